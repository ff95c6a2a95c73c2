"""Fused scaled-dot-product attention, FlashAttention-2 style: Triton forward and backward kernels,
the launcher that picks block sizes per GPU and head size, and the autograd.Function behind
`kernels.attention`.

What is computed, per batch b and head h (s = scale, default D^-0.5):

    S = s * Q K^T                      (Nq, Nk) scores
    S[i, j] = -inf where j > i + Nk - Nq     (causal=True: the mask is aligned bottom-right)
    P = softmax(S, dim=-1)             rows that see no key at all (Nq > Nk) get P = 0, so out = 0
    P = P * keep / (1 - dropout_p)     keep ~ Bernoulli(1 - dropout_p), drawn inside the kernel
    out = P V                          (Nq, D)

Nothing of size Nq x Nk is ever stored: the forward keeps the output and one log-sum-exp per query
row; the backward recomputes P from it and regenerates the dropout mask from (seed, position).

Dropout randomness: Philox (`tl.rand`) with key (seed, batch * H + head) and counter
query_row * Nk + key_col, so every (batch, head, row, col) has its own stream position and the
forward, both backward kernels and `attention_dropout_mask` agree on the mask. The seed is drawn
from torch's default (CPU) generator when not given, so `torch.manual_seed` reproduces a call.
"""

import inspect
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._library import NAMESPACE
from ._validate import check_runnable, check_same_device_and_dtype, check_tensor

MAX_HEAD_SIZE = 256
# log2(e): exp(x) = exp2(x * log2(e)); the kernels fold it into the softmax scale to use exp2.
LOG2_E = tl.constexpr(1.4426950408889634)
# Every tl.dot multiplies in true fp32 for fp32 inputs (it would otherwise round them to TF32 on the
# GPU); 16-bit inputs are multiplied exactly either way.
DOT_PRECISION = tl.constexpr("ieee")


# --------------------------------------------------------------------------------------------------
# Shared pieces of the kernels
# --------------------------------------------------------------------------------------------------


def _attention_kernel(fn):
    """triton.jit for the attention kernels. Triton's JIT compiles a variant per pattern of its integer
    arguments (equal to 1, divisible by 16, or neither); these kernels opt out for the sizes and for the
    strides' divisibility, so what a GPU runs is exactly one of the two variants the compile report checks
    per tile: ALIGNED (strides marked inside the kernel, see _head_slice) or not. A unit stride still
    becomes a constant. The seed changes every call and is never specialised."""
    names = inspect.signature(fn).parameters
    return triton.jit(fn, do_not_specialize=[name for name in ("seed", "H", "N_Q", "N_K") if name in names],
                      do_not_specialize_on_alignment=[name for name in names if name.startswith("stride_")])


@triton.jit
def _dropout_keep(seed, bh, query_idx, key_idx, N_K, dropout_p):
    """The dropout keep-mask of one tile, shared by every kernel that needs it.

    seed:      i32 scalar, the call's seed.
    bh:        i32 scalar, batch * H + head.
    query_idx: query row indices, broadcastable against key_idx (e.g. rows[:, None] or rows[None, :]).
    key_idx:   key column indices.
    N_K:       number of keys (the row length of the virtual (Nq, Nk) mask).
    dropout_p: fp32 probability of dropping.
    Returns a boolean tile: True where the probability is kept.
    """
    # Philox key = (seed, bh) keeps heads independent; the counter row * Nk + col is unique inside a head.
    philox_key = seed.to(tl.uint64) + (bh.to(tl.uint64) << 32)
    return tl.rand(philox_key, query_idx * N_K + key_idx) >= dropout_p


@triton.jit
def _head_slice(X, bh, H, stride_b, stride_h, stride_row, ALIGNED: tl.constexpr):
    """The (batch, head) = divmod(bh, H) slice of X: its pointer, with 64-bit offsets (big tensors overflow
    i32), and its row stride.

    With ALIGNED (the launcher checked it), every stride is visibly a multiple of 16 bytes' worth of X's
    elements. The kernels opt out of the JIT's own marking (see _attention_kernel), which only knows
    divisibility by 16 elements: rows of e.g. 40 fp16 elements are 16-byte aligned too, and marked here they
    are loaded in 16-byte vectors and pipelined like any aligned rows. (stride // m) * m equals the stride and
    lets the compiler see its divisibility; tl.multiple_of cannot mark an argument."""
    if ALIGNED:
        elements: tl.constexpr = 128 // X.dtype.element_ty.primitive_bitwidth
        stride_b = stride_b // elements * elements
        stride_h = stride_h // elements * elements
        stride_row = stride_row // elements * elements
    return X + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h, stride_row


@triton.jit
def _load_tile(X, rows, n_rows, stride_row, cols, stride_col, HEAD_DIM: tl.constexpr):
    """Load the (rows, cols) tile of a (n_rows, HEAD_DIM) matrix at X, zeros past the sequence end and in
    the head-size padding. Pointers are formed from 32-bit offsets at each load, so no tile of 64-bit
    pointers stays live across a loop."""
    ptrs = X + rows[:, None] * stride_row + cols[None, :] * stride_col
    return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _store_tile(X, values, rows, n_rows, stride_row, cols, stride_col, HEAD_DIM: tl.constexpr):
    """Store a (rows, cols) tile into a (n_rows, HEAD_DIM) matrix at X, in X's dtype, skipping the padding."""
    ptrs = X + rows[:, None] * stride_row + cols[None, :] * stride_col
    tl.store(ptrs, values.to(X.dtype.element_ty), mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM))


