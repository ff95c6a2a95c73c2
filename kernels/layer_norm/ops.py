"""LayerNorm as PyTorch operators: the launchers of the Triton kernels, each an _library.Operator (registered with
torch.library, so torch.compile sees each launch as one opaque node with known output shapes; called directly in
eager mode), and one autograd formula for layer_norm and add_layer_norm.

Operators (namespace decoder_kernels): layer_norm_forward, layer_norm_backward.
"""

from typing import Optional

import torch
from torch import Tensor

from .._gpu import launch_device
from .._library import cdiv, differentiable, operator
from . import tiles
from .kernels import (
    BACKWARD_COMPILE_OPTIONS,
    layer_norm_backward_kernel,
    layer_norm_backward_streamed_kernel,
    layer_norm_forward_kernel,
    layer_norm_forward_streamed_kernel,
)


def _as_rows(tensor):
    """A (rows, width) view of `tensor` with unit column stride, copying only when the last dimension
    is not unit-stride or the leading dimensions cannot be flattened into one row stride."""
    if tensor.stride(-1) != 1:
        tensor = tensor.contiguous()
    rows = tensor.reshape(-1, tensor.shape[-1])
    if rows.shape[0] > 1 and (rows.shape[0] - 1) * rows.stride(0) + rows.shape[1] >= tiles.MAX_ELEMENTS:
        rows = rows.contiguous()  # a strided view spanning more than 32-bit offsets reach
    return rows


def _kernel_for(tile, one_tile_kernel, streamed_kernel):
    """The kernel for a tile, and its ROWS argument (a streamed row is one per program: no ROWS)."""
    return (streamed_kernel, {}) if tile.streamed else (one_tile_kernel, {"ROWS": tile.rows})


def _allocate_forward_outputs(x, with_sum):
    """y (and s), mean and rstd of the forward, allocated the same way by the launch and by its fake
    implementation: y and s contiguous in x's shape, mean and rstd one fp32 value per row."""
    n_rows = x.numel() // x.shape[-1]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    return (y, torch.empty_like(y), mean, rstd) if with_sum else (y, None, mean, rstd)


def _forward(x, residual, weight, bias, eps):
    """Launch the forward kernel for the row width. Returns y, s (None without residual), mean, rstd."""
    y, s, mean, rstd = _allocate_forward_outputs(x, residual is not None)
    x = _as_rows(x)
    residual = _as_rows(residual) if residual is not None else None
    n_rows, n_cols = x.shape
    if n_rows == 0:
        return y, s, mean, rstd
    tile = tiles.forward_tile(n_cols)
    kernel, rows = _kernel_for(tile, layer_norm_forward_kernel, layer_norm_forward_streamed_kernel)
    with launch_device(x):
        kernel[(cdiv(n_rows, tile.rows),)](
            X=x, RESIDUAL=residual if residual is not None else x, SUM=s if s is not None else y, Y=y,
            WEIGHT=weight if weight is not None else x, BIAS=bias if bias is not None else x, MEAN=mean, RSTD=rstd,
            stride_x=x.stride(0), stride_residual=residual.stride(0) if residual is not None else 0,
            n_rows=n_rows, n_cols=n_cols, eps=eps,
            HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            BLOCK_N=tile.block_n, num_warps=tile.num_warps, **rows,
        )
    return y, s, mean, rstd


def _backward(dy, dsum, x, weight, mean, rstd, compute_dweight, compute_dbias):
    """Launch the backward kernel for the row width; reduce the partial dweight / dbias rows. dy and dsum are made
    contiguous (autograd's gradients almost always are already): they share dx's offsets, which saves the kernel
    registers. Returns dx (contiguous, x's shape), dweight (or None), dbias (or None)."""
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    x = _as_rows(x)
    dy = dy.contiguous()
    dsum = dsum.contiguous() if dsum is not None else None
    n_rows, n_cols = x.shape
    tile = tiles.backward_tile(n_cols)
    programs = max(1, min(cdiv(n_rows, tile.rows), tiles.backward_programs(x.device)))
    # A streamed row accumulates into its partial rows, which must start at zero.
    allocate = torch.zeros if tile.streamed else torch.empty
    dweight_partial = allocate((programs, n_cols), dtype=torch.float32, device=x.device) if compute_dweight else None
    dbias_partial = allocate((programs, n_cols), dtype=torch.float32, device=x.device) if compute_dbias else None
    if n_rows > 0:
        kernel, rows = _kernel_for(tile, layer_norm_backward_kernel, layer_norm_backward_streamed_kernel)
        with launch_device(x):
            kernel[(programs,)](
                DY=dy, DSUM=dsum if dsum is not None else dy, X=x, WEIGHT=weight if weight is not None else x,
                MEAN=mean, RSTD=rstd, DX=dx, DWEIGHT_PARTIAL=dweight_partial if compute_dweight else mean,
                DBIAS_PARTIAL=dbias_partial if compute_dbias else mean, stride_x=x.stride(0), n_rows=n_rows,
                n_cols=n_cols,
                HAS_DSUM=dsum is not None, HAS_WEIGHT=weight is not None,
                COMPUTE_DWEIGHT=compute_dweight, COMPUTE_DBIAS=compute_dbias,
                BLOCK_N=tile.block_n, num_warps=tile.num_warps, **BACKWARD_COMPILE_OPTIONS, **rows,
            )
    elif compute_dweight or compute_dbias:  # no rows: the gradients are zero
        dweight_partial = dweight_partial.zero_() if compute_dweight else None
        dbias_partial = dbias_partial.zero_() if compute_dbias else None
    # A fixed-order sum over the programs' rows: deterministic, unlike float atomics.
    dweight = dweight_partial.sum(0).to(weight.dtype) if compute_dweight else None
    dbias = dbias_partial.sum(0).to(x.dtype) if compute_dbias else None
    return dx, dweight, dbias


