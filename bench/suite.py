"""python -m bench.suite: the whole GPU suite in one command, for whoever is lent a GPU.

    1. the test suite on CUDA (tests/test_compile_report.py left out: it needs no GPU and CI runs it)
    2. python -m bench.attention, bench.layernorm, bench.train, bench.decode, with time budgets shared out of what
       the tests left of --total-s (default 450 s, under the 8 minutes an H100 is given for it): once a benchmark's
       budget is spent it measures only the core comparisons, past 1.5x nothing more, and records what it skipped
    3. pytest bench --benchmark-only (the headline shapes; JSON next to the other results)
    4. python -m bench.plot on the results folder, when matplotlib is importable (else it says so)
Every step runs even when an earlier one fails; the exit status is non-zero if any did. Results land in
bench/results/<card>/ (with suite.md, the steps' times); on the lent machine copy them out, e.g.
`PYTHONPATH=. python -m bench.suite; tar czf $OUT/results.tgz bench/results`.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import common

REPO = Path(__file__).resolve().parent.parent
# Shares of the benchmarks' time, and the seconds set aside for each one's start-up (imports, ceilings, writing)
# and for the headline benchmarks and plots.
SHARES = {"attention": 0.4, "layernorm": 0.15, "train": 0.25, "decode": 0.2}
STARTUP_S = 20
TAIL_S = 60


def run_step(name, command, steps, dry_run=False):
    print(f"\n=== {name}: {' '.join(command)}", flush=True)
    if dry_run:  # the plumbing only: what would run, with what budget
        steps.append({"step": name, "seconds": 0.0, "exit_code": 0})
        return 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    code = subprocess.run(command, cwd=REPO, env=env).returncode
    steps.append({"step": name, "seconds": time.perf_counter() - started, "exit_code": code})
    print(f"=== {name}: exit {code} after {steps[-1]['seconds']:.0f} s", flush=True)
    return code


def main():
    p = argparse.ArgumentParser(description="the CUDA test suite, then every benchmark, then the plots")
    p.add_argument("--total-s", type=float, default=450, help="wall-clock target for the whole suite")
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    p.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    p.add_argument("--dry-run", action="store_true", help="no GPU needed: print each step and its budget, run none")
    args = p.parse_args()
    if not args.dry_run:
        common.require_gpu("bench.suite")
    started = time.perf_counter()
    card = "dry-run" if args.dry_run else common.card_slug(torch.cuda.get_device_name(0))
    results_dir = common.RESULTS_DIR / card
    steps = []
    python = sys.executable
    if not args.skip_tests:
        run_step("tests (CUDA)", [python, "-m", "pytest", "-q", "tests", "--ignore=tests/test_compile_report.py"],
                 steps, args.dry_run)
    for i, (bench_name, share) in enumerate(SHARES.items()):
        # What is left goes to this benchmark and the ones after it by their shares (so time one leaves unused
        # passes on); a benchmark may overrun its budget by half while finishing core points, hence the 1.5.
        later = list(SHARES.values())[i:]
        left = args.total_s - (time.perf_counter() - started) - TAIL_S - STARTUP_S * len(later)
        budget = max(20.0, left * share / sum(later) / 1.5)
        command = [python, "-m", f"bench.{bench_name}", "--budget-s", f"{budget:.0f}"] + (["--quick"] if args.quick
                                                                                          else [])
        run_step(bench_name, command, steps, args.dry_run)
    run_step("headline (pytest-benchmark)", [python, "-m", "pytest", "-q", "bench", "--benchmark-only",
                                             f"--benchmark-json={results_dir / 'headline.json'}"], steps, args.dry_run)
    try:
        import matplotlib  # noqa: F401

        run_step("plots", [python, "-m", "bench.plot", str(results_dir)], steps, args.dry_run)
    except ImportError:
        print("\n=== plots: skipped, matplotlib is not installed here; run `python -m bench.plot "
              f"{results_dir.relative_to(REPO)}` where it is", flush=True)
    total = time.perf_counter() - started
    table = common.markdown_table(["step", "seconds", "exit code"],
                                  [[s["step"], f"{s['seconds']:.0f}", s["exit_code"]] for s in steps])
    summary = f"# GPU suite\n\n{total:.0f} s in all (target {args.total_s:.0f} s).\n\n{table}\n"
    if not args.dry_run:
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / "suite.md").write_text(summary)
    print("\n" + summary)
    return 1 if any(s["exit_code"] for s in steps) else 0


if __name__ == "__main__":
    sys.exit(main())
