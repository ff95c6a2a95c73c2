"""The decoding kernels: attention of a few new tokens per sequence against a preallocated key/value cache, split
along the keys ("flash decoding"). Per batch b, with L_b the sequence's length after the append:

    K_cache[b, :, s_b : s_b + Nq] = K_new[b]  (and V)   the append, when new keys are given (s_b = cache_seqlens[b])
    S = scale * Q K_cache[b, :, :L_b]^T                    (Nq, L_b) scores of each query head against its group's
                                                           key/value head h // (H / H_KV)
    S[i, j] = -inf unless j <= L_b - Nq + i               causal, aligned bottom-right within the sequence
    out = softmax(S) V_cache[b, :, :L_b]

A sequence's keys are cut into `num_splits` contiguous chunks, and one program handles one chunk for every query
row of one key/value group (its H / H_KV query heads times Nq new tokens, in blocks of BLOCK_R rows): the cache is
read once per group, not once per query head, and short batches still fill the GPU. Each program leaves its
chunk's output normalised by its own softmax denominator, with the log-sum-exp of that denominator; the combine
kernel weighs the chunks by those (2^(lse_s - max) / sum). With one split the first kernel writes the output
itself. The chunk size is computed on the device from L_b, so no host ever reads cache_seqlens.
"""

import triton
import triton.language as tl

from ..attention.band import band_bounds
from ..attention.shared import (
    LOG2_E,
    attention_kernel,
    load_tile,
    matrix_of,
    online_softmax,
    program_coordinates,
    store_tile,
)


@triton.jit
def cache_length(CACHE_SEQLENS, b, n_new, N_K):
    """(length, valid) of batch b's sequence: its keys after appending n_new (0 without an append), and whether
    that stays within the cache's N_K slots. The launcher checks the lengths before launching, except where it
    cannot read them (CUDA-graph capture, torch.compile): then an out-of-range sequence reads and writes nothing
    and outputs NaN, never a silently clamped result."""
    cached = tl.load(CACHE_SEQLENS + b)
    valid = (cached >= 0) & (cached + n_new <= N_K)
    return tl.where(valid, cached + n_new, 0), valid


