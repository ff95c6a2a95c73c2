"""python -m bench.compile_report: compile every shipped kernel config for sm_90 and sm_80 on this machine (no GPU
needed) and write registers, spills, shared memory and the matrix instructions to bench/results/compile_report.md.

Each kernel module ships its launch configs through `shipped_kernel_configs()` (a list of dicts: name, kernel,
signature, constexprs, num_warps, num_stages, and optionally targets, the (arch, aligned) launches that run that
tile; without it a config is compiled for every target in TARGETS). Each is compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` into PTX and a cubin, as a launch would be.
Triton's JIT specialises on its arguments: pointers aligned to 16 bytes and integers divisible by 16 are marked
so, and the code it generates (vectorised, asynchronously pipelined loads) differs. So each config is compiled
both ways: "aligned" marks every pointer and every stride_* argument divisible by 16 as the JIT would, except the
arguments a kernel opts out of that specialisation for (the attention kernels mark their strides themselves,
from their ALIGNED constexpr); "any" marks nothing, the worst case of misaligned operands. Then the wheel's own
ptxas is run with `-v` on that PTX to read the registers, stack frame and spill bytes; the shared memory is what
Triton allocates; the PTX shows whether the matrix products use wgmma (sm_90's warpgroup instructions) or
mma.sync (sm_80's).

This is also the machinery of tests/test_compile_report.py, which fails when a shipped config spills, uses more
shared memory than the arch allows, does not compile, or runs mma.sync on sm_90 with aligned operands. Compiles
run in worker processes (one per core, at most 8) started without TRITON_INTERPRET (the test suite sets it on
CPU, and interpreted kernels cannot be compiled).
"""

import concurrent.futures
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KERNEL_MODULES = ("kernels.flash_attention", "kernels.layer_norm")
ARCHS = (90, 80)
# (arch, aligned operands): every pair a config is compiled for unless it names its own targets.
TARGETS = tuple((arch, aligned) for arch in ARCHS for aligned in (True, False))
# The most shared memory one program may ask for (bytes): 227 KiB on sm_90, 163 KiB on sm_80.
MAX_SHARED_BYTES = {90: 232448, 80: 166912}
REPORT_PATH = Path(__file__).resolve().parent / "results" / "compile_report.md"
# Compiles are single-threaded and CPU-bound: one worker per core, capped for memory (~0.6 GB each).
WORKERS = max(1, min(8, os.cpu_count() or 1))


def shipped_configs():
    """[(module name, config name, targets)] for every config the kernel modules ship (targets: the (arch,
    aligned) pairs it is compiled for). Importing the modules is cheap and works in interpreter mode; the
    kernels themselves are only touched by the workers."""
    return [(module_name, entry["name"], tuple(entry.get("targets", TARGETS))) for module_name in KERNEL_MODULES
            for entry in importlib.import_module(module_name).shipped_kernel_configs()]


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


