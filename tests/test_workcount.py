"""bench.workcount's counts on launches whose answer is known exactly: a masked copy (bytes moved and distinct), one
tl.dot (FLOPs), torch-side ops, the attention forward at an sm_90 tile (its (query, key) pairs by kind), and the
LayerNorm extrapolation against a direct count."""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

if torch.cuda.is_available():  # the kernels are compiled for the GPU in this session, not interpreted
    pytest.skip("bench.workcount counts the kernels under Triton's CPU interpreter", allow_module_level=True)

from bench import workcount  # noqa: E402
from kernels.attention import tiles as attention_tiles  # noqa: E402


@triton.jit
def _pair_sum_kernel(X, Y, n, BLOCK: tl.constexpr):
    """Y[i] = X[i] + X[i + BLOCK] (0 past n) for the BLOCK elements of each program: X[i] is read by two programs."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(X + offsets, mask=offsets < n, other=0.0)
    b = tl.load(X + offsets + BLOCK, mask=offsets + BLOCK < n, other=0.0)
    tl.store(Y + offsets, a + b, mask=offsets < n)


@triton.jit
def _product_kernel(A, B, C, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    """C = A @ B for one row-major (M, K) x (K, N) tile, in fp32."""
    rows, columns, inner = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(A + rows[:, None] * K + inner[None, :])
    b = tl.load(B + inner[:, None] * N + columns[None, :])
    tl.store(C + rows[:, None] * N + columns[None, :], tl.dot(a, b))


def test_masked_loads_count_only_their_true_elements_and_distinct_bytes_count_each_byte_once():
    n, block = 100, 32
    x = torch.randn(n, dtype=torch.float16)
    y = torch.empty_like(x)
    with workcount.record() as recording:
        _pair_sum_kernel[(triton.cdiv(n, block),)](x, y, n, BLOCK=block)
    (launch,) = recording.launches
    assert launch.kernel == "_pair_sum_kernel" and launch.grid == (4, 1, 1)
    # a: elements 0..99 once; b: elements 32..99 (offsets + 32 < 100) once more; 2 bytes each
    assert launch.operands["X"] == {"loaded": (100 + 68) * 2, "stored": 0, "read": 100 * 2, "written": 0}
    assert launch.operands["Y"] == {"loaded": 0, "stored": 100 * 2, "read": 0, "written": 100 * 2}
    assert launch.moved == 536 and launch.distinct == 400
    torch.testing.assert_close(y[:68], x[:68] + x[32:])


@triton.jit
def _row_sum_kernel(X, Y, n_rows, n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Y = the sum of X's first n_rows rows (of n_cols), ROWS rows tried: each mask a column mask and-ed with a scalar
    comparison, which the interpreter holds as int32 0 / 1."""
    cols = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for row in tl.static_range(ROWS):
        total += tl.load(X + row * n_cols + cols, mask=(cols < n_cols) & (row < n_rows), other=0.0)
    tl.store(Y + cols, total, mask=cols < n_cols)


def test_an_integer_mask_selects_its_true_elements():
    x, y = torch.randn(3, 10), torch.empty(10)
    with workcount.record() as recording:
        _row_sum_kernel[(1,)](x, y, 3, 10, ROWS=4, BLOCK=16)
    (launch,) = recording.launches
    assert launch.operands == {"X": {"loaded": 120, "stored": 0, "read": 120, "written": 0},
                               "Y": {"loaded": 0, "stored": 40, "read": 0, "written": 40}}
    torch.testing.assert_close(y, x.sum(0))


def test_a_product_counts_2_m_n_k_flops():
    m, n, k = 16, 32, 64
    a, b = torch.randn(m, k, dtype=torch.float16), torch.randn(k, n, dtype=torch.float16)
    c = torch.empty(m, n)
    with workcount.record() as recording:
        _product_kernel[(1,)](a, b, c, M=m, N=n, K=k)
    (launch,) = recording.launches
    assert launch.flops == {"unclassified": 2 * m * n * k}  # no attention operands: pairs not classified
    assert launch.moved == (m * k + k * n) * 2 + m * n * 4


