"""kernels.layer_norm / add_layer_norm / FusedLayerNorm against torch's LayerNorm in float64."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import DTYPES, assert_within_error_rule, gpu_only_determinism
from norm_helpers import leaf, random64, shape_id

import kernels._validate
from kernels import FusedLayerNorm, add_layer_norm, layer_norm

pytestmark = pytest.mark.usefixtures("poisoned_allocations")

EPS = 1e-5

# (shape, with weight, with bias). Widths around every tile boundary: one element, odd, the decoder's 384,
# not a power of two, the backward's widest one-tile row (1024) and one past it (streamed in the backward),
# just past a power of two, the forward's widest tile and past it (streamed in both, a ragged last chunk),
# and the widest checked (65536); one row and many; 2-D and 3-D.
LAYER_NORM_CASES = [
    ((1, 1), True, True),
    ((37, 1), True, True),
    ((1, 7), True, True),
    ((37, 7), True, True),
    ((1, 384), True, True),
    ((300, 384), True, True),
    ((37, 384), True, False),
    ((37, 384), False, True),
    ((37, 384), False, False),
    ((37, 1000), True, True),
    ((3, 1024), True, True),
    ((2, 1025), True, True),
    ((1, 4097), True, True),
    ((5, 4097), True, True),
    ((2, 8192), True, True),
    ((3, 20000), True, True),
    ((3, 20000), False, False),
    ((3, 20000), True, False),
    ((1, 65536), True, True),
    ((2, 65536), True, True),
    ((2, 9, 384), True, True),
    ((3, 5, 7), False, True),
]


def _grads(*tensors):
    return [None if t is None else t.grad for t in tensors]


def _assert_grads_within_error_rule(fused, eager, reference, names):
    for fused_grad, eager_grad, reference_grad, name in zip(fused, eager, reference, names):
        if reference_grad is None:
            assert fused_grad is None, f"{name}: unexpected gradient"
        else:
            assert_within_error_rule(fused_grad, eager_grad, reference_grad, name=f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, has_weight, has_bias", LAYER_NORM_CASES, ids=shape_id)
def test_layer_norm_matches_float64_reference(device, dtype, shape, has_weight, has_bias):
    generator = torch.Generator().manual_seed(hash((shape, has_weight, has_bias)) % 2**31)
    width = shape[-1]
    x = random64(shape, generator, scale=2.0, offset=0.5)  # a mean well away from zero
    weight = random64(width, generator, scale=0.5, offset=1.0) if has_weight else None
    bias = random64(width, generator) if has_bias else None
    x, weight, bias = (None if t is None else t.to(dtype) for t in (x, weight, bias))  # every run sees these
    dy = random64(shape, generator).to(device=device, dtype=dtype)

    def run(dtype, fn):
        leaves = [leaf(t, dtype, device) for t in (x, weight, bias)]
        out = fn(*leaves)
        out.backward(dy.to(dtype))
        return out, _grads(*leaves)

    fused, fused_grads = run(dtype, lambda x, w, b: layer_norm(x, w, b, EPS))
    eager, eager_grads = run(dtype, lambda x, w, b: F.layer_norm(x, (width,), w, b, EPS))
    reference, reference_grads = run(torch.float64, lambda x, w, b: F.layer_norm(x, (width,), w, b, EPS))

    assert fused.dtype == dtype and fused.shape == x.shape
    assert_within_error_rule(fused, eager, reference, name="y")
    _assert_grads_within_error_rule(fused_grads, eager_grads, reference_grads, ("x", "weight", "bias"))


# (shape, with weight, with bias): the add + norm over the same width classes.
ADD_LAYER_NORM_CASES = [
    ((1, 7), True, True),
    ((300, 384), True, True),
    ((2, 9, 384), False, False),
    ((5, 4097), True, True),
    ((3, 10000), True, False),
    ((3, 20000), True, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, has_weight, has_bias", ADD_LAYER_NORM_CASES, ids=shape_id)
def test_add_layer_norm_matches_eager_composite(device, dtype, shape, has_weight, has_bias):
    generator = torch.Generator().manual_seed(hash((shape, has_weight)) % 2**31)
    width = shape[-1]
    inputs = [
        random64(shape, generator, scale=2.0, offset=0.5),
        random64(shape, generator),
        random64(width, generator, scale=0.5, offset=1.0) if has_weight else None,
        random64(width, generator) if has_bias else None,
    ]
    inputs = [None if t is None else t.to(dtype) for t in inputs]  # the same rounded inputs for every run
    dy, ds = (random64(shape, generator).to(device=device, dtype=dtype) for _ in range(2))

    def run(dtype, fn):
        leaves = [leaf(t, dtype, device) for t in inputs]
        y, s = fn(*leaves)
        torch.autograd.backward((y, s), (dy.to(dtype), ds.to(dtype)))  # gradients from both outputs
        return y, s, _grads(*leaves)

    def eager_composite(x, residual, w, b):
        s = x + residual
        return F.layer_norm(s, (width,), w, b, EPS), s

    fused_y, fused_s, fused_grads = run(dtype, lambda x, r, w, b: add_layer_norm(x, r, w, b, EPS))
    eager_y, eager_s, eager_grads = run(dtype, eager_composite)
    reference_y, reference_s, reference_grads = run(torch.float64, eager_composite)

    torch.testing.assert_close(fused_s, eager_s, rtol=0, atol=0)  # the same rounded sum as torch's add
    assert_within_error_rule(fused_y, eager_y, reference_y, name="y")
    _assert_grads_within_error_rule(fused_grads, eager_grads, reference_grads, ("x", "residual", "weight", "bias"))


@pytest.mark.parametrize("used_output", ["y", "s"])
def test_add_layer_norm_with_one_output_used(device, used_output):
    generator = torch.Generator().manual_seed(3)
    inputs = [random64((6, 384), generator) for _ in range(2)] + [random64(384, generator) for _ in range(2)]

    def run(dtype, fn):
        leaves = [leaf(t, dtype, device) for t in inputs]
        y, s = fn(*leaves)
        (y if used_output == "y" else s).pow(2).sum().backward()
        return [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]  # weight, bias do not reach s

    def eager_composite(x, r, w, b):
        s = x + r
        return F.layer_norm(s, (384,), w, b, EPS), s

    fused = run(torch.float32, lambda x, r, w, b: add_layer_norm(x, r, w, b, EPS))
    eager = run(torch.float32, eager_composite)
    reference = run(torch.float64, eager_composite)
    _assert_grads_within_error_rule(fused, eager, reference, ("x", "residual", "weight", "bias"))


@gpu_only_determinism
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(200, 384), (12, 5000)], ids=["one-tile-rows", "streamed-rows"])
def test_backward_is_deterministic(device, dtype, shape):
    """Many programs add partial dweight / dbias rows; two runs must agree to the bit."""
    generator = torch.Generator().manual_seed(4)
    x, residual, dy, ds = (random64(shape, generator).to(device=device, dtype=dtype) for _ in range(4))
    weight, bias = (random64(shape[-1], generator).to(device=device, dtype=dtype) for _ in range(2))

    def grads():
        leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
        y, s = add_layer_norm(*leaves)
        torch.autograd.backward((y, s), (dy, ds))
        return _grads(*leaves)

    for first, second in zip(grads(), grads()):
        assert torch.equal(first, second)


def test_strided_inputs_and_expanded_gradients(device):
    """A row-strided view is read in place, a column-strided one is copied; an expanded (stride-0)
    gradient, as y.sum().backward() gives, is handled."""
    generator = torch.Generator().manual_seed(5)
    base = random64((12, 500), generator).float().to(device)
    weight = random64(384, generator).float().to(device)
    for view in (base[:, :384], base[:, ::2][:, :200], base.t()[:384]):
        width = view.shape[-1]

        def run(dtype, fn):
            x = view.detach().to(dtype).requires_grad_()
            w = weight[:width].detach().to(dtype).requires_grad_()
            out = fn(x, w)
            out.sum().backward()
            return out, x.grad, w.grad

        fused = run(torch.float32, lambda x, w: layer_norm(x, w))
        eager = run(torch.float32, lambda x, w: F.layer_norm(x, (width,), w, None, EPS))
        reference = run(torch.float64, lambda x, w: F.layer_norm(x, (width,), w, None, EPS))
        for name, f, e, r in zip(("y", "grad x", "grad weight"), fused, eager, reference):
            assert_within_error_rule(f, e, r, name=name)


def test_no_rows(device):
    x = torch.randn(0, 384, device=device, requires_grad=True)
    weight = torch.randn(384, device=device, requires_grad=True)
    bias = torch.randn(384, device=device, requires_grad=True)
    y = layer_norm(x, weight, bias)
    assert y.shape == (0, 384)
    y.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))


# ----------------------------------------------------------------------------------------------------
# The module.


@pytest.mark.parametrize("elementwise_affine, bias", [(True, True), (True, False), (False, True)])
def test_fused_layer_norm_is_a_drop_in_for_nn_layer_norm(device, elementwise_affine, bias):
    torch.manual_seed(6)
    eager = nn.LayerNorm(384, eps=1e-6, elementwise_affine=elementwise_affine, bias=bias, device=device)
    for parameter in eager.parameters():
        nn.init.normal_(parameter)
    fused = FusedLayerNorm(384, eps=1e-6, elementwise_affine=elementwise_affine, bias=bias, device=device)

    assert fused.normalized_shape == eager.normalized_shape == (384,)
    assert repr(fused) == repr(eager).replace("LayerNorm", "FusedLayerNorm")
    fresh = nn.LayerNorm(384, elementwise_affine=elementwise_affine, bias=bias, device=device).state_dict()
    assert {k: v.tolist() for k, v in fused.state_dict().items()} == {k: v.tolist() for k, v in fresh.items()}

    fused.load_state_dict(eager.state_dict())
    x = torch.randn(2, 9, 384, device=device)
    assert_within_error_rule(fused(x), eager(x), eager.double()(x.double()))
    eager.float().load_state_dict(fused.state_dict())  # and back


def test_fused_layer_norm_add_and_norm(device):
    torch.manual_seed(7)
    norm = FusedLayerNorm(384, device=device)
    nn.init.normal_(norm.weight)
    x, residual = torch.randn(2, 5, 384, device=device), torch.randn(2, 5, 384, device=device)
    y, s = norm.add_and_norm(x, residual)
    torch.testing.assert_close(s, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(y, norm(x + residual), rtol=0, atol=0)


def test_fused_layer_norm_options(device):
    norm = FusedLayerNorm([64], dtype=torch.float16, device=device)
    assert norm.normalized_shape == (64,) and norm.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="last dimension only"):
        FusedLayerNorm((4, 64))
    with pytest.raises(ValueError, match="last dimension 64"):
        norm(torch.randn(3, 32, dtype=torch.float16, device=device))


# ----------------------------------------------------------------------------------------------------
# Bad input: a clear error before anything reaches Triton.


def test_bad_inputs(device):
    x = torch.randn(4, 8, device=device)
    w = torch.randn(8, device=device)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        layer_norm(x, torch.randn(7, device=device))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        layer_norm(x, w, torch.randn(1, 8, device=device))
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        layer_norm(torch.ones(4, 8, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match="weight has dtype torch.int32"):
        layer_norm(x, torch.ones(8, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="weight has dtype torch.float16 but x has dtype torch.float32"):
        layer_norm(x, w.half())
    with pytest.raises(ValueError, match="weight is on meta"):
        layer_norm(x, torch.empty(8, device="meta"))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer_norm([1.0, 2.0])
    with pytest.raises(ValueError, match="at least 1 dimension"):
        layer_norm(torch.tensor(1.0, device=device))
    with pytest.raises(ValueError, match="non-empty last dimension"):
        layer_norm(torch.randn(4, 0, device=device))
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        layer_norm(x, eps=-1.0)
    with pytest.raises(ValueError, match=r"residual shape \(4, 7\) must equal x shape \(4, 8\)"):
        add_layer_norm(x, torch.randn(4, 7, device=device))
    with pytest.raises(TypeError, match="residual has dtype torch.int32"):
        add_layer_norm(x, torch.ones(4, 8, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="weight has dtype torch.float16 but x \\+ residual has dtype torch.float32"):
        add_layer_norm(x.half(), x, w.half())
    with pytest.raises(ValueError, match="residual is on meta"):
        add_layer_norm(x, torch.empty(4, 8, device="meta"))


def test_add_layer_norm_runs_in_the_dtype_of_the_sum(device):
    """A 16-bit branch output added to an fp32 residual stream: s and y in fp32, as eager x + residual gives,
    and each input's gradient in its own dtype."""
    generator = torch.Generator().manual_seed(5)
    x, residual, weight, bias = (random64(shape, generator).to(device) for shape in ((3, 40), (3, 40), 40, 40))
    x16 = x.half().requires_grad_()
    residual32 = residual.float().requires_grad_()
    y, s = add_layer_norm(x16, residual32, weight.float(), bias.float(), EPS)
    assert y.dtype == s.dtype == torch.float32
    expected_s = x16.detach().float() + residual32.detach()
    torch.testing.assert_close(s, expected_s, rtol=0, atol=0)
    torch.testing.assert_close(y, F.layer_norm(expected_s, (40,), weight.float(), bias.float(), EPS))
    (y.sum() + s.sum()).backward()
    assert x16.grad.dtype == torch.float16 and residual32.grad.dtype == torch.float32


