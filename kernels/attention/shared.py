"""What every attention kernel shares: the program's coordinates, sequence bounds and matrix slices, operand
alignment, tile loads and stores, dropout, and the online softmax over key blocks (the forward's loop, which
decoding runs too: kernels/decode/kernels.py); band.py has the visible band and the ranges of blocks it makes. The
kernels (forward.py, backward.py with backward_programs.py) compute,
per batch b and query head h, against key/value head h // (H / H_KV) (grouped-query attention; H_KV = H is plain
multi-head attention), with s = scale (default D^-0.5) and offset = Nk - Nq:

    S = s * Q K^T                        (Nq, Nk) scores
    S[i, j] = -inf unless i + offset - left <= j <= i + offset + right
                                         the visible band: causal is right = 0 (the mask aligned bottom-right),
                                         a sliding window bounds left and/or right; an unbounded side is -1
    P = softmax(S, dim=-1)               rows that see no key at all get P = 0, so out = 0
    P = P * keep / (1 - dropout_p)       keep ~ Bernoulli(1 - dropout_p), drawn inside the kernel
    out = P V                            (Nq, D)

Sequences are either a dense batch (B, H, N, D), or packed one after another (VARLEN: (total, H, D) rows, with
sequence b in rows [cu_seqlens[b], cu_seqlens[b + 1])): programs past their own sequence's end exit at once.
Nothing of size Nq x Nk is ever stored: the forward keeps the output and one log-sum-exp per query row; the
backward recomputes P from it and regenerates the dropout mask from (seed, position).

Dropout randomness: Philox (`tl.randint4x`) keyed by (seed, b * H + h) and counted by i * cdiv(Nk, 4) + j // 4
within the sequence, draw j % 4 of the call, so every (batch, query head, row, col) has its own random number and
the forward, both backward kernels and the mask kernel agree on the mask.

Operand alignment (ALIGNED): the launcher sets it when every strided operand has a 16-byte-aligned pointer, a
unit last stride and rows a multiple of 16 bytes (`operands_aligned`). The kernels opt out of Triton's own
divisibility marks on their strides (`attention_kernel`) and mark them themselves from ALIGNED (`matrix_of`), so
a GPU compiles exactly one of two variants per tile, the two the compile report checks. The last dimension is
always contiguous (the launchers copy a tensor whose is not, as FlashAttention does).
"""

import inspect

import triton
import triton.language as tl

from .band import visible

# log2(e): exp(x) = exp2(x * log2(e)); the kernels fold it into the softmax scale to use exp2.
LOG2_E = tl.constexpr(1.4426950408889634)
# Every tl.dot multiplies in true fp32 for fp32 inputs (it would otherwise round them to TF32 on the GPU); 16-bit
# inputs are multiplied exactly either way.
DOT_PRECISION = tl.constexpr("ieee")
# Sizes and bounds change from call to call: never specialised, so one compiled variant serves them all.
_RUNTIME_SIZES = ("B", "H", "H_KV", "N_Q", "N_K", "window_left", "window_right", "n_new", "num_splits")


def attention_kernel(fn):
    """triton.jit for the attention kernels, typed so that what a GPU compiles is exactly one of the two variants
    per tile the compile report checks: ALIGNED (strides marked inside the kernel, see matrix_of) or not.

    Triton's JIT would compile a variant per pattern of its integer arguments (equal to 1, divisible by 16) and
    type each by its value (i32 below 2^31, else i64). Here no size or stride is specialised, and the strides'
    types are fixed by their names, stride_<tensor><dim>: batch and head strides (dim b, h) are int64, since a
    whole tensor may span more than 2^31 elements; row strides are int32, since the launchers keep each
    sequence's rows within 32-bit offsets (ops.rows_fit) and pass 0 for a dimension of size 1."""
    parameters = inspect.signature(fn).parameters
    strides = [name for name in parameters if name.startswith("stride_")]
    for name in strides:
        fn.__annotations__[name] = tl.int64 if name[-1] in "bh" else tl.int32
    return triton.jit(fn, do_not_specialize=[name for name in _RUNTIME_SIZES if name in parameters] + strides,
                      do_not_specialize_on_alignment=strides)


