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
from .backward import (
    layer_norm_backward_columns_kernel,
    layer_norm_backward_kernel,
    layer_norm_backward_row_sums_kernel,
    layer_norm_partials_sum_kernel,
)
from .forward import dropout_mask_kernel, layer_norm_forward_kernel, layer_norm_forward_streamed_kernel
from .shared import BACKWARD_COMPILE_OPTIONS


def _rows(tensor):
    """(rows, n_rows, row_stride): `tensor` as the kernels read it, row after row of its last dimension. A contiguous
    tensor is read as it is (no view made: the kernels take a pointer and a row stride). Otherwise a (rows, width)
    view with unit column stride, copying only when the last dimension is not unit-stride or the leading
    dimensions cannot be flattened into one row stride."""
    n_cols = tensor.shape[-1]
    if tensor.is_contiguous():
        return tensor, tensor.numel() // n_cols, n_cols
    if tensor.stride(-1) != 1:
        tensor = tensor.contiguous()
    rows = tensor.reshape(-1, n_cols)
    if rows.shape[0] > 1 and (rows.shape[0] - 1) * rows.stride(0) + n_cols >= tiles.MAX_ELEMENTS:
        rows = rows.contiguous()  # a strided view spanning more than 32-bit offsets reach
    return rows, rows.shape[0], rows.stride(0)


def _allocate_forward_outputs(x, with_sum, rms, residual_in_fp32):
    """y (and s), mean and rstd of the forward, allocated the same way by the launch and by its fake
    implementation: y and s contiguous in x's shape (s in fp32 when residual_in_fp32), y in x's dtype, rstd one
    fp32 value per row and mean too (None for RMS, which keeps no mean)."""
    n_rows = x.numel() // x.shape[-1]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    s = torch.empty_like(y, dtype=torch.float32 if residual_in_fp32 else None) if with_sum else None
    mean = None if rms else torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    return y, s, mean, rstd


def _forward(x, residual, weight, bias, eps, rms=False, offset=0.0, residual_in_fp32=False, dropout_p=0.0,
             seed=None):
    """Launch the forward kernel for the row width. Returns y, s (None without residual), mean (None for RMS),
    rstd."""
    y, s, mean, rstd = _allocate_forward_outputs(x, residual is not None, rms, residual_in_fp32)
    x, n_rows, stride_x = _rows(x)
    residual, _, stride_residual = _rows(residual) if residual is not None else (None, 0, 0)
    n_cols = x.shape[-1]
    if n_rows == 0:
        return y, s, mean, rstd
    aligned = tiles.operands_aligned(n_cols, x, residual, weight, bias)
    precision = tiles.launch_precision(x.dtype, s.dtype if s is not None else x.dtype)
    tile = tiles.launch_tile("forward", precision, n_cols, aligned)
    # rows held in registers, ROWS to a tile; or streamed, one at a time
    kernel, rows = ((layer_norm_forward_streamed_kernel, {})
                    if tiles.launch_width("forward", precision, n_cols, aligned) == "streamed"
                    else (layer_norm_forward_kernel, {"ROWS": tile.rows}))
    programs = tiles.forward_programs(n_rows, tile, x.device)
    with launch_device(x):
        kernel[(programs,)](
            X=x, RESIDUAL=residual if residual is not None else x, SUM=s if s is not None else y, Y=y,
            WEIGHT=weight if weight is not None else x, BIAS=bias if bias is not None else x,
            MEAN=mean if mean is not None else rstd, RSTD=rstd, SEED=seed if seed is not None else rstd,
            stride_x=stride_x, stride_residual=stride_residual,
            n_rows=n_rows, n_cols=n_cols, eps=eps, offset=offset, dropout_p=dropout_p,
            HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, RMS=rms,
            DROPOUT=seed is not None, BLOCK_N=tile.block_n, num_warps=tile.num_warps, **rows,
        )
    return y, s, mean, rstd