@pytest.mark.parametrize("with_residual", [False, True], ids=["layer_norm", "add_layer_norm"])
def test_under_autocast_the_norm_returns_torchs_dtype(device, with_residual):
    """CUDA autocast runs torch's layer_norm in fp32 whatever its input's dtype, CPU autocast in the input's:
    ours return what torch's return, with fp32 weights."""
    generator = torch.Generator().manual_seed(6)
    x, residual = (random64((3, 40), generator).to(device).half() for _ in range(2))
    weight, bias = (random64(40, generator).to(device).float() for _ in range(2))
    with torch.autocast(device, dtype=torch.float16):
        if with_residual:
            fused, s = add_layer_norm(x, residual, weight, bias, EPS)
            eager = F.layer_norm(x + residual, (40,), weight, bias, EPS)
            assert s.dtype == eager.dtype
        else:
            fused = layer_norm(x, weight, bias, EPS)
            eager = F.layer_norm(x, (40,), weight, bias, EPS)
    assert fused.dtype == eager.dtype == (torch.float32 if device == "cuda" else torch.float16)
    torch.testing.assert_close(fused, eager, rtol=1e-3, atol=2e-3)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(kernels._validate, "TRITON_INTERPRETS", False)
    with pytest.raises(ValueError, match="x is on cpu.*interpreter"):
        layer_norm(torch.randn(3, 8))


