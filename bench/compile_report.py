"""python -m bench.compile_report: compile every shipped kernel config for the checked architectures (sm_90 and sm_80)
on this machine, no GPU needed, and write registers, spills, shared memory and the matrix instructions to
bench/results/compile_report.md (or --output).

The configs come from the kernels themselves: the attention launch tables (kernels/attention/tiles.py) and the
LayerNorm tiles (kernels/layer_norm/tiles.py) say which tiles a launch can pick, and each kernel's signature is
derived from its own parameters (`_signature`). Each config is compiled with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))` into PTX and a cubin, as a launch would be. Triton's JIT specialises on its
arguments: pointers aligned to 16 bytes and integers divisible by 16 are marked so, and the code it generates
(vectorised, asynchronously pipelined loads) differs. So each config is compiled both ways: "aligned" marks every
pointer and every integer argument divisible by 16 as the JIT would, except the arguments a kernel opts out of that
specialisation for (the attention kernels mark their strides themselves, from their ALIGNED constexpr; LayerNorm
leaves n_rows unmarked); "any" marks nothing, the worst case of misaligned operands. Then the wheel's own ptxas is
run with `-v` on that PTX to read the registers, stack frame and spill bytes; the shared memory is what Triton
allocates; the PTX shows whether the matrix products use wgmma (sm_90's warpgroup instructions) or mma.sync
(sm_80's).

This is also the machinery of tests/test_compile_report.py, which fails when a shipped config spills (fp32: more
than FP32_SPILL_ALLOWANCE_BYTES), uses more shared memory than the arch allows, does not compile, runs mma.sync on
sm_90 with aligned operands or duplicates work across sm_90 warpgroups. bench/tile_search.py finds the replacement
for a tile that fails. Compiles run in worker processes (one per core, at most 8) started without TRITON_INTERPRET
(the test suite sets it on CPU, and interpreted kernels cannot be compiled). Registers and spills depend on the
compiler: the tiles were checked with triton TILES_CHECKED_WITH.
"""

import argparse
import concurrent.futures
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OPS = ("attention", "layer_norm")
# The Triton release whose compiler the shipped tiles were checked with: registers and spills are that compiler's
# (3.9 spills where 3.6 does not). The report test runs only under it; on another version, retune first.
TILES_CHECKED_WITH = "3.6.0"
# The most shared memory one program may ask for (bytes): 227 KiB on sm_90, 163 KiB on sm_80, 99 KiB on sm_86 and
# sm_89, which run sm_80's code: its compiles are held to the smallest limit of the archs that run them.
MAX_SHARED_BYTES = {90: 232448, 80: 166912, 86: 101376, 89: 101376}
REPORT_PATH = Path(__file__).resolve().parent / "results" / "compile_report.md"
# Compiles are single-threaded and CPU-bound: one worker per core, capped for memory (~0.6 GB each).
WORKERS = max(1, min(8, os.cpu_count() or 1))
DTYPE_NAMES = ("float16", "bfloat16", "float32")
# The padded head sizes the attention tables have tiles for (a head size runs the tiles of its power of two).
HEAD_DIMS = (16, 32, 64, 128, 256)
POINTER_TYPES = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}


def _targets(aligned=None):
    """(arch, aligned operands) pairs: every checked arch, with the given alignment or both."""
    from kernels._gpu import CHECKED_ARCHS

    alignments = (True, False) if aligned is None else (aligned,)
    return tuple((arch, a) for arch in CHECKED_ARCHS for a in alignments)


def _signature(kernel, pointer_type, constexprs):
    """Triton's signature of `kernel` for one config, derived from the kernel's own parameters: constexprs as
    given, annotated parameters (sizes, scales, fp32 buffers) as annotated, strides as the JIT types them (i32),
    and every other tensor as `pointer_type` (the input dtype)."""
    signature = {}
    for param in _kernel_params(kernel):
        if param.is_constexpr or param.name in constexprs:
            signature[param.name] = "constexpr"
        elif param.annotation:
            signature[param.name] = param.annotation
        elif param.name.startswith("stride_"):
            signature[param.name] = "i32"
        else:
            signature[param.name] = pointer_type
    return signature


def _kernel_params(kernel):
    """The kernel's parameters as Triton's JIT reads them (name, annotation), from the Python function under the
    jit (or, in interpreter mode, the interpreter's) wrapper."""
    import inspect

    from triton.runtime.jit import KernelParam

    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return [KernelParam(i, p, False, False) for i, p in enumerate(inspect.signature(kernel).parameters.values())]


