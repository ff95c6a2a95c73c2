"""Every shipped kernel config compiles for sm_90 and sm_80 without a GPU, with aligned operands and with any: without
register spills, within the arch's shared memory, and with wgmma on sm_90 when the operands are aligned
(tools/tiles/ is the machinery, tools.tiles.checks the verdict; this only asserts on its results)."""

import pytest
import triton

from tools.tiles import checks, configs
from tools.tiles.compile import compile_all

CONFIGS = configs.shipped_configs()
# Registers and spills are the compiler's: the shipped tiles are checked against the release they were tuned with.
pytestmark = pytest.mark.skipif(
    triton.__version__ != checks.TILES_CHECKED_WITH,
    reason=f"the tiles were checked with triton {checks.TILES_CHECKED_WITH}, this is {triton.__version__}: "
           "rerun tools.tiles.report and retune before trusting them here",
)


@pytest.fixture(scope="module")
def compiled():
    """Every (config, target) compiled once, one worker per core, keyed by (config name, arch, aligned)."""
    return {(r["name"], r["arch"], r["aligned"]): r for r in compile_all(CONFIGS)}


def test_every_op_ships_configs():
    assert {entry["op"] for entry in CONFIGS} == set(configs.OPS)


@pytest.mark.parametrize("name, arch, aligned", [
    pytest.param(entry["name"], arch, aligned, id=f"{entry['name']}-sm_{arch}-{configs.operands_name(aligned)}")
    for entry in CONFIGS for arch, aligned in entry["targets"]])
def test_shipped_config_compiles_cleanly(compiled, name, arch, aligned):
    result = compiled[(name, arch, aligned)]
    problems = "; ".join(checks.problems(result))
    assert not problems, f"{name} on sm_{arch}, {configs.operands_name(aligned)} operands: {problems}"


def test_the_model_ranking_is_current_and_the_model_chosen_tiles_are_its_best(compiled):
    """bench/results/model_ranking.json (`python -m tools.tiles.search --rank`) agrees with this compile: every
    shipped headline tile it ranks models as many clocks now as when it was ranked (else the kernels changed
    since: rerun the ranking), and every tile the table says the model chose is the ranking's best clean tile."""
    from tools.tiles import report, search

    ranking = search.load_ranking()
    assert ranking is not None, "bench/results/model_ranking.json is missing: python -m tools.tiles.search --rank"
    for launch in ranking:
        head_dim, kernel = launch["head_dim"], launch["kernel"]
        rule = report.headline_rule(head_dim, kernel)
        if rule is None:
            continue
        name = configs.attention_config("bfloat16", head_dim, kernel, "causal", False, rule.tile, True, (90,))["name"]
        ranked = {configs.as_tile(kernel, e["tile"]): e for e in launch["candidates"]}
        assert ranked[tuple(rule.tile)]["model_clocks"] == compiled[(name, 90, True)]["model_clocks"], \
            f"{name}: the ranking is stale, rerun python -m tools.tiles.search --rank"
        if rule.chosen_by == "model":
            assert rule.tile == configs.as_tile(kernel, search.clean_ranked(launch)[0]["tile"]), name
