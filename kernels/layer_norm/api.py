"""The public norm functions, LayerNorm and RMSNorm with and without the residual add: input checks and the dtype
the norm runs in, the dropout seed, then the operators."""

import numbers

import torch

from .._validate import check_bool, check_number, check_runnable, check_same_device_and_dtype, check_tensor
from ..attention.api import seed_tensor
from ..attention.checks import check_dropout, check_seed
from .ops import dropout_mask, layer_norm_forward
from .tiles import MAX_ELEMENTS

# torch's RMSNorm default eps: the machine epsilon of the fp32 statistics, whatever the input dtype.
RMS_NORM_EPS = torch.finfo(torch.float32).eps


def check_eps(eps):
    """eps: a real number (TypeError otherwise), at least 0 (ValueError otherwise)."""
    check_number("eps", eps, numbers.Real, lambda e: e >= 0, "a non-negative number")


def _rms_eps(eps):
    """eps as given, or torch's RMSNorm default for None."""
    return RMS_NORM_EPS if eps is None else eps


def _check_x(x):
    check_tensor("x", x, min_ndim=1)
    if x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension to normalize, got shape {tuple(x.shape)}")
    if x.numel() >= MAX_ELEMENTS:
        raise ValueError(f"x has {x.numel()} elements; the kernels use 32-bit offsets, so at most {MAX_ELEMENTS - 1}")


def _prepared_inputs(x, residual, weight, bias, eps, residual_in_fp32=False, offset=0.0):
    """Check the inputs and cast them to the dtype the norm runs in, the dtype torch's own layer_norm (rms_norm)
    would return: the dtype of x + residual (x's own without a residual), except under CUDA autocast, which runs
    both norms in fp32 (CPU autocast leaves them in their input's dtype). Under autocast weight and bias are
    cast to that dtype too; otherwise they must have it. With residual_in_fp32, x and residual keep their dtypes
    (the kernel adds them in fp32 and stores the sum in fp32), and weight and bias must have x's. The casts are
    differentiable, so gradients return in each input's own dtype. Returns (x, residual, weight, bias)."""
    _check_x(x)
    n_cols = x.shape[-1]
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
    check_bool("residual_in_fp32", residual_in_fp32)
    check_number("offset", offset, numbers.Real, lambda o: o == 0 or weight is not None,
                 "0 without a weight (it is added to the weight)")

    dtype = x.dtype if residual is None or residual_in_fp32 else torch.promote_types(x.dtype, residual.dtype)
    if torch.is_autocast_enabled(x.device.type):
        if x.device.type == "cuda":
            dtype = torch.float32
        weight, bias = _cast(weight, dtype), _cast(bias, dtype)
    x = _cast(x, dtype)
    if not residual_in_fp32:
        residual = _cast(residual, dtype)
    others = {name: t for name, t in (("weight", weight), ("bias", bias)) if t is not None}
    if residual is not None and not residual_in_fp32:
        others = {"residual": residual, **others}
    if residual is not None and residual.device != x.device:
        raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    check_same_device_and_dtype("x" if residual is None or residual_in_fp32 else "x + residual", x, **others)
    return x, residual, weight, bias