def _config(name, jit_kernel, dtype_name, constexprs, num_warps, num_stages, targets, options=None, **meta):
    """One config: what to compile (the jit kernel, signature, constexprs, warps, stages and any other compile
    options the launcher passes), where it runs (targets) and what it is (meta: the launch's kernel name, dtype,
    head size or width, mask, dropout, tile), for the JSON records."""
    return {"name": name, "kernel": jit_kernel,
            "signature": _signature(jit_kernel, POINTER_TYPES[dtype_name], constexprs),
            "constexprs": constexprs, "num_warps": num_warps, "num_stages": num_stages, "targets": targets,
            "options": options or {}, "meta": dict(dtype=dtype_name, **meta)}


# The attention masks a config is compiled with: the causal dense call (the decoder's, whose speed the tiles are
# chosen for) and the most general one, a two-sided window over packed sequences (the most masking arithmetic
# and scalar state). Full attention, one-sided windows and dense windows use a subset of the latter's code.
ATTENTION_MASKS = {
    "causal": dict(BOUNDED_LEFT=False, BOUNDED_RIGHT=True, VARLEN=False),
    "window_varlen": dict(BOUNDED_LEFT=True, BOUNDED_RIGHT=True, VARLEN=True),
}


def attention_configs():
    """Every compile the attention launchers can cause on the checked archs, aligned operands and not: for each
    dtype and head-size class 16 ... 256 (a padded head size, e.g. 48 -> 64, runs the tiles of its class with
    masked loads), the forward, dK/dV (or dK and dV) and dQ kernels under each of ATTENTION_MASKS, with and without
    dropout (dropout's random numbers cost registers), plus the delta preprocess kernel. A config's name ends in
    its tile (BLOCK_M x BLOCK_N, warps, stages) and the operands' alignment; its targets are the (arch, aligned)
    launches that run it."""
    import torch

    from kernels._gpu import CHECKED_ARCHS
    from kernels.attention import backward, tiles

    configs = []
    for dtype_name in DTYPE_NAMES:
        dtype = getattr(torch, dtype_name)
        for head_dim in HEAD_DIMS:
            for aligned in (True, False):
                for varlen in (False, True):
                    constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": tiles.block_d(head_dim), "ALIGNED": aligned,
                                  "BLOCK_M": tiles.preprocess_block_m(tiles.block_d(head_dim), dtype),
                                  "VARLEN": varlen}
                    configs.append(_config(
                        f"attention_preprocess{'_varlen' if varlen else ''}_{dtype_name}_d{head_dim}"
                        f"_{operands_name(aligned)}",
                        backward.attention_backward_preprocess_kernel, dtype_name, constexprs, 4, 1,
                        _targets(aligned), kernel="preprocess", head_dim=head_dim,
                        mask="varlen" if varlen else "dense", dropout=False))
                for mask_name, dropout in itertools.product(ATTENTION_MASKS, (False, True)):
                    archs_by_launch = {}
                    for arch in CHECKED_ARCHS:
                        for kernel_name in ("forward", *tiles.key_block_passes(head_dim, dtype, dropout, arch,
                                                                               aligned), "dq"):
                            tile = tiles.table_tile(kernel_name, head_dim, dtype, dropout, arch, aligned)
                            archs_by_launch.setdefault((kernel_name, tile), []).append(arch)
                    configs += [attention_config(dtype_name, head_dim, kernel_name, mask_name, dropout, tile,
                                                 aligned, archs)
                                for (kernel_name, tile), archs in archs_by_launch.items()]
    return configs


