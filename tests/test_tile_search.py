"""tools.tiles.search's order of candidates and the verdict it searches with, tools.tiles.checks (no compiles here:
tests/test_compile_report.py compiles every shipped tile)."""

import pytest

from tools.tiles import checks, search, speed_model
from kernels.attention.tiles import Tile


@pytest.mark.parametrize("kernel, rejected", [("forward", Tile(128, 32, 8, 3)), ("dq", Tile(64, 64, 4, 2)),
                                              ("dk", Tile(32, 64, 4, 2)), ("dkdv", Tile(16, 128, 8, 2))])
def test_candidates_are_no_larger_and_hold_the_most_rows_first(kernel, rejected):
    def held_and_streamed(tile):
        return (tile.block_m, tile.block_n) if kernel in ("forward", "dq") else (tile.block_n, tile.block_m)

    candidates = search.candidates(kernel, rejected)
    assert rejected not in candidates
    assert all(t.block_m * t.block_n <= rejected.block_m * rejected.block_n for t in candidates)
    assert candidates == sorted(candidates, key=lambda t: (*(-x for x in held_and_streamed(t)), -t.num_stages,
                                                           -t.num_warps))
    assert held_and_streamed(candidates[0])[0] == 128


def _record(dtype, spill_bytes, **fields):
    return dict({"op": "attention", "kernel": "dk", "dtype": dtype, "arch": 80, "aligned": True, "mma_sync": True,
                 "wgmma": False, "duplicated": False, "shared_bytes": 1024, "spill_store_bytes": spill_bytes,
                 "spill_load_bytes": spill_bytes}, **fields)


def test_any_spill_rejects_a_16bit_tile_and_fp32_has_a_small_allowance():
    allowance = checks.FP32_SPILL_ALLOWANCE_BYTES
    assert checks.problems(_record("bfloat16", 4)) == ["spills 4 B stored / 4 B loaded"]
    assert checks.problems(_record("float16", 0)) == []
    assert checks.problems(_record("float32", allowance)) == []
    assert checks.problems(_record("float32", allowance + 4))


def test_sm90_rejects_mma_sync_and_repeated_work():
    assert checks.problems(_record("bfloat16", 0, arch=90))  # aligned, mma.sync only
    assert checks.problems(_record("bfloat16", 0, arch=90, wgmma=True, duplicated=True))
    assert checks.problems(_record("bfloat16", 0, arch=90, wgmma=True)) == []


def test_ranked_tiles_repeat_no_warpgroup_work_and_ties_go_to_more_stages():
    for kernel in ("forward", "dkdv", "dq"):
        ranked = search.rank_candidates(kernel)
        assert ranked and not any(speed_model.duplicates_work(kernel, *tile[:3]) for tile in ranked)
    entries = [{"tile": [128, 64, 8, 1], "model_clocks": 100, "registers": 200},
               {"tile": [128, 64, 8, 3], "model_clocks": 100, "registers": 240},
               {"tile": [64, 64, 4, 3], "model_clocks": 90, "registers": 250},
               {"tile": [128, 32, 8, 3], "model_clocks": 100, "registers": 230}]
    assert [e["tile"] for e in sorted(entries, key=search.model_order)] == [
        [64, 64, 4, 3], [128, 32, 8, 3], [128, 64, 8, 3], [128, 64, 8, 1]]
