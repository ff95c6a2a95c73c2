"""`python -m bench.plot`: help, and a clear error for a folder that is not a results folder (it needs no GPU,
and matplotlib only once it draws)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def plot(*argv):
    return subprocess.run([sys.executable, "-m", "bench.plot", *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=60)  # fmt: skip


def test_help():
    result = plot("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m bench.plot") and "bench/results/<card>/" in result.stdout


def test_a_missing_folder_is_named(tmp_path):
    result = plot(str(tmp_path / "nvidia-nothing"))
    assert result.returncode == 2
    assert result.stderr == (f"bench.plot: error: {tmp_path / 'nvidia-nothing'} does not exist; it should be a "
                             f"results folder (bench/results/<card>/, with the JSON files a GPU run wrote)\n")


def test_a_file_is_not_a_folder():
    result = plot("README.md")
    assert result.returncode == 2
    assert result.stderr.startswith("bench.plot: error: README.md is a file, not a results folder")