def operands_aligned(*tensors):
    """The kernels' ALIGNED: every tensor whose strides a launch passes has a 16-byte aligned pointer (which
    Triton's JIT marks), a unit last stride and its other strides multiples of 16 bytes (which the kernels mark,
    see matrix_of). LSE and DELTA, allocated by the launchers, are aligned by construction."""
    for t in tensors:  # a loop, not nested generators: the launchers ask on every call, for up to 8 tensors
        *row_strides, last_stride = t.stride()
        if t.data_ptr() % 16 or last_stride != 1:
            return False
        size = t.element_size()
        for stride in row_strides:
            if stride * size % 16:
                return False
    return True


@triton.jit
def program_coordinates(pid, N, H, BLOCK: tl.constexpr, LONGEST_FIRST: tl.constexpr = False):
    """(block, b, h) of program `pid` of a one-dimensional grid of cdiv(N, BLOCK) * B * H programs: its block of
    BLOCK rows along a sequence of at most N, its batch and its head. Consecutive programs walk one head's
    sequence, so they share its keys and values in L2; one axis has no 65535-program limit. LONGEST_FIRST walks
    the blocks last first: under a causal band the last query blocks see the most keys, and programs that start
    first finish first."""
    blocks = tl.cdiv(N, BLOCK)
    bh = pid // blocks
    block = pid % blocks
    if LONGEST_FIRST:
        block = blocks - 1 - block
    return block, bh // H, bh % H


@triton.jit
def sequence_of(b, CU_SEQLENS, N, VARLEN: tl.constexpr):
    """(first row, length) of batch b's sequence: packed (VARLEN) from the cumulative lengths, else 0 and N."""
    if VARLEN:
        start = tl.load(CU_SEQLENS + b)
        length = tl.load(CU_SEQLENS + b + 1) - start
    else:
        start = 0
        length = N
    return start, length


@triton.jit
def matrix_of(X, b, head, start, stride_b, stride_h, stride_row, ALIGNED: tl.constexpr):
    """Row 0 of the (batch b, head) matrix of X whose sequence starts at row `start` (0 unless packed), with
    64-bit offsets (big tensors overflow i32), and its row stride.

    With ALIGNED (the launcher checked it), every stride is visibly a multiple of 16 bytes' worth of X's elements.
    The kernels opt out of the JIT's own marking (see attention_kernel), which only knows divisibility by 16
    elements: rows of e.g. 40 fp16 elements are 16-byte aligned too, and marked here they are loaded in 16-byte
    vectors and pipelined like any aligned rows. (stride // m) * m equals the stride and lets the compiler see its
    divisibility; tl.multiple_of cannot mark an argument."""
    if ALIGNED:
        elements: tl.constexpr = 128 // X.dtype.element_ty.primitive_bitwidth
        stride_b = stride_b // elements * elements
        stride_h = stride_h // elements * elements
        stride_row = stride_row // elements * elements
    offset = tl.cast(b, tl.int64) * stride_b + tl.cast(head, tl.int64) * stride_h
    return X + offset + tl.cast(start, tl.int64) * stride_row, stride_row


