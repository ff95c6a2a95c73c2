"""What the LayerNorm kernels share (forward.py, backward.py compute):

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias            layer_norm
    s = x + residual;  y = layer_norm(s)                               add_layer_norm -> (y, s)

Every launch is a persistent grid: a few programs per multiprocessor (the tile table's programs_per_sm), each
owning one contiguous run of row tiles (`program_run`), so the weight and bias (and in the backward the dweight
and dbias partial sums) are loaded and stored once per program, not once per row. Statistics are fp32 whatever
the input dtype; mean and 1/std (one fp32 each per row) are saved for the backward.
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
def load_input(x_pointers, residual_pointers, sum_pointers, mask, HAS_RESIDUAL: tl.constexpr,
               STORE_SUM: tl.constexpr):
    """The elements to normalize, in fp32: x, or s = x + residual (stored to sum_pointers when STORE_SUM). The
    statistics are taken of s rounded to its storage dtype, exactly the s the caller receives, so
    y = layer_norm(s) holds as it does for the eager composite."""
    x = tl.load(x_pointers, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s = (x + tl.load(residual_pointers, mask=mask, other=0.0).to(tl.float32)).to(sum_pointers.dtype.element_ty)
        if STORE_SUM:
            tl.store(sum_pointers, s, mask=mask)
        x = s.to(tl.float32)
    return x


@triton.jit
def scale_and_shift(x_hat, w, b, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """x_hat * w + b, each factor only when present (w and b broadcast over x_hat's rows, any dtype)."""
    if HAS_WEIGHT:
        x_hat = x_hat * w.to(tl.float32)
    if HAS_BIAS:
        x_hat = x_hat + b.to(tl.float32)
    return x_hat