def _cast(t, dtype):
    """t in dtype (None stays None); no call at all when it has it already, the usual case."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _dropout_seed(dropout_p, seed, x):
    """The seed operand: checked, then drawn or filled in on the device as attention's is (None without dropout)."""
    check_dropout(dropout_p)
    check_seed(seed)
    return seed_tensor(dropout_p, seed, x)


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the last dimension of `x`, as torch.nn.functional.layer_norm(x, (x.shape[-1],),
    weight, bias, eps).

    x: (..., N) fp16, bf16 or fp32, any leading dimensions. weight, bias: (N,) in x's dtype and on its
    device, each optional. Statistics are computed in fp32; the output has x's shape and dtype, except
    under CUDA autocast, where it is fp32 as torch's own layer_norm's is.
    Any width from 1 up: rows wider than one tile (FORWARD / BACKWARD max_block) are streamed in chunks.
    """
    x, _, weight, bias = _prepared_inputs(x, None, weight, bias, eps)
    y, _, _, _ = layer_norm_forward(x, None, weight, bias, float(eps), False, 0.0, False, 0.0, None)
    return y


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5, *, dropout_p=0.0, seed=None,
                   residual_in_fp32=False):
    """s = dropout(x) + residual and y = layer_norm(s, weight, bias, eps) in one pass; returns (y, s).

    The residual stream's "add, then the next norm": x and residual are read once, s and y written once.
    Gradients reach x, residual, weight and bias from both outputs. x and residual: the same shape
    (..., N) and device; s and y have the dtype of x + residual (a 16-bit x added to an fp32 residual
    stream gives fp32), and weight and bias must have it too. Under CUDA autocast s and y are fp32, as eager
    `x + residual` followed by torch's layer_norm gives them.
    dropout_p: the probability of zeroing an element of x before the add (kept ones scaled by 1 / (1 - dropout_p)),
        the branch's dropout; the mask is drawn in the kernel and regenerated in the backward, never stored.
    seed: the dropout seed in [0, 2**31); when None (and dropout_p > 0) it is drawn from torch's generator, as
        `kernels.attention` draws its own, so `torch.manual_seed` reproduces the call. `add_norm_dropout_mask`
        returns the mask.
    residual_in_fp32: s in fp32 (x and residual added in fp32, whatever their dtypes) while y keeps x's dtype, and
        weight and bias have x's: a 16-bit branch on an fp32 residual stream, as flash-attn's layer_norm_fn.
    """
    x, residual, weight, bias = _prepared_inputs(x, residual, weight, bias, eps, residual_in_fp32)
    seed = _dropout_seed(dropout_p, seed, x)
    y, s, _, _ = layer_norm_forward(x, residual, weight, bias, float(eps), False, 0.0, residual_in_fp32,
                                    float(dropout_p), seed)
    return y, s


def rms_norm(x, weight=None, eps=None, *, offset=0.0):
    """RMSNorm over the last dimension of `x`: y = x / sqrt(mean(x^2) + eps) * (offset + weight), as
    torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps) for offset 0.

    x: (..., N) fp16, bf16 or fp32, any leading dimensions. weight: (N,) in x's dtype and on its device, optional.
    eps: as given; None is torch's default, fp32's machine epsilon. offset: added to the weight, 1.0 for the
    models that store their weight as 1 + w (Gemma; Liger-Kernel's `offset`); needs a weight.
    The mean square and 1 / rms in fp32, normalized and scaled in fp32 and rounded once: the output has x's shape
    and dtype, except under CUDA autocast, where it is fp32 as torch's own rms_norm's is. Any width from 1 up.
    """
    eps = _rms_eps(eps)
    x, _, weight, _ = _prepared_inputs(x, None, weight, None, eps, offset=offset)
    y, _, _, _ = layer_norm_forward(x, None, weight, None, float(eps), True, float(offset), False, 0.0, None)
    return y


def add_rms_norm(x, residual, weight=None, eps=None, *, offset=0.0, dropout_p=0.0, seed=None,
                 residual_in_fp32=False):
    """s = dropout(x) + residual and y = rms_norm(s, weight, eps, offset=offset) in one pass; returns (y, s).

    What `add_layer_norm` is for LayerNorm, with rms_norm's eps and offset: the same shapes, dtypes, dropout, seed
    and residual_in_fp32.
    """
    eps = _rms_eps(eps)
    x, residual, weight, _ = _prepared_inputs(x, residual, weight, None, eps, residual_in_fp32, offset)
    seed = _dropout_seed(dropout_p, seed, x)
    y, s, _, _ = layer_norm_forward(x, residual, weight, None, float(eps), True, float(offset), residual_in_fp32,
                                    float(dropout_p), seed)
    return y, s


def add_norm_dropout_mask(x, dropout_p, *, seed=None):
    """The boolean keep-mask, x's shape, that `add_layer_norm(x, residual, ..., dropout_p=dropout_p, seed=seed)`
    (and `add_rms_norm`) applies to x: True where an element is kept.

    With seed=None the seed is drawn from torch's generator exactly as the call draws it, so
        torch.manual_seed(s); y, s = add_layer_norm(x, residual, dropout_p=p)
        torch.manual_seed(s); keep = add_norm_dropout_mask(x, p)
    gives the mask of that call. Meant for tests and inspection.
    """
    _check_x(x)
    check_runnable("x", x)
    seed = _dropout_seed(dropout_p, seed, x)
    n_cols = x.shape[-1]
    if seed is None:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    return dropout_mask(seed, x.numel() // n_cols, n_cols, dropout_p, x.device).view(x.shape)