@triton.jit
def program_operands(
    pid, Q, K, V, CU_SEQLENS_Q, CU_SEQLENS_K, N_Q, N_K, H, H_KV,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    BLOCK: tl.constexpr, VARLEN: tl.constexpr, ALIGNED: tl.constexpr, LONGEST_FIRST: tl.constexpr,
):
    """Where program `pid` of a grid over query blocks (the forward's, dQ's) starts: (first row of its block of
    BLOCK queries; batch b; query head h; b's query sequence start and length; its key sequence start and length;
    and Q's (b, h) matrix with K's and V's of h's key/value head, each with its row stride). Query heads come in
    groups of H // H_KV per key/value head. A block that starts past its own sequence's end (a packed sequence
    shorter than the longest) has nothing to do."""
    block, b, h = program_coordinates(pid, N_Q, H, BLOCK, LONGEST_FIRST)
    q_start, n_q = sequence_of(b, CU_SEQLENS_Q, N_Q, VARLEN)
    k_start, n_k = sequence_of(b, CU_SEQLENS_K, N_K, VARLEN)
    kv_head = h // (H // H_KV)
    Q, stride_qm = matrix_of(Q, b, h, q_start, stride_qb, stride_qh, stride_qm, ALIGNED)
    K, stride_kn = matrix_of(K, b, kv_head, k_start, stride_kb, stride_kh, stride_kn, ALIGNED)
    V, stride_vn = matrix_of(V, b, kv_head, k_start, stride_vb, stride_vh, stride_vn, ALIGNED)
    return block * BLOCK, b, h, q_start, n_q, k_start, n_k, Q, stride_qm, K, stride_kn, V, stride_vn


@triton.jit
def row_statistics_of(X, b, head, start, stride_b, stride_h):
    """Row 0 of the (batch b, head) vector of a per-row statistic (LSE, DELTA: fp32, one per query row)."""
    return X + tl.cast(b, tl.int64) * stride_b + tl.cast(head, tl.int64) * stride_h + start


@triton.jit
def load_tile(X, rows, n_rows, stride_row, cols, HEAD_DIM: tl.constexpr, EVEN: tl.constexpr = False):
    """Load the (rows, cols) tile of a (n_rows, HEAD_DIM) matrix at X, zeros past the sequence end and in the
    head-size padding. EVEN: every row is known to lie in the sequence, so only the head-size padding (if any) is
    masked. Pointers are formed from 32-bit offsets at each load, so no tile of 64-bit pointers stays live across
    a loop (the launchers keep every in-sequence offset below 2^31)."""
    ptrs = X + rows[:, None] * stride_row + cols[None, :]
    if EVEN:
        if HEAD_DIM == cols.shape[0]:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
    else:
        tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)
    return tile


@triton.jit
def store_tile(X, values, rows, n_rows, stride_row, cols, HEAD_DIM: tl.constexpr):
    """Store a (rows, cols) tile into a (n_rows, HEAD_DIM) matrix at X, in X's dtype, skipping the padding."""
    ptrs = X + rows[:, None] * stride_row + cols[None, :]
    tl.store(ptrs, values.to(X.dtype.element_ty), mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM))