# ----------------------------------------------------------------------------------------------------
# Wide rows: row-strided views, and means far from zero.


def _assert_norm_within_error_rule(device, dtype, inputs, output_grads, fused, eager, names):
    """fused and eager, each (*leaves) -> an output or a tuple of outputs, against eager in float64 by the error
    rule: every output and every input's gradient. inputs: float64 tensors (None for an absent one), rounded to
    dtype once so that every run sees the same values; output_grads: one per output."""
    inputs = [None if t is None else t.to(dtype) for t in inputs]

    def run(dtype, fn):
        leaves = [leaf(t, dtype, device) for t in inputs]
        outputs = fn(*leaves)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        torch.autograd.backward(outputs, [g.to(device=device, dtype=dtype) for g in output_grads])
        return outputs, _grads(*leaves)

    fused_outputs, fused_grads = run(dtype, fused)
    eager_outputs, eager_grads = run(dtype, eager)
    reference_outputs, reference_grads = run(torch.float64, eager)
    for index, (f, e, r) in enumerate(zip(fused_outputs, eager_outputs, reference_outputs)):
        assert_within_error_rule(f, e, r, name=("y", "s")[index])
    _assert_grads_within_error_rule(fused_grads, eager_grads, reference_grads, names)


def _eager_add_layer_norm(x, residual, weight, bias):
    s = x + residual
    return F.layer_norm(s, (s.shape[-1],), weight, bias, EPS), s


