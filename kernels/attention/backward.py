"""The attention backward kernels: delta = rowsum(dO * O), then dK and dV per key block, then dQ per query block.
Each program owns the rows it writes: no atomics, deterministic."""

import triton
import triton.language as tl

from .shared import (
    DOT_PRECISION,
    LOG2_E,
    attention_kernel,
    dropout_keep,
    fresh_each_step,
    head_slice,
    keys_seen_by_query_block,
    load_tile,
    qkv_of_head,
    queries_seeing_key_block,
    store_tile,
)


@attention_kernel
def attention_backward_preprocess_kernel(
    O, DO, DELTA: "*fp32",
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H: tl.int32, N_Q: tl.int32,
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
    O, stride_om = head_slice(O, bh, H, stride_ob, stride_oh, stride_om, ALIGNED)
    DO, stride_dom = head_slice(DO, bh, H, stride_dob, stride_doh, stride_dom, ALIGNED)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_tile(O, offs_m, N_Q, stride_om, offs_d, stride_od, HEAD_DIM)
    do = load_tile(DO, offs_m, N_Q, stride_dom, offs_d, stride_dod, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _backward_dkdv_inner(
    dk, dv, k, v,
    Q, DO, stride_qm, stride_qd, stride_dom, stride_dod, LSE, DELTA,
    offs_n, offs_d, seed, bh, dropout_p, qk_scale,
    lo, hi, N_Q, N_K,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr, DROPOUT: tl.constexpr, COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr,
):
    """Accumulate dK and/or dV of one key block over query blocks [lo, hi). Works on transposed tiles (keys x
    queries) so the accumulations are plain matrix products. MASKED applies the causal mask; rows past Nq read
    q = dO = 0 and LSE = +inf, so they add nothing even unmasked."""
    offs_m0 = tl.arange(0, BLOCK_M)
    dropout_scale = 1.0 / (1.0 - dropout_p)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q = load_tile(Q, offs_m, N_Q, stride_qm, offs_d, stride_qd, HEAD_DIM)
        lse = tl.load(LSE + offs_m, mask=offs_m < N_Q, other=float("inf"))
        # P^T = 2^(s^T - LSE): the forward's probabilities, recomputed
        s_t = tl.dot(fresh_each_step(k, start_m), tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + (N_K - N_Q), p_t, 0.0)
        do = load_tile(DO, offs_m, N_Q, stride_dom, offs_d, stride_dod, HEAD_DIM)
        if DROPOUT:
            keep = dropout_keep(seed, bh, offs_m[None, :], offs_n[:, None], N_K, dropout_p)
        if COMPUTE_DV:
            # dV += P_dropped^T dO
            p_dropped_t = p_t
            if DROPOUT:
                p_dropped_t = tl.where(keep, p_t * dropout_scale, 0.0)
            dv = tl.dot(p_dropped_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if COMPUTE_DK:
            # dP^T = V dO^T, the gradient of the dropped probabilities
            dp_t = tl.dot(fresh_each_step(v, start_m), tl.trans(do), input_precision=DOT_PRECISION)
            if DROPOUT:
                dp_t = tl.where(keep, dp_t * dropout_scale, 0.0)
            # dS^T = P^T * (dP^T - delta); dK += dS^T Q (times the scale, applied once at the end)
            delta = tl.load(DELTA + offs_m, mask=offs_m < N_Q, other=0.0)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@attention_kernel
def attention_backward_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE: "*fp32", DELTA: "*fp32",
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H: tl.int32, N_Q: tl.int32, N_K: tl.int32, scale: tl.float32, dropout_p: tl.float32, seed: tl.int32,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """dK and/or dV for one block of BLOCK_N keys of one (batch, head), looping over query blocks of BLOCK_M.
    Grid: (cdiv(Nk, BLOCK_N), B * H). Each program owns its rows of dK, dV: no atomics, deterministic.

    Q, K, V: forward inputs as in the forward kernel. DO: (B, H, Nq, D) gradient of the output, any strides.
    DK, DV: (B, H, Nk, D) gradients, written here in the input dtype, any strides.
    LSE: (B, H, Nq) fp32 from the forward. DELTA: (B, H, Nq) fp32 from the preprocess kernel.
    COMPUTE_DK, COMPUTE_DV: which of the two to compute and write (both, or one per launch where the two fp32
    accumulators do not fit in registers together).
    The remaining arguments mean what they mean in the forward kernel.
    """
    bh = tl.program_id(1)
    Q, stride_qm, K, stride_kn, V, stride_vn = qkv_of_head(
        Q, K, V, bh, H, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
        stride_vn, ALIGNED)
    DO, stride_dom = head_slice(DO, bh, H, stride_dob, stride_doh, stride_dom, ALIGNED)
    DK, stride_dkn = head_slice(DK, bh, H, stride_dkb, stride_dkh, stride_dkn, ALIGNED)
    DV, stride_dvn = head_slice(DV, bh, H, stride_dvb, stride_dvh, stride_dvn, ALIGNED)
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_tile(K, offs_n, N_K, stride_kn, offs_d, stride_kd, HEAD_DIM)
    v = load_tile(V, offs_n, N_K, stride_vn, offs_d, stride_vd, HEAD_DIM)
    LSE += bh * N_Q
    DELTA += bh * N_Q
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = scale * LOG2_E

    # Two passes over the queries that see this key block: the diagonal (masked), then those that see it whole.
    start, full_start = queries_seeing_key_block(start_n, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    for whole in tl.static_range(2):
        if whole:
            lo, hi = full_start, N_Q
        else:
            lo, hi = start, full_start
        dk, dv = _backward_dkdv_inner(
            dk, dv, k, v, Q, DO, stride_qm, stride_qd, stride_dom, stride_dod, LSE, DELTA,
            offs_n, offs_d, seed, bh, dropout_p, qk_scale, lo, hi, N_Q, N_K,
            HEAD_DIM, BLOCK_M, whole == 0, DROPOUT, COMPUTE_DK, COMPUTE_DV,
        )

    if COMPUTE_DK:
        # dK = scale * sum_i dS_ij q_i: the scale of S = scale * Q K^T, applied once
        store_tile(DK, dk * scale, offs_n, N_K, stride_dkn, offs_d, stride_dkd, HEAD_DIM)
    if COMPUTE_DV:
        store_tile(DV, dv, offs_n, N_K, stride_dvn, offs_d, stride_dvd, HEAD_DIM)


@triton.jit
def _backward_dq_inner(
    dq, q, do, lse, delta,
    K, V, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, seed, bh, dropout_p, qk_scale,
    lo, hi, N_Q, N_K,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
):
    """Accumulate dQ of one query block over key blocks [lo, hi). MASKED applies the causal mask and the key
    tail (dQ sums over keys, so padded keys must contribute exactly 0)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    dropout_scale = 1.0 / (1.0 - dropout_p)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = load_tile(K, offs_n, N_K, stride_kn, offs_d, stride_kd, HEAD_DIM)
        v = load_tile(V, offs_n, N_K, stride_vn, offs_d, stride_vd, HEAD_DIM)
        # P = 2^(s - LSE), recomputed
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            visible = offs_n[None, :] < N_K
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + (N_K - N_Q))
            p = tl.where(visible, p, 0.0)
        # dP = dO V^T, through the dropout mask
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], N_K, dropout_p)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        # dS = P * (dP - delta); dQ += dS K (times the scale, applied once at the end)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@attention_kernel
def attention_backward_dq_kernel(
    Q, K, V, DO, DQ, LSE: "*fp32", DELTA: "*fp32",
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H: tl.int32, N_Q: tl.int32, N_K: tl.int32, scale: tl.float32, dropout_p: tl.float32, seed: tl.int32,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, ALIGNED: tl.constexpr,
):
    """dQ for one block of BLOCK_M queries of one (batch, head), looping over key blocks of BLOCK_N.
    Grid: (cdiv(Nq, BLOCK_M), B * H). Each program owns its rows of dQ: deterministic.

    DQ: (B, H, Nq, D) gradient of the queries, written here in the input dtype, any strides.
    The remaining arguments mean what they mean in the dK/dV kernel.
    """
    bh = tl.program_id(1)
    Q, stride_qm, K, stride_kn, V, stride_vn = qkv_of_head(
        Q, K, V, bh, H, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
        stride_vn, ALIGNED)
    DO, stride_dom = head_slice(DO, bh, H, stride_dob, stride_doh, stride_dom, ALIGNED)
    DQ, stride_dqm = head_slice(DQ, bh, H, stride_dqb, stride_dqh, stride_dqm, ALIGNED)
    start_m = tl.program_id(0) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(Q, offs_m, N_Q, stride_qm, offs_d, stride_qd, HEAD_DIM)
    do = load_tile(DO, offs_m, N_Q, stride_dom, offs_d, stride_dod, HEAD_DIM)
    lse = tl.load(LSE + bh * N_Q + offs_m, mask=offs_m < N_Q, other=float("inf"))
    delta = tl.load(DELTA + bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = scale * LOG2_E

    # The same two passes over the keys as the forward: unmasked whole blocks, then the diagonal and the tail.
    full_end, end = keys_seen_by_query_block(start_m, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    for masked in tl.static_range(2):
        if masked:
            lo, hi = full_end, end
        else:
            lo, hi = 0, full_end
        dq = _backward_dq_inner(
            dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
            offs_m, offs_d, seed, bh, dropout_p, qk_scale, lo, hi, N_Q, N_K,
            HEAD_DIM, BLOCK_N, masked == 1, CAUSAL, DROPOUT,
        )

    # dQ = scale * sum_j dS_ij k_j
    store_tile(DQ, dq * scale, offs_m, N_Q, stride_dqm, offs_d, stride_dqd, HEAD_DIM)
