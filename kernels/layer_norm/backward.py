"""The LayerNorm and RMSNorm backward kernels (the math, the grid and dropout: shared.py). With
x_hat = (x - mean) * rstd (RMS: x * rstd) and g = (offset + w) * dy:

    dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))   (RMS: without mean(g); + the gradient reaching s itself,
                                                           for the add)
    dweight = sum over rows of dy * x_hat;  dbias = sum over rows of dy
    with dropout before the add, s = dropout(x) + residual: the residual receives dx, and x receives dx where its
    element was kept (times 1 / (1 - p)), 0 where dropped; the mask regenerated from the seed

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

from .shared import RUNTIME_SIZES, dropout_keep, program_run


@triton.jit
def _gradient_terms(X, DY, WEIGHT_TILE, MEAN, RSTD, rows, row_mask, cols, mask, stride_x, n_cols, offset,
                    HAS_WEIGHT: tl.constexpr, RMS: tl.constexpr):
    """For the tile of `rows` x `cols`: rstd, dy, x_hat = (x - mean) * rstd (RMS: x * rstd) and
    g = (offset + w) * dy, in fp32 (WEIGHT_TILE: the weight at cols, loaded by the caller)."""
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
    mean = tl.zeros_like(rstd) if RMS else tl.load(MEAN + rows, mask=row_mask, other=0.0)
    x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    g = dy * (WEIGHT_TILE.to(tl.float32) + offset) if HAS_WEIGHT else dy
    return rstd, dy, x_hat, g


@triton.jit
def _store_dx(DSUM, DX, DX_KEPT, g, x_hat, sum_g, sum_g_x_hat, rstd, rows, first_col, cols, mask, n_cols, seed,
              dropout_p, HAS_DSUM: tl.constexpr, RMS: tl.constexpr, DROPOUT: tl.constexpr, ROWS: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) (RMS: without mean(g); plus the gradient reaching s
    from its other uses, when HAS_DSUM), from the rows' sums of g and g * x_hat, stored to DX in its dtype; with
    DROPOUT, also x's gradient, dx where kept (scaled by 1 / (1 - dropout_p)) and 0 where dropped, to DX_KEPT."""
    centered_g = g if RMS else g - (sum_g / n_cols)[:, None]
    dx = (centered_g - x_hat * (sum_g_x_hat / n_cols)[:, None]) * rstd[:, None]
    offsets = rows[:, None] * n_cols + cols[None, :]
    if HAS_DSUM:
        dx += tl.load(DSUM + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
    if DROPOUT:
        keep = dropout_keep(seed, rows, first_col, n_cols, dropout_p, ROWS, BLOCK_N)
        tl.store(DX_KEPT + offsets, tl.where(keep, dx * (1.0 / (1.0 - dropout_p)), 0.0).to(DX_KEPT.dtype.element_ty),
                 mask=mask)


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
    DY, DSUM, X, WEIGHT, MEAN: "*fp32", RSTD: "*fp32", SEED: "*i64", DX, DX_KEPT, DWEIGHT_PARTIAL: "*fp32",
    DBIAS_PARTIAL: "*fp32", stride_x, n_rows: tl.int32, n_cols: tl.int32, offset: tl.float32, dropout_p: tl.float32,
    HAS_DSUM: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_DWEIGHT: tl.constexpr, COMPUTE_DBIAS: tl.constexpr,
    RMS: tl.constexpr, DROPOUT: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradients of rows that fit one tile (n_cols <= BLOCK_N), ROWS at a time: dx of every row, and the program's
    partial dweight and dbias rows. Each program takes one contiguous run of the cdiv(n_rows, ROWS) tiles.
    Grid: (programs,).

    DY:     (n_rows, n_cols) contiguous, y's dtype: the gradient of y.
    DSUM:   (n_rows, n_cols) contiguous, s's dtype: the gradient that reaches s = dropout(x) + residual from its
            other uses (the add); added to dx when HAS_DSUM.
    X:      (n_rows, n_cols) row stride stride_x: the normalized input (x, or s for the add).
    WEIGHT: (n_cols,) y's dtype, read only when HAS_WEIGHT.
    MEAN, RSTD: (n_rows,) fp32: the forward's statistics (MEAN read only without RMS).
    SEED:   (1,) int64: the forward's dropout seed, read only when DROPOUT.
    DX:     (n_rows, n_cols) contiguous, X's dtype: the gradient of X (of the residual, for the add).
    DX_KEPT: like DX, written only when DROPOUT: the gradient of the x that dropout was applied to.
    DWEIGHT_PARTIAL, DBIAS_PARTIAL: (programs, n_cols) fp32: row pid receives the sums over this program's rows
            of dy * x_hat and of dy (written when COMPUTE_DWEIGHT / COMPUTE_DBIAS).
    n_rows, n_cols: sizes. offset: added to the weight. dropout_p: the forward's dropout probability.
    RMS: the forward normalized by the root mean square. ROWS: rows per tile. BLOCK_N: columns per tile, a power of
    two, at least n_cols.
    """
    first, last = program_run(tl.cdiv(n_rows, ROWS), AXIS=0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(WEIGHT + cols[None, :], mask=col_mask[None, :], other=0.0) if HAS_WEIGHT else 1.0
    seed = tl.load(SEED) if DROPOUT else 0
    dweight = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile in range(first, last):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rstd, dy, x_hat, g = _gradient_terms(X, DY, w, MEAN, RSTD, rows, row_mask, cols, mask, stride_x, n_cols,
                                             offset, HAS_WEIGHT=HAS_WEIGHT, RMS=RMS)
        dweight += tl.sum(dy * x_hat, axis=0)  # before dx: dy's registers free up sooner
        dbias += tl.sum(dy, axis=0)
        sum_g = 0.0 if RMS else tl.sum(g, axis=1)
        _store_dx(DSUM, DX, DX_KEPT, g, x_hat, sum_g, tl.sum(g * x_hat, axis=1), rstd, rows, 0, cols, mask, n_cols,
                  seed, dropout_p, HAS_DSUM=HAS_DSUM, RMS=RMS, DROPOUT=DROPOUT, ROWS=ROWS, BLOCK_N=BLOCK_N)
    _store_partials(DWEIGHT_PARTIAL, DBIAS_PARTIAL, dweight, dbias, tl.program_id(0), cols, col_mask, n_cols,
                    COMPUTE_DWEIGHT=COMPUTE_DWEIGHT, COMPUTE_DBIAS=COMPUTE_DBIAS)


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def layer_norm_backward_row_sums_kernel(
    DY, X, WEIGHT, MEAN: "*fp32", RSTD: "*fp32", ROW_SUMS: "*fp32", stride_x, n_rows: tl.int32, n_cols: tl.int32,
    offset: tl.float32, HAS_WEIGHT: tl.constexpr, RMS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Pass 1 of rows wider than one tile: program (c, r) takes column tile c (columns [c * BLOCK_N, (c + 1) *
    BLOCK_N)) of the r-th contiguous run of the cdiv(n_rows, ROWS) row tiles, holding the tile's weight.
    Grid: (column tiles, row groups).

    ROW_SUMS: (2, column tiles, n_rows) fp32: [0, c, row] receives the sum of g over column tile c of the row
              (unused with RMS), [1, c, row] the sum of g * x_hat.
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
                                         offset, HAS_WEIGHT=HAS_WEIGHT, RMS=RMS)
        # RMS needs no sum of g; it is stored anyway, one fp32 per row and column tile (with it left out, sm_80
        # spilled here)
        tl.store(ROW_SUMS + column_tile * n_rows + rows, tl.sum(g, axis=1), mask=row_mask)
        tl.store(ROW_SUMS + (column_tiles + column_tile) * n_rows + rows, tl.sum(g * x_hat, axis=1), mask=row_mask)


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def layer_norm_backward_columns_kernel(
    DY, DSUM, X, WEIGHT, MEAN: "*fp32", RSTD: "*fp32", SEED: "*i64", ROW_SUMS: "*fp32", DX, DX_KEPT,
    DWEIGHT_PARTIAL: "*fp32", DBIAS_PARTIAL: "*fp32", stride_x, n_rows: tl.int32, n_cols: tl.int32,
    offset: tl.float32, dropout_p: tl.float32,
    HAS_DSUM: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_DWEIGHT: tl.constexpr, COMPUTE_DBIAS: tl.constexpr,
    RMS: tl.constexpr, DROPOUT: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Pass 2 of rows wider than one tile, on pass 1's grid: program (c, r) writes dx of column tile c of its rows
    and stores its dweight / dbias partial sums to row r of the (row groups, n_cols) buffers, columns of tile c.
    ROW_SUMS: pass 1's. Other arguments as in layer_norm_backward_kernel."""
    column_tile = tl.program_id(0)
    column_tiles = tl.num_programs(0)
    first, last = program_run(tl.cdiv(n_rows, ROWS), AXIS=1)
    first_col = column_tile * BLOCK_N
    cols = first_col + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(WEIGHT + cols[None, :], mask=col_mask[None, :], other=0.0) if HAS_WEIGHT else 1.0
    seed = tl.load(SEED) if DROPOUT else 0
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
            if not RMS:
                sum_g += tl.load(ROW_SUMS + tile_sums * n_rows + rows, mask=row_mask, other=0.0)
            sum_g_x_hat += tl.load(ROW_SUMS + (column_tiles + tile_sums) * n_rows + rows, mask=row_mask, other=0.0)
        rstd, dy, x_hat, g = _gradient_terms(X, DY, w, MEAN, RSTD, rows, row_mask, cols, mask, stride_x, n_cols,
                                             offset, HAS_WEIGHT=HAS_WEIGHT, RMS=RMS)
        dweight += tl.sum(dy * x_hat, axis=0)  # before dx: dy's registers free up sooner
        dbias += tl.sum(dy, axis=0)
        _store_dx(DSUM, DX, DX_KEPT, g, x_hat, sum_g, sum_g_x_hat, rstd, rows, first_col, cols, mask, n_cols, seed,
                  dropout_p, HAS_DSUM=HAS_DSUM, RMS=RMS, DROPOUT=DROPOUT, ROWS=ROWS, BLOCK_N=BLOCK_N)
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