def attention_config(dtype_name, head_dim, kernel_name, mask_name, dropout, tile, aligned, archs):
    """The config of one attention launch: `kernel_name` ("forward", "dkdv", "dk", "dv" or "dq") at this head
    size, under ATTENTION_MASKS[mask_name], with or without dropout, run with `tile` (BLOCK_M, BLOCK_N, warps,
    stages) on `archs` with aligned operands or any. attention_configs builds the shipped ones; bench.tile_search
    builds its candidates here too, so both compile the same thing."""
    from kernels.attention import backward, forward, tiles

    kernel_of = {"forward": forward.attention_forward_kernel, "dq": backward.attention_backward_dq_kernel,
                 **dict.fromkeys(tiles.COMPUTED_GRADIENTS, backward.attention_backward_dkdv_kernel)}
    block_m, block_n, num_warps, num_stages = tile
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": tiles.block_d(head_dim), "ALIGNED": aligned, "BLOCK_M": block_m,
                  "BLOCK_N": block_n, "DROPOUT": dropout, **ATTENTION_MASKS[mask_name]}
    if kernel_name in tiles.COMPUTED_GRADIENTS:
        constexprs["COMPUTE_DK"], constexprs["COMPUTE_DV"] = tiles.COMPUTED_GRADIENTS[kernel_name]
    name = (f"attention_{kernel_name}_{mask_name}{'_dropout' if dropout else ''}_{dtype_name}_d{head_dim}"
            f"_{block_m}x{block_n}w{num_warps}s{num_stages}_{operands_name(aligned)}")
    return _config(name, kernel_of[kernel_name], dtype_name, constexprs, num_warps, num_stages,
                   tuple((arch, aligned) for arch in archs), kernel=kernel_name, head_dim=head_dim, mask=mask_name,
                   dropout=dropout, block_m=block_m, block_n=block_n)


def layer_norm_configs():
    """One config per (kernel, dtype, width class) the LayerNorm launchers can pick, with weight and bias
    present (FusedLayerNorm's case): forward, add-forward, backward, and add-backward (with the gradient of s);
    each for every checked arch, aligned and not."""
    from kernels.layer_norm import kernels, tiles

    configs = []
    for dtype_name in DTYPE_NAMES:
        short = POINTER_TYPES[dtype_name][1:]
        for width in tiles.SHIPPED_WIDTHS:
            for has_residual in (False, True):
                add = "add_" if has_residual else ""
                tile = tiles.forward_tile(width)
                kernel = kernels.layer_norm_forward_streamed_kernel if tile.streamed else \
                    kernels.layer_norm_forward_kernel
                constexprs = {"HAS_RESIDUAL": has_residual, "HAS_WEIGHT": True, "HAS_BIAS": True,
                              "BLOCK_N": tile.block_n, **({} if tile.streamed else {"ROWS": tile.rows})}
                configs.append(_config(f"layer_norm_{add}forward_{short}_n{width}", kernel, dtype_name, constexprs,
                                       tile.num_warps, 3, _targets(), kernel=f"{add}forward", width=width))
                tile = tiles.backward_tile(width)
                kernel = kernels.layer_norm_backward_streamed_kernel if tile.streamed else \
                    kernels.layer_norm_backward_kernel
                constexprs = {"HAS_DSUM": has_residual, "HAS_WEIGHT": True, "COMPUTE_DWEIGHT": True,
                              "COMPUTE_DBIAS": True, "BLOCK_N": tile.block_n,
                              **({} if tile.streamed else {"ROWS": tile.rows})}
                options = dict(kernels.BACKWARD_COMPILE_OPTIONS)
                configs.append(_config(f"layer_norm_{add}backward_{short}_n{width}", kernel, dtype_name, constexprs,
                                       tile.num_warps, options.pop("num_stages"), _targets(), options,
                                       kernel=f"{add}backward", width=width))
    return configs


_CONFIGS_OF = {"attention": attention_configs, "layer_norm": layer_norm_configs}


def shipped_configs():
    """[(op, config name, targets)] for every config the ops ship (targets: the (arch, aligned) pairs it is
    compiled for). Building them imports the kernels, which works in interpreter mode; compiling is left to the
    workers."""
    return [(op, entry["name"], entry["targets"]) for op in OPS for entry in _CONFIGS_OF[op]()]


def _start_worker():
    os.environ.pop("TRITON_INTERPRET", None)


def _jit_function(kernel):
    """The triton.jit function under any autotune / heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def ptxas_usage(ptx, arch):
    """Registers, stack frame and spill bytes that the wheel's ptxas reports (-v) for this PTX."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        command = [get_ptxas(arch).path, "-lineinfo", "-v", f"--gpu-name={sm_arch_from_capability(arch)}",
                   str(source), "-o", str(Path(tmp) / "kernel.cubin")]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or frame is None:
        raise RuntimeError(f"could not read ptxas -v output:\n{log}")
    return {"registers": int(registers.group(1)), "stack_bytes": int(frame.group(1)),
            "spill_store_bytes": int(frame.group(2)), "spill_load_bytes": int(frame.group(3))}


