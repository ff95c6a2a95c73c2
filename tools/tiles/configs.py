"""Every kernel config the ops ship, read off the kernels themselves: what `tools.tiles.compile` compiles.

The attention launch tables (kernels/attention/tiles.py) and the LayerNorm tiles (kernels/layer_norm/tiles.py) say
which tiles a launch can pick, and each kernel's signature is derived from its own parameters (`signature`). A
config is a dict: the jit kernel, its signature, constexprs, warps, stages and any other compile options the launcher
passes; where it runs ("targets": (arch, aligned operands) pairs); what it is ("meta": the launch's kernel name,
dtype, head size or width, mask, dropout, tile); and its "key", the few plain values it is built from. A compile
worker receives the key and builds that one config (`config`), never the whole list.
"""

import itertools
from collections import namedtuple

OPS = ("attention", "layer_norm")
DTYPE_NAMES = ("float16", "bfloat16", "float32")
# The padded head sizes the attention tables have tiles for (a head size runs the tiles of its power of two).
HEAD_DIMS = (16, 32, 64, 128, 256)
POINTER_TYPES = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}
# The attention masks a config is compiled with: the causal dense call (the decoder's, whose speed the tiles are
# chosen for), with lengths that are multiples of every block (EVEN: no bounds masks) and with any, and the most
# general one, a two-sided window over packed sequences (the most masking arithmetic and scalar state). Full
# attention, one-sided windows and dense windows use a subset of the latter's code.
ATTENTION_MASKS = {
    "causal": dict(BOUNDED_LEFT=False, BOUNDED_RIGHT=True, VARLEN=False, EVEN=False),
    "causal_even": dict(BOUNDED_LEFT=False, BOUNDED_RIGHT=True, VARLEN=False, EVEN=True),
    "window_varlen": dict(BOUNDED_LEFT=True, BOUNDED_RIGHT=True, VARLEN=True, EVEN=False),
}
# The attention launches a table key names.
ATTENTION_KERNELS = ("forward", "backward")
# The precision class each dtype's tiles are keyed by.
PRECISIONS = {"float16": "16bit", "bfloat16": "16bit", "float32": "fp32"}
# The norm kernels a config can be: name -> (its tile table direction, whether it runs the "streamed" width, the
# kernel in kernels/layer_norm/forward.py or backward.py, the constexprs that name it, and for the launches of a sum
# kept in fp32 (residual_in_fp32), the pointers that are fp32 beside 16-bit ones and the table precision such a
# launch looks up). LayerNorm and RMSNorm (RMS), with and without the residual add; dropout on the add's branch for
# LayerNorm, whose statistics keep the most values live; and the add with its sum in fp32 (compiled for 16-bit
# dtypes only: in fp32 it is the plain add): the forward reads an fp32 residual and writes the fp32 sum beside
# 16-bit x and y, the backward reads the fp32 sum beside 16-bit dy and weight (both on "mixed" tiles).
NormKernel = namedtuple("NormKernel", "direction streamed function constexprs fp32_pointers launch_precision",
                        defaults=((), None))
_SUM_IN_FP32_FORWARD = (("RESIDUAL", "SUM"), "mixed")
_SUM_IN_FP32_BACKWARD = (("X", "DSUM", "DX", "DX_KEPT"), "mixed")
_FORWARD = {"HAS_WEIGHT": True, "HAS_BIAS": True, "RMS": False, "DROPOUT": False, "HAS_RESIDUAL": False}
_ADD_FORWARD = dict(_FORWARD, HAS_RESIDUAL=True)
_RMS_FORWARD = dict(_FORWARD, HAS_BIAS=False, RMS=True)
_BACKWARD = {"HAS_WEIGHT": True, "COMPUTE_DWEIGHT": True, "COMPUTE_DBIAS": True, "RMS": False, "DROPOUT": False,
             "HAS_DSUM": False}