def compile_config(module_name, name, arch, aligned):
    """Compile one shipped config for one arch, with aligned operands or any; a dict of what the report shows
    ("error" set when it failed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = {"module": module_name, "name": name, "arch": arch, "aligned": aligned}
    started = time.perf_counter()
    try:
        entry = next(e for e in importlib.import_module(module_name).shipped_kernel_configs() if e["name"] == name)
        result.update(num_warps=entry["num_warps"], num_stages=entry["num_stages"])
        fn = _jit_function(entry["kernel"])
        signature = entry["signature"]
        divisible = [param.num for param in fn.params if aligned and _jit_marks_divisibility(param) and (
            signature[param.name].startswith("*") or (signature[param.name] == "i32"
                                                       and param.name.startswith("stride_")))]
        source = ASTSource(fn=fn, signature=signature, constexprs=entry["constexprs"],
                           attrs={(i,): [["tt.divisibility", 16]] for i in divisible})
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": entry["num_warps"], "num_stages": entry["num_stages"]})
        ptx = compiled.asm["ptx"]
        result.update(ptxas_usage(ptx, arch))
        result["shared_bytes"] = compiled.metadata.shared
        result["dots"] = len(re.findall(r"\btt\.dot\b", compiled.asm["ttir"]))
        result["wgmma"] = "wgmma.mma_async" in ptx
        result["mma_sync"] = "mma.sync" in ptx
    except Exception as exc:  # noqa: BLE001 - a failed compile is what the report and the test are for
        result["error"] = f"{type(exc).__name__}: {str(exc).strip()[:2000]}"
    result["seconds"] = time.perf_counter() - started
    return result


def _compile_task(task):
    return compile_config(*task)


def compile_all(configs=None, workers=WORKERS):
    """Compile every (config, target) in `workers` spawned processes, one task at a time in KERNEL_MODULES order
    (the attention kernels, the longest, first, so no worker is left with one of them at the end); results in
    order."""
    configs = shipped_configs() if configs is None else configs
    tasks = [(module_name, name, arch, aligned) for module_name, name, targets in configs
             for arch, aligned in targets]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker) as pool:
        return list(pool.map(_compile_task, tasks))


def problems(result):
    """What makes a compiled config unfit to ship: a failed compile, spills, too much shared memory, or, on sm_90
    with aligned operands, matrix products left to mma.sync instead of wgmma."""
    if "error" in result:
        return [f"does not compile: {result['error'].splitlines()[0]}"]
    found = []
    if result["arch"] == 90 and result["aligned"] and result["mma_sync"] and not result["wgmma"]:
        found.append("mma.sync where sm_90 has wgmma")
    if result["spill_store_bytes"] or result["spill_load_bytes"]:
        found.append(f"spills {result['spill_store_bytes']} B stored / {result['spill_load_bytes']} B loaded")
    if result["shared_bytes"] > MAX_SHARED_BYTES[result["arch"]]:
        found.append(f"needs {result['shared_bytes']} B of shared memory, sm_{result['arch']} allows "
                     f"{MAX_SHARED_BYTES[result['arch']]}")
    return found


def matrix_instructions(result):
    if result["dots"] == 0:
        return "— (no tl.dot)"
    wanted, used = ("wgmma", result["wgmma"]) if result["arch"] == 90 else ("mma.sync", result["mma_sync"])
    if used:
        return wanted
    return "mma.sync (no wgmma)" if result["mma_sync"] else "NONE (FMA)"


def operands_name(aligned):
    return "aligned" if aligned else "any"


def to_markdown(results):
    import triton

    headers = ["config", "arch", "operands", "warps", "stages", "registers", "spills (st/ld B)", "stack B",
               "shared KiB", "tl.dot", "matrix instr.", "status"]
    rows = []
    for r in results:
        base = [r["name"], f"sm_{r['arch']}", operands_name(r["aligned"]), r.get("num_warps", "—"),
                r.get("num_stages", "—")]
        if "error" in r:
            rows.append(base + ["—"] * 6 + ["FAILS TO COMPILE"])
            continue
        found = problems(r)
        rows.append(base + [r["registers"], f"{r['spill_store_bytes']}/{r['spill_load_bytes']}", r["stack_bytes"],
                            f"{r['shared_bytes'] / 1024:.1f}", r["dots"], matrix_instructions(r),
                            "; ".join(found) if found else "ok"])
    failing = [r for r in results if problems(r)]
    lines = [
        "# Compile report",
        "",
        f"Every shipped kernel config of {', '.join(KERNEL_MODULES)}, compiled without a GPU by triton "
        f"{triton.__version__} for sm_90 (sm_90a) and sm_80; registers, stack and spills from the wheel's "
        "ptxas -v on the PTX, shared memory as Triton allocates it, matrix instructions read off the PTX. "
        "Operands \"aligned\": pointers and strides known to be multiples of 16 bytes (marked by Triton's JIT, "
        "or for the attention kernels' strides by the kernel itself); \"any\": nothing marked, the worst case. "
        "A config is "
        "compiled for the (arch, operands) launches that run its tile (a name ends in the attention tile, "
        "BLOCK_M x BLOCK_N). Regenerate with `python -m bench.compile_report`.",
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


def main():
    started = time.perf_counter()
    results = compile_all()
    REPORT_PATH.parent.mkdir(parents=True, exist_ok=True)
    REPORT_PATH.write_text(to_markdown(results))
    failing = [r for r in results if problems(r)]
    for r in failing:
        print(f"PROBLEM {r['name']} sm_{r['arch']} {operands_name(r['aligned'])}: {'; '.join(problems(r))}")
    print(f"compiled {len(results)} (config, target) pairs in {time.perf_counter() - started:.0f} s; "
          f"{len(failing)} with problems; wrote {REPORT_PATH}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