# (rows, width, row stride) of row-strided views x = base[:, :width] of a (rows, row stride) base. The strides are
# not multiples of 16, so the launches take the misaligned tiles: 2000 is held on chip both ways, 9000 is wider
# than the misaligned backward's limit (two passes) and the 16-bit forward's (streamed, with a ragged last chunk;
# an fp32 forward holds it on chip). Several rows, so
# that reading at the width instead of the stride reads the wrong rows.
STRIDED_WIDE_ROWS = [(12, 2000, 2500), (5, 9000, 9300)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, width, row_stride", STRIDED_WIDE_ROWS, ids=lambda n: str(n))
@pytest.mark.parametrize("with_residual", [False, True], ids=["layer_norm", "add_layer_norm"])
def test_row_strided_views_of_wide_rows(device, dtype, rows, width, row_stride, with_residual):
    """Read in place at their row stride, forward and backward: y (and s), and the gradients of x (the base: 0
    outside the view), residual (a view of another base, with another stride), weight and bias."""
    generator = torch.Generator().manual_seed(rows + width)
    x_base = random64((rows, row_stride), generator, scale=2.0, offset=0.5)
    residual_base = random64((rows, row_stride + 100), generator)
    weight, bias = random64(width, generator, scale=0.5, offset=1.0), random64(width, generator)
    output_grads = [random64((rows, width), generator) for _ in range(1 + with_residual)]
    if with_residual:
        def view(function):
            return lambda x, r, w, b: function(x[:, :width], r[:, :width], w, b)

        fused, eager = view(lambda x, r, w, b: add_layer_norm(x, r, w, b, EPS)), view(_eager_add_layer_norm)
        inputs, names = (x_base, residual_base, weight, bias), ("x", "residual", "weight", "bias")
    else:
        fused = lambda x, w, b: layer_norm(x[:, :width], w, b, EPS)  # noqa: E731
        eager = lambda x, w, b: F.layer_norm(x[:, :width], (width,), w, b, EPS)  # noqa: E731
        inputs, names = (x_base, weight, bias), ("x", "weight", "bias")
    _assert_norm_within_error_rule(device, dtype, inputs, output_grads, fused, eager, names)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mean", [100, 1000])
@pytest.mark.parametrize("shape", [(5, 4097), (3, 20000)], ids=shape_id)
@pytest.mark.parametrize("with_residual", [False, True], ids=["layer_norm", "add_layer_norm"])
def test_wide_rows_far_from_zero_do_not_cancel(device, dtype, mean, shape, with_residual):
    """Rows of mean 100 and 1000 against a spread of 2: the variance is then a difference of nearly equal numbers
    unless it is taken from deviations (the on-chip kernels) or merged chunk by chunk from deviations (the
    streamed ones: 4097, misaligned, takes the two-pass backward; 20000 is streamed forward and two-pass backward).
    Values and every gradient."""
    generator = torch.Generator().manual_seed(mean + shape[-1])
    width = shape[-1]
    x = random64(shape, generator, scale=2.0, offset=mean)
    weight, bias = random64(width, generator, scale=0.5, offset=1.0), random64(width, generator)
    output_grads = [random64(shape, generator) for _ in range(1 + with_residual)]
    if with_residual:
        inputs, names = (x, random64(shape, generator), weight, bias), ("x", "residual", "weight", "bias")
        fused, eager = lambda x, r, w, b: add_layer_norm(x, r, w, b, EPS), _eager_add_layer_norm
    else:
        inputs, names = (x, weight, bias), ("x", "weight", "bias")
        fused = lambda x, w, b: layer_norm(x, w, b, EPS)  # noqa: E731
        eager = lambda x, w, b: F.layer_norm(x, (width,), w, b, EPS)  # noqa: E731
    _assert_norm_within_error_rule(device, dtype, inputs, output_grads, fused, eager, names)