_ADD_BACKWARD = dict(_BACKWARD, HAS_DSUM=True)
_RMS_BACKWARD = dict(_BACKWARD, COMPUTE_DBIAS=False, RMS=True)
_ROW_SUMS = {"HAS_WEIGHT": True, "RMS": False}
LAYER_NORM_KERNELS = {
    "forward": NormKernel("forward", False, "layer_norm_forward_kernel", _FORWARD),
    "add_forward": NormKernel("forward", False, "layer_norm_forward_kernel", _ADD_FORWARD),
    "add_dropout_forward": NormKernel("forward", False, "layer_norm_forward_kernel", dict(_ADD_FORWARD, DROPOUT=True)),
    "add_forward_sum_in_fp32": NormKernel("forward", False, "layer_norm_forward_kernel", _ADD_FORWARD,
                                          *_SUM_IN_FP32_FORWARD),
    "add_forward_streamed_sum_in_fp32": NormKernel("forward", True, "layer_norm_forward_streamed_kernel",
                                                   _ADD_FORWARD, *_SUM_IN_FP32_FORWARD),
    "rms_forward": NormKernel("forward", False, "layer_norm_forward_kernel", _RMS_FORWARD),
    "add_rms_forward": NormKernel("forward", False, "layer_norm_forward_kernel", dict(_RMS_FORWARD, HAS_RESIDUAL=True)),
    "forward_streamed": NormKernel("forward", True, "layer_norm_forward_streamed_kernel", _FORWARD),
    "add_forward_streamed": NormKernel("forward", True, "layer_norm_forward_streamed_kernel", _ADD_FORWARD),
    "add_dropout_forward_streamed": NormKernel("forward", True, "layer_norm_forward_streamed_kernel",
                                               dict(_ADD_FORWARD, DROPOUT=True)),
    "rms_forward_streamed": NormKernel("forward", True, "layer_norm_forward_streamed_kernel", _RMS_FORWARD),
    "add_rms_forward_streamed": NormKernel("forward", True, "layer_norm_forward_streamed_kernel",
                                           dict(_RMS_FORWARD, HAS_RESIDUAL=True)),
    "backward": NormKernel("backward", False, "layer_norm_backward_kernel", _BACKWARD),
    "add_backward": NormKernel("backward", False, "layer_norm_backward_kernel", _ADD_BACKWARD),
    "add_dropout_backward": NormKernel("backward", False, "layer_norm_backward_kernel",
                                       dict(_ADD_BACKWARD, DROPOUT=True)),
    "add_backward_sum_in_fp32": NormKernel("backward", False, "layer_norm_backward_kernel", _ADD_BACKWARD,
                                           *_SUM_IN_FP32_BACKWARD),
    "add_backward_columns_sum_in_fp32": NormKernel("backward", True, "layer_norm_backward_columns_kernel",
                                                   _ADD_BACKWARD, *_SUM_IN_FP32_BACKWARD),
    "rms_backward": NormKernel("backward", False, "layer_norm_backward_kernel", _RMS_BACKWARD),
    "add_rms_backward": NormKernel("backward", False, "layer_norm_backward_kernel", dict(_RMS_BACKWARD, HAS_DSUM=True)),
    "backward_row_sums": NormKernel("backward", True, "layer_norm_backward_row_sums_kernel", _ROW_SUMS),
    "rms_backward_row_sums": NormKernel("backward", True, "layer_norm_backward_row_sums_kernel",
                                        dict(_ROW_SUMS, RMS=True)),
    "backward_columns": NormKernel("backward", True, "layer_norm_backward_columns_kernel", _BACKWARD),
    "add_backward_columns": NormKernel("backward", True, "layer_norm_backward_columns_kernel", _ADD_BACKWARD),
    "add_dropout_backward_columns": NormKernel("backward", True, "layer_norm_backward_columns_kernel",
                                               dict(_ADD_BACKWARD, DROPOUT=True)),
    "rms_backward_columns": NormKernel("backward", True, "layer_norm_backward_columns_kernel", _RMS_BACKWARD),
    "add_rms_backward_columns": NormKernel("backward", True, "layer_norm_backward_columns_kernel",
                                           dict(_RMS_BACKWARD, HAS_DSUM=True)),
    "partials_sum": NormKernel("partials_sum", True, "layer_norm_partials_sum_kernel",
                               {"COMPUTE_DWEIGHT": True, "COMPUTE_DBIAS": True}),
}


def operands_name(aligned):
    return "aligned" if aligned else "any"


