"""The Triton kernels of LayerNorm and residual-add + LayerNorm over the last dimension:

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias            layer_norm
    s = x + residual;  y = layer_norm(s)                               add_layer_norm -> (y, s)

Two algorithms each way, as two kernels: a row that fits one register tile is read once (narrow rows, the
decoder's 384, packed several to a program), and a wider row is streamed twice in chunks (statistics, then the
output). Statistics are fp32 whatever the input dtype; mean and 1/std (one fp32 each per row) are saved for the
backward. The backward reduces dweight and dbias deterministically: every program sums its rows into its own
fp32 row of a (programs, N) buffer, which the launcher sums in a fixed order (no atomics).
"""

import triton
import triton.language as tl

# The JIT specialises integer arguments on their divisibility by 16; the row width and strides gain from it (16-byte
# vector loads and stores), the row count does not (it only bounds masks): not specialised, so a compiled variant
# serves any number of rows, and the compile report's aligned build is exactly what runs.

# The backward kernels are compiled with one stage (no prefetch buffers in the row loops: the register budget the
# tiles were sized for) and without fusing multiplies into adds: g = w * dy feeds both the row sums and
# g - mean(g), and fused into the latter it enters unrounded, off from the sums by g's rounding error, which rstd
# then amplifies (at width 1 the exact gradient, 0, came out as rstd * ulp(g), 1e-5 for eps 1e-5 on an H200).
# Unfused, each product is rounded once, as in eager PyTorch. The kernels are memory-bound: the extra
# instructions cost nothing measurable.
BACKWARD_COMPILE_OPTIONS = {"num_stages": 1, "enable_fp_fusion": False}

# --------------------------------------------------------------------------------------------------------------
# Pieces both directions share
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_input(x_rows, residual_rows, sum_rows, cols, mask, HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr):
    """The tile of rows to normalize, in fp32: x, or s = x + residual (stored to SUM when STORE_SUM).
    The statistics are taken of s rounded to its storage dtype, exactly the s the caller receives, so
    y = layer_norm(s) holds as it does for the eager composite."""
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
def _store_output(y_rows, centered, rstd, cols, mask, col_mask, WEIGHT, BIAS, HAS_WEIGHT: tl.constexpr,
                  HAS_BIAS: tl.constexpr):
    """y = (x - mean) * rstd * w + b from the centered tile, stored at the rows' pointers y_rows in Y's dtype."""
    y = _scale_and_shift(centered * rstd[:, None], WEIGHT=WEIGHT, BIAS=BIAS, cols=cols, col_mask=col_mask,
                         HAS_WEIGHT=HAS_WEIGHT, HAS_BIAS=HAS_BIAS)
    tl.store(y_rows + cols[None, :], y.to(y_rows.dtype.element_ty), mask=mask)


