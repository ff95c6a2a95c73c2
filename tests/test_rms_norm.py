"""kernels.rms_norm / add_rms_norm / FusedRMSNorm against torch's RMSNorm and transformers' LlamaRMSNorm in float64:
widths at the tile boundaries, the weight optional, Gemma's offset weight, eps as given, a residual kept in fp32,
the module as a drop-in. (The grids, large means, row-strided views and repeats: test_layer_norm_grid.py, which
runs every norm.)"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import DTYPES, assert_within_error_rule
from norm_helpers import leaf, random64, shape_id

from kernels import FusedRMSNorm, add_rms_norm, rms_norm

pytestmark = pytest.mark.usefixtures("poisoned_allocations")

EPS = 1e-6  # the Llama family's

# (shape, with weight, offset). Widths around every tile boundary: one element, odd, the decoder's 384, the
# backward's widest misaligned row (4096) and one past it, its widest aligned row (8192) and one past it (two
# column-tiled passes), the forward's widest aligned row (16384) and one past it (streamed in both), and 65536; the
# weight absent, and Gemma's offset.
RMS_NORM_CASES = [
    ((37, 1), True, 0.0),
    ((37, 7), True, 0.0),
    ((300, 384), True, 0.0),
    ((37, 384), False, 0.0),
    ((37, 384), True, 1.0),
    ((3, 4097), True, 0.0),
    ((3, 8192), True, 0.0),
    ((3, 8208), True, 1.0),
    ((2, 16384), True, 0.0),
    ((2, 16400), False, 0.0),
    ((1, 65536), True, 0.0),
    ((2, 9, 384), True, 0.0),
]


def eager_rms_norm(x, weight, offset=0.0, eps=EPS):
    """torch's RMSNorm with the weight `offset + weight` (Gemma's, for offset 1)."""
    return F.rms_norm(x, x.shape[-1:], None if weight is None else weight + offset, eps)


def _compare(fused_fn, eager_fn, inputs, cotangents, dtype, device, names):
    """fused_fn against eager_fn in `dtype` and in float64 on the same rounded inputs: every output and every
    gradient by the error rule."""

    def run(dtype, fn):
        leaves = [leaf(t, dtype, device) for t in inputs]
        outputs = fn(*leaves)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        torch.autograd.backward(outputs, [c.to(device=device, dtype=dtype) for c in cotangents[:len(outputs)]])
        return list(outputs) + [None if t is None else t.grad for t in leaves]

    fused, eager, reference = run(dtype, fused_fn), run(dtype, eager_fn), run(torch.float64, eager_fn)
    for name, f, e, r in zip(names, fused, eager, reference):
        if r is None:
            assert f is None, f"{name}: unexpected"
        else:
            assert f.dtype == e.dtype, name
            assert_within_error_rule(f, e, r, name=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, has_weight, offset", RMS_NORM_CASES, ids=shape_id)
def test_rms_norm_matches_float64_reference(device, dtype, shape, has_weight, offset):
    generator = torch.Generator().manual_seed(hash((shape, has_weight, offset)) % 2**31)
    x = random64(shape, generator, scale=2.0, offset=0.5).to(dtype)
    weight = random64(shape[-1], generator, scale=0.5, offset=1.0 - offset).to(dtype) if has_weight else None
    dy = random64(shape, generator).to(dtype)
    _compare(lambda x, w: rms_norm(x, w, EPS, offset=offset), lambda x, w: eager_rms_norm(x, w, offset),
             [x, weight], [dy], dtype, device, ("y", "grad x", "grad weight"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, has_weight, offset", [((1, 7), True, 0.0), ((300, 384), True, 1.0),
                                                       ((2, 9, 384), False, 0.0), ((3, 8208), True, 0.0),
                                                       ((3, 20000), True, 0.0)], ids=shape_id)
def test_add_rms_norm_matches_eager_composite(device, dtype, shape, has_weight, offset):
    generator = torch.Generator().manual_seed(hash((shape, has_weight, offset, "add")) % 2**31)
    x, residual = random64(shape, generator, scale=2.0, offset=0.5).to(dtype), random64(shape, generator).to(dtype)
    weight = random64(shape[-1], generator, scale=0.5, offset=1.0 - offset).to(dtype) if has_weight else None
    cotangents = [random64(shape, generator).to(dtype) for _ in range(2)]

    def eager(x, residual, w):
        s = x + residual
        return eager_rms_norm(s, w, offset), s

    fused_y, fused_s = add_rms_norm(*(t.to(device) if t is not None else None for t in (x, residual, weight)), EPS,
                                    offset=offset)
    torch.testing.assert_close(fused_s, (x + residual).to(device), rtol=0, atol=0)  # torch's own rounded sum
    _compare(lambda x, r, w: add_rms_norm(x, r, w, EPS, offset=offset), eager, [x, residual, weight], cotangents,
             dtype, device, ("y", "s", "grad x", "grad residual", "grad weight"))


def test_eps_none_is_torchs_default(device):
    """torch.nn.functional.rms_norm's eps=None is fp32's machine epsilon whatever the dtype: tiny inputs show it."""
    x = (torch.randn(4, 64) * 1e-3).half().to(device)
    eager = F.rms_norm(x.double(), (64,), eps=torch.finfo(torch.float32).eps)
    assert_within_error_rule(rms_norm(x), F.rms_norm(x, (64,)), eager)
    assert (rms_norm(x).double() - eager).abs().max() < 1e-2 < (rms_norm(x, eps=1e-3).double() - eager).abs().max()


@pytest.mark.parametrize("residual_dtype", [torch.float16, torch.float32], ids=str)
def test_residual_in_fp32(device, residual_dtype):
    """A 16-bit branch and a residual stream kept in fp32, as flash-attn's layer_norm_fn: s = x + residual added
    and stored in fp32, y in x's dtype; each input's gradient in its own dtype."""
    generator = torch.Generator().manual_seed(9)
    x = random64((5, 40), generator).half().to(device).requires_grad_()
    residual = random64((5, 40), generator).to(residual_dtype).to(device).requires_grad_()
    weight = random64(40, generator).half().to(device).requires_grad_()
    y, s = add_rms_norm(x, residual, weight, EPS, residual_in_fp32=True)
    assert y.dtype == torch.float16 and s.dtype == torch.float32
    expected_s = x.detach().float() + residual.detach().float()
    torch.testing.assert_close(s, expected_s, rtol=0, atol=0)
    expected_y = eager_rms_norm(expected_s, weight.detach().float()).half()
    torch.testing.assert_close(y, expected_y, rtol=1e-3, atol=1e-3)
    (y.float().sum() + s.sum()).backward()
    assert x.grad.dtype == torch.float16 and residual.grad.dtype == residual_dtype
    assert weight.grad.dtype == torch.float16


@pytest.mark.parametrize("width", [1000, 2048, 4096], ids=["misaligned-streamed", "on-chip", "streamed"])
def test_residual_in_fp32_gradients(device, width):
    """A sum kept in fp32 takes its own tiles (rows on chip to 2048 in the backward, 512 misaligned): values and
    every gradient against the eager fp32 sum normalized and rounded to fp16, by the error rule."""
    generator = torch.Generator().manual_seed(width)
    inputs = [random64((6, width), generator, scale=2.0, offset=0.5).half(), random64((6, width), generator).float(),
              random64(width, generator, scale=0.5, offset=1.0).half()]
    cotangents = [random64((6, width), generator).half(), random64((6, width), generator).float()]

    def run(fused, dtype):
        x, residual, weight = (t.detach().to(device).clone().requires_grad_() for t in inputs)
        if fused:
            y, s = add_rms_norm(x, residual, weight, EPS, residual_in_fp32=True)
        else:
            s = x.to(dtype) + residual.to(dtype)
            y = eager_rms_norm(s, weight.to(dtype))
            y = y.half() if dtype == torch.float32 else y
        torch.autograd.backward((y, s), [c.to(device=device, dtype=o.dtype) for c, o in zip(cotangents, (y, s))])
        return y, s, x.grad, residual.grad, weight.grad

    for name, f, e, r in zip(("y", "s", "grad x", "grad residual", "grad weight"), run(True, None),
                             run(False, torch.float32), run(False, torch.float64)):
        assert f.dtype == e.dtype, name
        assert_within_error_rule(f, e, r, name=name)


def test_with_only_its_sum_used(device):
    x, residual = (torch.randn(3, 40, device=device, requires_grad=True) for _ in range(2))
    weight = torch.randn(40, device=device, requires_grad=True)
    _, s = add_rms_norm(x, residual, weight)
    grad = torch.randn_like(s)
    s.backward(grad)
    assert torch.equal(x.grad, grad) and torch.equal(residual.grad, grad) and weight.grad is None


@pytest.mark.parametrize("with_residual", [False, True], ids=["rms_norm", "add_rms_norm"])
def test_under_autocast_the_norm_returns_torchs_dtype(device, with_residual):
    """CUDA autocast runs torch's rms_norm in fp32 whatever its input's dtype, CPU autocast in the input's."""
    x, residual = (torch.randn(3, 40, device=device).half() for _ in range(2))
    weight = torch.randn(40, device=device)
    with torch.autocast(device, dtype=torch.float16):
        fused = add_rms_norm(x, residual, weight, EPS)[0] if with_residual else rms_norm(x, weight, EPS)
        eager = F.rms_norm(x + residual if with_residual else x, (40,), weight.to(x.dtype if device == "cpu"
                                                                                   else torch.float32), EPS)
    assert fused.dtype == eager.dtype == (torch.float32 if device == "cuda" else torch.float16)
    torch.testing.assert_close(fused, eager, rtol=1e-3, atol=2e-3)


