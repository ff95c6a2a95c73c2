"""The attention forward kernel (online softmax over key blocks) and the kernel that writes the dropout mask."""

import triton
import triton.language as tl

from .shared import (
    DOT_PRECISION,
    LOG2_E,
    attention_kernel,
    dropout_keep,
    head_slice,
    keys_seen_by_query_block,
    load_tile,
    qkv_of_head,
    store_tile,
)


@triton.jit
def _forward_inner(
    acc, l_i, m_i, q,
    K, V, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, seed, bh, dropout_p, qk_scale,
    lo, hi, N_Q, N_K,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
):
    """Online softmax over key blocks [lo, hi) for one block of queries. MASKED blocks apply the causal mask and
    the sequence tail; the others are known to be fully visible and skip both."""
    offs_n0 = tl.arange(0, BLOCK_N)
    dropout_scale = 1.0 / (1.0 - dropout_p)  # kept probabilities are scaled up so the expectation is unchanged
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = load_tile(K, offs_n, N_K, stride_kn, offs_d, stride_kd, HEAD_DIM)
        # s = q k^T * scale * log2(e): scores in the log2 domain so exp2 can be used
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            visible = offs_n[None, :] < N_K
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + (N_K - N_Q))
            s = tl.where(visible, s, float("-inf"))
        # m_new = max(m_old, rowmax(s)); a row that has seen no key yet keeps m = -inf, so exponentiate against 0
        # instead to get 0 rather than exp2(-inf - -inf) = NaN
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
            keep = dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], N_K, dropout_p)
            p = tl.where(keep, p * dropout_scale, 0.0)
        # acc = alpha * acc + p v
        v = load_tile(V, offs_n, N_K, stride_vn, offs_d, stride_vd, HEAD_DIM)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@attention_kernel
def attention_forward_kernel(
    Q, K, V, O, LSE: "*fp32",
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H: tl.int32, N_Q: tl.int32, N_K: tl.int32, scale: tl.float32, dropout_p: tl.float32, seed: tl.int32,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Attention forward for one block of BLOCK_M queries of one (batch, head). Grid: (cdiv(Nq, BLOCK_M), B * H).

    Q:   (B, H, Nq, D) queries, fp16/bf16/fp32, any strides (stride_q*: batch, head, row, dim).
    K:   (B, H, Nk, D) keys, same dtype, any strides.
    V:   (B, H, Nk, D) values, same dtype, any strides.
    O:   (B, H, Nq, D) output, written here in the input dtype, any strides.
    LSE: (B, H, Nq) fp32, contiguous, written here: log2 of each row's softmax denominator in the log2-scaled
         domain, log2(sum_j 2^(s * log2(e) * q.k_j)); +inf for a row that sees no key.
    H:   number of heads; N_Q, N_K: sequence lengths of queries and keys/values.
    scale: the softmax scale s. dropout_p: drop probability. seed: the dropout seed.
    HEAD_DIM: the head size D; BLOCK_D: D padded to a power of two (>= 16).
    BLOCK_M, BLOCK_N: queries per program, keys per loop step.
    CAUSAL: query i sees keys j <= i + Nk - Nq. DROPOUT: apply dropout (dropout_p > 0).
    ALIGNED: every tensor's pointer is 16-byte aligned, its last stride 1 and its other strides multiples of
    16 bytes (operands_aligned).
    """
    bh = tl.program_id(1)
    Q, stride_qm, K, stride_kn, V, stride_vn = qkv_of_head(
        Q, K, V, bh, H, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
        stride_vn, ALIGNED)
    O, stride_om = head_slice(O, bh, H, stride_ob, stride_oh, stride_om, ALIGNED)
    start_m = tl.program_id(0) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    # Running row max m, denominator l and unnormalised output acc, all fp32.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = scale * LOG2_E  # log2(e) folded into the scale
    q = load_tile(Q, offs_m, N_Q, stride_qm, offs_d, stride_qd, HEAD_DIM)

    # Two passes over the keys this block sees: the blocks every row sees whole (no mask), then the diagonal
    # and the tail (masked).
    full_end, end = keys_seen_by_query_block(start_m, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    for masked in tl.static_range(2):
        if masked:
            lo, hi = full_end, end
        else:
            lo, hi = 0, full_end
        acc, l_i, m_i = _forward_inner(
            acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
            offs_m, offs_d, seed, bh, dropout_p, qk_scale, lo, hi, N_Q, N_K,
            HEAD_DIM, BLOCK_N, masked == 1, CAUSAL, DROPOUT,
        )

    # out = acc / l; a row that saw no key has l = 0 and acc = 0: its output is 0 and its LSE +inf, so the
    # backward recomputes P = 2^(s - LSE) = 0 for it
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + bh * N_Q + offs_m, lse, mask=offs_m < N_Q)
    store_tile(O, out, offs_m, N_Q, stride_om, offs_d, stride_od, HEAD_DIM)


@triton.jit(do_not_specialize=["seed"])
def dropout_mask_kernel(
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
    keep = dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], N_K, dropout_p)
    ptrs = MASK + (bh * N_Q + offs_m[:, None]).to(tl.int64) * N_K + offs_n[None, :]
    tl.store(ptrs, keep, mask=(offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K))
