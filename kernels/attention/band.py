"""The visible band and the ranges of blocks it makes (see shared.py for the band itself): which keys a block of
queries sees and which queries see a block of keys, in three consecutive ranges (a masked edge, the blocks seen
whole, the other masked edge), and the diagonal pieces a held block is cut into at the edges.

A program holds a block of rows (queries in the forward and dQ, keys in dK/dV) and streams the other side. Where
every held row sees every streamed row, it streams whole blocks without mask arithmetic. At the band's edges (the
causal diagonal, a window's far side) a held block of 128 rows would compute a 128-wide triangle whole, half of it
masked: there the held block is cut into pieces of DIAGONAL_ROWS rows, each streaming its own edge in steps of
DIAGONAL_ROWS, so only triangles of DIAGONAL_ROWS rows are computed and masked.
"""

import triton
import triton.language as tl

# Rows of a diagonal piece: the smallest tl.dot.
DIAGONAL_ROWS = tl.constexpr(16)


@triton.constexpr_function
def forward_edges_in_pieces(block_d):
    """Whether the forward runs the band's edges in diagonal pieces. At head size 256 its held accumulator takes
    128 registers a thread, and a piece's copy of its rows and its operands beside it spill (with dropout on sm_90):
    there the edge blocks run whole, masked, as the sequence's last partial block does. (The backward's key
    programs keep their pieces there and hold dK and dV in column slices of the head instead: with their edges
    whole they spilled more.)"""
    return block_d < 256


@triton.jit
def band_bounds(n_q, n_k, window_left, window_right):
    """(first, last): query i sees keys i + first <= j <= i + last, offset = Nk - Nq aligning the band
    bottom-right. Only the bounded sides are used."""
    offset = n_k - n_q
    return offset - window_left, offset + window_right


@triton.jit
def visible(query_idx, key_idx, n_k, first, last, BOUNDED_LEFT: tl.constexpr, BOUNDED_RIGHT: tl.constexpr):
    """Where query i sees key j: j is a key of the sequence and lies in i's band (each side only when bounded).
    query_idx and key_idx broadcast against each other (rows[:, None] and cols[None, :], or transposed)."""
    seen = key_idx < n_k
    if BOUNDED_LEFT:
        seen = seen & (key_idx - query_idx >= first)
    if BOUNDED_RIGHT:
        seen = seen & (key_idx - query_idx <= last)
    return seen


@triton.jit
def keys_seen_by_query_block(start_m, n_q, n_k, first, last, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BOUNDED_LEFT: tl.constexpr, BOUNDED_RIGHT: tl.constexpr):
    """The keys the query block [start_m, start_m + BLOCK_M) sees, as three consecutive ranges of whole key
    blocks: [lo, full_lo) masked (the band's left edge), [full_lo, full_hi) seen by every row of the block (no
    mask needed), [full_hi, hi) masked (the band's right edge, e.g. the causal diagonal, and the sequence's
    last partial block). Key blocks outside the band are never visited: cost grows with N x window."""
    last_row = tl.minimum(start_m + BLOCK_M, n_q) - 1
    lo = 0
    full_lo = 0
    hi = n_k
    full_hi = n_k
    if BOUNDED_LEFT:
        lo = tl.maximum(start_m + first, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(last_row + first, 0), BLOCK_N) * BLOCK_N
    if BOUNDED_RIGHT:
        hi = tl.maximum(tl.minimum(last_row + last + 1, n_k), 0)
        full_hi = tl.maximum(tl.minimum(start_m + last + 1, n_k), 0)
    full_lo = tl.maximum(tl.minimum(full_lo, hi), lo)
    full_hi = tl.maximum(full_hi // BLOCK_N * BLOCK_N, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def queries_seeing_key_block(start_n, n_q, first, last, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BOUNDED_LEFT: tl.constexpr, BOUNDED_RIGHT: tl.constexpr):
    """The queries that see the key block [start_n, start_n + BLOCK_N), as three consecutive ranges of whole
    query blocks: [lo, full_lo) masked, [full_lo, full_hi) see every key of the block, [full_hi, hi) masked.
    Query i sees key j when j - last <= i <= j - first. Rows past the sequence's end add nothing (their q and dO
    load as 0 and their LSE as +inf), so they need no mask."""
    lo = 0
    full_lo = 0
    hi = n_q
    full_hi = n_q
    if BOUNDED_RIGHT:
        lo = tl.maximum(start_n - last, 0) // BLOCK_M * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - last, 0), BLOCK_M) * BLOCK_M
    if BOUNDED_LEFT:
        hi = tl.maximum(tl.minimum(start_n + BLOCK_N - first, n_q), 0)
        full_hi = tl.maximum(tl.minimum(start_n + 1 - first, n_q), 0) // BLOCK_M * BLOCK_M
    full_lo = tl.maximum(tl.minimum(full_lo, hi), lo)
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def piece_edges(lo, hi, full_lo, full_hi):
    """The two ranges a diagonal piece streams, given the rows [lo, hi) it sees (from the two functions above at
    DIAGONAL_ROWS) and its block's range [full_lo, full_hi), which the whole block streamed already: the rows
    before that range, [lo, before_end), and after it, [after_start, hi) (either may be empty)."""
    return lo, tl.minimum(hi, full_lo), tl.maximum(lo, full_hi), hi


@triton.jit
def rows_of(x, first, ROWS: tl.constexpr):
    """Rows [first, first + ROWS) of x, (R,) or (R, C): a piece of a held block's accumulators."""
    if x.shape[0] == ROWS:  # a block of one piece (first is 0): a gather would hold a second copy of x
        return x
    index = first + tl.arange(0, ROWS)
    if len(x.shape) == 1:
        piece = tl.gather(x, index, 0)
    else:
        piece = tl.gather(x, index[:, None] + tl.zeros((ROWS, x.shape[1]), tl.int32), 0)
    return piece
