"""LayerNorm and residual-add + LayerNorm over the last dimension: Triton kernels, launchers, autograd.

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias            layer_norm
    s = x + residual;  y = layer_norm(s)                               add_layer_norm -> (y, s)

Both are memory-bound, so each kernel reads and writes every element once where it can:
- Forward: a program normalizes ROWS rows held in a (ROWS, BLOCK_N) register tile. Narrow rows (the
  decoder's 384) are packed several to a program so a launch is not a swarm of tiny programs; a row
  wider than the largest tile is streamed twice instead (statistics, then normalization).
  Statistics are fp32 whatever the input dtype; mean and 1/std (fp32, one per row) are saved for backward.
- Backward: dx from the saved mean and rstd, in one pass over a row that fits a tile (two over a
  streamed row). dweight and dbias are reduced
  deterministically: every program sums its rows into its own fp32 row of a (programs, N) buffer, and
  torch sums that buffer over programs (a fixed-order reduction, no atomics), so the same inputs give
  bit-identical gradients.
"""

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._library import NAMESPACE
from ._validate import check_runnable, check_same_device_and_dtype, check_tensor

# Tile shapes, per direction: the widest row that stays in registers as one tile (a wider row is
# streamed in chunk-wide tiles), the elements a tile of narrow rows aims for, and the elements each
# thread holds (which sets the warps). The backward keeps more values live per element, so its tiles
# are smaller. Sized so that every config compiles for sm_80 and sm_90 without register spills, with
# aligned operands and without (see shipped_kernel_configs; streamed fp16 rows in 4096-wide tiles of
# 8 warps spill on sm_90 when misaligned).
FORWARD = dict(max_block=8192, chunk=8192, tile_elements=4096, elements_per_thread=16)
BACKWARD = dict(max_block=1024, chunk=2048, tile_elements=2048, elements_per_thread=8)
MAX_ROWS_PER_PROGRAM = 16
# Programs of the backward: a few per SM on a GPU, so dweight and dbias have few partial rows to sum.
BACKWARD_PROGRAMS_PER_SM = 4
BACKWARD_PROGRAMS_ON_CPU = 4
# Offsets in the kernels are 32-bit (64-bit row offsets cost registers and spills), so a tensor holds
# fewer elements than this.
MAX_ELEMENTS = 2**31