def test_torch_side_ops_read_their_inputs_and_write_their_outputs_once():
    x = torch.randn(4, 8)  # 128 bytes
    with workcount.record() as recording:
        partial = torch.zeros(4, 8)  # written, not read
        total = x.sum(0)  # 128 read, 32 written
        partial.copy_(x)  # 128 read, 128 written (the destination is not read)
        x.view(-1), x.transpose(0, 1), torch.empty(1000)  # views and allocations move nothing
        total.to(torch.float16)  # 32 read, 16 written
    assert [(w.op, w.read, w.written) for w in recording.torch_work] == [
        ("zeros", 0, 128), ("sum", 128, 32), ("copy_", 128, 128), ("_to_copy", 32, 16)]


def _causal_forward_pairs(n, block_m, block_n, piece=16):
    """The (query, key) pairs a causal forward over N = n computes: each query block against the whole key blocks
    every one of its rows sees, then its diagonal in pieces of `piece` rows, each against its own keys in steps of
    `piece` (no piece past the last query). (visible, masked, padding), padding being a query or key index >= n."""
    computed = []  # (queries, keys) of each product
    for start_m in range(0, n, block_m):
        full_hi = min(start_m + 1, n) // block_n * block_n
        computed.append((np.arange(start_m, start_m + block_m), np.arange(0, full_hi)))
        for start in range(start_m, min(start_m + block_m, n), piece):
            last_row = min(start + piece, n) - 1
            for key in range(full_hi, last_row + 1, piece):
                computed.append((np.arange(start, start + piece), np.arange(key, key + piece)))
    visible = masked = padding = 0
    for queries, keys in computed:
        past_end = (queries[:, None] >= n) | (keys[None, :] >= n)
        seen = ~past_end & (keys[None, :] <= queries[:, None])
        visible += seen.sum()
        padding += past_end.sum()
        masked += seen.size - seen.sum() - past_end.sum()
    return visible, masked, padding


def test_attention_forward_at_the_sm90_tile_counts_its_pairs_by_kind():
    n, d = 100, 64
    case = workcount.AttentionCase(batch=1, heads=1, n=n, head_dim=d)
    forward, _ = workcount.run_attention(case)
    (launch,) = forward.launches
    tile = attention_tiles.table_tile("forward", d, torch.float16, False, 90, True)
    assert launch.tile.startswith(f"BLOCK_M {tile.block_m}, BLOCK_N {tile.block_n}")
    # At the 128 x 128 tile: one query block, no key block every row sees, so all of it in 16-row pieces: pieces 0
    # to 5 (rows 0..95) against keys up to their last row, 16 (t + 1) keys each; piece 6 (rows 96..111, 96..99 real)
    # against keys 0..111: 16 x (16 x 21 + 112) = 7168 pairs, of which 100 * 101 / 2 = 5050 visible, 12 rows x 112
    # keys + 4 rows x 12 keys = 1392 padding, and 6 triangles of 120 and one of 6 = 726 masked.
    visible, masked, padding = _causal_forward_pairs(n, tile.block_m, tile.block_n)
    if (tile.block_m, tile.block_n) == (128, 128):
        assert (visible, masked, padding) == (5050, 726, 1392)
    per_pair = 2 * 2 * d  # Q K^T and P V, 2 * d FLOPs each
    assert launch.flops == {"visible": visible * per_pair, "masked": masked * per_pair, "padding": padding * per_pair}
    assert forward.products("visible") == 2.0
    # every input read and every output written at least once, nothing else: distinct = needed
    rows = n * d * 2
    assert launch.distinct == forward.needed == 4 * rows + 4 * n


def test_layer_norm_extrapolated_to_more_rows_and_multiprocessors_counts_what_a_direct_run_counts():
    width, rows, multiprocessors = 5000, 96, 12  # misaligned: a streamed backward, 3 column tiles x 4 row groups
    direct = workcount.run_norm("layer_norm", width, rows, multiprocessors)
    extrapolated = workcount._norm_at_scale("layer_norm", width, [rows], multiprocessors)
    for measured, predicted in zip(direct, extrapolated):
        assert [(launch.kernel, launch.grid, launch.operands) for launch in predicted.launches] == [
            (launch.kernel, launch.grid, launch.operands) for launch in measured.launches]
        assert predicted.torch_work == measured.torch_work and predicted.needed == measured.needed
