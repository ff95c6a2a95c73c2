"""tools/tiles/gpu_run.sh end to end without a GPU, in its dry run: every step runs its plumbing (a few tests, the
tuner's candidates checked on CPU, the suite's steps listed) and leaves its files in $OUT."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the real run is tools/tiles/gpu_run.sh itself")
def test_the_gpu_run_runs_dry_on_cpu(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path), "TRITON_INTERPRET": "1", "TUNE_S": "240"}
    result = subprocess.run(["bash", "tools/tiles/gpu_run.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    for name in ("env.txt", "tests.txt", "tests.xml", "tune.txt", "gpt-train.txt", "suite.txt", "results.tgz"):
        assert (tmp_path / name).is_file(), name
    assert "tests exit 0" in (tmp_path / "tests.txt").read_text()
    tune = (tmp_path / "tune.txt").read_text()
    assert "tune exit 0" in tune and "skipped" not in tune
    train = (tmp_path / "gpt-train.txt").read_text()
    assert "| defaults | none | " in train and "tokens/s" in train.split("| defaults |")[1].splitlines()[0]
    suite = (tmp_path / "suite.txt").read_text()
    assert "suite exit 0" in suite and "=== attention:" in suite and "=== decode:" in suite
