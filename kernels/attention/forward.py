"""The attention forward kernel (online softmax over key blocks, shared.online_softmax) and the kernel that writes
the dropout mask."""

import triton
import triton.language as tl

from .band import (
    DIAGONAL_ROWS,
    band_bounds,
    forward_edges_in_pieces,
    keys_seen_by_query_block,
    piece_edges,
    rows_of,
)
from .shared import (
    LOG2_E,
    attention_kernel,
    dropout_keep,
    load_tile,
    matrix_of,
    online_softmax,
    program_operands,
    row_statistics_of,
    store_tile,
)


@attention_kernel
def attention_forward_kernel(
    Q, K, V, O, LSE: "*fp32", SEED: "*i64", CU_SEQLENS_Q: "*i32", CU_SEQLENS_K: "*i32",
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    H: tl.int32, H_KV: tl.int32, N_Q: tl.int32, N_K: tl.int32, scale: tl.float32, dropout_p: tl.float32,
    window_left: tl.int32, window_right: tl.int32,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BOUNDED_LEFT: tl.constexpr, BOUNDED_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    ALIGNED: tl.constexpr, EVEN: tl.constexpr,
):
    """Attention forward for one block of BLOCK_M queries of one (batch, query head).
    Grid: (cdiv(N_Q, BLOCK_M) * B * H,), see program_coordinates; under a causal band (BOUNDED_RIGHT) the blocks
    that see the most keys run first.

    Q:   queries, fp16/bf16/fp32: (B, H, Nq, D), or packed (total_q, H, D) when VARLEN; last stride 1, the others
         any (stride_q*: batch, head, row; stride_qb is 0 when packed).
    K:   keys, same dtype: (B, H_KV, Nk, D), or packed (total_k, H_KV, D).
    V:   values, laid out like K.
    O:   output, laid out like Q, written here in the input dtype.
    LSE: fp32, written here: (B, H, Nq) (stride_lb, stride_lh; rows contiguous), or (H, total_q) when packed
         (stride_lb = 0): log2 of each row's softmax denominator in the log2-scaled domain,
         log2(sum_j 2^(s * log2(e) * q.k_j)); +inf for a row that sees no key.
    SEED: int64 (1,), the dropout seed; read only when DROPOUT.
    CU_SEQLENS_Q, CU_SEQLENS_K: int32 (B + 1,) cumulative sequence lengths; read only when VARLEN.
    H, H_KV: query heads and key/value heads (H a multiple of H_KV). N_Q, N_K: the sequence lengths (the longest
    when packed). scale: the softmax scale s. dropout_p: drop probability.
    window_left, window_right: the visible band's sides (see band.py), used only where bounded.
    HEAD_DIM: the head size D; BLOCK_D: D padded to a power of two (>= 16).
    BLOCK_M, BLOCK_N: queries per program, keys per loop step.
    BOUNDED_LEFT, BOUNDED_RIGHT: which sides of the band apply (causal bounds the right at 0).
    DROPOUT: apply dropout (dropout_p > 0). VARLEN: packed sequences.
    ALIGNED: every tensor's pointer is 16-byte aligned and its strides multiples of 16 bytes (operands_aligned).
    EVEN: dense, and N_Q and N_K are multiples of BLOCK_M and BLOCK_N: no block is partial, so the loads of the
    blocks seen whole have no bounds masks.
    """
    start_m, b, h, q_start, n_q, k_start, n_k, Q, stride_qm, K, stride_kn, V, stride_vn = program_operands(
        pid=tl.program_id(0), Q=Q, K=K, V=V, CU_SEQLENS_Q=CU_SEQLENS_Q, CU_SEQLENS_K=CU_SEQLENS_K, N_Q=N_Q, N_K=N_K,
        H=H, H_KV=H_KV, stride_qb=stride_qb, stride_qh=stride_qh, stride_qm=stride_qm, stride_kb=stride_kb,
        stride_kh=stride_kh, stride_kn=stride_kn, stride_vb=stride_vb, stride_vh=stride_vh, stride_vn=stride_vn,
        BLOCK=BLOCK_M, VARLEN=VARLEN, ALIGNED=ALIGNED, LONGEST_FIRST=BOUNDED_RIGHT)
    if start_m >= n_q:  # past this packed sequence's end
        return
    offs_d = tl.arange(0, BLOCK_D)
    O, stride_om = matrix_of(O, b, h, q_start, stride_ob, stride_oh, stride_om, ALIGNED)
    LSE = row_statistics_of(LSE, b, h, q_start, stride_lb, stride_lh)
    seed = tl.load(SEED) if DROPOUT else 0
    first, last = band_bounds(n_q, n_k, window_left, window_right)
    qk_scale = scale * LOG2_E  # log2(e) folded into the scale
    # The keys this block sees, in three ranges: the band's left edge (only with a left bound), the blocks every
    # row sees whole, the right edge (the causal diagonal; without a right bound the sequence's last partial block)
    lo, full_lo, full_hi, hi = keys_seen_by_query_block(
        start_m=start_m, n_q=n_q, n_k=n_k, first=first, last=last, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT)

    # The whole block over the keys every row sees: no mask, and with EVEN no bounds either. Running row max m,
    # denominator l and unnormalised output acc, all fp32.
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = load_tile(Q, offs_m, n_q, stride_qm, offs_d, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = online_softmax(
        acc, l_i, m_i, q, K, V, stride_kn=stride_kn, stride_vn=stride_vn, offs_m=offs_m, start_m=start_m,
        offs_d=offs_d, lo=full_lo, hi=full_hi, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASKED=False, EVEN=EVEN,
        seed=seed, bh=b * H + h, dropout_p=dropout_p, qk_scale=qk_scale, n_k=n_k, first=first, last=last,
        HEAD_DIM=HEAD_DIM, BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT, DROPOUT=DROPOUT)
    pieces: tl.constexpr = (BOUNDED_LEFT or BOUNDED_RIGHT) and forward_edges_in_pieces(BLOCK_D)
    if BOUNDED_LEFT and not pieces:  # the band's left edge, whole blocks masked
        acc, l_i, m_i = online_softmax(
            acc, l_i, m_i, q, K, V, stride_kn=stride_kn, stride_vn=stride_vn, offs_m=offs_m, start_m=start_m,
            offs_d=offs_d, lo=lo, hi=full_lo, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASKED=True,
            seed=seed, bh=b * H + h, dropout_p=dropout_p, qk_scale=qk_scale, n_k=n_k, first=first, last=last,
            HEAD_DIM=HEAD_DIM, BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT, DROPOUT=DROPOUT)
    if not (BOUNDED_RIGHT and pieces):  # the right edge whole (or the sequence's last partial block), masked
        acc, l_i, m_i = online_softmax(
            acc, l_i, m_i, q, K, V, stride_kn=stride_kn, stride_vn=stride_vn, offs_m=offs_m, start_m=start_m,
            offs_d=offs_d, lo=full_hi, hi=hi, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASKED=True,
            seed=seed, bh=b * H + h, dropout_p=dropout_p, qk_scale=qk_scale, n_k=n_k, first=first, last=last,
            HEAD_DIM=HEAD_DIM, BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT, DROPOUT=DROPOUT)
    if not pieces:
        _store_rows(O, LSE, acc, l_i, m_i, offs_m, n_q, stride_om, offs_d, HEAD_DIM)
    else:
        # The band's edges, piece by piece: DIAGONAL_ROWS rows at a time against their own edge keys, each piece
        # carrying its rows' running statistics (band.py)
        for piece in range(tl.cdiv(tl.minimum(n_q - start_m, BLOCK_M), DIAGONAL_ROWS)):  # none past the end
            piece_m = start_m + piece * DIAGONAL_ROWS
            rows = piece_m + tl.arange(0, DIAGONAL_ROWS)
            q_piece = load_tile(Q, rows, n_q, stride_qm, offs_d, HEAD_DIM)
            piece_lo, _, _, piece_hi = keys_seen_by_query_block(
                start_m=piece_m, n_q=n_q, n_k=n_k, first=first, last=last, BLOCK_M=DIAGONAL_ROWS,
                BLOCK_N=DIAGONAL_ROWS, BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT)
            before_lo, before_hi, after_lo, after_hi = piece_edges(piece_lo, piece_hi, full_lo, full_hi)
            acc_piece = rows_of(acc, piece * DIAGONAL_ROWS, DIAGONAL_ROWS)
            l_piece = rows_of(l_i, piece * DIAGONAL_ROWS, DIAGONAL_ROWS)
            m_piece = rows_of(m_i, piece * DIAGONAL_ROWS, DIAGONAL_ROWS)
            if BOUNDED_LEFT:
                acc_piece, l_piece, m_piece = online_softmax(
                    acc_piece, l_piece, m_piece, q_piece, K, V, stride_kn=stride_kn, stride_vn=stride_vn,
                    offs_m=rows, start_m=piece_m, offs_d=offs_d, lo=before_lo, hi=before_hi,
                    BLOCK_M=DIAGONAL_ROWS, BLOCK_N=DIAGONAL_ROWS, MASKED=True,
                    seed=seed, bh=b * H + h, dropout_p=dropout_p, qk_scale=qk_scale, n_k=n_k, first=first, last=last,
                    HEAD_DIM=HEAD_DIM, BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT, DROPOUT=DROPOUT)
            if BOUNDED_RIGHT:
                acc_piece, l_piece, m_piece = online_softmax(
                    acc_piece, l_piece, m_piece, q_piece, K, V, stride_kn=stride_kn, stride_vn=stride_vn,
                    offs_m=rows, start_m=piece_m, offs_d=offs_d, lo=after_lo, hi=after_hi,
                    BLOCK_M=DIAGONAL_ROWS, BLOCK_N=DIAGONAL_ROWS, MASKED=True,
                    seed=seed, bh=b * H + h, dropout_p=dropout_p, qk_scale=qk_scale, n_k=n_k, first=first, last=last,
                    HEAD_DIM=HEAD_DIM, BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT, DROPOUT=DROPOUT)
            _store_rows(O, LSE, acc_piece, l_piece, m_piece, rows, n_q, stride_om, offs_d, HEAD_DIM)


@triton.jit
def _store_rows(O, LSE, acc, l_i, m_i, rows, n_q, stride_om, offs_d, HEAD_DIM: tl.constexpr):
    """out = acc / l and LSE = m + log2(l) of the query rows `rows`. A row that saw no key has l = 0 and acc = 0:
    its output is 0 and its LSE +inf, so the backward recomputes P = 2^(s - LSE) = 0 for it."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + rows, lse, mask=rows < n_q)
    store_tile(O, acc / l_safe[:, None], rows, n_q, stride_om, offs_d, HEAD_DIM)


@triton.jit(do_not_specialize=["first_b"])
def dropout_mask_kernel(
    MASK, SEED: "*i64", first_b, H, N_Q, N_K, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Write the keep-mask the attention kernels use for batches first_b, first_b + 1, ... of B.
    Grid: (cdiv(Nq, BLOCK_M), cdiv(Nk, BLOCK_N), B * H).

    MASK: (B, H, Nq, Nk) bool, contiguous, written here (True = kept). SEED: int64 (1,), the call's seed.
    first_b: the batch index of MASK's first batch (a packed call's masks are written one sequence at a time).
    H: query heads; N_Q, N_K: sequence lengths; dropout_p: fp32; BLOCK_M x BLOCK_N: tile per program.
    """
    bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(seed=tl.load(SEED), bh=first_b * H + bh, first_query=tl.program_id(0) * BLOCK_M,
                        first_key=tl.program_id(1) * BLOCK_N, n_k=N_K, dropout_p=dropout_p, BLOCK_Q=BLOCK_M,
                        BLOCK_K=BLOCK_N)
    ptrs = MASK + (bh * N_Q + offs_m[:, None]).to(tl.int64) * N_K + offs_n[None, :]
    tl.store(ptrs, keep, mask=(offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K))