@triton.jit
def _chunk_gradients(X, DY, WEIGHT, rows, row_mask, start, mean, rstd, stride_x, n_cols, BLOCK_N: tl.constexpr,
                     HAS_WEIGHT: tl.constexpr):
    """The chunk of columns [start, start + BLOCK_N) of a streamed row: cols, col_mask, mask, and in fp32 dy,
    x_hat = (x - mean) * rstd and g = weight * dy."""
    cols = start + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    g = dy
    if HAS_WEIGHT:
        g = dy * tl.load(WEIGHT + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return cols, col_mask, mask, dy, x_hat, g


@triton.jit
def _store_dx(DSUM, DX, dx, rows, cols, mask, n_cols, HAS_DSUM: tl.constexpr):
    """dx (plus the gradient reaching s from its other uses, when HAS_DSUM) to DX, in DX's dtype."""
    if HAS_DSUM:
        dsum = tl.load(DSUM + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
        dx += dsum.to(tl.float32)
    tl.store(DX + rows[:, None] * n_cols + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n_rows"])
def layer_norm_forward_kernel(
    X, RESIDUAL, SUM, Y, WEIGHT, BIAS, MEAN: "*fp32", RSTD: "*fp32",
    stride_x, stride_residual, n_rows: tl.int32, n_cols: tl.int32, eps: tl.float32,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Normalize rows [pid * ROWS, pid * ROWS + ROWS) of X (plus RESIDUAL), each held whole in one register tile
    (n_cols <= BLOCK_N). Grid: (cdiv(n_rows, ROWS),).

    X:        (n_rows, n_cols) fp16/bf16/fp32, row stride stride_x, unit column stride: the input.
    RESIDUAL: like X, row stride stride_residual; read only when HAS_RESIDUAL (then the normalized rows are
              s = X + RESIDUAL).
    SUM:      (n_rows, n_cols) contiguous, X's dtype: s, written only when HAS_RESIDUAL.
    Y:        (n_rows, n_cols) contiguous, X's dtype: the output.
    WEIGHT:   (n_cols,) X's dtype, read only when HAS_WEIGHT. BIAS: same, read only when HAS_BIAS.
    MEAN:     (n_rows,) fp32: each row's mean, saved for the backward.
    RSTD:     (n_rows,) fp32: each row's 1 / sqrt(var + eps), saved for the backward.
    n_rows, n_cols: sizes; eps: the variance epsilon.
    ROWS:     rows per program. BLOCK_N: columns per tile, a power of two, at least n_cols.
    """
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    x_rows = X + rows[:, None] * stride_x
    residual_rows = RESIDUAL + rows[:, None] * stride_residual
    sum_rows = SUM + rows[:, None] * n_cols
    y_rows = Y + rows[:, None] * n_cols
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    x = _load_input(x_rows=x_rows, residual_rows=residual_rows, sum_rows=sum_rows, cols=cols, mask=mask,
                    HAS_RESIDUAL=HAS_RESIDUAL, STORE_SUM=True)
    # mean = sum(x) / N;  var = sum((x - mean)^2) / N, both from the registers
    mean = tl.sum(x, axis=1) / n_cols
    centered = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    _store_output(y_rows, centered, rstd, cols=cols, mask=mask, col_mask=col_mask, WEIGHT=WEIGHT, BIAS=BIAS,
                  HAS_WEIGHT=HAS_WEIGHT, HAS_BIAS=HAS_BIAS)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit(do_not_specialize=["n_rows"])
def layer_norm_forward_streamed_kernel(
    X, RESIDUAL, SUM, Y, WEIGHT, BIAS, MEAN: "*fp32", RSTD: "*fp32",
    stride_x, stride_residual, n_rows: tl.int32, n_cols: tl.int32, eps: tl.float32,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Normalize rows wider than one tile, one row per program, reading it twice in BLOCK_N-wide chunks:
    statistics, then the output. Grid: (n_rows,). Arguments as in layer_norm_forward_kernel."""
    ROWS: tl.constexpr = 1
    rows = tl.program_id(0) + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    x_rows = X + rows[:, None] * stride_x
    residual_rows = RESIDUAL + rows[:, None] * stride_residual
    sum_rows = SUM + rows[:, None] * n_cols
    y_rows = Y + rows[:, None] * n_cols
    # Pass 1: mean and sum of squared deviations, merged chunk by chunk (Chan et al.), which stays accurate when
    # the mean is large against the spread, unlike sum(x^2) - sum(x)^2 / N.
    mean = tl.zeros((ROWS,), dtype=tl.float32)
    squared_deviations = tl.zeros((ROWS,), dtype=tl.float32)
    seen_count = 0.0
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        x = _load_input(x_rows=x_rows, residual_rows=residual_rows, sum_rows=sum_rows, cols=cols, mask=mask,
                        HAS_RESIDUAL=HAS_RESIDUAL, STORE_SUM=True)
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
    # Pass 2: y = (x - mean) * rstd * w + b. The sum s is recomputed from X and RESIDUAL rather than read back
    # from SUM, which other threads of this program wrote.
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        x = _load_input(x_rows=x_rows, residual_rows=residual_rows, sum_rows=sum_rows, cols=cols, mask=mask,
                        HAS_RESIDUAL=HAS_RESIDUAL, STORE_SUM=False)
        centered = tl.where(mask, x - mean[:, None], 0.0)
        _store_output(y_rows, centered, rstd, cols=cols, mask=mask, col_mask=col_mask, WEIGHT=WEIGHT, BIAS=BIAS,
                      HAS_WEIGHT=HAS_WEIGHT, HAS_BIAS=HAS_BIAS)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


# --------------------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n_rows"])
def layer_norm_backward_kernel(
    DY, DSUM, X, WEIGHT, MEAN: "*fp32", RSTD: "*fp32", DX, DWEIGHT_PARTIAL: "*fp32", DBIAS_PARTIAL: "*fp32",
    stride_x, n_rows: tl.int32, n_cols: tl.int32,
    HAS_DSUM: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_DWEIGHT: tl.constexpr, COMPUTE_DBIAS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradients of y = layer_norm(x) for rows that fit one tile (n_cols <= BLOCK_N): dx for every row, and this
    program's share of dweight and dbias. Program pid takes the tiles of ROWS rows numbered pid, pid + programs,
    pid + 2 * programs, ... Grid: (programs,).

    DY:     (n_rows, n_cols) contiguous, x's dtype: the gradient of y.
    DSUM:   like DY: the gradient that reaches s = x + residual from its other uses (add_layer_norm); added to dx
            when HAS_DSUM.
    X:      (n_rows, n_cols) row stride stride_x: the normalized input (x, or s for add_layer_norm).
    WEIGHT: (n_cols,) x's dtype, read only when HAS_WEIGHT.
    MEAN, RSTD: (n_rows,) fp32: the forward's statistics.
    DX:     (n_rows, n_cols) contiguous, x's dtype: the gradient of x (and of residual).
    DWEIGHT_PARTIAL, DBIAS_PARTIAL: (programs, n_cols) fp32: row pid receives the sums over this program's rows
            of dy * x_hat and of dy (written when COMPUTE_DWEIGHT / COMPUTE_DBIAS).
    n_rows, n_cols: sizes. ROWS: rows per tile. BLOCK_N: columns per tile, a power of two.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    n_tiles = tl.cdiv(n_rows, ROWS)
    partial_offset = pid * n_cols
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(WEIGHT + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]  # once, for every tile
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
        _store_dx(DSUM=DSUM, DX=DX, dx=dx, rows=rows, cols=cols, mask=mask, n_cols=n_cols, HAS_DSUM=HAS_DSUM)
        # dweight += sum over rows of dy * x_hat;  dbias += sum over rows of dy
        dweight += tl.sum(dy * x_hat, axis=0)
        dbias += tl.sum(dy, axis=0)
    if COMPUTE_DWEIGHT:
        tl.store(DWEIGHT_PARTIAL + partial_offset + cols, dweight, mask=col_mask)
    if COMPUTE_DBIAS:
        tl.store(DBIAS_PARTIAL + partial_offset + cols, dbias, mask=col_mask)


@triton.jit(do_not_specialize=["n_rows"])
def layer_norm_backward_streamed_kernel(
    DY, DSUM, X, WEIGHT, MEAN: "*fp32", RSTD: "*fp32", DX, DWEIGHT_PARTIAL: "*fp32", DBIAS_PARTIAL: "*fp32",
    stride_x, n_rows: tl.int32, n_cols: tl.int32,
    HAS_DSUM: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_DWEIGHT: tl.constexpr, COMPUTE_DBIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Gradients of rows wider than one tile, one row at a time, each read twice in BLOCK_N-wide chunks: program
    pid takes rows pid, pid + programs, ... Arguments as in layer_norm_backward_kernel, except that
    DWEIGHT_PARTIAL and DBIAS_PARTIAL are accumulated into, so the caller passes them zeroed."""
    ROWS: tl.constexpr = 1
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    n_tiles = tl.cdiv(n_rows, ROWS)
    partial_offset = pid * n_cols
    for tile in range(pid, n_tiles, programs):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        # Pass 1: mean(g) and mean(g * x_hat) over the whole row.
        sum_g = tl.zeros((ROWS,), dtype=tl.float32)
        sum_g_x_hat = tl.zeros((ROWS,), dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols, col_mask, mask, dy, x_hat, g = _chunk_gradients(
                X=X, DY=DY, WEIGHT=WEIGHT, rows=rows, row_mask=row_mask, start=start, mean=mean, rstd=rstd,
                stride_x=stride_x, n_cols=n_cols, BLOCK_N=BLOCK_N, HAS_WEIGHT=HAS_WEIGHT)
            sum_g += tl.sum(g, axis=1)
            sum_g_x_hat += tl.sum(g * x_hat, axis=1)
        mean_g = sum_g / n_cols
        mean_g_x_hat = sum_g_x_hat / n_cols
        # Pass 2: dx chunk by chunk, and this program's dweight / dbias rows accumulated in place (a chunk's
        # columns are read and written within one iteration; the barrier below orders one tile's writes before
        # the next tile's reads, whichever threads do them).
        for start in range(0, n_cols, BLOCK_N):
            cols, col_mask, mask, dy, x_hat, g = _chunk_gradients(
                X=X, DY=DY, WEIGHT=WEIGHT, rows=rows, row_mask=row_mask, start=start, mean=mean, rstd=rstd,
                stride_x=stride_x, n_cols=n_cols, BLOCK_N=BLOCK_N, HAS_WEIGHT=HAS_WEIGHT)
            dx = (g - mean_g[:, None] - x_hat * mean_g_x_hat[:, None]) * rstd[:, None]
            _store_dx(DSUM=DSUM, DX=DX, dx=dx, rows=rows, cols=cols, mask=mask, n_cols=n_cols, HAS_DSUM=HAS_DSUM)
            if COMPUTE_DWEIGHT:
                dweight = tl.load(DWEIGHT_PARTIAL + partial_offset + cols, mask=col_mask, other=0.0)
                tl.store(DWEIGHT_PARTIAL + partial_offset + cols, dweight + tl.sum(dy * x_hat, axis=0),
                         mask=col_mask)
            if COMPUTE_DBIAS:
                dbias = tl.load(DBIAS_PARTIAL + partial_offset + cols, mask=col_mask, other=0.0)
                tl.store(DBIAS_PARTIAL + partial_offset + cols, dbias + tl.sum(dy, axis=0), mask=col_mask)
        tl.debug_barrier()  # bar.sync: this tile's partial-row stores are visible to the whole program
