"""The LayerNorm backward kernels (the math and the grid: shared.py). With x_hat = (x - mean) * rstd and g = w * dy:

    dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))   (+ the gradient reaching s itself, for add_layer_norm)
    dweight = sum over rows of dy * x_hat;  dbias = sum over rows of dy

dweight and dbias are reduced deterministically, without atomics or zero-fills: every program sums its own rows in
fp32 registers and stores one partial row of a (programs, N) buffer once, at its end; layer_norm_partials_sum_kernel
then adds the partial rows in program order, one small launch over a buffer that sits in L2.

Two algorithms, by row width:
- A row that fits one register tile is read once and dx written once (layer_norm_backward_kernel); each program
  holds the weight and its dweight / dbias partial rows in registers across its run of rows.
- A wider row is cut into BLOCK_N-wide column tiles, and two launches share a grid of (column tiles, row groups):
  the first stores, per row and column tile, the partial sums of g and g * x_hat (_row_sums_kernel); the second
  adds them up per row, in column-tile order, and writes dx, each program holding its column tile's weight and
  dweight / dbias partials in registers across its row group (_columns_kernel). x and dy are read twice, the
  partials never: no read-modify-write in global memory.
"""

import triton
import triton.language as tl

from .shared import RUNTIME_SIZES, program_run


@triton.jit
def _gradient_terms(X, DY, WEIGHT_TILE, MEAN, RSTD, rows, row_mask, cols, mask, stride_x, n_cols,
                    HAS_WEIGHT: tl.constexpr):
    """For the tile of `rows` x `cols`: rstd, dy, x_hat = (x - mean) * rstd and g = w * dy, in fp32 (WEIGHT_TILE:
    the weight at cols, loaded by the caller)."""
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
    x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    g = dy * WEIGHT_TILE.to(tl.float32) if HAS_WEIGHT else dy
    return rstd, dy, x_hat, g


