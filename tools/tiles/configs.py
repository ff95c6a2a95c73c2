"""Every kernel config the ops ship, read off the kernels themselves: what `tools.tiles.compile` compiles.

The attention launch tables (kernels/attention/tiles.py) and the LayerNorm tiles (kernels/layer_norm/tiles.py) say
which tiles a launch can pick, and each kernel's signature is derived from its own parameters (`signature`). A
config is a dict: the jit kernel, its signature, constexprs, warps, stages and any other compile options the launcher
passes; where it runs ("targets": (arch, aligned operands) pairs); what it is ("meta": the launch's kernel name,
dtype, head size or width, mask, dropout, tile); and its "key", the few plain values it is built from. A compile
worker receives the key and builds that one config (`config`), never the whole list.
"""

import itertools

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
# The LayerNorm kernels a config can be: name -> (backward, with a residual).
LAYER_NORM_KERNELS = {"forward": (False, False), "add_forward": (False, True),
                      "backward": (True, False), "add_backward": (True, True)}


def operands_name(aligned):
    return "aligned" if aligned else "any"


def _targets(aligned=None):
    """(arch, aligned operands) pairs: every checked arch, with the given alignment or both."""
    from kernels._gpu import CHECKED_ARCHS

    alignments = (True, False) if aligned is None else (aligned,)
    return tuple((arch, a) for arch in CHECKED_ARCHS for a in alignments)


def signature(kernel, pointer_type, constexprs):
    """Triton's signature of `kernel` for one config, derived from the kernel's own parameters: constexprs as
    given, annotated parameters (sizes, scales, fp32 buffers) as annotated, strides as the JIT types them (i32),
    and every other tensor as `pointer_type` (the input dtype)."""
    found = {}
    for param in _kernel_params(kernel):
        if param.is_constexpr or param.name in constexprs:
            found[param.name] = "constexpr"
        elif param.annotation:
            found[param.name] = param.annotation
        elif param.name.startswith("stride_"):
            found[param.name] = "i32"
        else:
            found[param.name] = pointer_type
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
            **meta):
    """One config of `op`, as the module docstring describes it."""
    return {"op": op, "key": key, "name": name, "kernel": jit_kernel,
            "signature": signature(jit_kernel, POINTER_TYPES[dtype_name], constexprs),
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
    query programs' block_m2 x block_n2, "apart" where dK and dV have programs of their own), warps and stages."""
    if hasattr(tile, "block_n1"):
        apart = "_apart" if tile.dk_dv_apart else ""
        blocks = f"{tile.block_m1}x{tile.block_n1}_{tile.block_m2}x{tile.block_n2}{apart}"
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
    from kernels.attention import backward, forward, tiles

    constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": tiles.block_d(head_dim), "ALIGNED": aligned, "DROPOUT": dropout,
                  **ATTENTION_MASKS[mask_name]}
    if kernel_name == "forward":
        kernel = forward.attention_forward_kernel
        constexprs.update(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n)
    else:
        kernel = backward.attention_backward_kernel
        constexprs.update(BLOCK_M1=tile.block_m1, BLOCK_N1=tile.block_n1, BLOCK_M2=tile.block_m2,
                          BLOCK_N2=tile.block_n2, DK_DV_APART=tile.dk_dv_apart)
    name = (f"attention_{kernel_name}_{mask_name}{'_dropout' if dropout else ''}_{dtype_name}_d{head_dim}"
            f"_{tile_name(tile)}_{operands_name(aligned)}")
    key = ("attention", dtype_name, head_dim, kernel_name, mask_name, dropout, tile, aligned, tuple(archs))
    return _config("attention", key, name, kernel, dtype_name, constexprs, tile.num_warps, tile.num_stages,
                   tuple((arch, aligned) for arch in archs), kernel=kernel_name, head_dim=head_dim, mask=mask_name,
                   dropout=dropout, tile=tuple(tile))


def layer_norm_configs():
    """One config per (kernel, dtype, width class) the LayerNorm launchers can pick, with weight and bias
    present (FusedLayerNorm's case): forward, add-forward, backward, and add-backward (with the gradient of s);
    each for every checked arch, aligned and not."""
    from kernels.layer_norm import tiles

    return [layer_norm_config(dtype_name, width, add + direction) for dtype_name in DTYPE_NAMES
            for width in tiles.SHIPPED_WIDTHS for add in ("", "add_") for direction in ("forward", "backward")]


def layer_norm_config(dtype_name, width, kernel_name):
    """The config of one LayerNorm launch: `kernel_name` (one of LAYER_NORM_KERNELS) at this width class."""
    from kernels.layer_norm import kernels, tiles

    backward, has_residual = LAYER_NORM_KERNELS[kernel_name]
    options = {}
    if backward:
        tile = tiles.backward_tile(width)
        kernel = kernels.layer_norm_backward_streamed_kernel if tile.streamed else kernels.layer_norm_backward_kernel
        constexprs = {"HAS_DSUM": has_residual, "HAS_WEIGHT": True, "COMPUTE_DWEIGHT": True, "COMPUTE_DBIAS": True}
        options = dict(kernels.BACKWARD_COMPILE_OPTIONS)
        num_stages = options.pop("num_stages")
    else:
        tile = tiles.forward_tile(width)
        kernel = kernels.layer_norm_forward_streamed_kernel if tile.streamed else kernels.layer_norm_forward_kernel
        constexprs = {"HAS_RESIDUAL": has_residual, "HAS_WEIGHT": True, "HAS_BIAS": True}
        num_stages = 3
    constexprs.update(BLOCK_N=tile.block_n, **({} if tile.streamed else {"ROWS": tile.rows}))
    return _config("layer_norm", ("layer_norm", dtype_name, width, kernel_name),
                   f"layer_norm_{kernel_name}_{POINTER_TYPES[dtype_name][1:]}_n{width}", kernel, dtype_name,
                   constexprs, tile.num_warps, num_stages, _targets(), options, kernel=kernel_name, width=width)


_BUILDERS = {"attention": attention_config, "attention_preprocess": preprocess_config, "layer_norm": layer_norm_config}


def config(key):
    """The config a key names (a config's "key"): what a compile worker builds from the key it is sent."""
    builder, *args = key
    return _BUILDERS[builder](*args)


def shipped_configs():
    """Every config the ops ship, attention's first (OPS order). Building them imports the kernels, which works in
    interpreter mode; compiling is left to tools.tiles.compile's workers."""
    return attention_configs() + layer_norm_configs()