@triton.jit
def group_row_pointers(X, b, kv_head, rows, group, N_Q, stride_b, stride_h, stride_m, ALIGNED: tl.constexpr):
    """Pointers to the first element of each row of a key/value group's queries in X (B, H, N_Q, D): row
    r = g * N_Q + i is query i of head kv_head * group + g. 64-bit offsets: X may have any strides. With ALIGNED
    the strides are marked as multiples of 16 bytes, as matrix_of marks them, so whole rows move in 16-byte
    vectors (the rows' pointers alone would otherwise take a register pair per element)."""
    if ALIGNED:
        elements: tl.constexpr = 128 // X.dtype.element_ty.primitive_bitwidth
        stride_h = stride_h // elements * elements
        stride_m = stride_m // elements * elements
    X, stride_m = matrix_of(X, b, kv_head * group, 0, stride_b, stride_h, stride_m, ALIGNED)
    return X + (rows // N_Q).to(tl.int64) * stride_h + (rows % N_Q).to(tl.int64) * stride_m


@attention_kernel
def decode_append_kernel(
    K_NEW, V_NEW, K_CACHE, V_CACHE, CACHE_SEQLENS: "*i32",
    stride_knb, stride_knh, stride_knn,
    stride_vnb, stride_vnh, stride_vnn,
    stride_kcb, stride_kch, stride_kcn,
    stride_vcb, stride_vch, stride_vcn,
    H_KV: tl.int32, N_Q: tl.int32, N_K: tl.int32,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Write one (batch, key/value head)'s new keys and values into the caches, at rows
    [cache_seqlens[b], cache_seqlens[b] + N_Q). Grid: (B * H_KV,).

    K_NEW, V_NEW: the new keys and values, (B, H_KV, N_Q, D) in the caches' dtype, last stride 1 (stride_kn*,
        stride_vn*: batch, head, row).
    K_CACHE, V_CACHE: the caches, (B, H_KV, N_K, D), last stride 1, written here (stride_kc*, stride_vc*).
    CACHE_SEQLENS: int32 (B,), each sequence's filled length before the append.
    H_KV: key/value heads. N_Q: new tokens per sequence. N_K: the caches' slots per sequence (Nmax).
    HEAD_DIM: D; BLOCK_D: D padded to a power of two (>= 16). BLOCK_R: rows copied per step.
    ALIGNED: every tensor's pointer is 16-byte aligned and its strides multiples of 16 bytes (operands_aligned).
    """
    _, b, kv_head = program_coordinates(tl.program_id(0), 1, H_KV, 1)
    n_k, valid = cache_length(CACHE_SEQLENS, b, n_new=N_Q, N_K=N_K)
    if valid:
        start = n_k - N_Q
        K_NEW, stride_knn = matrix_of(K_NEW, b, kv_head, 0, stride_knb, stride_knh, stride_knn, ALIGNED)
        V_NEW, stride_vnn = matrix_of(V_NEW, b, kv_head, 0, stride_vnb, stride_vnh, stride_vnn, ALIGNED)
        # the caches from row `start` on: the new rows' place
        K_CACHE, stride_kcn = matrix_of(K_CACHE, b, kv_head, start, stride_kcb, stride_kch, stride_kcn, ALIGNED)
        V_CACHE, stride_vcn = matrix_of(V_CACHE, b, kv_head, start, stride_vcb, stride_vch, stride_vcn, ALIGNED)
        offs_d = tl.arange(0, BLOCK_D)
        for first in range(0, N_Q, BLOCK_R):
            rows = first + tl.arange(0, BLOCK_R)
            store_tile(K_CACHE, load_tile(K_NEW, rows, N_Q, stride_knn, offs_d, HEAD_DIM), rows, N_Q, stride_kcn,
                       offs_d, HEAD_DIM)
            store_tile(V_CACHE, load_tile(V_NEW, rows, N_Q, stride_vnn, offs_d, HEAD_DIM), rows, N_Q, stride_vcn,
                       offs_d, HEAD_DIM)


@attention_kernel
def decode_split_kernel(
    Q, K, V, O, O_SPLITS: "*fp32", LSE_SPLITS: "*fp32", CACHE_SEQLENS: "*i32",
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    H: tl.int32, H_KV: tl.int32, N_Q: tl.int32, N_K: tl.int32, n_new: tl.int32, num_splits: tl.int32,
    scale: tl.float32,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Attention of one block of BLOCK_R query rows of one key/value group (rows r = g * N_Q + i: query i of head
    kv_head * H / H_KV + g) against one chunk of its sequence's cached keys.
    Grid: (num_splits * cdiv(H / H_KV * N_Q, BLOCK_R) * B * H_KV,): a group's row blocks, then its splits, are
    consecutive programs, so the row blocks of one chunk read it from L2 after the first.

    Q: queries, fp16/bf16/fp32 (B, H, N_Q, D), last stride 1, others any (stride_q*: batch, head, row).
    K, V: the caches, same dtype, (B, H_KV, N_K, D), last stride 1 (stride_k*, stride_v*); read up to each
        sequence's length after the append (already written by decode_append_kernel).
    O: the output, (B, H, N_Q, D) in the input dtype (stride_o*); written here when not SPLIT.
    O_SPLITS: fp32 (B, H, N_Q, num_splits, D) contiguous, written here when SPLIT: each chunk's output,
        normalised by the chunk's own softmax denominator (0 for a row that sees none of the chunk's keys).
    LSE_SPLITS: fp32 (B, H, N_Q, num_splits) contiguous, written here when SPLIT: log2 of each chunk's softmax
        denominator in the log2-scaled domain, log2(sum_j 2^(scale * log2(e) * q.k_j)); -inf for a row that sees
        none of the chunk's keys.
    CACHE_SEQLENS: int32 (B,), each sequence's filled length before the append.
    H, H_KV: query and key/value heads (H a multiple of H_KV). N_Q: new tokens (query rows) per sequence.
    N_K: the caches' slots per sequence (Nmax). n_new: N_Q when new keys were appended, else 0.
    num_splits: chunks each sequence's keys are cut into. scale: the softmax scale.
    HEAD_DIM: D; BLOCK_D: D padded to a power of two (>= 16). BLOCK_R: query rows per program (>= 16, the
    smallest tl.dot); BLOCK_N: keys per loop step.
    SPLIT: write the chunks' partial results (num_splits > 1) instead of the output.
    ALIGNED: Q, K, V and O have 16-byte aligned pointers and strides that are multiples of 16 bytes
    (operands_aligned).
    """
    group = H // H_KV
    n_rows = group * N_Q
    row_blocks = tl.cdiv(n_rows, BLOCK_R)
    block, b, kv_head = program_coordinates(tl.program_id(0), num_splits * row_blocks, H_KV, 1)
    split = block // row_blocks
    rows = block % row_blocks * BLOCK_R + tl.arange(0, BLOCK_R)
    query_of_row = rows % N_Q
    offs_d = tl.arange(0, BLOCK_D)
    n_k, valid = cache_length(CACHE_SEQLENS, b, n_new=n_new, N_K=N_K)

    # This split's keys: a contiguous chunk of whole blocks, sized from the sequence's own length, so a short
    # sequence in a long cache is still spread over every split
    keys_per_split = tl.cdiv(tl.cdiv(n_k, num_splits), BLOCK_N) * BLOCK_N
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, n_k)
    # query i sees keys j <= n_k - N_Q + i, so every row sees the keys before n_k - N_Q + 1: blocks below that
    # need no mask; the rest of the chunk (the bottom-right diagonal, the sequence's last partial block) does
    seen_by_every_row = tl.maximum(n_k - N_Q + 1, 0) // BLOCK_N * BLOCK_N
    unmasked_end = tl.maximum(tl.minimum(seen_by_every_row, end), start)
    first, last = band_bounds(n_q=N_Q, n_k=n_k, window_left=0, window_right=0)

    K, stride_kn = matrix_of(K, b, kv_head, 0, stride_kb, stride_kh, stride_kn, ALIGNED)
    V, stride_vn = matrix_of(V, b, kv_head, 0, stride_vb, stride_vh, stride_vn, ALIGNED)
    q_rows = group_row_pointers(Q, b=b, kv_head=kv_head, rows=rows, group=group, N_Q=N_Q, stride_b=stride_qb,
                                stride_h=stride_qh, stride_m=stride_qm, ALIGNED=ALIGNED)
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM),
                other=0.0)

    # Running row max m, denominator l and unnormalised output acc, all fp32: the forward's online softmax over
    # the chunk's key blocks, unmasked then masked (the causal band's right side only, no dropout)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    qk_scale = scale * LOG2_E  # log2(e) folded into the scale
    for masked in tl.static_range(2):
        acc, l_i, m_i = online_softmax(
            acc, l_i, m_i, q, K, V, stride_kn=stride_kn, stride_vn=stride_vn, offs_m=query_of_row, start_m=0,
            offs_d=offs_d, seed=0, bh=0, dropout_p=0.0, qk_scale=qk_scale, lo=unmasked_end if masked else start,
            hi=end if masked else unmasked_end, n_k=n_k, first=first, last=last, HEAD_DIM=HEAD_DIM,
            BLOCK_M=BLOCK_R, BLOCK_N=BLOCK_N, MASKED=masked == 1, BOUNDED_LEFT=False, BOUNDED_RIGHT=True,
            DROPOUT=False,
        )

    # out = acc / l; a row that saw no key has l = 0 and acc = 0: output 0, LSE -inf (weight 0 in the combine).
    # An out-of-range length (unchecked) gives NaN everywhere in its sequence's output.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(valid, acc / l_safe[:, None], float("nan"))
    if SPLIT:
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
        lse = tl.where(valid, lse, 0.0)
        # rows r of this group are rows kv_head * group * N_Q + r of the (B, H * N_Q) partial results
        first_row = (tl.cast(b, tl.int64) * H + kv_head * group) * N_Q
        row_stride = num_splits * HEAD_DIM
        store_tile(O_SPLITS + first_row * row_stride + split * HEAD_DIM, out, rows, n_rows, row_stride, offs_d,
                   HEAD_DIM)
        tl.store(LSE_SPLITS + (first_row + rows) * num_splits + split, lse, mask=rows < n_rows)
    else:
        o_rows = group_row_pointers(O, b=b, kv_head=kv_head, rows=rows, group=group, N_Q=N_Q, stride_b=stride_ob,
                                    stride_h=stride_oh, stride_m=stride_om, ALIGNED=ALIGNED)
        tl.store(o_rows[:, None] + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@attention_kernel
def decode_combine_kernel(
    O_SPLITS: "*fp32", LSE_SPLITS: "*fp32", O,
    stride_ob, stride_oh, stride_om,
    H: tl.int32, H_KV: tl.int32, N_Q: tl.int32, num_splits: tl.int32,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, ALIGNED: tl.constexpr,
):
    """The output of one block of BLOCK_R query rows of one key/value group (the split kernel's rows) from their
    chunks' partial results: each chunk's output weighted by its share of the row's softmax denominator, summed
    chunk by chunk with the online softmax's rescaling. Grid: (cdiv(H / H_KV * N_Q, BLOCK_R) * B * H_KV,).

    O_SPLITS: fp32 (B, H, N_Q, num_splits, D) contiguous, each chunk's normalised output (decode_split_kernel).
    LSE_SPLITS: fp32 (B, H, N_Q, num_splits) contiguous, each chunk's log2-domain log-sum-exp, -inf for a chunk
        the row sees no key of.
    O: the output, (B, H, N_Q, D) in the input dtype, last stride 1 (stride_o*: batch, head, row), written here.
    H, H_KV: query and key/value heads. N_Q: query rows per sequence and head. num_splits: chunks per sequence.
    HEAD_DIM: D; BLOCK_D: D padded to a power of two (>= 16). BLOCK_R: query rows per program.
    ALIGNED: O has a 16-byte aligned pointer and strides that are multiples of 16 bytes (operands_aligned).
    """
    group = H // H_KV
    n_rows = group * N_Q
    block, b, kv_head = program_coordinates(tl.program_id(0), tl.cdiv(n_rows, BLOCK_R), H_KV, 1)
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    # rows r of this group are rows kv_head * group * N_Q + r of the (B, H * N_Q) partial results
    first_row = (tl.cast(b, tl.int64) * H + kv_head * group) * N_Q
    LSE_SPLITS += first_row * num_splits
    O_SPLITS += first_row * num_splits * HEAD_DIM

    # Running max m of the chunks' LSEs, denominator l = sum_s 2^(lse_s - m) and output acc = sum_s 2^(lse_s - m) o_s
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for split in range(num_splits):
        lse = tl.load(LSE_SPLITS + rows * num_splits + split, mask=rows < n_rows, other=float("-inf"))
        o = load_tile(O_SPLITS + split * HEAD_DIM, rows, n_rows, num_splits * HEAD_DIM, offs_d, HEAD_DIM)
        # rescale what was summed to the new max; a row that has seen no key yet (m = -inf) uses 0 instead
        m_new = tl.maximum(m_i, lse)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_ref)
        weight = tl.math.exp2(lse - m_ref)
        acc = acc * alpha[:, None] + weight[:, None] * o
        l_i = l_i * alpha + weight
        m_i = m_new
    # out = acc / l; a row that sees no key at all has l = 0 and acc = 0: output 0
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_rows = group_row_pointers(O, b=b, kv_head=kv_head, rows=rows, group=group, N_Q=N_Q, stride_b=stride_ob,
                                stride_h=stride_oh, stride_m=stride_om, ALIGNED=ALIGNED)
    tl.store(o_rows[:, None] + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))
