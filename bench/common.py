"""What every GPU benchmark shares: the GPU check, timing, the card's two ceilings, the environment,
correctness checks, a time budget, and writing results (JSON + markdown) under bench/results/<card>/."""

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# do_bench's warm-up and measuring windows, in milliseconds. Small on purpose: the whole suite must finish in
# minutes, and a median over ~30 ms of calls is stable for kernels of micro- to milliseconds.
WARMUP_MS = 5
REP_MS = 30

# Largest relative error ||out - ref|| / ||ref|| a measured output may have against the fp32 reference
# (the usual ranges: bf16 operands 1e-3..1e-2, tf32 ~3e-4); outputs beyond it are reported, never timed.
RELATIVE_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float32: 2e-3}

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def require_gpu(command):
    """Exit with a plain message (no traceback) when no CUDA device is visible."""
    if not torch.cuda.is_available():
        print(
            f"{command} needs a CUDA GPU, and none is visible here (torch.cuda.is_available() is False).\n"
            "Run it on a machine with an NVIDIA GPU; `python -m tools.tiles.report` works without one.",
            file=sys.stderr,
        )
        raise SystemExit(2)


def parser(description, default_budget_s):
    """The arguments every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a few points of each sweep, to check the script runs")
    p.add_argument(
        "--budget-s",
        type=float,
        default=default_budget_s,
        help="wall-clock seconds after which optional competitors are skipped (recorded as such)",
    )
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<card>/)")
    return p


class Budget:
    """A benchmark's wall-clock allowance. Once `spent`, only the core comparisons are measured; once
    `exhausted` (1.5x), nothing more is, and the remaining points are recorded as skipped."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.start

    def spent(self):
        return self.elapsed() > self.seconds

    def exhausted(self):
        return self.elapsed() > 1.5 * self.seconds

    def skip_reason(self, core):
        """Why a point is not measured now (the status to record), or None: a core comparison runs until the
        budget is exhausted, any other until it is spent."""
        if self.exhausted():
            return "skipped: time budget exhausted"
        if self.spent() and not core:
            return "skipped: time budget spent (only core providers measured)"
        return None


def configure_torch_compile():
    """torch.compile settings for competitors compiled once per static shape: keep every shape's graph (instead of
    falling back to eager after a few recompiles), and keep compiled backward graphs replayable with
    retain_graph=True (donated buffers forbid it) so the backward can be timed alone like every other provider's."""
    import torch._dynamo
    import torch._functorch.config

    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 1024)
    if hasattr(torch._functorch.config, "donated_buffer"):
        torch._functorch.config.donated_buffer = False


def median_ms(fn, grad_to_none=None, warmup=WARMUP_MS, rep=REP_MS):
    """Median time of `fn()` in milliseconds: triton.testing.do_bench (CUDA events, L2 flushed between calls)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def tflops(flops, ms):
    return flops / (ms * 1e-3) / 1e12


def gbps(num_bytes, ms):
    return num_bytes / (ms * 1e-3) / 1e9


def peak_memory_bytes(fn):
    """Peak memory one call of `fn` allocates beyond what was live before it (its result included)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak


MODES = ("fwd", "bwd", "fwd+bwd")


def measure_modes(forward, backward, grads, metrics):
    """Peak memory of one forward+backward, then the median times of the forward, the backward alone (replaying
    one kept graph) and both. forward() returns the outputs; backward(outputs, retain_graph) runs their backward;
    grads are the leaves whose .grad is cleared between calls; metrics(mode, ms) gives the derived numbers.
    A mode that fails (say, a compiled graph refusing retain_graph) is recorded on its own."""
    peak = peak_memory_bytes(lambda: backward(forward(), False))
    outputs = forward()
    calls = {
        "fwd": lambda: median_ms(forward),
        "bwd": lambda: median_ms(lambda: backward(outputs, True), grad_to_none=grads),
        "fwd+bwd": lambda: median_ms(lambda: backward(forward(), False), grad_to_none=grads),
    }
    timings = {}
    for mode, timed in calls.items():
        try:
            ms = timed()
            timings[mode] = {"ms": ms, **metrics(mode, ms)}
        except Exception as exc:  # noqa: BLE001 - any failure is a result to record
            timings[mode] = {"status": describe_failure(exc)}
        for t in grads:
            t.grad = None
    return peak, timings


def add_speedups(results, ours="triton", modes=MODES):
    """On every competitor's entry of one point: how many times faster ours is (its time / ours), per mode; or,
    with modes=None, for results timed one way (their "ms" on the entry itself), one number."""
    mine = next((r for r in results if r["provider"] == ours and r["status"] == "ok"), None)
    for r in results:
        if mine is None or r is mine or r["status"] != "ok":
            continue
        if modes is None:
            r["ours_speedup"] = r["ms"] / mine["ms"]
        else:
            r["ours_speedup"] = {m: r[m]["ms"] / mine[m]["ms"] for m in modes if "ms" in r[m] and "ms" in mine[m]}


def short_status(entry):
    """A table cell's word for an entry (or a mode) without a number."""
    if entry is None:
        return "—"
    return {"skipped": "skip", "failed": "fail", "wrong": "WRONG"}.get(entry["status"].split()[0].rstrip(":"), "—")


def not_measured_notes(results):
    """Every distinct reason a provider or one of its modes has no number, as markdown bullets."""
    notes = {f"{r['provider']}: {r['status']}" for r in results if r["status"] != "ok"}
    notes |= {f"{r['provider']} {m}: {r[m]['status']}" for r in results for m in MODES if "status" in r.get(m, {})}
    return "\n".join(f"- {note}" for note in sorted(notes))