def _jit_marks_divisibility(param):
    """Whether Triton's JIT would mark this kernel argument divisible by 16 when it is (a kernel can opt out)."""
    return not (param.do_not_specialize or param.do_not_specialize_on_alignment)


def compile_config(op, name, arch, aligned):
    """Compile one shipped config for one arch, with aligned operands or any; a dict of what the report shows
    ("error" set when it failed)."""
    return compile_entry(op, next(e for e in _CONFIGS_OF[op]() if e["name"] == name), arch, aligned)


def compile_entry(op, entry, arch, aligned):
    """Compile one config as _config builds it, shipped or not (bench.tile_search's candidates), for one arch,
    with aligned operands or any; a dict of what the report shows ("error" set when it failed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = {"op": op, "name": entry["name"], "arch": arch, "aligned": aligned}
    started = time.perf_counter()
    try:
        result.update(entry["meta"], num_warps=entry["num_warps"], num_stages=entry["num_stages"])
        fn = _jit_function(entry["kernel"])
        signature = entry["signature"]
        # Aligned: every pointer and every integer the JIT would mark divisible by 16 is marked (the shipped
        # LayerNorm widths, its strides and n_cols, are multiples of 16; the attention kernels opt out of integer
        # marks).
        divisible = [param.num for param in fn.params if aligned and _jit_marks_divisibility(param)
                     and (signature[param.name].startswith("*") or signature[param.name] in ("i32", "i64"))]
        source = ASTSource(fn=fn, signature=signature, constexprs=entry["constexprs"],
                           attrs={(i,): [["tt.divisibility", 16]] for i in divisible})
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": entry["num_warps"], "num_stages": entry["num_stages"],
                                           **entry["options"]})
        ptx = compiled.asm["ptx"]
        result.update(ptxas_usage(ptx, arch))
        result["shared_bytes"] = compiled.metadata.shared
        result["dots"] = len(re.findall(r"\btt\.dot\b", compiled.asm["ttir"]))
        result["wgmma"] = "wgmma.mma_async" in ptx
        result["mma_sync"] = "mma.sync" in ptx
        result.update(_speed(result, compiled.asm["cubin"]))
    except Exception as exc:  # noqa: BLE001 - a failed compile is what the report and the test are for
        result["error"] = f"{type(exc).__name__}: {str(exc).strip()[:2000]}"
    result["seconds"] = time.perf_counter() - started
    return result


def _speed(result, cubin):
    """The speed model's reading of a 16-bit attention tile's main loop (bench/speed_model.py): modelled clocks per
    128 x 128 block and their limiter, or None where no model applies (fp32, LayerNorm, the delta kernel, archs the
    model has no rates for); and
    whether its warpgroups duplicate work."""
    from bench import speed_model

    record = {"model_clocks": None, "limiter": None, "duplicated": False}
    if result["op"] != "attention" or result["kernel"] == "preprocess" or result["dtype"] == "float32":
        return record
    record["duplicated"] = result["wgmma"] and speed_model.duplicates_work(
        result["kernel"], result["block_m"], result["block_n"], result["num_warps"])
    if result["arch"] not in speed_model.RATES:
        return record
    loop = speed_model.main_loop(_disassemble(cubin, result["arch"]))
    if loop is not None:
        clocks, limiter = speed_model.block_clocks(loop, result["arch"], result["num_warps"], result["block_m"],
                                                   result["block_n"])
        record.update(model_clocks=round(clocks[limiter]), limiter=limiter,
                      unit_clocks={unit: round(value) for unit, value in clocks.items()},
                      loop_instructions=loop.instructions, loop_exp2=loop.mufu, wgmma_shapes=list(loop.wgmma))
    return record


def _disassemble(cubin, arch):
    """cuobjdump -sass of a cubin, with the tool the Triton wheel ships."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        tool = Path(get_ptxas(arch).path).parent / "cuobjdump"
        return subprocess.run([str(tool), "-sass", str(path)], capture_output=True, text=True, check=True).stdout


def _compile_task(task):
    return compile_config(*task)


def compile_all(configs=None, workers=WORKERS):
    """Compile every (config, target) in `workers` spawned processes, one task at a time in OPS order
    (the attention kernels, the longest, first, so no worker is left with one of them at the end); results in
    order."""
    configs = shipped_configs() if configs is None else configs
    tasks = [(op, name, arch, aligned) for op, name, targets in configs for arch, aligned in targets]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker) as pool:
        return list(pool.map(_compile_task, tasks))


