"""bench/decode.py's parts that need no GPU: the points it measures, the bytes it counts, what it skips, the goals
and the markdown it writes from a run's results; and its refusal without a GPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import common, decode

REPO = Path(__file__).resolve().parent.parent


def test_sweep_covers_the_issues_shapes_and_quick_is_a_subset():
    points = decode.sweep_points()
    assert {(p["heads"], p["kv_heads"], p["head_dim"]) for p in points} == {(32, 8, 128), (8, 8, 128), (6, 6, 64)}
    assert {p["context"] for p in points} == {2**k for k in range(10, 18)}  # 1k ... 128k
    assert {p["batch"] for p in points} == {1, 4, 16, 64}
    assert len(points) == 3 * 8 * 4 and points[0]["heads"] == 32  # the goals' model first
    quick = decode.sweep_points(quick=True)
    assert 0 < len(quick) < len(points) and all(p in points for p in quick)


def test_bytes_are_the_whole_cache_read_once():
    point = dict(heads=32, kv_heads=8, head_dim=128, batch=2, context=131072)
    assert decode.cache_bytes(point) == 2 * 8 * 131072 * 128 * 2 * 2  # keys and values, bf16
    assert decode.memory_needed("triton", point) == decode.cache_bytes(point)
    # SDPA's math backend repeats the grouped key/value heads: a copy four times the cache besides it
    assert decode.memory_needed("sdpa-math", point) == 5 * decode.cache_bytes(point)


def test_points_that_do_not_fit_or_have_no_time_left_are_skipped():
    point = dict(heads=8, kv_heads=8, head_dim=128, batch=64, context=131072)  # 34 GB of cache
    budget = common.Budget(60)
    assert decode.skip_reason("triton", True, point, budget, free_bytes=80 * 2**30) is None
    assert "needs ~32 GiB, 40 GiB free" in decode.skip_reason("triton", True, point, budget, free_bytes=40 * 2**30)
    budget.start -= 61  # spent: only core providers
    assert decode.skip_reason("sdpa-math", False, point, budget, 80 * 2**30).startswith("skipped: time budget spent")
    assert decode.skip_reason("triton", True, point, budget, 80 * 2**30) is None


def _result(provider, batch, context, ms, status="ok"):
    point = dict(heads=32, kv_heads=8, head_dim=128, batch=batch, context=context, dtype="bf16",
                 group="H=32 H_KV=8 D=128")
    entry = {**point, "provider": provider, "status": status}
    if status == "ok":
        rate = common.gbps(decode.cache_bytes(point), ms)
        entry.update(ms=ms, gbps=rate, of_copy_ceiling=rate / 3000.0)
    return entry


def test_goals_and_markdown_from_a_run():
    results = []
    for batch, context, ours_ms, flash_ms in [(1, 1024, 0.01, 0.02), (1, 16384, 0.1, 0.09)]:
        point = [_result("triton", batch, context, ours_ms), _result("sdpa-flash", batch, context, flash_ms),
                 _result("sdpa-math", batch, context, None, status="skipped: time budget exhausted")]
        common.add_speedups(point, modes=None)
        results += point
    goals = decode.evaluate_goals(results)
    share_at_16k = results[3]["of_copy_ceiling"]
    assert goals[0]["measured"] == f"worst {share_at_16k:.0%}" and goals[0]["met"] is (share_at_16k >= 0.8)
    assert goals[1] == {"goal": "decode ahead of every SDPA backend at every point", "measured": "worst 0.90x",
                        "met": False}
    run = {"results": results, "goals": goals, "settings": {"warmup_ms": 5, "rep_ms": 30},
           "ceilings": {"matmul_bf16_tflops": 900.0, "matmul_shape": "8192x8192x8192 bf16", "copy_gbps": 3000.0},
           "environment": {"card": "NVIDIA H100", "compute_capability": "9.0", "multiprocessors": 132,
                           "driver": "1", "cuda": "12", "torch": "2", "triton": "3", "git_commit": "abc",
                           "date": "today"}}
    markdown = decode.to_markdown(run)
    assert "## H=32 H_KV=8 D=128" in markdown and "| batch | context | triton | sdpa-flash | sdpa-math |" in markdown
    assert f"| 1 | 1024 | {results[0]['gbps']:.0f} ({results[0]['of_copy_ceiling']:.0%}) |" in markdown
    assert "(2.00x)" in markdown and "(0.90x)" in markdown and "| skip |" in markdown
    assert "sdpa-math: skipped: time budget exhausted" in markdown


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is what a machine without a GPU sees")
def test_refuses_plainly_without_a_gpu():
    done = subprocess.run([sys.executable, "-m", "bench.decode", "--quick"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr and "Traceback" not in done.stderr


def test_generation_table_reads_the_cache_speedup():
    from bench import decode

    runs = decode.generation_runs()
    assert runs[0] == ("triton", 1, True) and len(runs) == 3 * 2 * 2
    results = [{"backend": "triton", "batch": 1, "use_cache": True, "tokens_per_s": 1000.0, "status": "ok"},
               {"backend": "triton", "batch": 1, "use_cache": False, "tokens_per_s": 50.0, "status": "ok"},
               {"backend": "eager", "batch": 1, "use_cache": True, "status": "skipped: time budget exhausted"}]
    table = decode.generation_markdown(results)
    assert "| triton | 1 | 1,000 | 50 | 20.0x |" in table and "| eager | 1 |" in table