def _targets(aligned=None):
    """(arch, aligned operands) pairs: every checked arch, with the given alignment or both."""
    from kernels._gpu import CHECKED_ARCHS

    alignments = (True, False) if aligned is None else (aligned,)
    return tuple((arch, a) for arch in CHECKED_ARCHS for a in alignments)


def signature(kernel, pointer_type, constexprs, fp32_pointers=()):
    """Triton's signature of `kernel` for one config, derived from the kernel's own parameters: constexprs as
    given, annotated parameters (sizes, scales, fp32 buffers) as annotated, strides as the JIT types them (i32),
    the tensors named in fp32_pointers as fp32, and every other tensor as `pointer_type` (the input dtype)."""
    found = {}
    for param in _kernel_params(kernel):
        if param.is_constexpr or param.name in constexprs:
            found[param.name] = "constexpr"
        elif param.annotation:
            found[param.name] = param.annotation
        elif param.name.startswith("stride_"):
            found[param.name] = "i32"
        else:
            found[param.name] = "*fp32" if param.name in fp32_pointers else pointer_type
    return found


def _kernel_params(kernel):
    """The kernel's parameters as Triton's JIT reads them (name, annotation), from the Python function under the
    jit (or, in interpreter mode, the interpreter's) wrapper."""
    import inspect

    from triton.runtime.jit import KernelParam

    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return [KernelParam(i, p, False, False) for i, p in enumerate(inspect.signature(kernel).parameters.values())]


def _config(op, key, name, jit_kernel, dtype_name, constexprs, num_warps, num_stages, targets, options=None,
            fp32_pointers=(), **meta):
    """One config of `op`, as the module docstring describes it."""
    return {"op": op, "key": key, "name": name, "kernel": jit_kernel,
            "signature": signature(jit_kernel, POINTER_TYPES[dtype_name], constexprs, fp32_pointers),
            "constexprs": constexprs, "num_warps": num_warps, "num_stages": num_stages, "targets": targets,
            "options": options or {}, "meta": dict(dtype=dtype_name, **meta)}


def attention_configs():
    """Every compile the attention launchers can cause on the checked archs, aligned operands and not: for each
    dtype and head-size class 16 ... 256 (a padded head size, e.g. 48 -> 64, runs the tiles of its class with
    masked loads), the forward and the backward (dK, dV and dQ in one launch) under each of ATTENTION_MASKS, with
    and without dropout (dropout's random numbers cost registers), plus the delta preprocess kernel. A config's
    name ends in its tile (tile_name) and the operands' alignment; its targets are the (arch, aligned) launches
    that run it."""
    import torch

    from kernels._gpu import CHECKED_ARCHS
    from kernels.attention import tiles

    configs = []
    for dtype_name in DTYPE_NAMES:
        dtype = getattr(torch, dtype_name)
        for head_dim in HEAD_DIMS:
            for aligned in (True, False):
                configs += [preprocess_config(dtype_name, head_dim, varlen, aligned) for varlen in (False, True)]
                for mask_name, dropout in itertools.product(ATTENTION_MASKS, (False, True)):
                    archs_by_launch = {}
                    for arch in CHECKED_ARCHS:
                        for kernel_name in ATTENTION_KERNELS:
                            precision = tiles.precision(dtype)
                            if not aligned and tiles.copies_misaligned_operands(kernel_name, head_dim, precision):
                                continue  # launched on aligned copies
                            tile = tiles.table_tile(kernel_name, head_dim, dtype, dropout, arch, aligned)
                            archs_by_launch.setdefault((kernel_name, tile), []).append(arch)
                    configs += [attention_config(dtype_name, head_dim, kernel_name, mask_name, dropout, tile,
                                                 aligned, archs)
                                for (kernel_name, tile), archs in archs_by_launch.items()]
    return configs


def preprocess_config(dtype_name, head_dim, varlen, aligned):
    """The config of the attention backward's delta kernel at this head size, dense or over packed sequences."""
    import torch

    from kernels.attention import backward, tiles

    constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": tiles.block_d(head_dim), "ALIGNED": aligned,
                  "BLOCK_M": tiles.preprocess_block_m(tiles.block_d(head_dim), getattr(torch, dtype_name)),
                  "VARLEN": varlen}
    return _config("attention", ("attention_preprocess", dtype_name, head_dim, varlen, aligned),
                   f"attention_preprocess{'_varlen' if varlen else ''}_{dtype_name}_d{head_dim}"
                   f"_{operands_name(aligned)}",
                   backward.attention_backward_preprocess_kernel, dtype_name, constexprs, 4, 1, _targets(aligned),
                   kernel="preprocess", head_dim=head_dim, mask="varlen" if varlen else "dense", dropout=False)


