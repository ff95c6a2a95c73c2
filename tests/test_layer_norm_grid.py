"""The norm kernels' persistent grids and tiles, for LayerNorm and RMSNorm alike, each alone and after the residual
add: every width class the tile table tells apart and every grid shape (programs owning several row tiles, row counts
that do not divide the programs, fewer rows than programs), values and all gradients against float64 by the error
rule; large means; the deterministic sum of the dweight / dbias partial rows; row-strided inputs."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, assert_within_error_rule

from kernels import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from kernels.layer_norm import ops, tiles

pytestmark = pytest.mark.usefixtures("poisoned_allocations")

EPS = 1e-5


@pytest.fixture
def grid(monkeypatch):
    """grid(multiprocessors) sizes the persistent grids for that many multiprocessors and lets a backward program
    take a single row, so that a few rows reach every grid shape on any device."""

    def size_for(multiprocessors):
        monkeypatch.setattr(tiles, "multiprocessors", lambda device: multiprocessors)
        monkeypatch.setattr(tiles, "MIN_BACKWARD_ROWS_PER_PROGRAM", 1)

    return size_for


# The ops the kernels serve: name -> (the fused function, the eager norm, with a residual, with a bias).
OPS = {
    "layer_norm": (layer_norm, lambda s, w, b, width: F.layer_norm(s, (width,), w, b, EPS), False, True),
    "add_layer_norm": (add_layer_norm, lambda s, w, b, width: F.layer_norm(s, (width,), w, b, EPS), True, True),
    "rms_norm": (rms_norm, lambda s, w, width: F.rms_norm(s, (width,), w, EPS), False, False),
    "add_rms_norm": (add_rms_norm, lambda s, w, width: F.rms_norm(s, (width,), w, EPS), True, False),
}


def _run(op_name, provider, dtype, device, inputs, grads, width, padding=0):
    """(outputs, gradients of every input) of `op_name` by `provider` ("fused", "eager") in `dtype` on the same
    rounded inputs: [x, (residual,) weight, (bias)] as OPS says; an add returns y and s. padding > 0: x is passed as
    a row-strided view, the first `width` elements of rows `padding` elements wider."""
    fused, eager, with_sum, _ = OPS[op_name]
    leaves = [t.detach().to(device=device, dtype=dtype).requires_grad_() for t in inputs]
    arguments = list(leaves)
    if padding:
        wide = torch.zeros(inputs[0].shape[0], width + padding, dtype=dtype, device=device)
        wide[:, :width] = leaves[0].detach()
        leaves[0] = wide.requires_grad_()
        arguments[0] = wide[:, :width]
    if provider == "fused":
        outputs = fused(*arguments, eps=EPS) if with_sum else (fused(*arguments, eps=EPS),)
    elif with_sum:
        s = arguments[0] + arguments[1]
        outputs = (eager(s, *arguments[2:], width), s)
    else:
        outputs = (eager(*arguments, width),)
    torch.autograd.backward(outputs, [g.to(device=device, dtype=dtype) for g in grads[:len(outputs)]])
    return list(outputs) + [leaves[0].grad[:, :width]] + [t.grad for t in leaves[1:]]


def _check(op_name, dtype, device, rows, width, mean=0.5, padding=0):
    """The fused op against float64 by the error rule, on (rows, width) inputs of the given mean (padding: x passed
    as a row-strided view, see _run)."""
    _, _, with_sum, with_bias = OPS[op_name]
    generator = torch.Generator().manual_seed(rows * 100003 + width)
    shape = (rows, width)
    inputs = [torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + mean]
    if with_sum:
        inputs.append(torch.randn(shape, generator=generator, dtype=torch.float64))
    inputs.append(torch.randn(width, generator=generator, dtype=torch.float64) * 0.5 + 1)
    if with_bias:
        inputs.append(torch.randn(width, generator=generator, dtype=torch.float64))
    inputs = [t.to(dtype) for t in inputs]  # every run sees the same rounded values
    grads = [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for _ in range(2)]
    fused = _run(op_name, "fused", dtype, device, inputs, grads, width, padding)
    eager = _run(op_name, "eager", dtype, device, inputs, grads, width)
    reference = _run(op_name, "eager", torch.float64, device, inputs, grads, width)
    names = (["y", "s"] if with_sum else ["y"]) + ["grad x"] + (["grad residual"] if with_sum else []) + [
        "grad weight"] + (["grad bias"] if with_bias else [])
    assert len(names) == len(fused)
    for name, f, e, r in zip(names, fused, eager, reference):
        assert_within_error_rule(f, e, r, name=name)


# (width, what it exercises). Aligned: a width that is a multiple of 16 (the tensors' pointers are), which the
# launchers give the wider on-chip limits.
WIDTHS = [
    (7, "stacked rows, misaligned"),
    (384, "stacked rows"),
    (4096, "one row per tile"),
    (8192, "the backward's on-chip limit"),
    (8208, "one past it: backward streamed, the last of five column tiles 16 wide"),
    (8200, "misaligned: the backward streamed, and the 16-bit forward (fp32's is held on chip)"),
    (16384, "forward on-chip limit"),
    (16400, "one past it: forward streamed, its 16-wide last chunk held; backward in nine column tiles"),
]


@pytest.mark.parametrize("op_name", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [w for w, _ in WIDTHS])
def test_every_width_class(grid, device, dtype, op_name, width):
    """Wide rows: 9 rows on 8 multiprocessors, which gives the forward one row per program at 4096 (more programs
    than rows), two (and one) at 8192 and 16384, the on-chip backward two (and one); the streamed backward one row
    group (test_streamed_backward_row_groups has several, test_grid_shapes the narrow rows' grids)."""
    grid(8)
    _check(op_name, dtype, device, rows=9 if width > 1000 else 37, width=width)


@pytest.mark.parametrize("op_name", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, multiprocessors", [(301, 2), (5, 4)], ids=["several-tiles-per-program",
                                                                           "fewer-rows-than-programs"])