@triton.jit
def _fresh_each_step(x, step):
    """x, for a loop over `step`. fp32 products run without tensor cores, and the compiler would convert a
    loop-invariant fp32 operand to the product's layout once, before the loop: replicated across threads,
    that takes hundreds of registers per thread at head size 256. A loop-dependent zero moves the conversion
    into the loop. 16-bit tiles (tensor-core operands, compact) are returned unchanged."""
    if x.dtype == tl.float32:
        x = x + 0.0 * step
    return x


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _forward_inner(
    acc, l_i, m_i, q,
    K, V, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, seed, bh, dropout_p, qk_scale,
    lo, hi, N_K, causal_offset,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
):
    """Online softmax over key blocks [lo, hi) for one block of queries. MASKED blocks apply the causal
    mask and the sequence tail; the others are known to be fully visible and skip both."""
    offs_n0 = tl.arange(0, BLOCK_N)
    dropout_scale = 1.0 / (1.0 - dropout_p)  # kept probabilities are scaled up so the expectation is unchanged
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(K, offs_n, N_K, stride_kn, offs_d, stride_kd, HEAD_DIM)
        # s = q k^T * scale * log2(e): scores in the log2 domain so exp2 can be used
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            visible = offs_n[None, :] < N_K
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
            s = tl.where(visible, s, float("-inf"))
        # m_new = max(m_old, rowmax(s)); a row that has seen no key yet keeps m = -inf, so
        # exponentiate against 0 instead to get 0 rather than exp2(-inf - -inf) = NaN
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_ref = m_new
        # p = 2^(s - m_new); alpha = 2^(m_old - m_new) rescales what was accumulated so far
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        # l = alpha * l + rowsum(p): the softmax denominator sees every probability, dropped or not
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], N_K, dropout_p)
            p = tl.where(keep, p * dropout_scale, 0.0)
        # acc = alpha * acc + p v
        v = _load_tile(V, offs_n, N_K, stride_vn, offs_d, stride_vd, HEAD_DIM)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@_attention_kernel