def _backward(dy, dsum, x, weight, mean, rstd, compute_dweight, compute_dbias, rms=False, offset=0.0, dropout_p=0.0,
              seed=None):
    """Launch the backward kernels for the row width, then the sum of the dweight / dbias partial rows. dy and dsum
    are made contiguous (autograd's gradients almost always are already): they share dx's offsets, which saves the
    kernels registers. Returns dx (contiguous, x's shape and dtype), the gradient of the input dropout was applied
    to (with a seed, else None; like dx), dweight (or None), dbias (or None)."""
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dx_kept = torch.empty_like(dx) if seed is not None else None
    x, n_rows, stride_x = _rows(x)
    dy = dy.contiguous()
    dsum = dsum.contiguous() if dsum is not None else None
    n_cols = x.shape[-1]
    aligned = tiles.operands_aligned(n_cols, dy, dsum, x, weight)
    precision = tiles.launch_precision(dy.dtype, x.dtype)
    tile = tiles.launch_tile("backward", precision, n_cols, aligned)
    column_tiles = cdiv(n_cols, tile.block_n)
    row_groups = tiles.backward_row_groups(n_rows, tile, column_tiles, x.device)
    # One buffer for both partial sums, (2, row groups, n_cols): [0] dweight's, [1] dbias's. Never zero-filled: every
    # program stores its rows once. (Without either gradient nothing is stored there; rstd stands in.)
    dweight_partial, dbias_partial = (
        torch.empty((2, row_groups, n_cols), dtype=torch.float32, device=x.device).unbind()
        if compute_dweight or compute_dbias else (rstd, rstd))
    common = dict(DY=dy, X=x, WEIGHT=weight if weight is not None else x, MEAN=mean if mean is not None else rstd,
                  RSTD=rstd, stride_x=stride_x, n_rows=n_rows, n_cols=n_cols, offset=offset,
                  HAS_WEIGHT=weight is not None, RMS=rms, ROWS=tile.rows, BLOCK_N=tile.block_n,
                  num_warps=tile.num_warps, **BACKWARD_COMPILE_OPTIONS)
    gradients = dict(DSUM=dsum if dsum is not None else dy, DX=dx, DX_KEPT=dx_kept if dx_kept is not None else dx,
                     SEED=seed if seed is not None else rstd, DWEIGHT_PARTIAL=dweight_partial,
                     DBIAS_PARTIAL=dbias_partial, dropout_p=dropout_p, HAS_DSUM=dsum is not None,
                     COMPUTE_DWEIGHT=compute_dweight, COMPUTE_DBIAS=compute_dbias, DROPOUT=seed is not None)
    streamed = tiles.launch_width("backward", precision, n_cols, aligned) == "streamed"
    with launch_device(x):
        if row_groups and not streamed:
            layer_norm_backward_kernel[(row_groups,)](**common, **gradients)
        elif row_groups:  # two passes over column tiles
            row_sums = torch.empty((2, column_tiles, n_rows), dtype=torch.float32, device=x.device)
            layer_norm_backward_row_sums_kernel[(column_tiles, row_groups)](**common, ROW_SUMS=row_sums)
            layer_norm_backward_columns_kernel[(column_tiles, row_groups)](**common, **gradients, ROW_SUMS=row_sums)
        dweight, dbias = _sum_partials(dweight_partial, dbias_partial, weight, dy.dtype, n_cols, compute_dweight,
                                       compute_dbias)
    return dx, dx_kept, dweight, dbias


def dropout_mask(seed, n_rows, n_cols, dropout_p, device):
    """The boolean keep-mask (n_rows, n_cols) a dropout call with this seed (a one-element int64 tensor) applies to
    its (n_rows, n_cols) input, True where kept. A launcher, not an operator: the mask helper serves tests and
    inspection. Its tile is its own, unlike any the norms run: the mask depends on positions alone."""
    mask = torch.empty((n_rows, n_cols), dtype=torch.bool, device=device)
    if mask.numel():
        with launch_device(mask):
            dropout_mask_kernel[(cdiv(n_rows, 8), cdiv(n_cols, 64))](
                MASK=mask, SEED=seed, n_rows=n_rows, n_cols=n_cols, dropout_p=float(dropout_p), ROWS=8, BLOCK_N=64)
    return mask


def _sum_partials(dweight_partial, dbias_partial, weight, dtype, n_cols, compute_dweight, compute_dbias):
    """dweight (in the weight's dtype) and dbias (in `dtype`, the bias's) from the (programs, n_cols) partial rows,
    added in program order by one launch; None for a gradient not computed."""
    if not (compute_dweight or compute_dbias):
        return None, None
    device = dweight_partial.device
    dweight = torch.empty(n_cols, dtype=weight.dtype, device=device) if compute_dweight else None
    dbias = torch.empty(n_cols, dtype=dtype, device=device) if compute_dbias else None
    tile = tiles.launch_tile("partials_sum", tiles.precision(dtype), n_cols, n_cols % 16 == 0)
    layer_norm_partials_sum_kernel[(cdiv(n_cols, tile.block_n),)](
        DWEIGHT_PARTIAL=dweight_partial, DBIAS_PARTIAL=dbias_partial,
        DWEIGHT=dweight if compute_dweight else dbias, DBIAS=dbias if compute_dbias else dweight,
        n_partials=dweight_partial.shape[0], n_cols=n_cols,
        COMPUTE_DWEIGHT=compute_dweight, COMPUTE_DBIAS=compute_dbias, ROWS=tile.rows, BLOCK_N=tile.block_n,
        num_warps=tile.num_warps,
    )
    return dweight, dbias


# --------------------------------------------------------------------------------------------------------------
# The launches as PyTorch operators (_library.operator: registered for torch.compile, called directly in eager)


