"""The public LayerNorm functions: input checks and the dtype the norm runs in, then the operators."""

import numbers

import torch

from .._validate import check_number, check_runnable, check_same_device_and_dtype, check_tensor
from .ops import layer_norm_forward
from .tiles import MAX_ELEMENTS


def check_eps(eps):
    """eps: a real number (TypeError otherwise), at least 0 (ValueError otherwise)."""
    check_number("eps", eps, numbers.Real, lambda e: e >= 0, "a non-negative number")


def _prepared_inputs(x, residual, weight, bias, eps):
    """Check the inputs and cast them to the dtype the norm runs in, the dtype torch's own layer_norm would
    return: the dtype of x + residual (x's own without a residual), except under CUDA autocast, which runs
    layer_norm in fp32 (CPU autocast leaves it in its input's dtype). Under autocast weight and bias are
    cast to that dtype too; otherwise they must have it. The casts are differentiable, so gradients return
    in each input's own dtype. Returns (x, residual, weight, bias)."""
    check_tensor("x", x, min_ndim=1)
    n_cols = x.shape[-1]
    if n_cols == 0:
        raise ValueError(f"x must have a non-empty last dimension to normalize, got shape {tuple(x.shape)}")
    if x.numel() >= MAX_ELEMENTS:
        raise ValueError(f"x has {x.numel()} elements; the kernels use 32-bit offsets, so at most {MAX_ELEMENTS - 1}")
    if residual is not None:
        check_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}")
    for name, parameter in (("weight", weight), ("bias", bias)):
        if parameter is not None:
            check_tensor(name, parameter)
            if parameter.shape != (n_cols,):
                raise ValueError(
                    f"{name} must have shape ({n_cols},) to match the last dimension of x, got {tuple(parameter.shape)}"
                )
    check_runnable("x", x)
    check_eps(eps)

    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    if torch.is_autocast_enabled(x.device.type):
        if x.device.type == "cuda":
            dtype = torch.float32
        weight, bias = _cast(weight, dtype), _cast(bias, dtype)
    x, residual = _cast(x, dtype), _cast(residual, dtype)
    others = {name: t for name, t in (("residual", residual), ("weight", weight), ("bias", bias)) if t is not None}
    check_same_device_and_dtype("x" if residual is None else "x + residual", x, **others)
    return x, residual, weight, bias


def _cast(t, dtype):
    """t in dtype (None stays None); no call at all when it has it already, the usual case."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the last dimension of `x`, as torch.nn.functional.layer_norm(x, (x.shape[-1],),
    weight, bias, eps).

    x: (..., N) fp16, bf16 or fp32, any leading dimensions. weight, bias: (N,) in x's dtype and on its
    device, each optional. Statistics are computed in fp32; the output has x's shape and dtype, except
    under CUDA autocast, where it is fp32 as torch's own layer_norm's is.
    Any width from 1 up: rows wider than one tile (FORWARD / BACKWARD max_block) are streamed in chunks.
    """
    x, _, weight, bias = _prepared_inputs(x, None, weight, bias, eps)
    y, _, _, _ = layer_norm_forward(x, None, weight, bias, float(eps))
    return y


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5):
    """s = x + residual and y = layer_norm(s, weight, bias, eps) in one pass; returns (y, s).

    The residual stream's "add, then the next norm": x and residual are read once, s and y written once.
    Gradients reach x, residual, weight and bias from both outputs. x and residual: the same shape
    (..., N) and device; s and y have the dtype of x + residual (a 16-bit x added to an fp32 residual
    stream gives fp32), and weight and bias must have it too. Under CUDA autocast s and y are fp32, as eager
    `x + residual` followed by torch's layer_norm gives them.
    """
    x, residual, weight, bias = _prepared_inputs(x, residual, weight, bias, eps)
    y, s, _, _ = layer_norm_forward(x, residual, weight, bias, float(eps))
    return y, s