def relative_error(out, ref):
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_close(name, out, ref, dtype):
    """Relative error of `out` against `ref`; raises ValueError when it is beyond the dtype's tolerance or NaN."""
    err = relative_error(out, ref)
    tolerance = RELATIVE_TOLERANCE[dtype]
    if not err <= tolerance:  # also catches NaN
        raise ValueError(f"wrong output: {name} relative error {err:.2e} > {tolerance:.0e}")
    return err


def describe_failure(exc):
    """One line for a result's status: what went wrong, without a traceback."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "failed: out of memory"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if message.startswith("wrong output"):
        return message
    return f"failed: {type(exc).__name__}: {message[:200]}"


def measure_ceilings():
    """The card's two ceilings, measured in this run: an 8192^3 bf16 matrix product (TFLOP/s) and a 1 GiB
    device-to-device copy (GB/s counting bytes read plus bytes written)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    matmul_ms = median_ms(lambda: a @ b, warmup=25, rep=200)
    del a, b
    src = torch.randn(2**28, device="cuda")  # 1 GiB of fp32
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), warmup=25, rep=200)
    copy_bytes = 2 * src.numel() * src.element_size()
    del src, dst
    torch.cuda.empty_cache()
    return {
        "matmul_bf16_tflops": tflops(2 * n**3, matmul_ms),
        "matmul_shape": f"{n}x{n}x{n} bf16",
        "copy_gbps": gbps(copy_bytes, copy_ms),
        "copy_bytes_read_plus_written": copy_bytes,
    }


def card_slug(name):
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': the results folder of a card."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _command_output(args):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment():
    """The card, driver, versions and date a result belongs to."""
    import triton

    props = torch.cuda.get_device_properties(0)
    driver = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return {
        "card": props.name,
        "card_slug": card_slug(props.name),
        "compute_capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": driver.splitlines()[0] if driver else "unknown",
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "git_commit": _command_output(["git", "-C", str(RESULTS_DIR.parent), "rev-parse", "--short", "HEAD"]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def start(command, description, default_budget_s):
    """Parse arguments, refuse without a GPU, record the environment and the ceilings. Returns (args, run) where
    run is the dict that becomes the JSON file."""
    args = parser(description, default_budget_s).parse_args()
    require_gpu(command)
    env = environment()
    print(f"{command}: {env['card']}, driver {env['driver']}, torch {env['torch']}, triton {env['triton']}", flush=True)
    ceilings = measure_ceilings()
    print(
        f"ceilings: bf16 matmul {ceilings['matmul_bf16_tflops']:.0f} TFLOP/s, copy {ceilings['copy_gbps']:.0f} GB/s",
        flush=True,
    )
    run = {"benchmark": command, "environment": env, "ceilings": ceilings, "settings": {"quick": args.quick}}
    run["settings"].update(warmup_ms=WARMUP_MS, rep_ms=REP_MS, budget_s=args.budget_s, timing="do_bench median")
    return args, run


def fmt(value, digits=1):
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def comparison_rows(by_provider, names, key, cell, ceiling_field, ours="triton"):
    """Markdown rows, one per mode, for one point of a sweep: each provider's rate (`cell(entry, mode)`
    formats it) with ours' speedup over it, or a short word for why it has none; last, ours as a fraction of
    the card's ceiling (`ceiling_field`). by_provider: provider name -> result entry at this point; key: the
    point's label (a sequence length, a width)."""
    rows = []
    for mode in MODES:
        row = [key, mode]
        for name in names:
            entry = by_provider.get(name)
            if entry is None or entry["status"] != "ok":
                row.append(short_status(entry))
            else:
                speedup = entry.get("ours_speedup", {}).get(mode)
                row.append(cell(entry, mode) + (f" ({speedup:.2f}x)" if speedup else ""))
        mine = by_provider.get(ours)
        ok = mine and mine["status"] == "ok" and ceiling_field in mine[mode]
        row.append(f"{mine[mode][ceiling_field]:.0%}" if ok else "—")
        rows.append(row)
    return rows


def markdown_header(run, title):
    env, ceil = run["environment"], run["ceilings"]
    return "\n".join(
        [
            f"# {title}",
            "",
            f"{env['card']} (compute capability {env['compute_capability']}, {env['multiprocessors']} SMs), "
            f"driver {env['driver']}, CUDA {env['cuda']}, torch {env['torch']}, triton {env['triton']}, "
            f"commit {env['git_commit']}, {env['date']}.",
            f"Ceilings measured in this run: bf16 matmul {ceil['matmul_bf16_tflops']:.0f} TFLOP/s "
            f"({ceil['matmul_shape']}), device-to-device copy {ceil['copy_gbps']:.0f} GB/s (read + written).",
            f"Timing: triton.testing.do_bench median, warm-up {run['settings']['warmup_ms']} ms, "
            f"{run['settings']['rep_ms']} ms of repetitions; every output checked against the reference first.",
            "",
        ]
    )


def goals_markdown(goals):
    rows = [[g["goal"], g["measured"], "yes" if g["met"] else ("no" if g["met"] is False else "not measured")]
            for g in goals]
    return "## Goals (recorded, not asserted)\n\n" + markdown_table(["goal", "measured", "met"], rows)


def write_results(run, name, markdown, out_dir=None):
    """Write <name>.json and <name>.md under bench/results/<card>/ (or out_dir) and print the markdown."""
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR / run["environment"]["card_slug"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(run, indent=1) + "\n")
    (out_dir / f"{name}.md").write_text(markdown + "\n")
    print(markdown)
    print(f"\nwrote {out_dir / (name + '.json')} and {name}.md", flush=True)
    return out_dir
