"""Compiling one kernel config for one GPU architecture on this machine, no GPU needed, and reading what the compiler
made of it: registers, stack and spills (the wheel's ptxas -v), shared memory (as Triton allocates it), the matrix
instructions (wgmma, sm_90's warpgroup instructions, or mma.sync, sm_80's) and the speed model's reading of the main
loop's SASS (tools/tiles/speed_model.py).

Each config (tools/tiles/configs.py) is compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda",
arch, 32))` into PTX and a cubin, as a launch would be. Triton's JIT specialises on its arguments: pointers aligned
to 16 bytes and integers divisible by 16 are marked so, and the code it generates (vectorised, asynchronously
pipelined loads) differs. So each config is compiled both ways: "aligned" marks every pointer and every integer
argument divisible by 16 as the JIT would, except the arguments a kernel opts out of that specialisation for (the
attention kernels mark their strides themselves, from their ALIGNED constexpr; LayerNorm leaves n_rows unmarked);
"any" marks nothing, the worst case of misaligned operands.

Compiles run in worker processes (`worker_pool`: one per core, at most 8) started without TRITON_INTERPRET (the
test suite sets it on CPU, and interpreted kernels cannot be compiled); a worker is sent a config's key and builds
that config itself.
"""

import concurrent.futures
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from tools.tiles import configs, speed_model

# Compiles are single-threaded and CPU-bound: one worker per core, capped for memory (~0.6 GB each).
WORKERS = max(1, min(8, os.cpu_count() or 1))


def worker_pool(workers=WORKERS):
    """A pool of `workers` spawned compile processes, each started without TRITON_INTERPRET."""
    context = multiprocessing.get_context("spawn")
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker)


def _start_worker():
    os.environ.pop("TRITON_INTERPRET", None)


def compile_all(shipped=None, workers=WORKERS):
    """Compile every (config, target) of `shipped` (default: every shipped config) in `workers` processes, one
    task at a time in the configs' order (the attention kernels, the longest, first, so no worker is left with one
    of them at the end); results in order."""
    shipped = configs.shipped_configs() if shipped is None else shipped
    tasks = [(entry["key"], arch, aligned) for entry in shipped for arch, aligned in entry["targets"]]
    with worker_pool(workers) as pool:
        return list(pool.map(_compile_task, tasks))


def _compile_task(task):
    key, arch, aligned = task
    return compile_entry(configs.config(key), arch, aligned)


def compile_entry(entry, arch, aligned):
    """Compile one config (tools.tiles.configs), shipped or a candidate of tools.tiles.search, for one arch, with
    aligned operands or any; a dict of what the report shows ("error" set when it failed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = {"op": entry["op"], "name": entry["name"], "arch": arch, "aligned": aligned}
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
    """The speed model's reading of a 16-bit attention tile's main loops: modelled clocks per 128 x 128 block and
    their limiters, or None where no model applies (fp32, LayerNorm, the delta kernel, archs the model has no rates
    for); and whether its warpgroups duplicate work."""
    record = {"model_clocks": None, "limiter": None, "duplicated": False}
    if result["op"] != "attention" or result["kernel"] == "preprocess" or result["dtype"] == "float32":
        return record
    tile = configs.as_tile(result["kernel"], result["tile"])
    record["duplicated"] = result["wgmma"] and speed_model.duplicates_work(result["kernel"], tile)
    if result["arch"] not in speed_model.RATES:
        return record
    reading = speed_model.kernel_clocks(_disassemble(cubin, result["arch"]), result["arch"], result["kernel"], tile,
                                        result["head_dim"])
    if reading is not None:
        clocks, limiters, loops = reading
        record.update(model_clocks=round(clocks), limiter=" + ".join(limiters),
                      loop_instructions=[loop.instructions for loop in loops],
                      loop_exp2=[loop.mufu for loop in loops],
                      wgmma_shapes=sorted({shape for loop in loops for shape in loop.wgmma}))
    return record


def _disassemble(cubin, arch):
    """cuobjdump -sass of a cubin, with the tool the Triton wheel ships."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        tool = Path(get_ptxas(arch).path).parent / "cuobjdump"
        return subprocess.run([str(tool), "-sass", str(path)], capture_output=True, text=True, check=True).stdout


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