# fp32 products run on the FMA units, and Triton's FMA dot holds whole rows of both operands per thread: at
# head size 128 and 256, under the windowed packed mask with dropout, every fp32 tile spills a few words
# (bench.tile_search finds none clean down to 16 x 16 with 1 to 8 warps). fp32 is the accuracy path, several
# times slower than 16-bit whatever its tile, so a few spilled words per thread are accepted there; more means a
# tile or kernel regressed.
FP32_SPILL_ALLOWANCE_BYTES = 128


def problems(result):
    """What makes a compiled config unfit to ship: a failed compile, spills (beyond FP32_SPILL_ALLOWANCE_BYTES for
    fp32), too much shared memory, on sm_90 with aligned operands matrix products left to mma.sync instead of
    wgmma, or on sm_90 warpgroups that duplicate work."""
    if "error" in result:
        return [f"does not compile: {result['error'].splitlines()[0]}"]
    found = []
    if result["arch"] == 90 and result["aligned"] and result["mma_sync"] and not result["wgmma"]:
        found.append("mma.sync where sm_90 has wgmma")
    if result["arch"] == 90 and result.get("duplicated"):
        found.append("warpgroups duplicate work (fewer than 64 rows per warpgroup)")
    spill_allowed = FP32_SPILL_ALLOWANCE_BYTES if result.get("dtype") == "float32" else 0
    if max(result["spill_store_bytes"], result["spill_load_bytes"]) > spill_allowed:
        found.append(f"spills {result['spill_store_bytes']} B stored / {result['spill_load_bytes']} B loaded")
    for arch in _archs_running(result["arch"]):
        if result["shared_bytes"] > MAX_SHARED_BYTES[arch]:
            found.append(f"needs {result['shared_bytes']} B of shared memory, sm_{arch} allows "
                         f"{MAX_SHARED_BYTES[arch]}")
    return found


def _archs_running(arch):
    """The architectures that run code compiled for `arch`: sm_80's code runs on sm_86 and sm_89 too."""
    from kernels._gpu import ARCHS_RUNNING_SM80_CODE

    return (arch, *ARCHS_RUNNING_SM80_CODE) if arch == 80 else (arch,)


def matrix_instructions(result):
    if result["dots"] == 0:
        return "— (no tl.dot)"
    wanted, used = ("wgmma", result["wgmma"]) if result["arch"] == 90 else ("mma.sync", result["mma_sync"])
    if used:
        return wanted
    return "mma.sync (no wgmma)" if result["mma_sync"] else "NONE (FMA)"


def operands_name(aligned):
    return "aligned" if aligned else "any"


# Goals of the speed model for the headline configs (16-bit, causal, aligned, sm_90, no dropout), in modelled clocks
# per 128 x 128 block, and the Triton tutorial's fused attention (06-fused-attention.py) under the same model: a
# static estimate, not a timing. The floor is the tensor cores' alone: 2 products of 128 x 128 x D
# in the forward, 7 in the backward (dK/dV + dQ).
MODEL_GOALS = {64: {"forward": 1075, "backward": 3950}, 128: {"forward": 2150, "backward": 7900}}
TUTORIAL_MODEL = {64: {"forward": 1088, "backward": 4608}, 128: {"forward": 2048, "backward": 8960}}
# The headline launches' (dropout, arch, aligned operands): no dropout, sm_90, aligned (16-bit, causal).
HEADLINE_LAUNCH = (False, 90, True)


def _headline_clocks(results):
    """{(head size, kernel): modelled clocks} of the shipped headline launches (bf16 causal)."""
    return {(r["head_dim"], r["kernel"]): r["model_clocks"] for r in results
            if r["op"] == "attention" and (r.get("dropout"), r["arch"], r["aligned"]) == HEADLINE_LAUNCH
            and r.get("mask") == "causal" and r.get("dtype") == "bfloat16" and r.get("model_clocks") is not None}


def _backward_clocks(clocks, head_dim, passes):
    parts = [clocks.get((head_dim, kernel)) for kernel in (*passes, "dq")]
    return sum(parts) if None not in parts else None