def tile_name(tile):
    """A tile as a config name ends: BLOCK_M x BLOCK_N (the backward's key programs' block_m1 x block_n1, then its
    query programs' block_m2 x block_n2, "apart" where dK and dV have programs of their own, "Nslices" where the
    head's columns are split among N), warps and stages."""
    if hasattr(tile, "block_n1"):
        apart = "_apart" if tile.dk_dv_apart else ""
        sliced = f"_{tile.head_slices}slices" if tile.head_slices > 1 else ""
        blocks = f"{tile.block_m1}x{tile.block_n1}_{tile.block_m2}x{tile.block_n2}{apart}{sliced}"
    else:
        blocks = f"{tile.block_m}x{tile.block_n}"
    return f"{blocks}w{tile.num_warps}s{tile.num_stages}"


def as_tile(kernel, values):
    """A tile of `kernel` from its values (a ranking's lists) as the table holds it: a Tile or a BackwardTile."""
    from kernels.attention.tiles import BackwardTile, Tile

    return (Tile if kernel == "forward" else BackwardTile)(*values)


def attention_config(dtype_name, head_dim, kernel_name, mask_name, dropout, tile, aligned, archs):
    """The config of one attention launch: `kernel_name` ("forward" or "backward") at this head size, under
    ATTENTION_MASKS[mask_name], with or without dropout, run with `tile` (a tiles.Tile or tiles.BackwardTile) on
    `archs` with aligned operands or any. attention_configs builds the shipped ones; tools.tiles.search builds its
    candidates here too, so both compile the same thing."""
    import torch

    from kernels.attention import backward, forward, tiles

    constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": tiles.block_d(head_dim), "ALIGNED": aligned, "DROPOUT": dropout,
                  **ATTENTION_MASKS[mask_name]}
    if kernel_name == "forward":
        kernel = forward.attention_forward_kernel
        constexprs.update(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n)
    else:
        kernel = backward.attention_backward_kernel
        constexprs.update(BLOCK_M1=tile.block_m1, BLOCK_N1=tile.block_n1, BLOCK_M2=tile.block_m2,
                          BLOCK_N2=tile.block_n2, DK_DV_APART=tile.dk_dv_apart,
                          HEAD_SLICES=tiles.head_slices(tile, head_dim))
    name = (f"attention_{kernel_name}_{mask_name}{'_dropout' if dropout else ''}_{dtype_name}_d{head_dim}"
            f"_{tile_name(tile)}_{operands_name(aligned)}")
    key = ("attention", dtype_name, head_dim, kernel_name, mask_name, dropout, tile, aligned, tuple(archs))
    # the launcher's register cap (maxnreg), if it passes one
    max_registers = (tiles.backward_max_registers(head_dim, getattr(torch, dtype_name), aligned)
                     if kernel_name == "backward" else None)
    options = {} if max_registers is None else {"maxnreg": max_registers}
    return _config("attention", key, name, kernel, dtype_name, constexprs, tile.num_warps, tile.num_stages,
                   tuple((arch, aligned) for arch in archs), options, kernel=kernel_name, head_dim=head_dim,
                   mask=mask_name, dropout=dropout, tile=tuple(tile))


