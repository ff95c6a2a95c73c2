"""The attention backward: delta = rowsum(dO * O) in a small kernel of its own, then one launch for dK, dV and dQ,
its programs split as FlexAttention's backward splits them. The first programs each own a block of keys of one
key/value head and compute its dK and dV, looping over the query heads of its group (grouped-query attention sums
the group in the program, in a fixed order); the others each own a block of queries of one query head and compute
its dQ. Each program writes only its own rows: no atomics, deterministic. Both kinds recompute P from the forward's
LSE; together they run 7 matrix products per (query block, key block) pair, 4 for dK/dV and 3 for dQ. Where the
tile puts dK and dV in programs of their own, or splits them into column slices of the head, each such program
recomputes P (and dP) itself.

Per program, as in the forward (band.py): the blocks every held row sees run whole without mask arithmetic (and,
when every block is whole, without bounds masks); the band's edges run in diagonal pieces.
"""

import triton.language as tl

from .backward_programs import key_block_program, query_block_program
from .shared import attention_kernel, load_tile, matrix_of, program_coordinates, row_statistics_of, sequence_of


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
    block, b, h = program_coordinates(tl.program_id(0), N_Q, H, BLOCK_M)
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


@attention_kernel
def attention_backward_kernel(
    Q, K, V, DO, DQ, DK, DV, LSE: "*fp32", DELTA: "*fp32", SEED: "*i64", CU_SEQLENS_Q: "*i32",
    CU_SEQLENS_K: "*i32",
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh,
    B: tl.int32, H: tl.int32, H_KV: tl.int32, N_Q: tl.int32, N_K: tl.int32, scale: tl.float32,
    dropout_p: tl.float32, window_left: tl.int32, window_right: tl.int32,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,
    BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr, BOUNDED_LEFT: tl.constexpr, BOUNDED_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr, VARLEN: tl.constexpr, ALIGNED: tl.constexpr, EVEN: tl.constexpr,
    DK_DV_APART: tl.constexpr, HEAD_SLICES: tl.constexpr,
):
    """dK, dV and dQ. Grid: (key programs + cdiv(N_Q, BLOCK_M2) * B * H,), key programs being
    cdiv(N_K, BLOCK_N1) * B * H_KV times HEAD_SLICES, twice that with DK_DV_APART. They come first: with
    grouped-query heads they are the longest, and under a causal band the first key blocks see the most queries;
    the query blocks come last first (the most keys first).

    DO: the gradient of the output, laid out like Q. DQ, DK, DV: the gradients, laid out like Q, K, V, written
    here in the input dtype. DELTA: fp32 from the preprocess kernel, laid out like LSE. B: the batch.
    BLOCK_N1: keys a key program holds; BLOCK_M1: queries it streams per step. BLOCK_M2: queries a query program
    holds; BLOCK_N2: keys it streams per step.
    EVEN: dense, and N_Q and N_K are multiples of every block: no streamed block is partial.
    DK_DV_APART: dK and dV by separate programs (first the dK ones), each recomputing P, where their two fp32
    accumulators do not fit in registers together.
    HEAD_SLICES: dK and dV split into this many column slices of BLOCK_D // HEAD_SLICES, each by programs of its
    own that recompute P (and dP) over the whole head, where even one whole-head accumulator does not fit (head
    size 256: a wgmma accumulator holds 64 rows per warpgroup).
    The other arguments mean what they mean in the forward kernel.
    """
    pid = tl.program_id(0)
    key_programs = tl.cdiv(N_K, BLOCK_N1) * B * H_KV
    # Key programs in roles of key_programs each: dK (and dV unless apart) of every column slice, then with
    # DK_DV_APART dV of every slice
    role = pid // key_programs
    first_column = (role % HEAD_SLICES) * (BLOCK_D // HEAD_SLICES)
    if role < HEAD_SLICES:
        key_block_program(
            pid % key_programs, first_column, Q, K, V, DO, DK, DV, LSE, DELTA, SEED, CU_SEQLENS_Q, CU_SEQLENS_K,
            stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh,
            stride_dvn, stride_lb, stride_lh, H, H_KV, N_Q, N_K, scale, dropout_p, window_left, window_right,
            HEAD_DIM, BLOCK_D, BLOCK_D // HEAD_SLICES, BLOCK_M1, BLOCK_N1, BOUNDED_LEFT, BOUNDED_RIGHT, DROPOUT,
            VARLEN, ALIGNED, EVEN, COMPUTE_DK=True, COMPUTE_DV=not DK_DV_APART)
    elif DK_DV_APART and role < 2 * HEAD_SLICES:
        key_block_program(
            pid % key_programs, first_column, Q, K, V, DO, DK, DV, LSE, DELTA, SEED, CU_SEQLENS_Q, CU_SEQLENS_K,
            stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh,
            stride_dvn, stride_lb, stride_lh, H, H_KV, N_Q, N_K, scale, dropout_p, window_left, window_right,
            HEAD_DIM, BLOCK_D, BLOCK_D // HEAD_SLICES, BLOCK_M1, BLOCK_N1, BOUNDED_LEFT, BOUNDED_RIGHT, DROPOUT,
            VARLEN, ALIGNED, EVEN, COMPUTE_DK=False, COMPUTE_DV=True)
    else:
        query_block_program(
            pid - key_programs * HEAD_SLICES * (2 if DK_DV_APART else 1), Q, K, V, DO, DQ, LSE, DELTA, SEED,
            CU_SEQLENS_Q, CU_SEQLENS_K, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb,
            stride_vh, stride_vn, stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm, stride_lb,
            stride_lh, H, H_KV, N_Q, N_K, scale, dropout_p, window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_M2,
            BLOCK_N2, BOUNDED_LEFT, BOUNDED_RIGHT, DROPOUT, VARLEN, ALIGNED, EVEN)