def headline_model(results, ranking):
    """[(head_dim, part, shipped tiles' modelled clocks, the model's best tiles' clocks, floor, goal, tutorial)]
    for the headline configs: the forward, and the backward as the sum of its key-block launches and dQ (the delta
    kernel aside). The model's best: bench.tile_search's ranking (None where it was never run), with dK/dV fused
    or split, whichever models faster."""
    import torch

    from bench import tile_search
    from kernels.attention import tiles

    shipped = _headline_clocks(results)
    best = {(launch["head_dim"], launch["kernel"]): clean[0]["model_clocks"]
            for launch in ranking or [] for clean in [tile_search.clean_ranked(launch)] if clean}
    rows = []
    for head_dim in sorted(MODEL_GOALS):
        passes = tiles.key_block_passes(head_dim, torch.bfloat16, *HEADLINE_LAUNCH)
        best_backward = [_backward_clocks(best, head_dim, split) for split in (("dkdv",), ("dk", "dv"))]
        best_backward = min((c for c in best_backward if c is not None), default=None)
        floor = 128 * 128 * head_dim // 2048
        rows.append((head_dim, "forward", shipped.get((head_dim, "forward")), best.get((head_dim, "forward")),
                     2 * floor, MODEL_GOALS[head_dim]["forward"], TUTORIAL_MODEL[head_dim]["forward"]))
        rows.append((head_dim, "backward (dK/dV + dQ)", _backward_clocks(shipped, head_dim, passes), best_backward,
                     7 * floor, MODEL_GOALS[head_dim]["backward"], TUTORIAL_MODEL[head_dim]["backward"]))
    return rows


def headline_rule(head_dim, kernel):
    """The TileRule of a headline launch (16-bit, sm_90, aligned, no dropout), or None where that launch is not
    made (dK or dV alone where one launch computes both)."""
    import torch

    from kernels.attention import tiles

    if kernel not in ("forward", "dq", *tiles.key_block_passes(head_dim, torch.bfloat16, *HEADLINE_LAUNCH)):
        return None
    return next(rule for rule in tiles.RULES if rule.matches("16bit", head_dim, kernel, *HEADLINE_LAUNCH))


def ranking_rows(results, ranking):
    """Per ranked headline launch: the shipped tile (its clocks and how it was chosen, or that the launch is not
    made) beside the model's best, runner-up and third clean tiles."""
    from bench import tile_search

    shipped = _headline_clocks(results)
    rows = []
    for launch in ranking:
        head_dim, kernel = launch["head_dim"], launch["kernel"]
        rule = headline_rule(head_dim, kernel)
        ours = (f"{tuple(rule.tile)} {shipped.get((head_dim, kernel), '—')} ({rule.chosen_by})" if rule
                else "not launched")
        rows.append([f"d{head_dim}", kernel, ours, *tile_search.ranked_cells(launch)])
    return rows


