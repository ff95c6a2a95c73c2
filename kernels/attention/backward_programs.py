"""The two kinds of program of the backward launch (backward.py): a key program computes dK and dV of one block of
keys, a query program dQ of one block of queries. Each streams the other side's blocks: first the blocks every held
row sees whole (no mask; with EVEN no bounds), then, under a band, the band's edges in diagonal pieces (band.py).
The arguments mean what they mean in backward.attention_backward_kernel."""

import triton
import triton.language as tl

from .band import DIAGONAL_ROWS, band_bounds, keys_seen_by_query_block, piece_edges, rows_of
from .band import queries_seeing_key_block, visible
from .shared import (
    DOT_PRECISION,
    LOG2_E,
    dropout_keep,
    fresh_each_step,
    load_tile,
    matrix_of,
    program_coordinates,
    program_operands,
    row_statistics_of,
    sequence_of,
    store_tile,
)


@triton.jit
def _key_block_steps(
    dk, dv, k, v, Q, DO, LSE, DELTA, stride_qm, stride_dom, start_n, offs_d, offs_slice, seed, bh, dropout_p,
    qk_scale, lo, hi, n_q, n_k, first, last, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, EVEN: tl.constexpr,
    BOUNDED_LEFT: tl.constexpr, BOUNDED_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, COMPUTE_DK: tl.constexpr,
    COMPUTE_DV: tl.constexpr,
):
    """Accumulate dK and/or dV of the BLOCK_N held keys from start_n (k, v) over query blocks [lo, hi) of one query
    head, BLOCK_M queries per step, in the head's columns offs_slice (all of offs_d, or a slice of them). Works on
    transposed tiles (keys x queries) so the accumulations are plain matrix products. MASKED applies the band; rows
    past the sequence's end read q = dO = 0 and LSE = +inf, so they add nothing even unmasked."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    dropout_scale = 1.0 / (1.0 - dropout_p)
    SLICED: tl.constexpr = offs_slice.shape[0] < offs_d.shape[0]
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        # the statistics first, so their loads are in flight during the first product
        if EVEN and not MASKED:
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        else:
            lse = tl.load(LSE + offs_m, mask=offs_m < n_q, other=float("inf"))
            delta = tl.load(DELTA + offs_m, mask=offs_m < n_q, other=0.0)
        even = EVEN and not MASKED
        q = load_tile(Q, offs_m, n_q, stride_qm, offs_d, HEAD_DIM, EVEN=even)
        # P^T = 2^(s^T - LSE): the forward's probabilities, recomputed (scale and log2(e) in one FMA per score)
        qk_t = tl.dot(fresh_each_step(k, start_m), tl.trans(q), input_precision=DOT_PRECISION)
        p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
        if MASKED:
            seen = visible(query_idx=offs_m[None, :], key_idx=offs_n[:, None], n_k=n_k, first=first, last=last,
                           BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT)
            p_t = tl.where(seen, p_t, 0.0)
        if COMPUTE_DK or not SLICED:  # dP needs the whole of dO
            do = load_tile(DO, offs_m, n_q, stride_dom, offs_d, HEAD_DIM, EVEN=even)
        if DROPOUT:
            keep = tl.trans(dropout_keep(seed=seed, bh=bh, first_query=start_m, first_key=start_n, n_k=n_k,
                                         dropout_p=dropout_p, BLOCK_Q=BLOCK_M, BLOCK_K=BLOCK_N))
        if COMPUTE_DV:
            # dV += P_dropped^T dO
            p_dropped_t = p_t
            if DROPOUT:
                p_dropped_t = tl.where(keep, p_t * dropout_scale, 0.0)
            if SLICED:
                do_slice = load_tile(DO, offs_m, n_q, stride_dom, offs_slice, HEAD_DIM, EVEN=even)
            else:
                do_slice = do
            dv = tl.dot(p_dropped_t.to(do_slice.dtype), do_slice, dv, input_precision=DOT_PRECISION)
        if COMPUTE_DK:
            # dP^T = V dO^T, the gradient of the dropped probabilities
            dp_t = tl.dot(fresh_each_step(v, start_m), tl.trans(do), input_precision=DOT_PRECISION)
            if DROPOUT:
                dp_t = tl.where(keep, dp_t * dropout_scale, 0.0)
            # dS^T = P^T * (dP^T - delta); dK += dS^T Q (times the scale, applied once at the end)
            ds_t = p_t * (dp_t - delta[None, :])
            if SLICED:
                q_slice = load_tile(Q, offs_m, n_q, stride_qm, offs_slice, HEAD_DIM, EVEN=even)
            else:
                q_slice = q
            dk = tl.dot(ds_t.to(q_slice.dtype), q_slice, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _query_head_operands(b, h, q_start, Q, DO, LSE, DELTA, stride_qb, stride_qh, stride_qm, stride_dob, stride_doh,
                         stride_dom, stride_lb, stride_lh, ALIGNED: tl.constexpr):
    """Q's and dO's (b, h) matrices with their row strides, and the (b, h) rows of LSE and DELTA."""
    Q, stride_qm = matrix_of(Q, b, h, q_start, stride_qb, stride_qh, stride_qm, ALIGNED)
    DO, stride_dom = matrix_of(DO, b, h, q_start, stride_dob, stride_doh, stride_dom, ALIGNED)
    LSE = row_statistics_of(LSE, b, h, q_start, stride_lb, stride_lh)
    DELTA = row_statistics_of(DELTA, b, h, q_start, stride_lb, stride_lh)
    return Q, stride_qm, DO, stride_dom, LSE, DELTA


@triton.jit
def key_block_program(
    pid, first_column, Q, K, V, DO, DK, DV, LSE, DELTA, SEED, CU_SEQLENS_Q, CU_SEQLENS_K,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh, H, H_KV, N_Q, N_K, scale, dropout_p, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SLICE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BOUNDED_LEFT: tl.constexpr, BOUNDED_RIGHT: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, ALIGNED: tl.constexpr, EVEN: tl.constexpr, COMPUTE_DK: tl.constexpr,
    COMPUTE_DV: tl.constexpr,
):
    """dK and/or dV of one block of BLOCK_N keys of one (batch, key/value head), summed over the query heads of
    its group, streaming BLOCK_M queries per step: BLOCK_SLICE of the head's columns from first_column (all
    BLOCK_D of them, or a slice)."""
    block, b, kv_head = program_coordinates(pid, N_K, H_KV, BLOCK_N)
    q_start, n_q = sequence_of(b, CU_SEQLENS_Q, N_Q, VARLEN)
    k_start, n_k = sequence_of(b, CU_SEQLENS_K, N_K, VARLEN)
    start_n = block * BLOCK_N
    if start_n < n_k:  # else past this packed sequence's end
        group = H // H_KV
        K, stride_kn = matrix_of(K, b, kv_head, k_start, stride_kb, stride_kh, stride_kn, ALIGNED)
        V, stride_vn = matrix_of(V, b, kv_head, k_start, stride_vb, stride_vh, stride_vn, ALIGNED)
        DK, stride_dkn = matrix_of(DK, b, kv_head, k_start, stride_dkb, stride_dkh, stride_dkn, ALIGNED)
        DV, stride_dvn = matrix_of(DV, b, kv_head, k_start, stride_dvb, stride_dvh, stride_dvn, ALIGNED)
        seed = tl.load(SEED) if DROPOUT else 0
        first, last = band_bounds(n_q, n_k, window_left, window_right)
        qk_scale = scale * LOG2_E
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_slice = tl.multiple_of(first_column, BLOCK_SLICE) + tl.arange(0, BLOCK_SLICE)
        # The queries that see this key block, in three ranges: the band's right edge (the causal diagonal), those
        # that see it whole, its left edge (only with a left bound)
        lo, full_lo, full_hi, hi = queries_seeing_key_block(
            start_n=start_n, n_q=n_q, first=first, last=last, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT)

        # The whole block against the queries that see all of it, head by head of the group
        k = load_tile(K, offs_n, n_k, stride_kn, offs_d, HEAD_DIM)
        v = load_tile(V, offs_n, n_k, stride_vn, offs_d, HEAD_DIM)
        dk = tl.zeros([BLOCK_N, BLOCK_SLICE], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_SLICE], dtype=tl.float32)
        for g in range(group):
            h = kv_head * group + g
            Q_h, stride_qm_h, DO_h, stride_dom_h, LSE_h, DELTA_h = _query_head_operands(
                b, h, q_start, Q, DO, LSE, DELTA, stride_qb, stride_qh, stride_qm, stride_dob, stride_doh,
                stride_dom, stride_lb, stride_lh, ALIGNED)
            dk, dv = _key_block_steps(
                dk, dv, k, v, Q_h, DO_h, LSE_h, DELTA_h, stride_qm_h, stride_dom_h, start_n, offs_d, offs_slice, seed,
                b * H + h, dropout_p, qk_scale, full_lo, full_hi, n_q, n_k, first, last, HEAD_DIM=HEAD_DIM,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASKED=False, EVEN=EVEN, BOUNDED_LEFT=BOUNDED_LEFT,
                BOUNDED_RIGHT=BOUNDED_RIGHT, DROPOUT=DROPOUT, COMPUTE_DK=COMPUTE_DK, COMPUTE_DV=COMPUTE_DV)

        if BOUNDED_LEFT or BOUNDED_RIGHT:
            # The band's edges, piece by piece: DIAGONAL_ROWS keys at a time against their own edge queries
            for piece in range(tl.cdiv(tl.minimum(n_k - start_n, BLOCK_N), DIAGONAL_ROWS)):  # none past the end
                piece_n = start_n + piece * DIAGONAL_ROWS
                rows = piece_n + tl.arange(0, DIAGONAL_ROWS)
                k_piece = load_tile(K, rows, n_k, stride_kn, offs_d, HEAD_DIM)
                v_piece = load_tile(V, rows, n_k, stride_vn, offs_d, HEAD_DIM)
                piece_lo, _, _, piece_hi = queries_seeing_key_block(
                    start_n=piece_n, n_q=n_q, first=first, last=last, BLOCK_M=DIAGONAL_ROWS,
                    BLOCK_N=DIAGONAL_ROWS, BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT)
                before_lo, before_hi, after_lo, after_hi = piece_edges(piece_lo, piece_hi, full_lo, full_hi)
                dk_piece = rows_of(dk, piece * DIAGONAL_ROWS, DIAGONAL_ROWS)
                dv_piece = rows_of(dv, piece * DIAGONAL_ROWS, DIAGONAL_ROWS)
                for g in range(group):
                    h = kv_head * group + g
                    Q_h, stride_qm_h, DO_h, stride_dom_h, LSE_h, DELTA_h = _query_head_operands(
                        b, h, q_start, Q, DO, LSE, DELTA, stride_qb, stride_qh, stride_qm, stride_dob, stride_doh,
                        stride_dom, stride_lb, stride_lh, ALIGNED)
                    if BOUNDED_RIGHT:
                        dk_piece, dv_piece = _key_block_steps(
                            dk_piece, dv_piece, k_piece, v_piece, Q_h, DO_h, LSE_h, DELTA_h, stride_qm_h,
                            stride_dom_h, piece_n, offs_d, offs_slice, seed, b * H + h, dropout_p, qk_scale,
                            before_lo, before_hi, n_q, n_k, first, last, HEAD_DIM=HEAD_DIM, BLOCK_M=DIAGONAL_ROWS,
                            BLOCK_N=DIAGONAL_ROWS, MASKED=True,
                            EVEN=EVEN, BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT, DROPOUT=DROPOUT,
                            COMPUTE_DK=COMPUTE_DK, COMPUTE_DV=COMPUTE_DV)
                    if BOUNDED_LEFT:
                        dk_piece, dv_piece = _key_block_steps(
                            dk_piece, dv_piece, k_piece, v_piece, Q_h, DO_h, LSE_h, DELTA_h, stride_qm_h,
                            stride_dom_h, piece_n, offs_d, offs_slice, seed, b * H + h, dropout_p, qk_scale,
                            after_lo, after_hi, n_q, n_k, first, last, HEAD_DIM=HEAD_DIM, BLOCK_M=DIAGONAL_ROWS,
                            BLOCK_N=DIAGONAL_ROWS, MASKED=True,
                            EVEN=EVEN, BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT, DROPOUT=DROPOUT,
                            COMPUTE_DK=COMPUTE_DK, COMPUTE_DV=COMPUTE_DV)
                _store_key_rows(DK, DV, dk_piece, dv_piece, scale, rows, n_k, stride_dkn, stride_dvn, offs_slice,
                                HEAD_DIM, COMPUTE_DK, COMPUTE_DV)
        else:
            _store_key_rows(DK, DV, dk, dv, scale, offs_n, n_k, stride_dkn, stride_dvn, offs_slice, HEAD_DIM,
                            COMPUTE_DK, COMPUTE_DV)


@triton.jit
def _store_key_rows(DK, DV, dk, dv, scale, rows, n_k, stride_dkn, stride_dvn, cols, HEAD_DIM: tl.constexpr,
                    COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr):
    """Write the (rows, cols) tile of dK (times the scale of S = scale * Q K^T, applied once) and/or dV."""
    if COMPUTE_DK:
        store_tile(DK, dk * scale, rows, n_k, stride_dkn, cols, HEAD_DIM)
    if COMPUTE_DV:
        store_tile(DV, dv, rows, n_k, stride_dvn, cols, HEAD_DIM)


@triton.jit
def _query_block_steps(
    dq, q, do, lse, delta, K, V, stride_kn, stride_vn, start_m, offs_d, seed, bh, dropout_p, qk_scale, lo, hi, n_k,
    first, last, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    EVEN: tl.constexpr,
    BOUNDED_LEFT: tl.constexpr, BOUNDED_RIGHT: tl.constexpr, DROPOUT: tl.constexpr,
):
    """Accumulate dQ of the BLOCK_M held queries from start_m (q, do and their lse, delta) over key blocks [lo, hi),
    BLOCK_N keys per step. MASKED applies the band and the sequence's end (dQ sums over keys, so keys past the end must
    contribute exactly 0)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    dropout_scale = 1.0 / (1.0 - dropout_p)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = load_tile(K, offs_n, n_k, stride_kn, offs_d, HEAD_DIM, EVEN=EVEN and not MASKED)
        v = load_tile(V, offs_n, n_k, stride_vn, offs_d, HEAD_DIM, EVEN=EVEN and not MASKED)
        # P = 2^(s - LSE), recomputed
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            seen = visible(query_idx=offs_m[:, None], key_idx=offs_n[None, :], n_k=n_k, first=first, last=last,
                           BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT)
            p = tl.where(seen, p, 0.0)
        # dP = dO V^T, through the dropout mask
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = dropout_keep(seed=seed, bh=bh, first_query=start_m, first_key=start_n, n_k=n_k,
                                dropout_p=dropout_p, BLOCK_Q=BLOCK_M, BLOCK_K=BLOCK_N)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        # dS = P * (dP - delta); dQ += dS K (times the scale, applied once at the end)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _query_rows(Q, DO, LSE, DELTA, rows, n_q, stride_qm, stride_dom, offs_d, HEAD_DIM: tl.constexpr):
    """q, dO, LSE and delta of the query rows `rows` (zeros, +inf and 0 past the sequence's end)."""
    q = load_tile(Q, rows, n_q, stride_qm, offs_d, HEAD_DIM)
    do = load_tile(DO, rows, n_q, stride_dom, offs_d, HEAD_DIM)
    lse = tl.load(LSE + rows, mask=rows < n_q, other=float("inf"))
    delta = tl.load(DELTA + rows, mask=rows < n_q, other=0.0)
    return q, do, lse, delta