def _forward_op(
    x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
    rms: bool = False, offset: float = 0.0, residual_in_fp32: bool = False, dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, s, mean, rstd) of LayerNorm (RMSNorm when rms) over the last dimension of s = dropout(x) + residual (x
    alone without a residual; dropout with a seed), y = norm(s) * (offset + weight) + bias. Without a residual, s is
    an empty tensor, and so is mean for RMSNorm (an operator's output may not alias its input nor be None; the
    eager route returns None)."""
    y, s, mean, rstd = _forward(x, residual, weight, bias, eps, rms, offset, residual_in_fp32, dropout_p, seed)
    return y, (s if s is not None else x.new_empty(0)), (mean if mean is not None else rstd.new_empty(0)), rstd


def _forward_fake(x, residual, weight, bias, eps, rms=False, offset=0.0, residual_in_fp32=False, dropout_p=0.0,
                  seed=None):
    y, s, mean, rstd = _allocate_forward_outputs(x, residual is not None, rms, residual_in_fp32)
    return y, (s if s is not None else x.new_empty(0)), (mean if mean is not None else rstd.new_empty(0)), rstd


layer_norm_forward = operator("layer_norm_forward", _forward_op, fake=_forward_fake, eager=_forward)


def _backward_op(
    dy: Tensor, dsum: Optional[Tensor], s: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
    compute_dweight: bool, compute_dbias: bool, rms: bool = False, offset: float = 0.0, dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
) -> list[Tensor]:
    """[ds, dx (with a seed), dweight (when compute_dweight), dbias (when compute_dbias)] for the norm of s, whose
    output received dy and s itself dsum (None when s is no output); dx: the gradient of the x that dropout was
    applied to, ds where kept (scaled up) and 0 where dropped."""
    ds, dx, dweight, dbias = _backward(dy, dsum, s, weight, mean, rstd, compute_dweight, compute_dbias, rms, offset,
                                       dropout_p, seed)
    return [ds] + ([dx] if seed is not None else []) + ([dweight] if compute_dweight else []) + (
        [dbias] if compute_dbias else [])


def _backward_fake(dy, dsum, s, weight, mean, rstd, compute_dweight, compute_dbias, rms=False, offset=0.0,
                   dropout_p=0.0, seed=None):
    width = s.shape[-1]
    return (
        [torch.empty(s.shape, dtype=s.dtype, device=s.device) for _ in range(1 if seed is None else 2)]
        + ([s.new_empty(width, dtype=weight.dtype)] if compute_dweight else [])
        + ([s.new_empty(width, dtype=dy.dtype)] if compute_dbias else [])
    )


layer_norm_backward = operator("layer_norm_backward", _backward_op, fake=_backward_fake)


# --------------------------------------------------------------------------------------------------------------
# Autograd: one formula for both routes (_library.differentiable), for every norm and add + norm alike, the one
# place their backward is defined.


def _save_for_backward(ctx, inputs, output):
    x, residual, weight, bias, _, ctx.rms, ctx.offset, _, ctx.dropout_p, seed = inputs
    y, s, mean, rstd = output
    ctx.with_residual = residual is not None
    # The rows that were normalized: the sum s when there is a residual, else x itself.
    ctx.save_for_backward(s if ctx.with_residual else x, weight, mean, rstd, seed)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(*(t for t in (mean, rstd) if t is not None))
    ctx.set_materialize_grads(False)  # a missing gradient of y or s is skipped, not read as zeros


def _gradients(ctx, dy, dsum, _dmean, _drstd):
    s, weight, mean, rstd, seed = ctx.saved_tensors
    if dy is None and seed is None:  # y unused: x and residual receive the gradient of s alone; no launch
        return (dsum, dsum) + (None,) * 8
    compute_dweight = dy is not None and weight is not None and ctx.needs_input_grad[2]
    compute_dbias = dy is not None and ctx.has_bias and ctx.needs_input_grad[3]
    # y unused with dropout: the gradient of s still needs the mask to reach x (a rare call, so no kernel of its
    # own: the backward of a zero dy)
    grads = layer_norm_backward(
        torch.zeros_like(dsum) if dy is None else dy, dsum if ctx.with_residual else None, s, weight, mean, rstd,
        compute_dweight, compute_dbias, ctx.rms, ctx.offset, ctx.dropout_p, seed,
    )
    ds = grads[0]
    dx = grads[1] if seed is not None else ds
    dweight = grads[2 if seed is not None else 1] if compute_dweight else None
    dbias = grads[-1] if compute_dbias else None
    # s = dropout(x) + residual: the residual receives the gradient of s, x its kept elements'.
    return (dx, (ds if ctx.with_residual else None), dweight, dbias) + (None,) * 6


layer_norm_forward = differentiable(layer_norm_forward, _save_for_backward, _gradients)
