"""pyproject.toml: the license in the current form (an SPDX string and license-files), which setuptools reads
without a deprecation warning, and a build requirement on the setuptools that first reads it."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")


def test_license_is_an_spdx_string_with_its_file():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "MIT"
    assert all((REPO / name).is_file() for name in pyproject["project"]["license-files"])
    assert "setuptools>=77" in pyproject["build-system"]["requires"]  # 77 is the first to read the SPDX form


def test_metadata_builds_without_a_warning(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} predates the SPDX license form (pip builds with >= 77)")
    build = f"from setuptools import build_meta; build_meta.prepare_metadata_for_build_wheel({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-W", "error", "-c", build], capture_output=True, text=True, cwd=REPO,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    metadata = next(tmp_path.glob("*.dist-info")).joinpath("METADATA").read_text()
    assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata
