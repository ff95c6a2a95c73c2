"""tools.tiles.search's order of candidates and the verdict it searches with, tools.tiles.checks (no compiles here:
tests/test_compile_report.py compiles every shipped tile)."""

import pytest

from tools.tiles import checks, search, speed_model
from kernels.attention.tiles import BackwardTile, Tile


def test_forward_candidates_are_no_larger_and_hold_the_most_rows_first():
    rejected = Tile(128, 32, 8, 3)
    candidates = search.candidates("forward", rejected, 64)
    assert rejected not in candidates
    assert all(t.block_m * t.block_n <= rejected.block_m * rejected.block_n for t in candidates)
    assert candidates == sorted(candidates, key=lambda t: (-t.block_m, -t.block_n, -t.num_stages, -t.num_warps))
    assert candidates[0].block_m == 128


def test_backward_candidates_are_no_larger_and_hold_the_most_rows_first_together_before_apart_unsliced_first():
    rejected = BackwardTile(64, 128, 128, 64, 8, 3, False)
    candidates = search.candidates("backward", rejected, 64)
    assert rejected not in candidates
    assert all(t.head_slices == 1 for t in candidates)  # column slices are for head size 256 alone
    assert all(t.block_m1 * t.block_n1 <= 64 * 128 and t.block_m2 * t.block_n2 <= 128 * 64 for t in candidates)
    held = [min(t.block_n1, t.block_m2) for t in candidates]
    assert held == sorted(held, reverse=True) and held[0] == 128
    first = candidates[0]
    assert (first.block_m1, first.block_n1, first.block_m2, first.block_n2, first.dk_dv_apart) == \
        (64, 128, 128, 64, False)  # the same blocks, fewer stages or warps
    at_256 = search.candidates("backward", rejected, 256)
    same_blocks = [t.head_slices for t in at_256 if t[:7] == (64, 128, 128, 64, 8, 2, True)]
    assert same_blocks == [1, 2, 4]  # the fewest column slices first


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
    for head_dim, kernel in search.RANKED_LAUNCHES:
        ranked = search.rank_candidates(kernel, head_dim)
        assert ranked and not any(speed_model.duplicates_work(kernel, tile) for tile in ranked)
    assert BackwardTile(64, 128, 128, 64, 8, 3, False) in search.rank_candidates("backward", 64)  # FlexAttention's
    assert any(tile.dk_dv_apart for tile in search.rank_candidates("backward", 128))
    entries = [{"tile": [128, 64, 8, 1], "model_clocks": 100, "registers": 200},
               {"tile": [128, 64, 8, 3], "model_clocks": 100, "registers": 240},
               {"tile": [64, 64, 4, 3], "model_clocks": 90, "registers": 250},
               {"tile": [128, 32, 8, 3], "model_clocks": 100, "registers": 230}]
    assert [e["tile"] for e in sorted(entries, key=search.model_order)] == [
        [64, 64, 4, 3], [128, 32, 8, 3], [128, 64, 8, 3], [128, 64, 8, 1]]