def layer_norm_configs():
    """One config per launch key of the LayerNorm tile table (kernels.layer_norm.tiles.launch_keys: direction,
    precision, width), per dtype of its precision and per kernel its launches run (LAYER_NORM_KERNELS), with weight
    and bias present (FusedLayerNorm's case; RMSNorm's weight alone); each for every checked arch, aligned and
    not."""
    from kernels.layer_norm import tiles

    alignments_of = {}  # (dtype, kernel, width, tile) -> the alignments whose launches run it
    for direction, precision, width, aligned in tiles.launch_keys():
        tile = tiles.TABLE.lookup(direction=direction, precision=precision, width=width, aligned=aligned)
        for dtype_name in DTYPE_NAMES:
            for kernel_name, norm_kernel in LAYER_NORM_KERNELS.items():
                if norm_kernel.fp32_pointers and dtype_name == "float32":
                    continue  # the plain add's config
                launch_precision = norm_kernel.launch_precision or PRECISIONS[dtype_name]
                if (launch_precision, norm_kernel.direction, norm_kernel.streamed) == (
                        precision, direction, width == "streamed"):
                    alignments_of.setdefault((dtype_name, kernel_name, width, tuple(tile)), []).append(aligned)
    return [layer_norm_config(*launch, tuple(alignments)) for launch, alignments in alignments_of.items()]


def layer_norm_config(dtype_name, kernel_name, width, tile, alignments=(True, False)):
    """The config of one LayerNorm launch: `kernel_name` (one of LAYER_NORM_KERNELS) at the table's width key,
    run with `tile` (kernels.layer_norm.tiles.Tile), for the launches with these operand alignments on every
    checked arch."""
    from kernels.layer_norm import backward, forward, shared, tiles

    tile = tiles.Tile(*tile)
    direction, _, function, constexprs, fp32_pointers, _ = LAYER_NORM_KERNELS[kernel_name]
    kernel = getattr(forward if direction == "forward" else backward, function)
    constexprs = dict(constexprs, BLOCK_N=tile.block_n)
    if "ROWS" in _kernel_param_names(kernel):
        constexprs["ROWS"] = tile.rows
    options = dict(shared.BACKWARD_COMPILE_OPTIONS) if direction == "backward" else {"num_stages": 3}
    num_stages = options.pop("num_stages")
    name = f"layer_norm_{kernel_name}_{POINTER_TYPES[dtype_name][1:]}" + (
        "" if direction == "partials_sum" else f"_n{width}") + f"_{tile.rows}x{tile.block_n}w{tile.num_warps}"
    return _config("layer_norm", ("layer_norm", dtype_name, kernel_name, width, tuple(tile), tuple(alignments)),
                   name, kernel, dtype_name, constexprs, tile.num_warps, num_stages,
                   tuple(target for target in _targets() if target[1] in alignments), options, fp32_pointers,
                   kernel=kernel_name, width=width, block_m=tile.rows, block_n=tile.block_n)


def layer_norm_limit_probes():
    """For each on-chip limit of the LayerNorm table (direction, precision, operand alignment), the next width up
    run the on-chip way: the add variant (the most live values; `limit_probe`) with the limit's tile at twice the
    columns and twice the warps (at most 32), for the alignment on every checked arch. The report shows their
    spills: why each limit is where it is."""
    from kernels.layer_norm import tiles

    probes = []
    for (direction, precision, aligned), limit in tiles.MAX_ON_CHIP_WIDTH.items():
        tile = tiles.TABLE.lookup(direction=direction, precision=precision, width=limit, aligned=aligned)
        wider = tile._replace(block_n=2 * limit, num_warps=min(32, 2 * tile.num_warps))
        probes.append(layer_norm_config(*limit_probe(direction, precision), 2 * limit, tuple(wider), (aligned,)))
    return probes


def limit_probe(direction, precision):
    """(dtype name, kernel) of the limit probe of a direction and precision: the add in fp16 or fp32, or the add
    with its sum in fp32 for the "mixed" precision."""
    if precision == "mixed":
        return "float16", f"add_{direction}_sum_in_fp32"
    return ("float16" if precision == "16bit" else "float32"), f"add_{direction}"


def _kernel_param_names(kernel):
    return [param.name for param in _kernel_params(kernel)]


_BUILDERS = {"attention": attention_config, "attention_preprocess": preprocess_config, "layer_norm": layer_norm_config}


def config(key):
    """The config a key names (a config's "key"): what a compile worker builds from the key it is sent."""
    builder, *args = key
    return _BUILDERS[builder](*args)


def shipped_configs():
    """Every config the ops ship, attention's first (OPS order). Building them imports the kernels, which works in
    interpreter mode; compiling is left to tools.tiles.compile's workers."""
    return attention_configs() + layer_norm_configs()