@triton.jit
def _layer_norm_forward_kernel(
    X, RESIDUAL, SUM, Y, WEIGHT, BIAS, MEAN, RSTD,
    stride_x, stride_residual, n_rows, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, STREAM_ROW: tl.constexpr,
):
    """Normalize rows [pid * ROWS, pid * ROWS + ROWS) of X (plus RESIDUAL) over their n_cols columns.

    X:        (n_rows, n_cols) fp16/bf16/fp32, row stride stride_x, unit column stride: the input.
    RESIDUAL: like X, row stride stride_residual; read only when HAS_RESIDUAL (then the normalized
              rows are s = X + RESIDUAL).
    SUM:      (n_rows, n_cols) contiguous, X's dtype: s, written only when HAS_RESIDUAL.
    Y:        (n_rows, n_cols) contiguous, X's dtype: the output.
    WEIGHT:   (n_cols,) X's dtype, read only when HAS_WEIGHT. BIAS: same, read only when HAS_BIAS.
    MEAN:     (n_rows,) fp32: each row's mean, saved for the backward.
    RSTD:     (n_rows,) fp32: each row's 1 / sqrt(var + eps), saved for the backward.
    n_rows, n_cols: int32 sizes; eps: fp32.
    ROWS:     rows per program. BLOCK_N: columns per tile, a power of two.
    STREAM_ROW: False when a row fits one tile (n_cols <= BLOCK_N, the row stays in registers);
              True for wider rows, read twice in BLOCK_N chunks (ROWS is then 1).
    """
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    x_rows = X + rows[:, None] * stride_x
    residual_rows = RESIDUAL + rows[:, None] * stride_residual
    sum_rows = SUM + rows[:, None] * n_cols
    y_rows = Y + rows[:, None] * n_cols

    if not STREAM_ROW:
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        x = _load_input(x_rows, residual_rows, sum_rows, cols, mask, HAS_RESIDUAL, True)
        # mean = sum(x) / N;  var = sum((x - mean)^2) / N, both from the registers
        mean = tl.sum(x, axis=1) / n_cols
        centered = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(centered * centered, axis=1) / n_cols
        rstd = 1.0 / tl.sqrt(var + eps)
        # y = (x - mean) * rstd * w + b
        y = _scale_and_shift(centered * rstd[:, None], WEIGHT, BIAS, cols, col_mask, HAS_WEIGHT, HAS_BIAS)
        tl.store(y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Pass 1: mean and sum of squared deviations, merged chunk by chunk (Chan et al.), which stays
        # accurate when the mean is large against the spread, unlike sum(x^2) - sum(x)^2 / N.
        mean = tl.zeros((ROWS,), dtype=tl.float32)
        squared_deviations = tl.zeros((ROWS,), dtype=tl.float32)
        seen_count = 0.0
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols < n_cols)[None, :]
            x = _load_input(x_rows, residual_rows, sum_rows, cols, mask, HAS_RESIDUAL, True)
            chunk_count = tl.sum((cols < n_cols).to(tl.float32), axis=0)
            chunk_mean = tl.sum(x, axis=1) / chunk_count
            chunk_centered = tl.where(mask, x - chunk_mean[:, None], 0.0)
            # merge: delta = chunk mean - running mean; mean += delta * n_b / n; M2 += M2_b + delta^2 n_a n_b / n
            delta = chunk_mean - mean
            total_count = seen_count + chunk_count
            mean += delta * (chunk_count / total_count)
            squared_deviations += tl.sum(chunk_centered * chunk_centered, axis=1)
            squared_deviations += delta * delta * (seen_count * chunk_count / total_count)
            seen_count = total_count
        rstd = 1.0 / tl.sqrt(squared_deviations / n_cols + eps)
        # Pass 2: y = (x - mean) * rstd * w + b. The sum s is recomputed from X and RESIDUAL rather than
        # read back from SUM, which other threads of this program wrote.
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_mask = cols < n_cols
            mask = row_mask[:, None] & col_mask[None, :]
            x = _load_input(x_rows, residual_rows, sum_rows, cols, mask, HAS_RESIDUAL, False)
            centered = tl.where(mask, x - mean[:, None], 0.0)
            y = _scale_and_shift(centered * rstd[:, None], WEIGHT, BIAS, cols, col_mask, HAS_WEIGHT, HAS_BIAS)
            tl.store(y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _load_input(x_rows, residual_rows, sum_rows, cols, mask, HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr):
    """The tile of rows to normalize, in fp32: x, or s = x + residual (stored to SUM when STORE_SUM).
    The statistics are taken of s rounded to its storage dtype, exactly the s the caller receives,
    so y = layer_norm(s) holds as it does for the eager composite."""
    x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s = x + tl.load(residual_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = s.to(sum_rows.dtype.element_ty)
        if STORE_SUM:
            tl.store(sum_rows + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    return x


@triton.jit
def _scale_and_shift(x_hat, WEIGHT, BIAS, cols, col_mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """x_hat * weight + bias, each factor only when present."""
    if HAS_WEIGHT:
        x_hat = x_hat * tl.load(WEIGHT + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        x_hat = x_hat + tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return x_hat


@triton.jit
def _layer_norm_backward_kernel(
    DY, DSUM, X, WEIGHT, MEAN, RSTD, DX, DWEIGHT_PARTIAL, DBIAS_PARTIAL,
    stride_x, n_rows, n_cols,
    HAS_DSUM: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_DWEIGHT: tl.constexpr, COMPUTE_DBIAS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, STREAM_ROW: tl.constexpr,
):
    """Gradients of y = layer_norm(x): dx for every row, and this program's share of dweight and dbias.
    Program pid takes the tiles of ROWS rows numbered pid, pid + programs, pid + 2 * programs, ...

    DY:     (n_rows, n_cols) contiguous, x's dtype: the gradient of y.
    DSUM:   like DY: the gradient that reaches s = x + residual from its other uses (add_layer_norm);
            added to dx when HAS_DSUM.
    X:      (n_rows, n_cols) row stride stride_x: the normalized input (x, or s for add_layer_norm).
    WEIGHT: (n_cols,) x's dtype, read only when HAS_WEIGHT.
    MEAN, RSTD: (n_rows,) fp32: the forward's statistics.
    DX:     (n_rows, n_cols) contiguous, x's dtype: the gradient of x (and of residual).
    DWEIGHT_PARTIAL, DBIAS_PARTIAL: (programs, n_cols) fp32: row pid receives the sums over this
            program's rows of dy * x_hat and of dy (written when COMPUTE_DWEIGHT / COMPUTE_DBIAS; when
            STREAM_ROW they are accumulated into, so the caller passes them zeroed).
    n_rows, n_cols: int32 sizes.
    ROWS:   rows per tile. BLOCK_N: columns per tile, a power of two.
    STREAM_ROW: False when a row fits one tile; True for wider rows, read twice in BLOCK_N chunks.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    n_tiles = tl.cdiv(n_rows, ROWS)
    partial_offset = pid * n_cols

    if not STREAM_ROW:
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        if HAS_WEIGHT:
            w = tl.load(WEIGHT + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        dweight = tl.zeros((BLOCK_N,), dtype=tl.float32)
        dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for tile in range(pid, n_tiles, programs):
            rows = tile * ROWS + tl.arange(0, ROWS)
            row_mask = rows < n_rows
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            # x_hat = (x - mean) * rstd;  g = w * dy
            x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            g = dy
            if HAS_WEIGHT:
                g = dy * w
            # dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))
            mean_g = tl.sum(g, axis=1) / n_cols
            mean_g_x_hat = tl.sum(g * x_hat, axis=1) / n_cols
            dx = (g - mean_g[:, None] - x_hat * mean_g_x_hat[:, None]) * rstd[:, None]
            if HAS_DSUM:
                dsum = tl.load(DSUM + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
                dx += dsum.to(tl.float32)
            tl.store(DX + rows[:, None] * n_cols + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            # dweight += sum over rows of dy * x_hat;  dbias += sum over rows of dy
            dweight += tl.sum(dy * x_hat, axis=0)
            dbias += tl.sum(dy, axis=0)
        if COMPUTE_DWEIGHT:
            tl.store(DWEIGHT_PARTIAL + partial_offset + cols, dweight, mask=col_mask)
        if COMPUTE_DBIAS:
            tl.store(DBIAS_PARTIAL + partial_offset + cols, dbias, mask=col_mask)
    else:
        for tile in range(pid, n_tiles, programs):
            rows = tile * ROWS + tl.arange(0, ROWS)
            row_mask = rows < n_rows
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            # Pass 1: mean(g) and mean(g * x_hat) over the whole row.
            sum_g = tl.zeros((ROWS,), dtype=tl.float32)
            sum_g_x_hat = tl.zeros((ROWS,), dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                col_mask = cols < n_cols
                mask = row_mask[:, None] & col_mask[None, :]
                dy, x_hat, g = _load_chunk_gradients(
                    X, DY, WEIGHT, rows, cols, mask, col_mask, mean, rstd, stride_x, n_cols, HAS_WEIGHT
                )
                sum_g += tl.sum(g, axis=1)
                sum_g_x_hat += tl.sum(g * x_hat, axis=1)
            mean_g = sum_g / n_cols
            mean_g_x_hat = sum_g_x_hat / n_cols
            # Pass 2: dx chunk by chunk, and this program's dweight / dbias rows accumulated in place
            # (a chunk's columns are read and written within one iteration; the barrier below orders
            # one tile's writes before the next tile's reads, whichever threads do them).
            for start in range(0, n_cols, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                col_mask = cols < n_cols
                mask = row_mask[:, None] & col_mask[None, :]
                dy, x_hat, g = _load_chunk_gradients(
                    X, DY, WEIGHT, rows, cols, mask, col_mask, mean, rstd, stride_x, n_cols, HAS_WEIGHT
                )
                dx = (g - mean_g[:, None] - x_hat * mean_g_x_hat[:, None]) * rstd[:, None]
                if HAS_DSUM:
                    dsum = tl.load(DSUM + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
                    dx += dsum.to(tl.float32)
                tl.store(DX + rows[:, None] * n_cols + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
                if COMPUTE_DWEIGHT:
                    dweight = tl.load(DWEIGHT_PARTIAL + partial_offset + cols, mask=col_mask, other=0.0)
                    dweight += tl.sum(dy * x_hat, axis=0)
                    tl.store(DWEIGHT_PARTIAL + partial_offset + cols, dweight, mask=col_mask)
                if COMPUTE_DBIAS:
                    dbias = tl.load(DBIAS_PARTIAL + partial_offset + cols, mask=col_mask, other=0.0)
                    dbias += tl.sum(dy, axis=0)
                    tl.store(DBIAS_PARTIAL + partial_offset + cols, dbias, mask=col_mask)
            tl.debug_barrier()  # bar.sync: this tile's partial-row stores are visible to the whole program


@triton.jit
def _load_chunk_gradients(
    X, DY, WEIGHT, rows, cols, mask, col_mask, mean, rstd, stride_x, n_cols, HAS_WEIGHT: tl.constexpr
):
    """For a streamed row's chunk, in fp32: dy, x_hat = (x - mean) * rstd, and g = weight * dy."""
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    g = dy
    if HAS_WEIGHT:
        g = dy * tl.load(WEIGHT + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return dy, x_hat, g


# ----------------------------------------------------------------------------------------------------
# Launchers: the tile shape and warps from the row width.


def _tile_config(n_cols, max_block, chunk, tile_elements, elements_per_thread):
    """(ROWS, BLOCK_N, STREAM_ROW, num_warps) for rows of n_cols elements (the other arguments: one
    direction's FORWARD or BACKWARD sizes).

    A row of at most max_block elements is one tile row; narrow rows are stacked up to tile_elements
    per tile. A wider row is streamed in chunk-wide tiles, one row at a time. The warps give each
    thread about elements_per_thread elements, between 1 and 16 warps.
    """
    if n_cols <= max_block:
        block_n = triton.next_power_of_2(n_cols)
        rows = min(MAX_ROWS_PER_PROGRAM, max(1, tile_elements // block_n))
        stream_row = False
    else:
        block_n, rows, stream_row = chunk, 1, True
    num_warps = min(16, max(1, rows * block_n // (32 * elements_per_thread)))
    return rows, block_n, stream_row, num_warps


@functools.lru_cache(maxsize=None)
def _backward_programs(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * BACKWARD_PROGRAMS_PER_SM
    return BACKWARD_PROGRAMS_ON_CPU


def _as_rows(tensor):
    """A (rows, width) view of `tensor` with unit column stride, copying only when the last dimension
    is not unit-stride or the leading dimensions cannot be flattened into one row stride."""
    if tensor.stride(-1) != 1:
        tensor = tensor.contiguous()
    rows = tensor.reshape(-1, tensor.shape[-1])
    if rows.shape[0] > 1 and (rows.shape[0] - 1) * rows.stride(0) + rows.shape[1] >= MAX_ELEMENTS:
        rows = rows.contiguous()  # a strided view spanning more than 32-bit offsets reach
    return rows


def _allocate_forward_outputs(x, with_sum):
    """y (and s), mean and rstd of the forward, allocated the same way by the launch and by its fake
    implementation: y and s contiguous in x's shape, mean and rstd one fp32 value per row."""
    n_rows = x.numel() // x.shape[-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    return (y, torch.empty_like(y), mean, rstd) if with_sum else (y, None, mean, rstd)


def _forward(x, residual, weight, bias, eps):
    """Launch the forward kernel. Returns y, s (None without residual), mean, rstd."""
    y, s, mean, rstd = _allocate_forward_outputs(x, residual is not None)
    x = _as_rows(x)
    residual = _as_rows(residual) if residual is not None else None
    n_rows, n_cols = x.shape
    if n_rows == 0:
        return y, s, mean, rstd
    rows, block_n, stream_row, num_warps = _tile_config(n_cols, **FORWARD)
    _layer_norm_forward_kernel[(triton.cdiv(n_rows, rows),)](
        x, residual if residual is not None else x, s if s is not None else y, y,
        weight if weight is not None else x, bias if bias is not None else x, mean, rstd,
        x.stride(0), residual.stride(0) if residual is not None else 0, n_rows, n_cols, eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        ROWS=rows, BLOCK_N=block_n, STREAM_ROW=stream_row, num_warps=num_warps,
    )
    return y, s, mean, rstd


def _backward(dy, dsum, x, weight, mean, rstd, compute_dweight, compute_dbias):
    """Launch the backward kernel; reduce the partial dweight / dbias rows. dy and dsum are made contiguous
    (autograd's gradients almost always are already): they share dx's offsets, which saves the kernel
    registers. Returns dx (contiguous, x's shape), dweight (or None), dbias (or None)."""
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x = _as_rows(x)
    dy = dy.contiguous()
    dsum = dsum.contiguous() if dsum is not None else None
    n_rows, n_cols = x.shape
    rows, block_n, stream_row, num_warps = _tile_config(n_cols, **BACKWARD)
    programs = max(1, min(triton.cdiv(n_rows, rows), _backward_programs(x.device)))
    # A streamed row accumulates into its partial rows, which must start at zero.
    allocate = torch.zeros if stream_row else torch.empty
    dweight_partial = allocate((programs, n_cols), dtype=torch.float32, device=x.device) if compute_dweight else None
    dbias_partial = allocate((programs, n_cols), dtype=torch.float32, device=x.device) if compute_dbias else None
    if n_rows > 0:
        # num_stages=1: no prefetch buffers in the row loops, the register budget the configs were sized for.
        _layer_norm_backward_kernel[(programs,)](
            dy, dsum if dsum is not None else dy, x, weight if weight is not None else x, mean, rstd, dx,
            dweight_partial if compute_dweight else mean, dbias_partial if compute_dbias else mean,
            x.stride(0), n_rows, n_cols,
            HAS_DSUM=dsum is not None, HAS_WEIGHT=weight is not None,
            COMPUTE_DWEIGHT=compute_dweight, COMPUTE_DBIAS=compute_dbias,
            ROWS=rows, BLOCK_N=block_n, STREAM_ROW=stream_row, num_warps=num_warps, num_stages=1,
        )
    elif compute_dweight or compute_dbias:  # no rows: the gradients are zero
        dweight_partial = dweight_partial.zero_() if compute_dweight else None
        dbias_partial = dbias_partial.zero_() if compute_dbias else None
    # A fixed-order sum over the programs' rows: deterministic, unlike float atomics.
    dweight = dweight_partial.sum(0).to(weight.dtype) if compute_dweight else None
    dbias = dbias_partial.sum(0).to(x.dtype) if compute_dbias else None
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------------------
# The launches as PyTorch operators (torch.library), so torch.compile sees them as opaque calls with known
# output shapes (their fake implementations) instead of tracing into Triton.


@torch.library.custom_op(f"{NAMESPACE}::layer_norm_forward", mutates_args=())
def layer_norm_forward(
    x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, s, mean, rstd) of LayerNorm over the last dimension of s = x (+ residual, when given). Without a
    residual, s is an empty tensor (an operator's output may not alias its input)."""
    y, s, mean, rstd = _forward(x, residual, weight, bias, eps)
    return y, (s if s is not None else x.new_empty(0)), mean, rstd


@layer_norm_forward.register_fake
def _(x, residual, weight, bias, eps):
    y, s, mean, rstd = _allocate_forward_outputs(x, residual is not None)
    return y, (s if s is not None else x.new_empty(0)), mean, rstd


@torch.library.custom_op(f"{NAMESPACE}::layer_norm_backward", mutates_args=())
def layer_norm_backward(
    dy: Tensor, dsum: Optional[Tensor], s: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
    compute_dweight: bool, compute_dbias: bool,
) -> list[Tensor]:
    """[ds, dweight (when compute_dweight), dbias (when compute_dbias)] for the LayerNorm of s, whose output
    received dy and s itself dsum (None when s is no output)."""
    ds, dweight, dbias = _backward(dy, dsum, s, weight, mean, rstd, compute_dweight, compute_dbias)
    return [ds] + ([dweight] if compute_dweight else []) + ([dbias] if compute_dbias else [])


@layer_norm_backward.register_fake
def _(dy, dsum, s, weight, mean, rstd, compute_dweight, compute_dbias):
    width = s.shape[-1]
    return (
        [torch.empty(s.shape, dtype=s.dtype, device=s.device)]
        + ([s.new_empty(width, dtype=weight.dtype)] if compute_dweight else [])
        + ([s.new_empty(width)] if compute_dbias else [])
    )


# ----------------------------------------------------------------------------------------------------
# Autograd: one Function for both ops, the single place their backward is defined. The same setup_context
# and backward are registered on the forward operator, so callers of the operator, opcheck and
# torch.compile all see this formula.


class LayerNormFunction(torch.autograd.Function):
    """forward(x, residual, weight, bias, eps) -> (y, s, mean, rstd); residual may be None (plain LayerNorm)."""

    @staticmethod
    def forward(x, residual, weight, bias, eps):
        return layer_norm_forward(x, residual, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, residual, weight, bias, _ = inputs
        y, s, mean, rstd = output
        ctx.with_residual = residual is not None
        # The rows that were normalized: the sum s when there is a residual, else x itself.
        ctx.save_for_backward(s if ctx.with_residual else x, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)  # a missing gradient of y or s is skipped, not read as zeros

    @staticmethod
    def backward(ctx, dy, dsum, _dmean, _drstd):
        s, weight, mean, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(s)
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


torch.library.register_autograd(
    f"{NAMESPACE}::layer_norm_forward", LayerNormFunction.backward, setup_context=LayerNormFunction.setup_context
)


# ----------------------------------------------------------------------------------------------------
# The functional API.


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
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")

    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    if torch.is_autocast_enabled(x.device.type):
        if x.device.type == "cuda":
            dtype = torch.float32
        weight = weight.to(dtype) if weight is not None else None
        bias = bias.to(dtype) if bias is not None else None
    x = x.to(dtype)
    residual = residual.to(dtype) if residual is not None else None
    others = {name: t for name, t in (("residual", residual), ("weight", weight), ("bias", bias)) if t is not None}
    check_same_device_and_dtype("x" if residual is None else "x + residual", x, **others)
    return x, residual, weight, bias


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the last dimension of `x`, as torch.nn.functional.layer_norm(x, (x.shape[-1],),
    weight, bias, eps).

    x: (..., N) fp16, bf16 or fp32, any leading dimensions. weight, bias: (N,) in x's dtype and on its
    device, each optional. Statistics are computed in fp32; the output has x's shape and dtype, except
    under CUDA autocast, where it is fp32 as torch's own layer_norm's is.
    Any width from 1 up: rows wider than one tile (FORWARD / BACKWARD max_block) are streamed in chunks.
    """
    x, _, weight, bias = _prepared_inputs(x, None, weight, bias, eps)
    y, _, _, _ = LayerNormFunction.apply(x, None, weight, bias, float(eps))
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
    y, s, _, _ = LayerNormFunction.apply(x, residual, weight, bias, float(eps))
    return y, s


# ----------------------------------------------------------------------------------------------------
# The configs the launcher picks on a GPU, for the compile report.

# A width of each class the launcher tells apart: several rows per tile (384, the decoder's), the backward's
# widest tile (1024), one row per forward tile and streamed backward rows (4096, and 8192: the forward's
# widest tile), streamed in both directions (65536).
SHIPPED_WIDTHS = (384, 1024, 4096, 8192, 65536)
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def shipped_kernel_configs():
    """One entry per (kernel, dtype, width class) the launcher can pick, with weight and bias present
    (FusedLayerNorm's case): forward, add-forward, backward, and add-backward (with the gradient of s)."""
    configs = []
    for dtype, name in _TRITON_DTYPE.items():
        data, stats = f"*{name}", "*fp32"
        for width in SHIPPED_WIDTHS:
            for has_residual in (False, True):
                rows, block_n, stream_row, num_warps = _tile_config(width, **FORWARD)
                configs.append({
                    "name": f"layer_norm_{'add_' if has_residual else ''}forward_{name}_n{width}",
                    "kernel": _layer_norm_forward_kernel,
                    "signature": {
                        "X": data, "RESIDUAL": data, "SUM": data, "Y": data, "WEIGHT": data, "BIAS": data,
                        "MEAN": stats, "RSTD": stats, "stride_x": "i32", "stride_residual": "i32",
                        "n_rows": "i32", "n_cols": "i32", "eps": "fp32",
                        "HAS_RESIDUAL": "constexpr", "HAS_WEIGHT": "constexpr", "HAS_BIAS": "constexpr",
                        "ROWS": "constexpr", "BLOCK_N": "constexpr", "STREAM_ROW": "constexpr",
                    },
                    "constexprs": {
                        "HAS_RESIDUAL": has_residual, "HAS_WEIGHT": True, "HAS_BIAS": True,
                        "ROWS": rows, "BLOCK_N": block_n, "STREAM_ROW": stream_row,
                    },
                    "num_warps": num_warps,
                    "num_stages": 3,
                })
                rows, block_n, stream_row, num_warps = _tile_config(width, **BACKWARD)
                configs.append({
                    "name": f"layer_norm_{'add_' if has_residual else ''}backward_{name}_n{width}",
                    "kernel": _layer_norm_backward_kernel,
                    "signature": {
                        "DY": data, "DSUM": data, "X": data, "WEIGHT": data, "MEAN": stats, "RSTD": stats,
                        "DX": data, "DWEIGHT_PARTIAL": stats, "DBIAS_PARTIAL": stats,
                        "stride_x": "i32", "n_rows": "i32", "n_cols": "i32",
                        "HAS_DSUM": "constexpr", "HAS_WEIGHT": "constexpr", "COMPUTE_DWEIGHT": "constexpr",
                        "COMPUTE_DBIAS": "constexpr", "ROWS": "constexpr", "BLOCK_N": "constexpr",
                        "STREAM_ROW": "constexpr",
                    },
                    "constexprs": {
                        "HAS_DSUM": has_residual, "HAS_WEIGHT": True, "COMPUTE_DWEIGHT": True, "COMPUTE_DBIAS": True,
                        "ROWS": rows, "BLOCK_N": block_n, "STREAM_ROW": stream_row,
                    },
                    "num_warps": num_warps,
                    "num_stages": 1,
                })
    return configs
