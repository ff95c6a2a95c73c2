"""What every attention kernel shares: operand alignment, tile loads and stores, the dropout mask, the causal
ranges. The kernels (forward.py, backward.py) compute, per batch b and head h (s = scale, default D^-0.5):

    S = s * Q K^T                      (Nq, Nk) scores
    S[i, j] = -inf where j > i + Nk - Nq     (causal=True: the mask is aligned bottom-right)
    P = softmax(S, dim=-1)             rows that see no key at all (Nq > Nk) get P = 0, so out = 0
    P = P * keep / (1 - dropout_p)     keep ~ Bernoulli(1 - dropout_p), drawn inside the kernel
    out = P V                          (Nq, D)

Nothing of size Nq x Nk is ever stored: the forward keeps the output and one log-sum-exp per query row; the
backward recomputes P from it and regenerates the dropout mask from (seed, position).

Dropout randomness: Philox (`tl.rand`) with key (seed, batch * H + head) and counter query_row * Nk + key_col,
so every (batch, head, row, col) has its own stream position and the forward, both backward kernels and the mask
kernel agree on the mask.

Operand alignment (ALIGNED): the launcher sets it when every strided operand has a 16-byte-aligned pointer, a
unit last stride and rows a multiple of 16 bytes (`operands_aligned`). The kernels opt out of Triton's own
divisibility marks on their strides (`attention_kernel`) and mark them themselves from ALIGNED (`head_slice`),
so a GPU compiles exactly one of two variants per tile, the two the compile report checks.
"""

import inspect

import triton
import triton.language as tl

# log2(e): exp(x) = exp2(x * log2(e)); the kernels fold it into the softmax scale to use exp2.
LOG2_E = tl.constexpr(1.4426950408889634)
# Every tl.dot multiplies in true fp32 for fp32 inputs (it would otherwise round them to TF32 on the GPU); 16-bit
# inputs are multiplied exactly either way.
DOT_PRECISION = tl.constexpr("ieee")


def attention_kernel(fn):
    """triton.jit for the attention kernels. Triton's JIT compiles a variant per pattern of its integer arguments
    (equal to 1, divisible by 16, or neither); these kernels opt out for the sizes and for the strides'
    divisibility, so what a GPU runs is exactly one of the two variants the compile report checks per tile:
    ALIGNED (strides marked inside the kernel, see head_slice) or not. A unit stride still becomes a constant.
    The seed changes every call and is never specialised."""
    names = inspect.signature(fn).parameters
    return triton.jit(fn, do_not_specialize=[name for name in ("seed", "H", "N_Q", "N_K") if name in names],
                      do_not_specialize_on_alignment=[name for name in names if name.startswith("stride_")])


def operands_aligned(*tensors):
    """The kernels' ALIGNED: every tensor whose strides a launch passes has a 16-byte aligned pointer (which
    Triton's JIT marks), a unit last stride (which it makes a constant) and its other strides multiples of 16
    bytes (which the kernels mark, see head_slice). LSE and DELTA, allocated by the launchers and indexed without
    strides, are aligned by construction."""
    return all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1
               and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) for t in tensors)


@triton.jit
def head_slice(X, bh, H, stride_b, stride_h, stride_row, ALIGNED: tl.constexpr):
    """The (batch, head) = divmod(bh, H) slice of X: its pointer, with 64-bit offsets (big tensors overflow i32),
    and its row stride.

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
    return X + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h, stride_row


@triton.jit
def qkv_of_head(Q, K, V, bh, H, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, ALIGNED: tl.constexpr):
    """The (batch, head) = divmod(bh, H) slices of Q, K and V: (Q, stride_qm, K, stride_kn, V, stride_vn)."""
    Q, stride_qm = head_slice(Q, bh, H, stride_qb, stride_qh, stride_qm, ALIGNED)
    K, stride_kn = head_slice(K, bh, H, stride_kb, stride_kh, stride_kn, ALIGNED)
    V, stride_vn = head_slice(V, bh, H, stride_vb, stride_vh, stride_vn, ALIGNED)
    return Q, stride_qm, K, stride_kn, V, stride_vn


@triton.jit
def load_tile(X, rows, n_rows, stride_row, cols, stride_col, HEAD_DIM: tl.constexpr):
    """Load the (rows, cols) tile of a (n_rows, HEAD_DIM) matrix at X, zeros past the sequence end and in the
    head-size padding. Pointers are formed from 32-bit offsets at each load, so no tile of 64-bit pointers stays
    live across a loop."""
    ptrs = X + rows[:, None] * stride_row + cols[None, :] * stride_col
    return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def store_tile(X, values, rows, n_rows, stride_row, cols, stride_col, HEAD_DIM: tl.constexpr):
    """Store a (rows, cols) tile into a (n_rows, HEAD_DIM) matrix at X, in X's dtype, skipping the padding."""
    ptrs = X + rows[:, None] * stride_row + cols[None, :] * stride_col
    tl.store(ptrs, values.to(X.dtype.element_ty), mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM))


@triton.jit
def dropout_keep(seed, bh, query_idx, key_idx, N_K, dropout_p):
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
def fresh_each_step(x, step):
    """x, for a loop over `step`. fp32 products run without tensor cores, and the compiler would convert a
    loop-invariant fp32 operand to the product's layout once, before the loop: replicated across threads, that
    takes hundreds of registers per thread at head size 256. A loop-dependent zero moves the conversion into the
    loop. 16-bit tiles (tensor-core operands, compact) are returned unchanged."""
    if x.dtype == tl.float32:
        x = x + 0.0 * step
    return x


@triton.jit
def keys_seen_by_query_block(start_m, N_Q, N_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              CAUSAL: tl.constexpr):
    """The key range of the query block starting at start_m, in two parts: [0, full_end) is seen by every row of
    the block (whole key blocks, no mask needed), [full_end, end) holds the diagonal block(s) and the key tail
    (masked). A causal block stops at its diagonal; query i sees keys j <= i + Nk - Nq."""
    if CAUSAL:
        causal_offset = N_K - N_Q
        full_end = tl.minimum(tl.maximum(start_m + causal_offset + 1, 0), N_K) // BLOCK_N * BLOCK_N
        end = tl.minimum(tl.maximum(tl.minimum(start_m + BLOCK_M, N_Q) + causal_offset, 0), N_K)
    else:
        full_end = N_K // BLOCK_N * BLOCK_N
        end = N_K
    return full_end, end


@triton.jit
def queries_seeing_key_block(start_n, N_Q, N_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              CAUSAL: tl.constexpr):
    """The query range that sees the key block starting at start_n, in two parts: [start, full_start) holds the
    diagonal (masked), [full_start, N_Q) sees the whole block (no mask). Both bounds are multiples of BLOCK_M."""
    if CAUSAL:
        causal_offset = N_K - N_Q
        start = tl.minimum(tl.maximum(start_n - causal_offset, 0), N_Q) // BLOCK_M * BLOCK_M
        full_start = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), N_Q)
        full_start = tl.cdiv(full_start, BLOCK_M) * BLOCK_M
    else:
        start = 0
        full_start = 0
    return start, full_start