@triton.jit
def dropout_keep(seed, bh, first_query, first_key, n_k, dropout_p, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """The dropout keep-mask of the (BLOCK_Q queries, BLOCK_K keys) tile starting at (first_query, first_key),
    shared by every kernel that needs it (the dK/dV kernel transposes it).

    seed:        the call's seed (int64, below 2^31).
    bh:          b * H + h, the batch and query head.
    first_query: the tile's first query row within the sequence.
    first_key:   the tile's first key column within the sequence, a multiple of 4.
    n_k:         the sequence's number of keys (the row length of the virtual (Nq, Nk) mask).
    dropout_p:   probability of dropping.
    Returns a boolean (BLOCK_Q, BLOCK_K) tile: True where the probability is kept.
    """
    # One Philox call gives four 32-bit numbers: keys 4c .. 4c + 3 of a row share the call counted by
    # row * cdiv(Nk, 4) + c, which is unique inside a head; the key (seed, bh) keeps heads independent. A quarter
    # of the random-number work of one call per probability, which otherwise bounds dropout's kernels.
    philox_key = seed.to(tl.uint64) + (bh.to(tl.uint64) << 32)
    rows = first_query + tl.arange(0, BLOCK_Q)
    groups = first_key // 4 + tl.arange(0, BLOCK_K // 4)
    r0, r1, r2, r3 = tl.randint4x(philox_key, rows[:, None] * tl.cdiv(n_k, 4) + groups[None, :])
    # kept where the draw, uniform on [0, 2^32), is at least dropout_p * 2^32
    threshold = tl.cast(dropout_p * 4294967296.0, tl.uint32)
    keep0, keep1, keep2, keep3 = r0 >= threshold, r1 >= threshold, r2 >= threshold, r3 >= threshold
    # interleave: column 4c + t of the tile is draw t of call c
    keep = tl.join(tl.join(keep0, keep2), tl.join(keep1, keep3))
    return tl.reshape(keep, (BLOCK_Q, BLOCK_K))


@triton.jit
def fresh_each_step(x, step):
    """x, for a loop over `step`. fp32 products run without tensor cores, and the compiler would convert a
    loop-invariant fp32 operand to the product's layout once, before the loop: replicated across threads, that
    takes hundreds of registers per thread at head size 256. A loop-dependent zero moves the conversion into the
    loop. 16-bit tiles (tensor-core operands, compact) are returned unchanged."""
    if x.dtype == tl.float32:
        x = x + 0.0 * step
    return x


@triton.jit
def online_softmax(
    acc, l_i, m_i, q, K, V, stride_kn, stride_vn,
    offs_m, start_m, offs_d, seed, bh, dropout_p, qk_scale, lo, hi, n_k, first, last,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    BOUNDED_LEFT: tl.constexpr, BOUNDED_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, EVEN: tl.constexpr = False,
):
    """The online softmax of one block of queries q over key blocks [lo, hi): returns the running row max m_i,
    denominator l_i and unnormalised output acc (all fp32) updated by those keys. MASKED blocks apply the band and
    the sequence's end; the others are known to be seen whole by every row and skip both, and with EVEN (every
    block whole) their loads have no bounds masks either. offs_m: each row's query index (the band's); start_m: the
    first of a block of BLOCK_M consecutive queries (dropout's tile); bh: b * H + h (dropout's stream). The other
    arguments mean what they mean in the forward kernel and band.band_bounds."""
    offs_n0 = tl.arange(0, BLOCK_N)
    dropout_scale = 1.0 / (1.0 - dropout_p)  # kept probabilities are scaled up so the expectation is unchanged
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = load_tile(K, offs_n, n_k, stride_kn, offs_d, HEAD_DIM, EVEN=EVEN and not MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            seen = visible(query_idx=offs_m[:, None], key_idx=offs_n[None, :], n_k=n_k, first=first, last=last,
                           BOUNDED_LEFT=BOUNDED_LEFT, BOUNDED_RIGHT=BOUNDED_RIGHT)
            qk = tl.where(seen, qk, float("-inf"))
        # Scores in the log2 domain, s = q k^T * scale * log2(e), so exp2 can be used; the scale is applied to the
        # row max and inside the exponent (one FMA per score), not to every score first.
        # m_new = max(m_old, rowmax(s)); a row that has seen no key yet keeps m = -inf, so exponentiate against 0
        # instead to get 0 rather than exp2(-inf - -inf) = NaN
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        if MASKED:
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_ref = m_new
        # p = 2^(s - m_new); alpha = 2^(m_old - m_new) rescales what was accumulated so far
        p = tl.math.exp2(qk * qk_scale - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        # l = alpha * l + rowsum(p): the softmax denominator sees every probability, dropped or not
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = dropout_keep(seed=seed, bh=bh, first_query=start_m, first_key=start_n, n_k=n_k,
                                dropout_p=dropout_p, BLOCK_Q=BLOCK_M, BLOCK_K=BLOCK_N)
            p = tl.where(keep, p * dropout_scale, 0.0)
        # acc = alpha * acc + p v
        v = load_tile(V, offs_n, n_k, stride_vn, offs_d, HEAD_DIM, EVEN=EVEN and not MASKED)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i