def to_markdown(results):
    import triton

    from bench import speed_model, tile_search

    headers = ["config", "arch", "operands", "warps", "stages", "registers", "spills (st/ld B)", "stack B",
               "shared KiB", "tl.dot", "matrix instr.", "model clk", "limiter", "status"]
    rows = []
    for r in results:
        base = [r["name"], f"sm_{r['arch']}", operands_name(r["aligned"]), r.get("num_warps", "—"),
                r.get("num_stages", "—")]
        if "error" in r:
            rows.append(base + ["—"] * 8 + ["FAILS TO COMPILE"])
            continue
        found = problems(r)
        rows.append(base + [r["registers"], f"{r['spill_store_bytes']}/{r['spill_load_bytes']}", r["stack_bytes"],
                            f"{r['shared_bytes'] / 1024:.1f}", r["dots"], matrix_instructions(r),
                            r.get("model_clocks") or "—", r.get("limiter") or "—",
                            "; ".join(found) if found else "ok"])
    failing = [r for r in results if problems(r)]
    ranking = tile_search.load_ranking()

    def meets(clocks, goal):
        return "—" if clocks is None else "yes" if clocks <= goal else "no"

    model_rows = [[f"d{head_dim}", part, ours if ours is not None else "—", best if best is not None else "—",
                   floor, goal, tutorial, meets(ours, goal), meets(best, goal)]
                  for head_dim, part, ours, best, floor, goal, tutorial in headline_model(results, ranking)]
    rates = ", ".join(f"sm_{arch}: " + ", ".join(f"{unit} {rate}" for unit, rate in units.items())
                      for arch, units in speed_model.RATES.items())
    lines = [
        "# Compile report",
        "",
        f"Every shipped kernel config of {', '.join(OPS)}, compiled without a GPU by triton "
        f"{triton.__version__} for sm_90 (sm_90a) and sm_80 (whose code sm_86 and sm_89 run: held to their shared "
        "memory too); registers, stack and spills from the wheel's ptxas -v on the PTX, shared memory as Triton "
        "allocates it, matrix instructions read off the PTX. "
        "Operands \"aligned\": pointers and strides known to be multiples of 16 bytes (marked by Triton's JIT, "
        "or for the attention kernels' strides by the kernel itself); \"any\": nothing marked, the worst case. "
        "A config is compiled for the (arch, operands) launches that run its tile (a name ends in the attention "
        "tile, BLOCK_M x BLOCK_N, warps and stages). Regenerate with `python -m bench.compile_report`.",
        "",
        "\"model clk\": the speed model's clocks per 128 x 128 block of (query, key) pairs for one SM, a lower bound "
        "read off the SASS of the main loop (bench/speed_model.py; per SM per clock " + rates + "), and the unit "
        "that limits it. A static estimate, not a timing.",
        "",
        "## The headline configs under the model (bf16, causal, aligned, sm_90, no dropout)",
        "",
        "Shipped: the tiles kernels/attention/tiles.py launches (some chosen by timing on a GPU, which wins over "
        "the model where they disagree). The model's best: the clean tiles with the fewest modelled clocks "
        "(`python -m bench.tile_search --rank`, bench/results/model_ranking.json), dK/dV fused or split.",
        "",
        "| head size | kernels | shipped: model clk | model's best: model clk | tensor floor | goal | "
        "tutorial (model) | shipped meets goal | best meets goal |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in model_rows]
    if ranking:
        lines += [
            "",
            "## The headline launches' tiles ranked by the model",
            "",
            "Per launch (bf16 causal for the clocks; clean: no spills in fp16 and bf16 under every mask), the "
            "shipped tile with its clocks and how it was chosen, and the model's three best clean tiles: "
            "(BLOCK_M, BLOCK_N, warps, stages) clocks (limiter).",
            "",
            "| head size | kernel | shipped | best | runner-up | third |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in ranking_rows(results, ranking)]
    lines += [
        "",
        "## Every config",
        "",
        f"{len(results)} compiles, {len(failing)} with problems.",
        "",
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---" for _ in headers) + " |",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    for r in results:
        if "error" in r:
            lines += ["", f"## {r['name']} sm_{r['arch']} {operands_name(r['aligned'])}: compile error", "", "```",
                      r["error"], "```"]
    return "\n".join(lines) + "\n"


JSON_FIELDS = ("op", "name", "kernel", "dtype", "head_dim", "width", "causal", "mask", "dropout", "arch", "aligned",
               "block_m", "block_n", "num_warps", "num_stages", "registers", "spills", "shared_bytes", "model_clocks",
               "limiter", "duplicated", "unit_clocks", "loop_instructions", "loop_exp2", "wgmma_shapes", "error")


def json_records(results):
    """The results for machines to read: one object per (config, arch, operands), the fields of JSON_FIELDS that
    apply (spills: bytes stored plus loaded; causal: the causal mask variant)."""
    records = []
    for r in results:
        record = dict(r, spills=r.get("spill_store_bytes", 0) + r.get("spill_load_bytes", 0),
                      causal=r.get("mask") == "causal" if r["op"] == "attention" else None)
        records.append({field: record.get(field) for field in JSON_FIELDS})
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description="Compile every shipped kernel config for the checked GPU architectures "
                                "(no GPU needed) and write the report of registers, spills, shared memory and "
                                "matrix instructions.")
    p.add_argument("--output", type=Path, default=REPORT_PATH, help=f"the report to write (default {REPORT_PATH})")
    p.add_argument("--workers", type=int, default=WORKERS, help=f"compile processes (default {WORKERS})")
    p.add_argument("--json", type=Path, help="also write every record as JSON to this file")
    args = p.parse_args(argv)
    started = time.perf_counter()
    results = compile_all(workers=args.workers)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(to_markdown(results))
    if args.json:
        args.json.write_text(json.dumps(json_records(results), indent=1) + "\n")
    failing = [r for r in results if problems(r)]
    for r in failing:
        print(f"PROBLEM {r['name']} sm_{r['arch']} {operands_name(r['aligned'])}: {'; '.join(problems(r))}")
    print(f"compiled {len(results)} (config, target) pairs in {time.perf_counter() - started:.0f} s; "
          f"{len(failing)} with problems; wrote {args.output}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