@triton.jit
def _store_dx(DSUM, DX, g, x_hat, mean_g, mean_g_x_hat, rstd, rows, cols, mask, n_cols, HAS_DSUM: tl.constexpr):
    """dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) (plus the gradient reaching s from its other uses, when
    HAS_DSUM), stored to DX in its dtype."""
    dx = (g - mean_g[:, None] - x_hat * mean_g_x_hat[:, None]) * rstd[:, None]
    offsets = rows[:, None] * n_cols + cols[None, :]
    if HAS_DSUM:
        dx += tl.load(DSUM + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _store_partials(DWEIGHT_PARTIAL, DBIAS_PARTIAL, dweight, dbias, partial_row, cols, col_mask, n_cols,
                    COMPUTE_DWEIGHT: tl.constexpr, COMPUTE_DBIAS: tl.constexpr):
    """This program's dweight and dbias partial sums, once, to row partial_row of the (programs, n_cols) buffers."""
    if COMPUTE_DWEIGHT:
        tl.store(DWEIGHT_PARTIAL + partial_row * n_cols + cols, dweight, mask=col_mask)
    if COMPUTE_DBIAS:
        tl.store(DBIAS_PARTIAL + partial_row * n_cols + cols, dbias, mask=col_mask)


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def layer_norm_backward_kernel(
    DY, DSUM, X, WEIGHT, MEAN: "*fp32", RSTD: "*fp32", DX, DWEIGHT_PARTIAL: "*fp32", DBIAS_PARTIAL: "*fp32",
    stride_x, n_rows: tl.int32, n_cols: tl.int32,
    HAS_DSUM: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_DWEIGHT: tl.constexpr, COMPUTE_DBIAS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradients of rows that fit one tile (n_cols <= BLOCK_N), ROWS at a time: dx of every row, and the program's
    partial dweight and dbias rows. Each program takes one contiguous run of the cdiv(n_rows, ROWS) tiles.
    Grid: (programs,).

    DY:     (n_rows, n_cols) contiguous, x's dtype: the gradient of y.
    DSUM:   like DY: the gradient that reaches s = x + residual from its other uses (add_layer_norm); added to dx
            when HAS_DSUM.
    X:      (n_rows, n_cols) row stride stride_x: the normalized input (x, or s for add_layer_norm).
    WEIGHT: (n_cols,) x's dtype, read only when HAS_WEIGHT.
    MEAN, RSTD: (n_rows,) fp32: the forward's statistics.
    DX:     (n_rows, n_cols) contiguous, x's dtype: the gradient of x (and of residual).
    DWEIGHT_PARTIAL, DBIAS_PARTIAL: (programs, n_cols) fp32: row pid receives the sums over this program's rows
            of dy * x_hat and of dy (written when COMPUTE_DWEIGHT / COMPUTE_DBIAS).
    n_rows, n_cols: sizes. ROWS: rows per tile. BLOCK_N: columns per tile, a power of two, at least n_cols.
    """
    first, last = program_run(tl.cdiv(n_rows, ROWS), AXIS=0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(WEIGHT + cols[None, :], mask=col_mask[None, :], other=0.0) if HAS_WEIGHT else 1.0
    dweight = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile in range(first, last):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rstd, dy, x_hat, g = _gradient_terms(X, DY, w, MEAN, RSTD, rows, row_mask, cols, mask, stride_x, n_cols,
                                             HAS_WEIGHT=HAS_WEIGHT)
        mean_g = tl.sum(g, axis=1) / n_cols
        mean_g_x_hat = tl.sum(g * x_hat, axis=1) / n_cols
        _store_dx(DSUM, DX, g, x_hat, mean_g, mean_g_x_hat, rstd, rows, cols, mask, n_cols, HAS_DSUM=HAS_DSUM)
        dweight += tl.sum(dy * x_hat, axis=0)
        dbias += tl.sum(dy, axis=0)
    _store_partials(DWEIGHT_PARTIAL, DBIAS_PARTIAL, dweight, dbias, tl.program_id(0), cols, col_mask, n_cols,
                    COMPUTE_DWEIGHT=COMPUTE_DWEIGHT, COMPUTE_DBIAS=COMPUTE_DBIAS)


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def layer_norm_backward_row_sums_kernel(
    DY, X, WEIGHT, MEAN: "*fp32", RSTD: "*fp32", ROW_SUMS: "*fp32", stride_x, n_rows: tl.int32, n_cols: tl.int32,
    HAS_WEIGHT: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Pass 1 of rows wider than one tile: program (c, r) takes column tile c (columns [c * BLOCK_N, (c + 1) *
    BLOCK_N)) of the r-th contiguous run of the cdiv(n_rows, ROWS) row tiles, holding the tile's weight.
    Grid: (column tiles, row groups).

    ROW_SUMS: (2, column tiles, n_rows) fp32: [0, c, row] receives the sum of g over column tile c of the row,
              [1, c, row] the sum of g * x_hat.
    Other arguments as in layer_norm_backward_kernel.
    """
    column_tile = tl.program_id(0)
    column_tiles = tl.num_programs(0)
    first, last = program_run(tl.cdiv(n_rows, ROWS), AXIS=1)
    cols = column_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(WEIGHT + cols[None, :], mask=col_mask[None, :], other=0.0) if HAS_WEIGHT else 1.0
    for tile in range(first, last):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        _, _, x_hat, g = _gradient_terms(X, DY, w, MEAN, RSTD, rows, row_mask, cols, mask, stride_x, n_cols,
                                         HAS_WEIGHT=HAS_WEIGHT)
        tl.store(ROW_SUMS + column_tile * n_rows + rows, tl.sum(g, axis=1), mask=row_mask)
        tl.store(ROW_SUMS + (column_tiles + column_tile) * n_rows + rows, tl.sum(g * x_hat, axis=1), mask=row_mask)


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def layer_norm_backward_columns_kernel(
    DY, DSUM, X, WEIGHT, MEAN: "*fp32", RSTD: "*fp32", ROW_SUMS: "*fp32", DX, DWEIGHT_PARTIAL: "*fp32",
    DBIAS_PARTIAL: "*fp32", stride_x, n_rows: tl.int32, n_cols: tl.int32,
    HAS_DSUM: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_DWEIGHT: tl.constexpr, COMPUTE_DBIAS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Pass 2 of rows wider than one tile, on pass 1's grid: program (c, r) writes dx of column tile c of its rows
    and stores its dweight / dbias partial sums to row r of the (row groups, n_cols) buffers, columns of tile c.
    ROW_SUMS: pass 1's. Other arguments as in layer_norm_backward_kernel."""
    column_tile = tl.program_id(0)
    column_tiles = tl.num_programs(0)
    first, last = program_run(tl.cdiv(n_rows, ROWS), AXIS=1)
    cols = column_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(WEIGHT + cols[None, :], mask=col_mask[None, :], other=0.0) if HAS_WEIGHT else 1.0
    dweight = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile in range(first, last):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        # The row sums over all column tiles, added in column-tile order by every program: the same mean(g) and
        # mean(g * x_hat) for every column tile of a row.
        sum_g = tl.zeros((ROWS,), dtype=tl.float32)
        sum_g_x_hat = tl.zeros((ROWS,), dtype=tl.float32)
        for tile_sums in range(0, column_tiles):
            sum_g += tl.load(ROW_SUMS + tile_sums * n_rows + rows, mask=row_mask, other=0.0)
            sum_g_x_hat += tl.load(ROW_SUMS + (column_tiles + tile_sums) * n_rows + rows, mask=row_mask, other=0.0)
        rstd, dy, x_hat, g = _gradient_terms(X, DY, w, MEAN, RSTD, rows, row_mask, cols, mask, stride_x, n_cols,
                                             HAS_WEIGHT=HAS_WEIGHT)
        _store_dx(DSUM, DX, g, x_hat, sum_g / n_cols, sum_g_x_hat / n_cols, rstd, rows, cols, mask, n_cols,
                  HAS_DSUM=HAS_DSUM)
        dweight += tl.sum(dy * x_hat, axis=0)
        dbias += tl.sum(dy, axis=0)
    _store_partials(DWEIGHT_PARTIAL, DBIAS_PARTIAL, dweight, dbias, tl.program_id(1), cols, col_mask, n_cols,
                    COMPUTE_DWEIGHT=COMPUTE_DWEIGHT, COMPUTE_DBIAS=COMPUTE_DBIAS)


@triton.jit(do_not_specialize=["n_partials"])
def layer_norm_partials_sum_kernel(
    DWEIGHT_PARTIAL: "*fp32", DBIAS_PARTIAL: "*fp32", DWEIGHT, DBIAS, n_partials: tl.int32, n_cols: tl.int32,
    COMPUTE_DWEIGHT: tl.constexpr, COMPUTE_DBIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dweight and dbias: the (n_partials, n_cols) partial rows added one after the other in row order, so a
    repeated backward gives the same bits. ROWS partial rows are loaded per step (issued together, so their
    latencies overlap) and added in order. Grid: (cdiv(n_cols, BLOCK_N),), program c taking columns
    [c * BLOCK_N, (c + 1) * BLOCK_N).

    DWEIGHT_PARTIAL, DBIAS_PARTIAL: (n_partials, n_cols) fp32, read when COMPUTE_DWEIGHT / COMPUTE_DBIAS.
    DWEIGHT, DBIAS: (n_cols,) in the weight's / bias's dtype: the sums (zero when n_partials is 0).
    """
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    dweight = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for first_row in range(0, n_partials, ROWS):
        for step in tl.static_range(ROWS):
            row_mask = col_mask & (first_row + step < n_partials)
            offsets = (first_row + step) * n_cols + cols
            if COMPUTE_DWEIGHT:
                dweight += tl.load(DWEIGHT_PARTIAL + offsets, mask=row_mask, other=0.0)
            if COMPUTE_DBIAS:
                dbias += tl.load(DBIAS_PARTIAL + offsets, mask=row_mask, other=0.0)
    if COMPUTE_DWEIGHT:
        tl.store(DWEIGHT + cols, dweight.to(DWEIGHT.dtype.element_ty), mask=col_mask)
    if COMPUTE_DBIAS:
        tl.store(DBIAS + cols, dbias.to(DBIAS.dtype.element_ty), mask=col_mask)