@triton.jit
def query_block_program(
    pid, Q, K, V, DO, DQ, LSE, DELTA, SEED, CU_SEQLENS_Q, CU_SEQLENS_K,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm, stride_lb, stride_lh,
    H, H_KV, N_Q, N_K, scale, dropout_p, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BOUNDED_LEFT: tl.constexpr, BOUNDED_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    ALIGNED: tl.constexpr, EVEN: tl.constexpr,
):
    """dQ of one block of BLOCK_M queries of one (batch, query head), streaming BLOCK_N keys per step."""
    start_m, b, h, q_start, n_q, k_start, n_k, Q, stride_qm, K, stride_kn, V, stride_vn = program_operands(
        pid=pid, Q=Q, K=K, V=V, CU_SEQLENS_Q=CU_SEQLENS_Q, CU_SEQLENS_K=CU_SEQLENS_K, N_Q=N_Q, N_K=N_K, H=H,
        H_KV=H_KV, stride_qb=stride_qb, stride_qh=stride_qh, stride_qm=stride_qm, stride_kb=stride_kb,
        stride_kh=stride_kh, stride_kn=stride_kn, stride_vb=stride_vb, stride_vh=stride_vh, stride_vn=stride_vn,
        BLOCK=BLOCK_M, VARLEN=VARLEN, ALIGNED=ALIGNED, LONGEST_FIRST=BOUNDED_RIGHT)
    if start_m < n_q:  # else past this packed sequence's end
        DO, stride_dom = matrix_of(DO, b, h, q_start, stride_dob, stride_doh, stride_dom, ALIGNED)
        DQ, stride_dqm = matrix_of(DQ, b, h, q_start, stride_dqb, stride_dqh, stride_dqm, ALIGNED)
        LSE = row_statistics_of(LSE, b, h, q_start, stride_lb, stride_lh)
        DELTA = row_statistics_of(DELTA, b, h, q_start, stride_lb, stride_lh)
        seed = tl.load(SEED) if DROPOUT else 0
        first, last = band_bounds(n_q, n_k, window_left, window_right)
        qk_scale = scale * LOG2_E
        offs_d = tl.arange(0, BLOCK_D)
        # The same three key ranges as the forward
        lo, full_lo, full_hi, hi = keys_seen_by_query_block(
            start_m=start_m, n_q=n_q, n_k=n_k, first=first, last=last, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT)

        # The whole block against the keys every row sees, then (without a right bound) the sequence's last
        # partial key block, masked
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, do, lse, delta = _query_rows(Q, DO, LSE, DELTA, offs_m, n_q, stride_qm, stride_dom, offs_d, HEAD_DIM)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dq = _query_block_steps(
            dq, q, do, lse, delta, K, V, stride_kn, stride_vn, start_m, offs_d, seed, b * H + h, dropout_p, qk_scale,
            full_lo, full_hi, n_k, first, last, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASKED=False,
            EVEN=EVEN,
            BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT, DROPOUT=DROPOUT)
        if not BOUNDED_RIGHT:
            dq = _query_block_steps(
                dq, q, do, lse, delta, K, V, stride_kn, stride_vn, start_m, offs_d, seed, b * H + h, dropout_p,
                qk_scale, full_hi, hi, n_k, first, last, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                MASKED=True,
                EVEN=EVEN, BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT, DROPOUT=DROPOUT)

        if BOUNDED_LEFT or BOUNDED_RIGHT:
            # The band's edges, piece by piece: DIAGONAL_ROWS queries at a time against their own edge keys
            for piece in range(tl.cdiv(tl.minimum(n_q - start_m, BLOCK_M), DIAGONAL_ROWS)):  # none past the end
                piece_m = start_m + piece * DIAGONAL_ROWS
                rows = piece_m + tl.arange(0, DIAGONAL_ROWS)
                q_piece, do_piece, lse_piece, delta_piece = _query_rows(
                    Q, DO, LSE, DELTA, rows, n_q, stride_qm, stride_dom, offs_d, HEAD_DIM)
                piece_lo, _, _, piece_hi = keys_seen_by_query_block(
                    start_m=piece_m, n_q=n_q, n_k=n_k, first=first, last=last, BLOCK_M=DIAGONAL_ROWS,
                    BLOCK_N=DIAGONAL_ROWS, BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT)
                before_lo, before_hi, after_lo, after_hi = piece_edges(piece_lo, piece_hi, full_lo, full_hi)
                dq_piece = rows_of(dq, piece * DIAGONAL_ROWS, DIAGONAL_ROWS)
                if BOUNDED_LEFT:
                    dq_piece = _query_block_steps(
                        dq_piece, q_piece, do_piece, lse_piece, delta_piece, K, V, stride_kn, stride_vn, piece_m,
                        offs_d, seed, b * H + h, dropout_p, qk_scale, before_lo, before_hi, n_k, first, last,
                        HEAD_DIM=HEAD_DIM, BLOCK_M=DIAGONAL_ROWS, BLOCK_N=DIAGONAL_ROWS, MASKED=True, EVEN=EVEN,
                        BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT, DROPOUT=DROPOUT)
                if BOUNDED_RIGHT:
                    dq_piece = _query_block_steps(
                        dq_piece, q_piece, do_piece, lse_piece, delta_piece, K, V, stride_kn, stride_vn, piece_m,
                        offs_d, seed, b * H + h, dropout_p, qk_scale, after_lo, after_hi, n_k, first, last,
                        HEAD_DIM=HEAD_DIM, BLOCK_M=DIAGONAL_ROWS, BLOCK_N=DIAGONAL_ROWS, MASKED=True, EVEN=EVEN,
                        BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT, DROPOUT=DROPOUT)
                # dQ = scale * sum_j dS_ij k_j
                store_tile(DQ, dq_piece * scale, rows, n_q, stride_dqm, offs_d, HEAD_DIM)
        else:
            store_tile(DQ, dq * scale, offs_m, n_q, stride_dqm, offs_d, HEAD_DIM)
