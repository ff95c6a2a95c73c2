"""What the LayerNorm kernels share (forward.py, backward.py compute):

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias            layer_norm
    y = x / sqrt(mean(x^2) + eps) * (offset + weight)                  rms_norm (RMS: the statistics drop the mean)
    s = dropout(x) + residual;  y = norm(s)                            add_layer_norm, add_rms_norm -> (y, s)

One set of kernels serves both norms: the RMS constexpr switches the mean off (x_hat = x * rstd, and the backward
loses its mean(g) term and dbias). `offset` is added to the weight where it is read (0 for LayerNorm; 1 where a
model stores its RMSNorm weight as 1 + w, as Gemma does).

Every launch is a persistent grid: a few programs per multiprocessor (the tile table's programs_per_sm), each
owning one contiguous run of row tiles (`program_run`), so the weight and bias (and in the backward the dweight
and dbias partial sums) are loaded and stored once per program, not once per row. Statistics are fp32 whatever
the input dtype; mean (LayerNorm only) and 1/std (one fp32 each per row) are saved for the backward.

Dropout before the residual add draws its keep-mask from Philox keyed by the call's seed and counted by the
element's position (`dropout_keep`), never by the tile: the backward regenerates the forward's mask from the same
seed whatever tiles either launch runs, and nothing of the mask is stored.
"""

import triton
import triton.language as tl

# The backward kernels are compiled with one stage (no prefetch buffers in the row loops: the register budget the
# tiles were sized for) and without fusing multiplies into adds: g = w * dy feeds both the row sums and
# g - mean(g), and fused into the latter it enters unrounded, off from the sums by g's rounding error, which rstd
# then amplifies (at width 1 the exact gradient, 0, came out as rstd * ulp(g), 1e-5 for eps 1e-5 on an H200).
# Unfused, each product is rounded once, as in eager PyTorch. The kernels are memory-bound: the extra
# instructions cost nothing measurable.
BACKWARD_COMPILE_OPTIONS = {"num_stages": 1, "enable_fp_fusion": False}

# The JIT specialises integer arguments on their divisibility by 16; the row width and strides gain from it (16-byte
# vector loads and stores), the row count does not (it only bounds loops and masks): not specialised, so a compiled
# variant serves any number of rows, and the compile report's aligned build is exactly what runs.
RUNTIME_SIZES = ["n_rows"]


@triton.jit
def program_run(n_items, AXIS: tl.constexpr):
    """The contiguous run [first, last) of the n_items (row tiles) that this program owns: runs of
    cdiv(n_items, programs) items in program order along grid axis AXIS. The launcher sizes the grid so that no
    run is empty (grid = cdiv(n_items, cdiv(n_items, programs wanted)))."""
    per_program = tl.cdiv(n_items, tl.num_programs(AXIS))
    first = tl.program_id(AXIS) * per_program
    return first, tl.minimum(first + per_program, n_items)


@triton.jit
def dropout_keep(seed, rows, first_col, n_cols, dropout_p, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dropout keep-mask of the (ROWS, BLOCK_N) tile of `rows` (ROWS row indices) and the BLOCK_N columns from
    first_col (a multiple of 4 when BLOCK_N >= 4): True where the element is kept.

    One Philox call (tl.randint4x, keyed by the seed) gives four 32-bit numbers: the four columns 4c .. 4c + 3 of a
    row share the call counted by row * cdiv(n_cols, 4) + c, so every element has its own number, fixed by its
    position alone. An element is kept where its number, uniform on [0, 2^32), is at least dropout_p * 2^32.
    """
    threshold = tl.cast(dropout_p * 4294967296.0, tl.uint32)
    calls_per_row = tl.cdiv(n_cols, 4)
    if BLOCK_N >= 4:
        groups = first_col // 4 + tl.arange(0, BLOCK_N // 4)
        r0, r1, r2, r3 = tl.randint4x(seed, rows[:, None] * calls_per_row + groups[None, :])
        # interleave: column 4c + t of the tile is draw t of call c
        keep = tl.join(tl.join(r0 >= threshold, r2 >= threshold), tl.join(r1 >= threshold, r3 >= threshold))
        keep = tl.reshape(keep, (ROWS, BLOCK_N))
    else:  # a row of 1 or 2 columns: one call, its first draws
        cols = (first_col + tl.arange(0, BLOCK_N))[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, rows[:, None] * calls_per_row + cols // 4)
        keep = tl.where(cols == 0, r0, r1) >= threshold
    return keep


@triton.jit
def load_input(x_pointers, residual_pointers, sum_pointers, mask, seed, rows, first_col, n_cols, dropout_p,
               HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr, DROPOUT: tl.constexpr, ROWS: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """The elements to normalize, in fp32: x, or s = dropout(x) + residual (stored to sum_pointers when
    STORE_SUM). With DROPOUT, x is zeroed where dropout_keep (of `rows` and the BLOCK_N columns from first_col) is
    False and scaled by 1 / (1 - dropout_p) where it is True, before the residual is added; the mask is drawn
    after x is loaded, so it never lives beside x and the residual. The statistics are taken of s rounded to its
    storage dtype (x's, or fp32 for a residual kept in fp32), exactly the s the caller receives, so y = norm(s)
    holds as it does for the eager composite."""
    x = tl.load(x_pointers, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        if DROPOUT:
            keep = tl.reshape(dropout_keep(seed, rows, first_col, n_cols, dropout_p, ROWS, BLOCK_N), x.shape)
            x = tl.where(keep, x * (1.0 / (1.0 - dropout_p)), 0.0)
        s = (x + tl.load(residual_pointers, mask=mask, other=0.0).to(tl.float32)).to(sum_pointers.dtype.element_ty)
        if STORE_SUM:
            tl.store(sum_pointers, s, mask=mask)
        x = s.to(tl.float32)
    return x


@triton.jit
def scale_and_shift(x_hat, w, b, offset, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """x_hat * (offset + w) + b, each factor only when present (w and b broadcast over x_hat's rows, any dtype)."""
    if HAS_WEIGHT:
        x_hat = x_hat * (w.to(tl.float32) + offset)
    if HAS_BIAS:
        x_hat = x_hat + b.to(tl.float32)
    return x_hat