def test_bad_inputs(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        rms_norm(x, torch.randn(7, device=device))
    with pytest.raises(ValueError, match="offset must be 0 without a weight"):
        rms_norm(x, offset=1.0)
    with pytest.raises(TypeError, match="offset must be a real number"):
        rms_norm(x, torch.randn(8, device=device), offset="1")
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        rms_norm(x, eps=-1.0)
    with pytest.raises(TypeError, match="residual_in_fp32 must be a bool"):
        add_rms_norm(x, x, residual_in_fp32=1)
    with pytest.raises(TypeError, match="weight has dtype torch.float32 but x has dtype torch.float16"):
        add_rms_norm(x.half(), x, torch.randn(8, device=device), residual_in_fp32=True)
    with pytest.raises(ValueError, match="residual is on meta"):
        add_rms_norm(x, torch.empty(4, 8, device="meta"), residual_in_fp32=True)
    with pytest.raises(ValueError, match="dropout_p must be a number in \\[0, 1\\)"):
        add_rms_norm(x, x, dropout_p=1.0)


# ----------------------------------------------------------------------------------------------------
# The module: a drop-in for torch.nn.RMSNorm and transformers' LlamaRMSNorm


@pytest.mark.parametrize("eps, elementwise_affine", [(None, True), (1e-6, True), (1e-5, False)])
def test_fused_rms_norm_is_a_drop_in_for_nn_rms_norm(device, eps, elementwise_affine):
    torch.manual_seed(6)
    eager = nn.RMSNorm(384, eps=eps, elementwise_affine=elementwise_affine, device=device)
    for parameter in eager.parameters():
        nn.init.normal_(parameter)
    fused = FusedRMSNorm(384, eps=eps, elementwise_affine=elementwise_affine, device=device)
    assert fused.normalized_shape == eager.normalized_shape == (384,)
    assert repr(fused) == repr(eager).replace("RMSNorm", "FusedRMSNorm")
    fresh = nn.RMSNorm(384, eps=eps, elementwise_affine=elementwise_affine, device=device).state_dict()
    assert {k: v.tolist() for k, v in fused.state_dict().items()} == {k: v.tolist() for k, v in fresh.items()}
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(2, 9, 384, device=device)
    assert_within_error_rule(fused(x), eager(x), eager.double()(x.double()))
    y, s = fused.add_and_norm(x, x)
    torch.testing.assert_close(s, 2 * x, rtol=0, atol=0)
    torch.testing.assert_close(y, fused(2 * x), rtol=0, atol=0)


def test_fused_rms_norm_options(device):
    gemma = FusedRMSNorm(64, eps=1e-6, offset=1.0, dtype=torch.float16, device=device)
    assert torch.equal(gemma.weight, torch.zeros(64, dtype=torch.float16, device=device))  # 1 + 0: a plain RMSNorm
    assert repr(gemma) == "FusedRMSNorm((64,), eps=1e-06, elementwise_affine=True, offset=1.0)"
    x = torch.randn(3, 64, dtype=torch.float16, device=device)
    torch.testing.assert_close(gemma(x), rms_norm(x, torch.ones_like(gemma.weight), 1e-6), rtol=0, atol=0)
    with pytest.raises(ValueError, match="last dimension only"):
        FusedRMSNorm((4, 64))
    with pytest.raises(ValueError, match="offset must be 0 without elementwise_affine"):
        FusedRMSNorm(64, elementwise_affine=False, offset=1.0)
    with pytest.raises(ValueError, match="last dimension 64"):
        gemma(torch.randn(3, 32, dtype=torch.float16, device=device))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_rms_norm_matches_llama_rms_norm(device, dtype):
    """transformers' LlamaRMSNorm upcasts to fp32, normalizes, casts back and then multiplies by the weight; ours
    rounds once, after the weight: within the error rule of Llama's own, on the same weights, forward and backward."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    torch.manual_seed(7)
    eager = llama.LlamaRMSNorm(384, eps=EPS).to(device=device, dtype=dtype)
    nn.init.normal_(eager.weight, mean=1.0, std=0.3)
    fused = FusedRMSNorm(384, eps=EPS, device=device, dtype=dtype)
    fused.load_state_dict(eager.state_dict())
    reference = llama.LlamaRMSNorm(384, eps=EPS).to(device=device, dtype=torch.float64)
    reference.load_state_dict(eager.state_dict())
    x = (torch.randn(4, 33, 384, device=device) * 3 + 1).to(dtype)
    dy = torch.randn(4, 33, 384, device=device).to(dtype)

    def run(module, dtype):
        inputs = x.to(dtype).clone().requires_grad_()
        out = module(inputs)
        out.backward(dy.to(dtype))
        return out, inputs.grad, module.weight.grad

    for name, f, e, r in zip(("y", "grad x", "grad weight"), run(fused, dtype), run(eager, dtype),
                             run(reference, torch.float64)):
        assert f.dtype == e.dtype
        assert_within_error_rule(f, e, r, name=name)