def _attention_forward_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, N_Q, N_K, scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Attention forward for one block of BLOCK_M queries of one (batch, head). Grid: (cdiv(Nq, BLOCK_M), B * H).

    Q:   (B, H, Nq, D) queries, fp16/bf16/fp32, any strides (stride_q*: batch, head, row, dim).
    K:   (B, H, Nk, D) keys, same dtype, any strides.
    V:   (B, H, Nk, D) values, same dtype, any strides.
    O:   (B, H, Nq, D) output, written here in the input dtype, any strides.
    LSE: (B, H, Nq) fp32, contiguous, written here: log2 of each row's softmax denominator in the
         log2-scaled domain, log2(sum_j 2^(s * log2(e) * q.k_j)); +inf for a row that sees no key.
    H:   number of heads; N_Q, N_K: sequence lengths of queries and keys/values.
    scale: fp32 softmax scale s. dropout_p: fp32 drop probability. seed: i32 dropout seed.
    HEAD_DIM: the head size D; BLOCK_D: D padded to a power of two (>= 16).
    BLOCK_M, BLOCK_N: queries per program, keys per loop step.
    CAUSAL: query i sees keys j <= i + Nk - Nq. DROPOUT: apply dropout (dropout_p > 0).
    ALIGNED: every tensor's pointer is 16-byte aligned, its last stride 1 and its other strides multiples of
    16 bytes (see _head_slice).
    """
    bh = tl.program_id(1)
    Q, stride_qm = _head_slice(Q, bh, H, stride_qb, stride_qh, stride_qm, ALIGNED)
    K, stride_kn = _head_slice(K, bh, H, stride_kb, stride_kh, stride_kn, ALIGNED)
    V, stride_vn = _head_slice(V, bh, H, stride_vb, stride_vh, stride_vn, ALIGNED)
    O, stride_om = _head_slice(O, bh, H, stride_ob, stride_oh, stride_om, ALIGNED)
    start_m = tl.program_id(0) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    # Running row max m, denominator l and unnormalised output acc, all fp32.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = scale * LOG2_E  # log2(e) folded into the scale
    q = _load_tile(Q, offs_m, N_Q, stride_qm, offs_d, stride_qd, HEAD_DIM)

    # Key range of this block: [0, full_end) is seen by every row (no mask); [full_end, hi) holds the
    # diagonal block(s) and the key tail (masked). A causal program stops at its diagonal.
    causal_offset = N_K - N_Q
    if CAUSAL:
        full_end = tl.minimum(tl.maximum(start_m + causal_offset + 1, 0), N_K) // BLOCK_N * BLOCK_N
        hi = tl.minimum(tl.maximum(tl.minimum(start_m + BLOCK_M, N_Q) + causal_offset, 0), N_K)
    else:
        full_end = N_K // BLOCK_N * BLOCK_N
        hi = N_K
    acc, l_i, m_i = _forward_inner(
        acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, seed, bh, dropout_p, qk_scale, 0, full_end, N_K, causal_offset,
        HEAD_DIM, BLOCK_N, False, CAUSAL, DROPOUT,
    )
    acc, l_i, m_i = _forward_inner(
        acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, seed, bh, dropout_p, qk_scale, full_end, hi, N_K, causal_offset,
        HEAD_DIM, BLOCK_N, True, CAUSAL, DROPOUT,
    )

    # out = acc / l; a row that saw no key has l = 0 and acc = 0: its output is 0 and its
    # LSE +inf, so the backward recomputes P = 2^(s - LSE) = 0 for it
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + bh * N_Q + offs_m, lse, mask=offs_m < N_Q)
    _store_tile(O, out, offs_m, N_Q, stride_om, offs_d, stride_od, HEAD_DIM)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------


@_attention_kernel
def _attention_backward_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, ALIGNED: tl.constexpr,
):
    """delta = rowsum(dO * O), the term every row of dS = P * (dP - delta) subtracts.
    Grid: (cdiv(Nq, BLOCK_M), B * H).

    O:     (B, H, Nq, D) forward output, any strides.   DO: (B, H, Nq, D) its gradient, any strides.
    DELTA: (B, H, Nq) fp32, contiguous, written here.
    H: number of heads; N_Q: number of queries; HEAD_DIM, BLOCK_D: head size and its power-of-two padding.
    BLOCK_M: rows per program. ALIGNED: as in the forward kernel.
    """
    bh = tl.program_id(1)
    O, stride_om = _head_slice(O, bh, H, stride_ob, stride_oh, stride_om, ALIGNED)
    DO, stride_dom = _head_slice(DO, bh, H, stride_dob, stride_doh, stride_dom, ALIGNED)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O, offs_m, N_Q, stride_om, offs_d, stride_od, HEAD_DIM)
    do = _load_tile(DO, offs_m, N_Q, stride_dom, offs_d, stride_dod, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _backward_dkdv_inner(
    dk, dv, k, v,
    Q, DO, stride_qm, stride_qd, stride_dom, stride_dod, LSE, DELTA,
    offs_n, offs_d, seed, bh, dropout_p, qk_scale,
    lo, hi, N_Q, N_K, causal_offset,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr, DROPOUT: tl.constexpr, COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr,
):
    """Accumulate dK and/or dV of one key block over query blocks [lo, hi). Works on transposed tiles
    (keys x queries) so the accumulations are plain matrix products. MASKED applies the causal mask;
    rows past Nq read q = dO = 0 and LSE = +inf, so they add nothing even unmasked."""
    offs_m0 = tl.arange(0, BLOCK_M)
    dropout_scale = 1.0 / (1.0 - dropout_p)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_tile(Q, offs_m, N_Q, stride_qm, offs_d, stride_qd, HEAD_DIM)
        lse = tl.load(LSE + offs_m, mask=offs_m < N_Q, other=float("inf"))
        # P^T = 2^(s^T - LSE): the forward's probabilities, recomputed
        s_t = tl.dot(_fresh_each_step(k, start_m), tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_offset, p_t, 0.0)
        do = _load_tile(DO, offs_m, N_Q, stride_dom, offs_d, stride_dod, HEAD_DIM)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[None, :], offs_n[:, None], N_K, dropout_p)
        if COMPUTE_DV:
            # dV += P_dropped^T dO
            p_dropped_t = p_t
            if DROPOUT:
                p_dropped_t = tl.where(keep, p_t * dropout_scale, 0.0)
            dv = tl.dot(p_dropped_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if COMPUTE_DK:
            # dP^T = V dO^T, the gradient of the dropped probabilities
            dp_t = tl.dot(_fresh_each_step(v, start_m), tl.trans(do), input_precision=DOT_PRECISION)
            if DROPOUT:
                dp_t = tl.where(keep, dp_t * dropout_scale, 0.0)
            # dS^T = P^T * (dP^T - delta); dK += dS^T Q (times the scale, applied once at the end)
            delta = tl.load(DELTA + offs_m, mask=offs_m < N_Q, other=0.0)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@_attention_kernel
def _attention_backward_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, N_Q, N_K, scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """dK and/or dV for one block of BLOCK_N keys of one (batch, head), looping over query blocks of BLOCK_M.
    Grid: (cdiv(Nk, BLOCK_N), B * H). Each program owns its rows of dK, dV: no atomics, deterministic.

    Q, K, V: forward inputs as in the forward kernel. DO: (B, H, Nq, D) gradient of the output, any strides.
    DK, DV: (B, H, Nk, D) gradients, written here in the input dtype, any strides.
    LSE: (B, H, Nq) fp32 from the forward. DELTA: (B, H, Nq) fp32 from the preprocess kernel.
    COMPUTE_DK, COMPUTE_DV: which of the two to compute and write (both, or one per launch where the two
    fp32 accumulators do not fit in registers together).
    The remaining arguments mean what they mean in the forward kernel.
    """
    bh = tl.program_id(1)
    Q, stride_qm = _head_slice(Q, bh, H, stride_qb, stride_qh, stride_qm, ALIGNED)
    K, stride_kn = _head_slice(K, bh, H, stride_kb, stride_kh, stride_kn, ALIGNED)
    V, stride_vn = _head_slice(V, bh, H, stride_vb, stride_vh, stride_vn, ALIGNED)
    DO, stride_dom = _head_slice(DO, bh, H, stride_dob, stride_doh, stride_dom, ALIGNED)
    DK, stride_dkn = _head_slice(DK, bh, H, stride_dkb, stride_dkh, stride_dkn, ALIGNED)
    DV, stride_dvn = _head_slice(DV, bh, H, stride_dvb, stride_dvh, stride_dvn, ALIGNED)
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K, offs_n, N_K, stride_kn, offs_d, stride_kd, HEAD_DIM)
    v = _load_tile(V, offs_n, N_K, stride_vn, offs_d, stride_vd, HEAD_DIM)
    LSE += bh * N_Q
    DELTA += bh * N_Q
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = scale * LOG2_E

    # Query range: a causal key block is first seen by query start_n - (Nk - Nq); queries from
    # full_start on see the whole block (no mask), those in [lo, full_start) hold the diagonal (masked).
    causal_offset = N_K - N_Q
    if CAUSAL:
        lo = tl.minimum(tl.maximum(start_n - causal_offset, 0), N_Q) // BLOCK_M * BLOCK_M
        full_start = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), N_Q)
        full_start = tl.cdiv(full_start, BLOCK_M) * BLOCK_M
    else:
        lo = 0
        full_start = 0
    dk, dv = _backward_dkdv_inner(
        dk, dv, k, v, Q, DO, stride_qm, stride_qd, stride_dom, stride_dod, LSE, DELTA,
        offs_n, offs_d, seed, bh, dropout_p, qk_scale, lo, full_start, N_Q, N_K, causal_offset,
        HEAD_DIM, BLOCK_M, True, DROPOUT, COMPUTE_DK, COMPUTE_DV,
    )
    dk, dv = _backward_dkdv_inner(
        dk, dv, k, v, Q, DO, stride_qm, stride_qd, stride_dom, stride_dod, LSE, DELTA,
        offs_n, offs_d, seed, bh, dropout_p, qk_scale, full_start, N_Q, N_Q, N_K, causal_offset,
        HEAD_DIM, BLOCK_M, False, DROPOUT, COMPUTE_DK, COMPUTE_DV,
    )

    if COMPUTE_DK:
        # dK = scale * sum_i dS_ij q_i: the scale of S = scale * Q K^T, applied once
        _store_tile(DK, dk * scale, offs_n, N_K, stride_dkn, offs_d, stride_dkd, HEAD_DIM)
    if COMPUTE_DV:
        _store_tile(DV, dv, offs_n, N_K, stride_dvn, offs_d, stride_dvd, HEAD_DIM)


@triton.jit
def _backward_dq_inner(
    dq, q, do, lse, delta,
    K, V, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, seed, bh, dropout_p, qk_scale,
    lo, hi, N_K, causal_offset,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
):
    """Accumulate dQ of one query block over key blocks [lo, hi). MASKED applies the causal mask and
    the key tail (dQ sums over keys, so padded keys must contribute exactly 0)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    dropout_scale = 1.0 / (1.0 - dropout_p)  # kept probabilities are scaled up so the expectation is unchanged
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(K, offs_n, N_K, stride_kn, offs_d, stride_kd, HEAD_DIM)
        v = _load_tile(V, offs_n, N_K, stride_vn, offs_d, stride_vd, HEAD_DIM)
        # P = 2^(s - LSE), recomputed
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            visible = offs_n[None, :] < N_K
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
            p = tl.where(visible, p, 0.0)
        # dP = dO V^T, through the dropout mask
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], N_K, dropout_p)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        # dS = P * (dP - delta); dQ += dS K (times the scale, applied once at the end)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@_attention_kernel
def _attention_backward_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, N_Q, N_K, scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, ALIGNED: tl.constexpr,
):
    """dQ for one block of BLOCK_M queries of one (batch, head), looping over key blocks of BLOCK_N.
    Grid: (cdiv(Nq, BLOCK_M), B * H). Each program owns its rows of dQ: deterministic.

    DQ: (B, H, Nq, D) gradient of the queries, written here in the input dtype, any strides.
    The remaining arguments mean what they mean in the dK/dV kernel.
    """
    bh = tl.program_id(1)
    Q, stride_qm = _head_slice(Q, bh, H, stride_qb, stride_qh, stride_qm, ALIGNED)
    K, stride_kn = _head_slice(K, bh, H, stride_kb, stride_kh, stride_kn, ALIGNED)
    V, stride_vn = _head_slice(V, bh, H, stride_vb, stride_vh, stride_vn, ALIGNED)
    DO, stride_dom = _head_slice(DO, bh, H, stride_dob, stride_doh, stride_dom, ALIGNED)
    DQ, stride_dqm = _head_slice(DQ, bh, H, stride_dqb, stride_dqh, stride_dqm, ALIGNED)
    start_m = tl.program_id(0) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q, offs_m, N_Q, stride_qm, offs_d, stride_qd, HEAD_DIM)
    do = _load_tile(DO, offs_m, N_Q, stride_dom, offs_d, stride_dod, HEAD_DIM)
    lse = tl.load(LSE + bh * N_Q + offs_m, mask=offs_m < N_Q, other=float("inf"))
    delta = tl.load(DELTA + bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = scale * LOG2_E

    # The same key ranges as the forward: unmasked [0, full_end), masked [full_end, hi).
    causal_offset = N_K - N_Q
    if CAUSAL:
        full_end = tl.minimum(tl.maximum(start_m + causal_offset + 1, 0), N_K) // BLOCK_N * BLOCK_N
        hi = tl.minimum(tl.maximum(tl.minimum(start_m + BLOCK_M, N_Q) + causal_offset, 0), N_K)
    else:
        full_end = N_K // BLOCK_N * BLOCK_N
        hi = N_K
    dq = _backward_dq_inner(
        dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, seed, bh, dropout_p, qk_scale, 0, full_end, N_K, causal_offset,
        HEAD_DIM, BLOCK_N, False, CAUSAL, DROPOUT,
    )
    dq = _backward_dq_inner(
        dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, seed, bh, dropout_p, qk_scale, full_end, hi, N_K, causal_offset,
        HEAD_DIM, BLOCK_N, True, CAUSAL, DROPOUT,
    )

    # dQ = scale * sum_j dS_ij k_j
    dq = dq * scale
    _store_tile(DQ, dq, offs_m, N_Q, stride_dqm, offs_d, stride_dqd, HEAD_DIM)


# --------------------------------------------------------------------------------------------------
# The dropout mask, for tests and for anyone who wants to see what a call dropped
# --------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(
    MASK, H, N_Q, N_K, dropout_p, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Write the keep-mask the attention kernels use. Grid: (cdiv(Nq, BLOCK_M), cdiv(Nk, BLOCK_N), B * H).

    MASK: (B, H, Nq, Nk) bool, contiguous, written here (True = kept).
    H: heads; N_Q, N_K: sequence lengths; dropout_p: fp32; seed: i32; BLOCK_M x BLOCK_N: tile per program.
    """
    bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], N_K, dropout_p)
    ptrs = MASK + (bh * N_Q + offs_m[:, None]).to(tl.int64) * N_K + offs_n[None, :]
    tl.store(ptrs, keep, mask=(offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K))


# --------------------------------------------------------------------------------------------------
# Launch configurations: block sizes, warps and stages per GPU, dtype and padded head size
# --------------------------------------------------------------------------------------------------

# (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages) of the forward, dK/dV and dQ kernels, keyed by the
# input precision and BLOCK_D (the head size padded to a power of two). The dK/dV kernel holds BLOCK_N keys
# and streams BLOCK_M queries; the others hold BLOCK_M queries and stream BLOCK_N keys. At head size 256 dK
# and dV are computed by two launches, "dk" and "dv" (see _key_block_passes).
# Hopper first: 16-bit tiles whose matrix-product rows (BLOCK_M; BLOCK_N for dK/dV) are 64 or more with
# num_warps = 8, so tl.dot becomes wgmma on sm_90; the same tiles run mma.sync on Ampere. Each is the largest
# tile tried that compiles without register spills for sm_90 and sm_80, with aligned operands and without
# (ptxas -v; the committed bench/results/compile_report.md). fp32 is multiplied in true fp32 without tensor
# cores, whose operands are register-hungry: small tiles.
_CONFIGS = {
    "16bit": {
        16: {"forward": (128, 64, 8, 3), "dkdv": (32, 128, 8, 3), "dq": (128, 64, 8, 3)},
        32: {"forward": (128, 64, 8, 3), "dkdv": (32, 128, 8, 3), "dq": (128, 64, 8, 3)},
        64: {"forward": (128, 64, 8, 3), "dkdv": (16, 128, 8, 2), "dq": (128, 64, 8, 3)},
        128: {"forward": (128, 32, 8, 3), "dkdv": (32, 64, 8, 2), "dq": (64, 32, 8, 2)},
        256: {"forward": (32, 32, 4, 2), "dk": (16, 32, 8, 1), "dv": (16, 64, 8, 2), "dq": (32, 16, 8, 2)},
    },
    "fp32": {
        16: {"forward": (32, 32, 4, 1), "dkdv": (16, 32, 8, 1), "dq": (32, 32, 8, 1)},
        32: {"forward": (32, 32, 4, 1), "dkdv": (16, 32, 8, 1), "dq": (32, 32, 4, 1)},
        64: {"forward": (32, 16, 4, 1), "dkdv": (32, 16, 8, 1), "dq": (32, 32, 8, 1)},
        128: {"forward": (32, 16, 8, 1), "dkdv": (16, 16, 8, 1), "dq": (16, 16, 8, 1)},
        256: {"forward": (16, 16, 4, 1), "dk": (16, 16, 8, 1), "dv": (16, 16, 4, 1), "dq": (16, 32, 8, 1)},
    },
}
# Tiles that replace the table's for some launches, as ((precision, BLOCK_D, kernel, dropout, arch, aligned),
# tile); None in a key matches anything, and the first matching entry wins. `aligned`: every operand pointer
# 16-byte aligned, its last stride 1 and the others multiples of 16 bytes (_operands_aligned): loads are then
# vectorised and pipelined into shared memory asynchronously. Misaligned operands are loaded element by
# element through registers, which costs registers.
_TILE_OVERRIDES = [
    # Head size 256 on sm_90 with aligned operands: wgmma tiles of two warpgroups, each holding a 64 x 256
    # fp32 accumulator (128 registers per thread) against 16 or 32 streamed rows. Misaligned, every wgmma
    # tile tried spills (the streamed tiles pass through registers), so those launches keep the table's
    # mma.sync tiles.
    (("16bit", 256, "forward", None, 90, True), (128, 32, 8, 2)),
    (("16bit", 256, "dq", None, 90, True), (128, 16, 8, 2)),
    (("16bit", 256, "dk", None, 90, True), (32, 128, 8, 2)),
    (("16bit", 256, "dv", None, 90, True), (32, 128, 8, 2)),
    # Dropout's random numbers take registers; where the table's tile then spills, dropout runs a smaller one.
    # dK/dV at head size 128 on sm_90: 64 keys x 16 queries with 8 warps is wgmma without spills but spills
    # 36 B on sm_80, and every larger key tile spills on both.
    (("16bit", 128, "dkdv", True, 90, None), (16, 64, 8, 2)),
    (("16bit", 128, "dkdv", True, None, None), (32, 32, 4, 2)),
    (("16bit", 128, "dq", True, None, None), (128, 16, 8, 2)),
    (("16bit", 256, "dk", True, None, None), (16, 16, 8, 1)),
    (("fp32", 256, "dv", True, None, None), (16, 16, 8, 1)),
]
# GPUs older than Ampere have less shared memory: no software pipelining there. The CPU interpreter gets
# small blocks: its cost grows with the number of elements computed, masked or not.
_INTERPRETER_CONFIG = (32, 32, 1, 1)
# Which gradients each key-block launch computes: (COMPUTE_DK, COMPUTE_DV).
_COMPUTED_GRADIENTS = {"dkdv": (True, True), "dk": (True, False), "dv": (False, True)}


def _key_block_passes(block_d):
    """The launches of the dK/dV kernel: one computing both, or at head size 256 one for dK and one for dV,
    each recomputing P. Two (BLOCK_N x 256) fp32 accumulators do not fit in registers together: at the 64 key
    rows per warpgroup that wgmma needs they alone are 256 registers per thread, and smaller tiles starve the
    tensor cores. The split costs one more Q K^T product per key block (5 products instead of 4)."""
    return ("dk", "dv") if block_d > 128 else ("dkdv",)


def _preprocess_block_m(block_d):
    """Rows per program of the delta kernel: 8192 elements of O and of dO per 4 warps stay in registers."""
    return min(64, 8192 // block_d)


def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def _precision(dtype):
    return "fp32" if dtype == torch.float32 else "16bit"


def _table_config(kernel, head_dim, dtype, dropout, arch, aligned):
    """The tile `kernel` runs on `arch` (90 for sm_90; other archs get the general tiles, chosen for sm_80)."""
    precision, block_d = _precision(dtype), _block_d(head_dim)
    launch = (precision, block_d, kernel, dropout, arch, aligned)
    for key, tile in _TILE_OVERRIDES:
        if all(want is None or want == have for want, have in zip(key, launch)):
            return tile
    return _CONFIGS[precision][block_d][kernel]


def _operands_aligned(*tensors):
    """The kernels' ALIGNED and the tables' `aligned`: every tensor whose strides a launch passes has a 16-byte
    aligned pointer (which Triton's JIT marks), a unit last stride (which it makes a constant) and its other
    strides multiples of 16 bytes (which the kernels mark, see _head_slice). LSE and DELTA, allocated by
    the launchers and indexed without strides, are aligned by construction."""
    return all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1
               and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) for t in tensors)


def _launch_config(kernel, head_dim, dtype, dropout, device, aligned):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for `kernel` ("forward", "dkdv", "dk", "dv" or "dq") on
    `device`, for operands that are `aligned` (_operands_aligned) or not."""
    if device.type != "cuda":
        return _INTERPRETER_CONFIG
    major, minor = torch.cuda.get_device_capability(device)
    arch = major * 10 + minor
    block_m, block_n, num_warps, num_stages = _table_config(kernel, head_dim, dtype, dropout, arch, aligned)
    if major < 8:
        num_stages = 1
    return block_m, block_n, num_warps, num_stages


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _strides(t):
    return tuple(t.stride())


def _seed_value(seed):
    """The kernels' i32 seed from the operators' seed tensor (None when there is no dropout)."""
    return 0 if seed is None else int(seed.item())


def _allocate_forward_outputs(q, k):
    """out and lse of the forward, allocated the same way by the launch and by its fake implementation."""
    B, H, N_Q, D = q.shape
    # The output is laid out as (B, Nq, H, D) in memory, so the usual transpose(1, 2).reshape(B, Nq, H * D)
    # that merges heads is free.
    out = torch.empty((B, N_Q, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B, H, N_Q), device=q.device, dtype=torch.float32)
    return out, lse


@torch.library.custom_op(f"{NAMESPACE}::attention_forward", mutates_args=())
def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float, scale: float, seed: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel on validated inputs. Returns (out, lse); see the kernel for their meaning.
    `seed` (a one-element int64 CPU tensor, None without dropout) is an argument, so the call is a pure
    function of its arguments and torch.compile can treat it as an opaque operator."""
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    out, lse = _allocate_forward_outputs(q, k)
    aligned = _operands_aligned(q, k, v, out)
    block_m, block_n, num_warps, num_stages = _launch_config("forward", D, q.dtype, dropout_p > 0, q.device, aligned)
    grid = (triton.cdiv(N_Q, block_m), B * H)
    _attention_forward_kernel[grid](
        q, k, v, out, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        H, N_Q, N_K, scale, dropout_p, _seed_value(seed),
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, DROPOUT=dropout_p > 0, ALIGNED=aligned,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


@attention_forward.register_fake
def _(q, k, v, causal, dropout_p, scale, seed):
    return _allocate_forward_outputs(q, k)


@torch.library.custom_op(f"{NAMESPACE}::attention_backward", mutates_args=())
def attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    causal: bool, dropout_p: float, scale: float, seed: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the three backward kernels. Returns (dq, dk, dv) in the input dtype, laid out like q, k, v."""
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    block_d = _block_d(D)
    dropout = dropout_p > 0
    seed = _seed_value(seed)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    aligned = _operands_aligned(q, k, v, out, grad_out, dq, dk, dv)

    # 1. delta = rowsum(dO * O)
    delta = torch.empty((B, H, N_Q), device=q.device, dtype=torch.float32)
    preprocess_block_m = _preprocess_block_m(block_d) if q.is_cuda else _INTERPRETER_CONFIG[0]
    _attention_backward_preprocess_kernel[(triton.cdiv(N_Q, preprocess_block_m), B * H)](
        out, grad_out, delta, *_strides(out), *_strides(grad_out), H, N_Q,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=preprocess_block_m, ALIGNED=aligned,
    )

    # 2. dK, dV: one program per key block, in one launch or two (_key_block_passes)
    for kernel in _key_block_passes(block_d):
        compute_dk, compute_dv = _COMPUTED_GRADIENTS[kernel]
        block_m, block_n, num_warps, num_stages = _launch_config(kernel, D, q.dtype, dropout, q.device, aligned)
        _attention_backward_dkdv_kernel[(triton.cdiv(N_K, block_n), B * H)](
            q, k, v, grad_out, dk, dv, lse, delta,
            *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
            H, N_Q, N_K, scale, dropout_p, seed,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
            CAUSAL=causal, DROPOUT=dropout, COMPUTE_DK=compute_dk, COMPUTE_DV=compute_dv, ALIGNED=aligned,
            num_warps=num_warps, num_stages=num_stages,
        )

    # 3. dQ: one program per query block
    block_m, block_n, num_warps, num_stages = _launch_config("dq", D, q.dtype, dropout, q.device, aligned)
    _attention_backward_dq_kernel[(triton.cdiv(N_Q, block_m), B * H)](
        q, k, v, grad_out, dq, lse, delta,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq),
        H, N_Q, N_K, scale, dropout_p, seed,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, DROPOUT=dropout, ALIGNED=aligned,
        num_warps=num_warps, num_stages=num_stages,
    )
    return dq, dk, dv


@attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, causal, dropout_p, scale, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class AttentionFunction(torch.autograd.Function):
    """Autograd for attention, the one place its backward is defined: `attention` calls it, and the same
    setup_context and backward are registered on the `attention_forward` operator (torch.library), so a
    caller of the operator itself, opcheck and torch.compile all see the same formula.
    forward(q, k, v, causal, dropout_p, scale, seed): every argument explicit, the seed included, so the
    dropout mask is a function of the arguments and backward regenerates it."""

    @staticmethod
    def forward(q, k, v, causal, dropout_p, scale, seed):
        return attention_forward(q, k, v, causal, dropout_p, scale, seed)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, causal, dropout_p, scale, seed = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, seed)
        ctx.causal, ctx.dropout_p, ctx.scale = causal, dropout_p, scale
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, seed = ctx.saved_tensors
        dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, ctx.causal, ctx.dropout_p, ctx.scale, seed)
        return dq, dk, dv, None, None, None, None


