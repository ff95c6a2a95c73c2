"""bench/layernorm.py's parts that need no GPU: the shapes it measures, the bytes it counts, the goals and the
markdown it writes from a run's results; and its refusal without a GPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import common, layernorm

REPO = Path(__file__).resolve().parent.parent


def test_sweep_covers_the_model_shapes_and_a_bandwidth_bound_one_and_quick_is_a_subset():
    points = layernorm.sweep_points()
    shapes = {(rows, width) for _, _, _, rows, width in points}
    assert (64 * 256, 384) in shapes and (16 * 1024, 768) in shapes  # the reference GPT's and its large config's
    bound = [(rows, width) for _, _, shape, rows, width in points if shape == layernorm.BANDWIDTH_BOUND]
    assert {rows for rows, _ in bound} == {65536} and max(width for _, width in bound) >= 16384
    assert min(rows * width for rows, width in bound) * 2 >= 48 * 2**20  # every point moves 48 MB and more
    assert (4096, 384) in shapes  # the launch-bound history
    assert {op for op, *_ in points} == {"layer_norm", "add_layer_norm", "rms_norm"}
    assert {dtype for _, dtype, *_ in points} == {"bf16", "fp16", "fp32"} and points[0][1] == "bf16"
    assert points[0][2:] == ("GPT (64 x 256 tokens)", 16384, 384)  # the model shapes first
    quick = layernorm.sweep_points(quick=True)
    assert 0 < len(quick) < len(points) and all(p in points for p in quick)
    assert {p[2] for p in quick} == set(layernorm.SHAPES)  # every shape, fewer widths


def test_bytes_are_each_input_read_and_each_output_written_once():
    rows, width, size = 16384, 768, 2
    big, small = rows * width * size, width * size
    assert layernorm.norm_bytes("layer_norm", rows, width, size, "fwd") == 2 * big + 2 * small
    assert layernorm.norm_bytes("layer_norm", rows, width, size, "bwd") == 3 * big + 3 * small
    assert layernorm.norm_bytes("add_layer_norm", rows, width, size, "fwd+bwd") == 8 * big + 5 * small
    assert layernorm.norm_bytes("rms_norm", rows, width, size, "fwd+bwd") == 5 * big + 3 * small  # no bias


def _entry(provider, shape, rows, width, fwd_share, bwd_share, status="ok"):
    entry = {"op": "layer_norm", "dtype": "bf16", "shape": shape, "rows": rows, "width": width,
             "provider": provider, "status": status}
    if status == "ok":
        for mode, share in (("fwd", fwd_share), ("bwd", bwd_share), ("fwd+bwd", (fwd_share + bwd_share) / 2)):
            entry[mode] = {"ms": 1.0 / share, "gbps": 3000.0 * share, "of_copy_ceiling": share}
    return entry


def test_goals_and_markdown_from_a_run():
    bound, rows = layernorm.BANDWIDTH_BOUND, 65536
    results = []
    for width, ours, torch_share in [(384, (0.5, 0.4), (0.6, 0.5)), (1024, (0.92, 0.85), (0.8, 0.5)),
                                     (16384, (0.95, 0.78), (0.9, 0.6))]:
        point = [_entry("triton", bound, rows, width, *ours), _entry("torch", bound, rows, width, *torch_share),
                 _entry("torch-compile", bound, rows, width, 0, 0, status="skipped: time budget exhausted")]
        common.add_speedups(point)
        results += point
    goals = layernorm.evaluate_goals(results, {"copy_gbps": 3000.0})
    assert goals[0]["measured"] == "worst 92% of 3000 GB/s" and goals[0]["met"] is True
    assert goals[1]["measured"] == "worst 78% of 3000 GB/s" and goals[1]["met"] is False  # width 384 not counted
    assert goals[2]["measured"] == "worst 0.80x" and goals[2]["met"] is False  # slower than torch at 384
    run = {"results": results, "goals": goals, "settings": {"warmup_ms": 5, "rep_ms": 30},
           "ceilings": {"matmul_bf16_tflops": 900.0, "matmul_shape": "8192x8192x8192 bf16", "copy_gbps": 3000.0},
           "environment": {"card": "NVIDIA H100", "compute_capability": "9.0", "multiprocessors": 132,
                           "driver": "1", "cuda": "12", "torch": "2", "triton": "3", "git_commit": "abc",
                           "date": "today"}}
    markdown = layernorm.to_markdown(run)
    assert f"## layer_norm bf16, {bound}" in markdown
    assert "| width | mode | triton | torch | torch-compile | %copy |" in markdown
    assert "torch-compile: skipped: time budget exhausted" in markdown


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is what a machine without a GPU sees")
def test_refuses_plainly_without_a_gpu():
    done = subprocess.run([sys.executable, "-m", "bench.layernorm", "--quick"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr and "Traceback" not in done.stderr
