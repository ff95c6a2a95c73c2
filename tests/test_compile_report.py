"""Every shipped kernel config compiles for sm_90 and sm_80 without a GPU, without register spills, and within the
arch's shared memory (bench/compile_report.py is the machinery; this only asserts on its results)."""

import pytest

from bench import compile_report

CONFIGS = compile_report.shipped_configs()


@pytest.fixture(scope="module")
def compiled():
    """Every (config, arch) compiled once, one worker per core, keyed by (config name, arch)."""
    return {(r["name"], r["arch"]): r for r in compile_report.compile_all(CONFIGS)}


def test_every_kernel_module_ships_configs():
    modules = {module for module, _, _ in CONFIGS}
    assert modules == set(compile_report.KERNEL_MODULES)


@pytest.mark.parametrize("name, arch", [pytest.param(name, arch, id=f"{name}-sm_{arch}")
                                        for _, name, archs in CONFIGS for arch in archs])
def test_shipped_config_compiles_without_spills(compiled, name, arch):
    result = compiled[(name, arch)]
    assert not compile_report.problems(result), f"{name} on sm_{arch}: {'; '.join(compile_report.problems(result))}"