@pytest.mark.parametrize("width", [7, 384, 2048])
def test_grid_shapes(grid, device, dtype, op_name, width, rows, multiprocessors):
    """301 rows on 2 multiprocessors: every program takes several row tiles and the tiles do not divide among them
    evenly; 5 rows on 4: more programs wanted than there are tiles."""
    grid(multiprocessors)
    tile = tiles.launch_tile("backward", tiles.precision(dtype), width, width % 16 == 0)
    row_tiles = -(-rows // tile.rows)
    row_groups = tiles.backward_row_groups(rows, tile, 1, torch.device(device))
    if rows == 301:
        assert row_tiles > row_groups > 1 and row_tiles % row_groups
    else:
        assert row_tiles < tile.programs_per_sm * multiprocessors
    _check(op_name, dtype, device, rows=rows, width=width)


@pytest.mark.parametrize("op_name", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_streamed_backward_row_groups(grid, device, dtype, op_name):
    """23 rows of 8208 on 16 multiprocessors: five column tiles, three row groups of two row tiles (8, 8 and 7
    rows), each program holding its column tile's partials across them."""
    grid(16)
    tile = tiles.launch_tile("backward", tiles.precision(dtype), 8208, True)
    assert tiles.backward_row_groups(23, tile, 5, torch.device(device)) == 3
    _check(op_name, dtype, device, rows=23, width=8208)


@pytest.mark.parametrize("op_name", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("mean", [100.0, 1000.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [384, 8192, 16400], ids=["stacked", "on-chip-limit", "streamed"])
def test_large_means(grid, device, dtype, width, mean, op_name):
    """Inputs whose mean is large against their spread: LayerNorm's variance must not come from sum(x^2) -
    sum(x)^2, and RMSNorm's mean square must keep the mean in (its fp32 sum of squares of values near 100)."""
    grid(1)
    _check(op_name, dtype, device, rows=3, width=width, mean=mean)


@pytest.mark.parametrize("op_name", ["add_layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("width", [384, 8192, 16400], ids=["stacked", "on-chip-limit", "streamed"])
def test_repeated_backward_is_bit_identical(grid, device, width, op_name):
    grid(2)
    fused, _, _, with_bias = OPS[op_name]
    generator = torch.Generator().manual_seed(width)
    x, residual, dy, ds = (torch.randn(40, width, generator=generator).half().to(device) for _ in range(4))
    parameters = [torch.randn(width, generator=generator).half().to(device) for _ in range(2 if with_bias else 1)]

    def gradients():
        leaves = [t.clone().requires_grad_() for t in (x, residual, *parameters)]
        torch.autograd.backward(fused(*leaves), (dy, ds))
        return [t.grad for t in leaves]

    for first, second in zip(gradients(), gradients()):
        assert torch.equal(first, second)


def test_partial_rows_are_summed_in_program_order(device):
    """dweight and dbias are the partial rows added one after the other from the first program's: bit for bit the
    sequential fp32 sum, whatever the row count (here not a multiple of the rows the kernel loads per step)."""
    generator = torch.Generator().manual_seed(11)
    n_partials, width = 21, 300
    scales = 10.0 ** torch.randint(-3, 4, (2, n_partials, 1), generator=generator)
    partials = (torch.randn(2, n_partials, width, generator=generator) * scales).to(device)
    weight = torch.empty(width, dtype=torch.float16, device=device)
    dweight, dbias = ops._sum_partials(partials[0], partials[1], weight, torch.float32, width, True, True)
    for computed, rows, dtype in ((dweight, partials[0], torch.float16), (dbias, partials[1], torch.float32)):
        in_order = torch.zeros(width, device=device)
        for row in rows:
            in_order = in_order + row
        assert computed.dtype == dtype and torch.equal(computed, in_order.to(dtype))
        reversed_order = torch.zeros(width, device=device)
        for row in rows.flip(0):
            reversed_order = reversed_order + row
        assert not torch.equal(in_order, reversed_order)  # the order shows in the bits


@pytest.mark.parametrize("op_name", OPS)
@pytest.mark.parametrize("width, padding", [(384, 16), (384, 3), (8192, 16), (16400, 16)],
                         ids=["stacked", "stacked-misaligned", "on-chip-limit", "streamed"])
def test_row_strided_views(grid, device, op_name, width, padding):
    """x a view of every row's first `width` elements of a wider tensor: read in place by the forward and the
    backward (which reads the normalized rows back), aligned or not as its row stride is."""
    grid(1)
    _check(op_name, torch.float16, device, rows=6, width=width, padding=padding)
