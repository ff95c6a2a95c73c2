"""Every shipped kernel config compiles for sm_90 and sm_80 without a GPU, with aligned operands and with any: without
register spills, within the arch's shared memory, and with wgmma on sm_90 when the operands are aligned
(bench/compile_report.py is the machinery; this only asserts on its results)."""

import pytest
import triton

from bench import compile_report

CONFIGS = compile_report.shipped_configs()
# Registers and spills are the compiler's: the shipped tiles are checked against the release they were tuned with.
pytestmark = pytest.mark.skipif(
    triton.__version__ != compile_report.TILES_CHECKED_WITH,
    reason=f"the tiles were checked with triton {compile_report.TILES_CHECKED_WITH}, this is {triton.__version__}: "
           "rerun bench.compile_report and retune before trusting them here",
)


@pytest.fixture(scope="module")
def compiled():
    """Every (config, target) compiled once, one worker per core, keyed by (config name, arch, aligned)."""
    return {(r["name"], r["arch"], r["aligned"]): r for r in compile_report.compile_all(CONFIGS)}


def test_every_op_ships_configs():
    assert {op for op, _, _ in CONFIGS} == set(compile_report.OPS)


@pytest.mark.parametrize("name, arch, aligned", [
    pytest.param(name, arch, aligned, id=f"{name}-sm_{arch}-{compile_report.operands_name(aligned)}")
    for _, name, targets in CONFIGS for arch, aligned in targets])
def test_shipped_config_compiles_cleanly(compiled, name, arch, aligned):
    result = compiled[(name, arch, aligned)]
    problems = "; ".join(compile_report.problems(result))
    assert not problems, f"{name} on sm_{arch}, {compile_report.operands_name(aligned)} operands: {problems}"

