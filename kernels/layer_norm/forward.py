"""The LayerNorm and RMSNorm forward kernels (the math, the grid and dropout: shared.py).

Two algorithms, by row width:
- A row that fits one register tile (the tile table's on-chip widths) is read once and written once: narrow rows
  are stacked ROWS to a tile, wider ones one to a tile, and every program keeps the weight and bias in registers
  across its whole run of rows.
- A wider row is streamed in BLOCK_N-wide chunks, one row at a time: a first pass merges the chunks' statistics and
  keeps the last chunk in registers; a second pass reads the other chunks again (from L2: the same program read
  them a moment ago, so DRAM sees each byte once) and writes y. The add's second pass reads back the sum s it
  stored, one tensor instead of x and residual.

Beside them, dropout_mask_kernel writes the keep-mask a dropout call applies, for the mask helper.
"""

import triton
import triton.language as tl

from .shared import RUNTIME_SIZES, dropout_keep, load_input, program_run, scale_and_shift


@triton.jit
def _load_parameters(WEIGHT, BIAS, cols, col_mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Weight and bias at `cols` in their storage dtype (for 16-bit, half the registers of fp32), or 1.0 and 0.0
    where absent."""
    w = tl.load(WEIGHT + cols, mask=col_mask, other=0.0) if HAS_WEIGHT else 1.0
    b = tl.load(BIAS + cols, mask=col_mask, other=0.0) if HAS_BIAS else 0.0
    return w, b


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def layer_norm_forward_kernel(
    X, RESIDUAL, SUM, Y, WEIGHT, BIAS, MEAN: "*fp32", RSTD: "*fp32", SEED: "*i64",
    stride_x, stride_residual, n_rows: tl.int32, n_cols: tl.int32, eps: tl.float32, offset: tl.float32,
    dropout_p: tl.float32,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
    DROPOUT: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Normalize rows that fit one register tile (n_cols <= BLOCK_N), ROWS at a time; each program takes one
    contiguous run of the cdiv(n_rows, ROWS) tiles. Grid: (programs,).

    X:        (n_rows, n_cols) fp16/bf16/fp32, row stride stride_x, unit column stride: the input.
    RESIDUAL: (n_rows, n_cols), row stride stride_residual, any of those dtypes; read only when HAS_RESIDUAL (then
              the normalized rows are s = dropout(X) + RESIDUAL).
    SUM:      (n_rows, n_cols) contiguous, X's dtype or fp32: s, written only when HAS_RESIDUAL.
    Y:        (n_rows, n_cols) contiguous, X's dtype: the output.
    WEIGHT:   (n_cols,) X's dtype, read only when HAS_WEIGHT. BIAS: same, read only when HAS_BIAS.
    MEAN:     (n_rows,) fp32: each row's mean, saved for the backward (LayerNorm only: not written when RMS).
    RSTD:     (n_rows,) fp32: each row's 1 / sqrt(var + eps) (RMS: 1 / sqrt(mean(x^2) + eps)), for the backward.
    SEED:     (1,) int64: the dropout seed, read only when DROPOUT.
    n_rows, n_cols: sizes; eps: the variance epsilon; offset: added to the weight (y = x_hat * (offset + w) + b).
    dropout_p: the probability of dropping an element of X before the residual add (DROPOUT, with HAS_RESIDUAL).
    RMS:      normalize by the root mean square, without the mean.
    ROWS:     rows per tile. BLOCK_N: columns per tile, a power of two, at least n_cols.
    """
    first, last = program_run(tl.cdiv(n_rows, ROWS), AXIS=0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w, b = _load_parameters(WEIGHT, BIAS, cols[None, :], col_mask[None, :], HAS_WEIGHT=HAS_WEIGHT,
                            HAS_BIAS=HAS_BIAS)
    seed = tl.load(SEED) if DROPOUT else 0
    for tile in range(first, last):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        x = load_input(X + rows[:, None] * stride_x + cols[None, :],
                       RESIDUAL + rows[:, None] * stride_residual + cols[None, :],
                       SUM + rows[:, None] * n_cols + cols[None, :], mask, seed, rows, 0, n_cols, dropout_p,
                       HAS_RESIDUAL=HAS_RESIDUAL, STORE_SUM=True, DROPOUT=DROPOUT, ROWS=ROWS, BLOCK_N=BLOCK_N)
        if RMS:
            centered = tl.where(mask, x, 0.0)  # the root mean square: no mean taken out
        else:
            # mean = sum(x) / N;  var = sum((x - mean)^2) / N, both from the registers
            mean = tl.sum(x, axis=1) / n_cols
            centered = tl.where(mask, x - mean[:, None], 0.0)
            tl.store(MEAN + rows, mean, mask=row_mask)
        var = tl.sum(centered * centered, axis=1) / n_cols
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(RSTD + rows, rstd, mask=row_mask)
        y = scale_and_shift(centered * rstd[:, None], w, b, offset, HAS_WEIGHT=HAS_WEIGHT, HAS_BIAS=HAS_BIAS)
        tl.store(Y + rows[:, None] * n_cols + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _merge_statistics(mean, squared_deviations, count, x, mask, chunk_count, RMS: tl.constexpr):
    """Chan et al.'s merge of a chunk x (chunk_count valid elements where mask) into the running mean and sum of
    squared deviations of `count` elements, which stays accurate when the mean is large against the spread, unlike
    sum(x^2) - sum(x)^2 / N. Returns (mean, squared_deviations, count) of both together. RMS: the sum of squares
    about 0 instead (the mean stays 0)."""
    total = count + chunk_count
    if RMS:
        squared_deviations += tl.sum(x * x, axis=0)
    else:
        chunk_mean = tl.sum(x, axis=0) / chunk_count
        chunk_centered = tl.where(mask, x - chunk_mean, 0.0)
        # delta = chunk mean - running mean;  mean += delta * n_b / n;  M2 += M2_b + delta^2 * n_a * n_b / n
        delta = chunk_mean - mean
        mean += delta * (chunk_count / total)
        squared_deviations += tl.sum(chunk_centered * chunk_centered, axis=0) + delta * delta * (
            count * chunk_count / total)
    return mean, squared_deviations, total


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def layer_norm_forward_streamed_kernel(
    X, RESIDUAL, SUM, Y, WEIGHT, BIAS, MEAN: "*fp32", RSTD: "*fp32", SEED: "*i64",
    stride_x, stride_residual, n_rows: tl.int32, n_cols: tl.int32, eps: tl.float32, offset: tl.float32,
    dropout_p: tl.float32,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
    DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Normalize rows wider than one tile, one at a time in BLOCK_N-wide chunks; each program takes one contiguous
    run of the rows. Grid: (programs,). Arguments as in layer_norm_forward_kernel."""
    first, last = program_run(n_rows, AXIS=0)
    offsets = tl.arange(0, BLOCK_N)
    last_start = (n_cols - 1) // BLOCK_N * BLOCK_N  # where the row's last chunk, held in registers, starts
    last_cols = last_start + offsets
    last_mask = last_cols < n_cols
    seed = tl.load(SEED) if DROPOUT else 0
    for row in range(first, last):
        x_row = X + row * stride_x
        residual_row = RESIDUAL + row * stride_residual
        sum_row = SUM + row * n_cols
        y_row = Y + row * n_cols
        row_index = row + tl.arange(0, 1)  # the row as a one-row tile, for dropout's mask
        # Pass 1: the statistics, chunk by chunk, and the sum s stored.
        mean = 0.0
        squared_deviations = 0.0
        count = 0.0
        for start in range(0, last_start, BLOCK_N):
            cols = start + offsets
            x = load_input(x_row + cols, residual_row + cols, sum_row + cols, cols < n_cols, seed, row_index, start,
                           n_cols, dropout_p, HAS_RESIDUAL=HAS_RESIDUAL, STORE_SUM=True, DROPOUT=DROPOUT, ROWS=1,
                           BLOCK_N=BLOCK_N)
            mean, squared_deviations, count = _merge_statistics(mean, squared_deviations, count, x, cols < n_cols,
                                                                BLOCK_N, RMS=RMS)
        x_last = load_input(x_row + last_cols, residual_row + last_cols, sum_row + last_cols, last_mask, seed,
                            row_index, last_start, n_cols, dropout_p, HAS_RESIDUAL=HAS_RESIDUAL, STORE_SUM=True,
                            DROPOUT=DROPOUT, ROWS=1, BLOCK_N=BLOCK_N)
        mean, squared_deviations, count = _merge_statistics(mean, squared_deviations, count, x_last, last_mask,
                                                            n_cols - last_start, RMS=RMS)
        rstd = 1.0 / tl.sqrt(squared_deviations / n_cols + eps)
        if HAS_RESIDUAL:
            tl.debug_barrier()  # bar.sync: the program's stores of s are visible to all its threads
        # Pass 2: y = (x - mean) * rstd * (offset + w) + b, the chunks before the last read again (s, not x and
        # residual).
        for start in range(0, last_start, BLOCK_N):
            cols = start + offsets
            x = tl.load((sum_row if HAS_RESIDUAL else x_row) + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            w, b = _load_parameters(WEIGHT, BIAS, cols, cols < n_cols, HAS_WEIGHT=HAS_WEIGHT, HAS_BIAS=HAS_BIAS)
            y = scale_and_shift((x - mean) * rstd, w, b, offset, HAS_WEIGHT=HAS_WEIGHT, HAS_BIAS=HAS_BIAS)
            tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=cols < n_cols)
        w, b = _load_parameters(WEIGHT, BIAS, last_cols, last_mask, HAS_WEIGHT=HAS_WEIGHT, HAS_BIAS=HAS_BIAS)
        y = scale_and_shift((x_last - mean) * rstd, w, b, offset, HAS_WEIGHT=HAS_WEIGHT, HAS_BIAS=HAS_BIAS)
        tl.store(y_row + last_cols, y.to(Y.dtype.element_ty), mask=last_mask)
        if not RMS:
            tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)


@triton.jit
def dropout_mask_kernel(MASK, SEED: "*i64", n_rows, n_cols, dropout_p, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep-mask a dropout call with this seed applies: MASK, (n_rows, n_cols) bool, contiguous, True where kept.
    Program (r, c) writes the (ROWS, BLOCK_N) tile at row tile r, column tile c. Grid: (cdiv(n_rows, ROWS),
    cdiv(n_cols, BLOCK_N))."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(tl.load(SEED), rows, tl.program_id(1) * BLOCK_N, n_cols, dropout_p, ROWS, BLOCK_N)
    tl.store(MASK + rows[:, None] * n_cols + cols[None, :], keep, mask=(rows[:, None] < n_rows)
             & (cols[None, :] < n_cols))
