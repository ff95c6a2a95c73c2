"""The attention backward kernels: delta = rowsum(dO * O), then dK and dV per key block, then dQ per query block.
Each program owns the rows it writes: no atomics, deterministic. With grouped-query attention each query head
writes its share of dK and dV, which the launcher sums over each group in a fixed order."""

import triton
import triton.language as tl

from .shared import (
    DOT_PRECISION,
    LOG2_E,
    attention_kernel,
    band_bounds,
    dropout_keep,
    fresh_each_step,
    keys_seen_by_query_block,
    load_tile,
    matrix_of,
    phase_range,
    program_coordinates,
    program_operands,
    queries_seeing_key_block,
    row_statistics_of,
    sequence_of,
    store_tile,
    visible,
)


@attention_kernel
def attention_backward_preprocess_kernel(
    O, DO, DELTA: "*fp32", CU_SEQLENS_Q: "*i32",
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh,
    H: tl.int32, N_Q: tl.int32,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """delta = rowsum(dO * O), the term every row of dS = P * (dP - delta) subtracts.
    Grid: (cdiv(N_Q, BLOCK_M) * B * H,).

    O:     the forward output, laid out like Q in the forward kernel.   DO: its gradient, laid out the same way.
    DELTA: fp32, laid out like the forward's LSE, written here.
    The other arguments mean what they mean in the forward kernel; BLOCK_M: rows per program.
    """
    block, b, h = program_coordinates(N_Q, H, BLOCK_M)
    q_start, n_q = sequence_of(b, CU_SEQLENS_Q, N_Q, VARLEN)
    if block * BLOCK_M >= n_q:  # past this packed sequence's end
        return
    O, stride_om = matrix_of(O, b, h, q_start, stride_ob, stride_oh, stride_om, ALIGNED)
    DO, stride_dom = matrix_of(DO, b, h, q_start, stride_dob, stride_doh, stride_dom, ALIGNED)
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_tile(O, offs_m, n_q, stride_om, offs_d, HEAD_DIM)
    do = load_tile(DO, offs_m, n_q, stride_dom, offs_d, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(row_statistics_of(DELTA, b, h, q_start, stride_lb, stride_lh) + offs_m, delta, mask=offs_m < n_q)


@triton.jit
def _backward_dkdv_inner(
    dk, dv, k, v, Q, DO, stride_qm, stride_dom, LSE, DELTA,
    start_n, offs_d, seed, bh, dropout_p, qk_scale, lo, hi, n_q, n_k, first, last,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    BOUNDED_LEFT: tl.constexpr,
    BOUNDED_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr,
):
    """Accumulate dK and/or dV of one key block over query blocks [lo, hi) of one query head. Works on transposed
    tiles (keys x queries) so the accumulations are plain matrix products. MASKED applies the band; rows past the
    sequence's end read q = dO = 0 and LSE = +inf, so they add nothing even unmasked."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    dropout_scale = 1.0 / (1.0 - dropout_p)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q = load_tile(Q, offs_m, n_q, stride_qm, offs_d, HEAD_DIM)
        lse = tl.load(LSE + offs_m, mask=offs_m < n_q, other=float("inf"))
        # P^T = 2^(s^T - LSE): the forward's probabilities, recomputed
        qk_t = tl.dot(fresh_each_step(k, start_m), tl.trans(q), input_precision=DOT_PRECISION)
        p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
        if MASKED:
            seen = visible(query_idx=offs_m[None, :], key_idx=offs_n[:, None], n_k=n_k, first=first, last=last,
                           BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT)
            p_t = tl.where(seen, p_t, 0.0)
        do = load_tile(DO, offs_m, n_q, stride_dom, offs_d, HEAD_DIM)
        if DROPOUT:
            keep = tl.trans(dropout_keep(seed=seed, bh=bh, first_query=start_m, first_key=start_n, n_k=n_k,
                                         dropout_p=dropout_p, BLOCK_Q=BLOCK_M, BLOCK_K=BLOCK_N))
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
            delta = tl.load(DELTA + offs_m, mask=offs_m < n_q, other=0.0)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@attention_kernel
def attention_backward_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE: "*fp32", DELTA: "*fp32", SEED: "*i64", CU_SEQLENS_Q: "*i32", CU_SEQLENS_K: "*i32",
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh,
    H: tl.int32, H_KV: tl.int32, N_Q: tl.int32, N_K: tl.int32, scale: tl.float32, dropout_p: tl.float32,
    window_left: tl.int32, window_right: tl.int32,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BOUNDED_LEFT: tl.constexpr, BOUNDED_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr, ALIGNED: tl.constexpr,
):
    """dK and/or dV for one block of BLOCK_N keys of one (batch, query head), looping over query blocks of
    BLOCK_M. Grid: (cdiv(N_K, BLOCK_N) * B * H,). The keys and values are those of the query head's key/value head;
    with grouped-query attention each query head writes its own share of dK and dV (DK, DV then have H heads, and
    the launcher sums each group's, in a fixed order). One head per program keeps the registers of the d128 tiles.

    DO: the gradient of the output, laid out like Q. DK, DV: gradients with H heads, laid out like K otherwise,
    written here in their dtype. DELTA: fp32 from the preprocess kernel, laid out like LSE.
    COMPUTE_DK, COMPUTE_DV: which of the two to compute and write (both, or one per launch where the two fp32
    accumulators do not fit in registers together).
    The other arguments mean what they mean in the forward kernel.
    """
    start_n, b, h, q_start, n_q, k_start, n_k, Q, stride_qm, K, stride_kn, V, stride_vn = program_operands(
        Q=Q, K=K, V=V, CU_SEQLENS_Q=CU_SEQLENS_Q, CU_SEQLENS_K=CU_SEQLENS_K, N_Q=N_Q, N_K=N_K, H=H, H_KV=H_KV,
        stride_qb=stride_qb, stride_qh=stride_qh, stride_qm=stride_qm, stride_kb=stride_kb, stride_kh=stride_kh,
        stride_kn=stride_kn, stride_vb=stride_vb, stride_vh=stride_vh, stride_vn=stride_vn, BLOCK=BLOCK_N,
        KEY_BLOCKS=True, VARLEN=VARLEN, ALIGNED=ALIGNED)
    if start_n >= n_k:  # past this packed sequence's end
        return
    LSE = row_statistics_of(LSE, b, h, q_start, stride_lb, stride_lh)
    DELTA = row_statistics_of(DELTA, b, h, q_start, stride_lb, stride_lh)
    DO, stride_dom = matrix_of(DO, b, h, q_start, stride_dob, stride_doh, stride_dom, ALIGNED)
    DK, stride_dkn = matrix_of(DK, b, h, k_start, stride_dkb, stride_dkh, stride_dkn, ALIGNED)
    DV, stride_dvn = matrix_of(DV, b, h, k_start, stride_dvb, stride_dvh, stride_dvn, ALIGNED)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_tile(K, offs_n, n_k, stride_kn, offs_d, HEAD_DIM)
    v = load_tile(V, offs_n, n_k, stride_vn, offs_d, HEAD_DIM)
    seed = tl.load(SEED) if DROPOUT else 0
    first, last = band_bounds(n_q, n_k, window_left, window_right)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = scale * LOG2_E

    # The queries that see this key block, in three ranges: the band's right edge (masked), those that see it
    # whole (no mask), its left edge (masked, only with a left bound).
    lo, full_lo, full_hi, hi = queries_seeing_key_block(
        start_n=start_n, n_q=n_q, first=first, last=last, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT)
    for phase in tl.static_range(3):
        if phase == 1 or (phase == 0 and BOUNDED_RIGHT) or (phase == 2 and BOUNDED_LEFT):
            start, end = phase_range(phase, lo=lo, full_lo=full_lo, full_hi=full_hi, hi=hi)
            dk, dv = _backward_dkdv_inner(
                dk, dv, k, v, Q, DO, stride_qm=stride_qm, stride_dom=stride_dom, LSE=LSE, DELTA=DELTA,
                start_n=start_n, offs_d=offs_d, seed=seed, bh=b * H + h, dropout_p=dropout_p, qk_scale=qk_scale,
                lo=start, hi=end, n_q=n_q, n_k=n_k, first=first, last=last, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M,
                BLOCK_N=BLOCK_N, MASKED=phase != 1, BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT,
                DROPOUT=DROPOUT, COMPUTE_DK=COMPUTE_DK, COMPUTE_DV=COMPUTE_DV,
            )

    if COMPUTE_DK:
        # dK = scale * sum_i dS_ij q_i: the scale of S = scale * Q K^T, applied once
        store_tile(DK, dk * scale, offs_n, n_k, stride_dkn, offs_d, HEAD_DIM)
    if COMPUTE_DV:
        store_tile(DV, dv, offs_n, n_k, stride_dvn, offs_d, HEAD_DIM)


@triton.jit
def _backward_dq_inner(
    dq, q, do, lse, delta, K, V, stride_kn, stride_vn,
    start_m, offs_d, seed, bh, dropout_p, qk_scale, lo, hi, n_k, first, last,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    BOUNDED_LEFT: tl.constexpr, BOUNDED_RIGHT: tl.constexpr, DROPOUT: tl.constexpr,
):
    """Accumulate dQ of one query block over key blocks [lo, hi). MASKED applies the band and the sequence's end
    (dQ sums over keys, so keys past the end must contribute exactly 0)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    dropout_scale = 1.0 / (1.0 - dropout_p)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = load_tile(K, offs_n, n_k, stride_kn, offs_d, HEAD_DIM)
        v = load_tile(V, offs_n, n_k, stride_vn, offs_d, HEAD_DIM)
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


@attention_kernel
def attention_backward_dq_kernel(
    Q, K, V, DO, DQ, LSE: "*fp32", DELTA: "*fp32", SEED: "*i64", CU_SEQLENS_Q: "*i32", CU_SEQLENS_K: "*i32",
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh,
    H: tl.int32, H_KV: tl.int32, N_Q: tl.int32, N_K: tl.int32, scale: tl.float32, dropout_p: tl.float32,
    window_left: tl.int32, window_right: tl.int32,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BOUNDED_LEFT: tl.constexpr, BOUNDED_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """dQ for one block of BLOCK_M queries of one (batch, query head), looping over key blocks of BLOCK_N.
    Grid: (cdiv(N_Q, BLOCK_M) * B * H,). Each program owns its rows of dQ: deterministic.

    DQ: the gradient of the queries, laid out like Q, written here in the input dtype.
    The other arguments mean what they mean in the dK/dV kernel.
    """
    start_m, b, h, q_start, n_q, k_start, n_k, Q, stride_qm, K, stride_kn, V, stride_vn = program_operands(
        Q=Q, K=K, V=V, CU_SEQLENS_Q=CU_SEQLENS_Q, CU_SEQLENS_K=CU_SEQLENS_K, N_Q=N_Q, N_K=N_K, H=H, H_KV=H_KV,
        stride_qb=stride_qb, stride_qh=stride_qh, stride_qm=stride_qm, stride_kb=stride_kb, stride_kh=stride_kh,
        stride_kn=stride_kn, stride_vb=stride_vb, stride_vh=stride_vh, stride_vn=stride_vn, BLOCK=BLOCK_M,
        KEY_BLOCKS=False, VARLEN=VARLEN, ALIGNED=ALIGNED)
    if start_m >= n_q:  # past this packed sequence's end
        return
    DO, stride_dom = matrix_of(DO, b, h, q_start, stride_dob, stride_doh, stride_dom, ALIGNED)
    DQ, stride_dqm = matrix_of(DQ, b, h, q_start, stride_dqb, stride_dqh, stride_dqm, ALIGNED)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(Q, offs_m, n_q, stride_qm, offs_d, HEAD_DIM)
    do = load_tile(DO, offs_m, n_q, stride_dom, offs_d, HEAD_DIM)
    lse = tl.load(row_statistics_of(LSE, b, h, q_start, stride_lb, stride_lh) + offs_m, mask=offs_m < n_q,
                  other=float("inf"))
    delta = tl.load(row_statistics_of(DELTA, b, h, q_start, stride_lb, stride_lh) + offs_m, mask=offs_m < n_q,
                    other=0.0)
    seed = tl.load(SEED) if DROPOUT else 0
    first, last = band_bounds(n_q, n_k, window_left, window_right)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = scale * LOG2_E

    # The same three key ranges as the forward.
    lo, full_lo, full_hi, hi = keys_seen_by_query_block(
        start_m=start_m, n_q=n_q, n_k=n_k, first=first, last=last, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT)
    for phase in tl.static_range(3):
        if phase != 0 or BOUNDED_LEFT:
            start, end = phase_range(phase, lo=lo, full_lo=full_lo, full_hi=full_hi, hi=hi)
            dq = _backward_dq_inner(
                dq, q, do, lse, delta, K, V, stride_kn=stride_kn, stride_vn=stride_vn, start_m=start_m,
                offs_d=offs_d, seed=seed, bh=b * H + h, dropout_p=dropout_p, qk_scale=qk_scale, lo=start, hi=end,
                n_k=n_k, first=first, last=last, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                MASKED=phase != 1, BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT, DROPOUT=DROPOUT,
            )

    # dQ = scale * sum_j dS_ij k_j
    store_tile(DQ, dq * scale, offs_m, n_q, stride_dqm, offs_d, HEAD_DIM)