# --------------------------------------------------------------------------------------------------------------
# The launches as PyTorch operators (_library.operator: registered for torch.compile, called directly in eager)


def _forward_op(
    x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, s, mean, rstd) of LayerNorm over the last dimension of s = x (+ residual, when given). Without a
    residual, s is an empty tensor (an operator's output may not alias its input; the eager route returns None)."""
    y, s, mean, rstd = _forward(x, residual, weight, bias, eps)
    return y, (s if s is not None else x.new_empty(0)), mean, rstd


def _forward_fake(x, residual, weight, bias, eps):
    y, s, mean, rstd = _allocate_forward_outputs(x, residual is not None)
    return y, (s if s is not None else x.new_empty(0)), mean, rstd


layer_norm_forward = operator("layer_norm_forward", _forward_op, fake=_forward_fake, eager=_forward)


def _backward_op(
    dy: Tensor, dsum: Optional[Tensor], s: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
    compute_dweight: bool, compute_dbias: bool,
) -> list[Tensor]:
    """[ds, dweight (when compute_dweight), dbias (when compute_dbias)] for the LayerNorm of s, whose output
    received dy and s itself dsum (None when s is no output)."""
    ds, dweight, dbias = _backward(dy, dsum, s, weight, mean, rstd, compute_dweight, compute_dbias)
    return [ds] + ([dweight] if compute_dweight else []) + ([dbias] if compute_dbias else [])


def _backward_fake(dy, dsum, s, weight, mean, rstd, compute_dweight, compute_dbias):
    width = s.shape[-1]
    return (
        [torch.empty(s.shape, dtype=s.dtype, device=s.device)]
        + ([s.new_empty(width, dtype=weight.dtype)] if compute_dweight else [])
        + ([s.new_empty(width)] if compute_dbias else [])
    )


layer_norm_backward = operator("layer_norm_backward", _backward_op, fake=_backward_fake)


# --------------------------------------------------------------------------------------------------------------
# Autograd: one formula for both routes (_library.differentiable), for layer_norm and add_layer_norm alike, the one
# place their backward is defined.


def _save_for_backward(ctx, inputs, output):
    x, residual, weight, bias, _ = inputs
    y, s, mean, rstd = output
    ctx.with_residual = residual is not None
    # The rows that were normalized: the sum s when there is a residual, else x itself.
    ctx.save_for_backward(s if ctx.with_residual else x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # a missing gradient of y or s is skipped, not read as zeros


def _gradients(ctx, dy, dsum, _dmean, _drstd):
    if dy is None:  # y unused: x and residual receive the gradient of s alone, weight and bias none; no launch
        return dsum, dsum, None, None, None
    s, weight, mean, rstd = ctx.saved_tensors
    compute_dweight = weight is not None and ctx.needs_input_grad[2]
    compute_dbias = ctx.has_bias and ctx.needs_input_grad[3]
    grads = layer_norm_backward(
        dy, dsum if ctx.with_residual else None, s, weight, mean, rstd, compute_dweight, compute_dbias
    )
    ds = grads[0]
    dweight = grads[1] if compute_dweight else None
    dbias = grads[-1] if compute_dbias else None
    # s = x + residual: both receive the gradient of s.
    return ds, (ds if ctx.with_residual else None), dweight, dbias, None


layer_norm_forward = differentiable(layer_norm_forward, _save_for_backward, _gradients)