torch.library.register_autograd(
    f"{NAMESPACE}::attention_forward", AttentionFunction.backward, setup_context=AttentionFunction.setup_context
)


@torch.library.custom_op(f"{NAMESPACE}::attention_dropout_seed", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def attention_dropout_seed() -> Tensor:
    """A dropout seed, a one-element int64 CPU tensor, drawn from torch's default CPU generator:
    `torch.manual_seed(s)` reproduces it, and drawing it costs no GPU synchronisation. An operator of its own,
    tagged as random, so torch.compile neither replaces it by its own random numbers nor recomputes it in the
    backward: compiled and eager calls draw the same seed."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)


@attention_dropout_seed.register_fake
def _():
    return torch.empty(1, dtype=torch.int64)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, dropout_p, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    check_same_device_and_dtype("q", q, k=k, v=v)
    check_runnable("q", q)
    (B, H, N_Q, D), (Bk, Hk, N_K, Dk), (Bv, Hv, N_V, Dv) = q.shape, k.shape, v.shape
    if not (B == Bk == Bv and H == Hk == Hv):
        raise ValueError(
            f"q, k, v must agree in batch and heads (dims 0 and 1), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if not D == Dk == Dv:
        raise ValueError(f"q, k, v must have the same head size (dim 3), got {D}, {Dk}, {Dv}")
    if N_K != N_V:
        raise ValueError(f"k and v must have the same sequence length (dim 2), got {N_K} and {N_V}")
    if D > MAX_HEAD_SIZE:
        raise ValueError(f"head size {D} is not supported; the largest is {MAX_HEAD_SIZE}")
    if min(B, H, N_Q, N_K, D) == 0:
        raise ValueError(f"q, k, v must not be empty, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and N_Q * N_K >= 2**31:
        raise ValueError(f"dropout needs Nq * Nk < 2**31 (its random stream is indexed per head), got {N_Q} x {N_K}")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number, got {scale}")


def _seed_tensor(dropout_p, seed):
    """The seed operand of the operators: None without dropout; else the given seed, or a fresh one drawn
    from torch's default CPU generator."""
    if dropout_p == 0:
        return None
    if seed is None:
        return attention_dropout_seed()
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    return torch.tensor([seed], dtype=torch.int64)


def attention(q, k, v, causal=True, dropout_p=0.0, scale=None, seed=None):
    """Scaled dot-product attention, fused: softmax(scale * q k^T [causal mask]) with dropout, times v.

    q: (B, H, Nq, D); k, v: (B, H, Nk, D); fp16, bf16 or fp32 on CUDA (or CPU under TRITON_INTERPRET=1);
    any strides; D up to 256. Returns (B, H, Nq, D) in the input dtype.
    causal: query i sees keys j <= i + Nk - Nq (bottom-right aligned; the lower triangle when Nq == Nk).
        A query that sees no key (Nq > Nk) outputs 0 and gets zero gradients.
    dropout_p: probability of dropping each attention weight (kept ones are scaled by 1 / (1 - dropout_p)).
    scale: the softmax scale, D ** -0.5 when None.
    seed: the dropout seed in [0, 2**31); when None (and dropout_p > 0) it is drawn from torch's default CPU
        generator, so `torch.manual_seed` makes the call reproducible. `attention_dropout_mask` returns the mask.
    """
    _check_inputs(q, k, v, dropout_p, scale)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    seed = _seed_tensor(dropout_p, seed)
    out, _ = AttentionFunction.apply(q, k, v, bool(causal), float(dropout_p), float(scale), seed)
    return out


def attention_dropout_mask(q, k, dropout_p, seed=None):
    """The boolean keep-mask (B, H, Nq, Nk) that `attention(q, k, ..., dropout_p=dropout_p, seed=seed)` uses.

    With seed=None the seed is drawn from torch's generator exactly as `attention` draws it, so
        torch.manual_seed(s); out = attention(q, k, v, dropout_p=p)
        torch.manual_seed(s); keep = attention_dropout_mask(q, k, p)
    gives the mask of that call. Meant for tests and inspection: it materialises Nq x Nk per head.
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_same_device_and_dtype("q", q, k=k)
    check_runnable("q", q)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    B, H, N_Q, _ = q.shape
    N_K = k.shape[2]
    seed = _seed_value(_seed_tensor(dropout_p, seed))
    mask = torch.empty((B, H, N_Q, N_K), device=q.device, dtype=torch.bool)
    block = 64 if q.is_cuda else 32
    grid = (triton.cdiv(N_Q, block), triton.cdiv(N_K, block), B * H)
    _dropout_mask_kernel[grid](mask, H, N_Q, N_K, float(dropout_p), seed, BLOCK_M=block, BLOCK_N=block)
    return mask


# --------------------------------------------------------------------------------------------------
# Shipped configurations, for the compile report
# --------------------------------------------------------------------------------------------------

_POINTER_TYPE = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_SHIPPED_KERNELS = {
    "preprocess": _attention_backward_preprocess_kernel,
    "forward": _attention_forward_kernel,
    "dkdv": _attention_backward_dkdv_kernel,
    "dk": _attention_backward_dkdv_kernel,
    "dv": _attention_backward_dkdv_kernel,
    "dq": _attention_backward_dq_kernel,
}


def _argument_type(name, pointer):
    if name.startswith("stride_"):
        return "i32"
    if name in ("LSE", "DELTA"):
        return "*fp32"
    if name in ("H", "N_Q", "N_K", "seed"):
        return "i32"
    if name in ("scale", "dropout_p"):
        return "fp32"
    return pointer  # Q, K, V, O, DO, DQ, DK, DV


def _kernel_entry(kernel_name, dtype, head_dim, causal, dropout, tile, aligned):
    """One shipped_kernel_configs() entry: the kernel, its signature and constexprs for this case, tile
    (BLOCK_M, BLOCK_N, num_warps, num_stages; None for the preprocess kernel) and operand alignment."""
    kernel = _SHIPPED_KERNELS[kernel_name]
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim), "ALIGNED": aligned}
    if kernel_name == "preprocess":
        constexprs["BLOCK_M"] = _preprocess_block_m(_block_d(head_dim))
        num_warps, num_stages = 4, 1
    else:
        block_m, block_n, num_warps, num_stages = tile
        constexprs.update(BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, DROPOUT=dropout)
    if kernel_name in _COMPUTED_GRADIENTS:
        constexprs["COMPUTE_DK"], constexprs["COMPUTE_DV"] = _COMPUTED_GRADIENTS[kernel_name]
    # The last dimension is contiguous in every realistic call and Triton's JIT specialises a stride of 1
    # into a constant, so the report compiles what the GPU runs: the dim strides (stride_*d) are constexpr 1.
    for name in kernel.arg_names:
        if name.startswith("stride_") and name.endswith("d"):
            constexprs[name] = 1
    signature = {
        name: "constexpr" if name in constexprs else _argument_type(name, _POINTER_TYPE[dtype])
        for name in kernel.arg_names
    }
    dtype_name = str(dtype).replace("torch.", "")
    flags = "" if kernel_name == "preprocess" else f"{'_causal' if causal else ''}{'_dropout' if dropout else ''}"
    tile_name = "" if tile is None else f"_{tile[0]}x{tile[1]}"
    operands = "aligned" if aligned else "any"
    return {
        "name": f"attention_{kernel_name}{flags}_{dtype_name}_d{head_dim}{tile_name}_{operands}",
        "kernel": kernel,
        "signature": signature,
        "constexprs": constexprs,
        "num_warps": num_warps,
        "num_stages": num_stages,
    }


def shipped_kernel_configs():
    """Every launch the table above can make on sm_90 and sm_80, with aligned operands and without: for each
    dtype and head-size class 16, 32, 64, 128, 256, the forward, dK/dV (or dK and dV) and dQ kernels, causal,
    with and without dropout (dropout's random numbers cost registers), plus the delta preprocess kernel. A
    padded head size (e.g. 48 -> 64) runs the tiles of its class with masked loads, so the classes stand for
    it. Each entry's "targets" lists the (arch, aligned) launches that run it; its name ends in the tile
    (BLOCK_M x BLOCK_N) and the operands' alignment."""
    entries = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for head_dim in (16, 32, 64, 128, 256):
            for aligned in (True, False):
                entry = _kernel_entry("preprocess", dtype, head_dim, False, False, None, aligned)
                entries.append(dict(entry, targets=((90, aligned), (80, aligned))))
                for kernel_name in ("forward", *_key_block_passes(_block_d(head_dim)), "dq"):
                    for dropout in (False, True):
                        archs_by_tile = {}
                        for arch in (90, 80):
                            tile = _table_config(kernel_name, head_dim, dtype, dropout, arch, aligned)
                            archs_by_tile.setdefault(tile, []).append(arch)
                        for tile, archs in archs_by_tile.items():
                            entry = _kernel_entry(kernel_name, dtype, head_dim, True, dropout, tile, aligned)
                            entries.append(dict(entry, targets=tuple((arch, aligned) for arch in archs)))
    return entries
