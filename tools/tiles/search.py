"""python -m tools.tiles.search: for every attention launch whose table tile (kernels/attention/tiles.py) the compile
report rejects, find the largest tile that compiles cleanly, offline, no GPU needed.

A launch key is what a TileRule can tell apart: precision, padded head size, kernel, dropout, arch (90, or 80 for
every other) and operand alignment. A tile is clean for a key when every compile the report makes of it passes
`checks.problems` (no spills, shared memory within the arch's limit, wgmma on sm_90 with aligned operands, no
duplicated warpgroup work): each dtype of the precision under each of configs.ATTENTION_MASKS, compiled exactly as
the report compiles it (configs.attention_config and compile.compile_entry).

Candidates are no larger than the rejected tile (each of its blocks of (query, key) pairs), tried in the order
`candidates` gives; the first clean one is printed as the replacement. A tile that passes is left alone (timed or
modelled faster). The result is a proposal for the attention TABLE, which a person edits (merging keys into rules, with each rule's reason);
rerun `python -m tools.tiles.report` after. Registers are tight enough that one stage or warp more or less can
decide a spill, so a tile clean for one key is not assumed clean for its neighbours: the report checks them all.

`--rank` ranks instead, by the speed model (tools/tiles/speed_model.py), every candidate tile of the headline
launches (HEADLINE_LAUNCH: 16-bit, sm_90, aligned operands, no dropout; head sizes 64 and 128; forward and
backward, the backward's tiles paired as FlexAttention's autotuning pairs them, (M, N, N, M), dK and dV apart or
not at head size 128): each tile whose wgmma work no warpgroup repeats is compiled in bf16 under the causal mask (the
model's config), sorted by modelled clocks per 128 x 128 block, and the best RANKED_CLEAN that are clean in every
variant of the key are kept with the rest's clocks. It writes RANKING_PATH, which the compile report shows (the
model's best and runner-up beside each shipped tile) and tools.tiles.tune reads (the candidates it times on a GPU).
"""

import argparse
import itertools
import json

from bench.common import RESULTS_DIR
from tools.tiles import checks, configs, speed_model
from tools.tiles.compile import WORKERS, compile_entry, worker_pool

BLOCK_SIZES = (16, 32, 64, 128)
WARPS = (4, 8)
STAGES = (1, 2, 3)
# Column slices of the head a backward candidate may split dK and dV into (head size 256 only).
HEAD_SLICES = (1, 2, 4)
# The compiles most likely to fail come first (the windowed, packed mask has the most scalar state), so a
# candidate is usually rejected by its first compile.
MASKS_MOST_DEMANDING_FIRST = ("window_varlen", "causal")
RANKING_PATH = RESULTS_DIR / "model_ranking.json"
# The headline launches' (dropout, arch, aligned operands), 16-bit and causal: what the model ranks and the compile
# report's headline rows show.
HEADLINE_LAUNCH = (False, 90, True)
# The headline launches the model ranks: (padded head size, kernel) under HEADLINE_LAUNCH.
RANKED_LAUNCHES = ((64, "forward"), (64, "backward"), (128, "forward"), (128, "backward"))
# How many clean tiles a ranking keeps per launch: the best, the runner-up and one more for tools.tiles.tune to time.
RANKED_CLEAN = 3
# Candidates checked for cleanliness at once (in parallel), best first, until RANKED_CLEAN are clean.
RANK_CHECK_BATCH = 6


def launch_keys():
    """Every (precision, head size, kernel, dropout, arch, aligned) the attention launchers can pick a tile for."""
    from kernels._gpu import CHECKED_ARCHS
    from kernels.attention.tiles import copies_misaligned_operands

    for precision, head_dim in itertools.product(("16bit", "fp32"), configs.HEAD_DIMS):
        for dropout, arch, aligned in itertools.product((False, True), CHECKED_ARCHS, (True, False)):
            for kernel in configs.ATTENTION_KERNELS:
                if aligned or not copies_misaligned_operands(kernel, head_dim, precision):
                    yield precision, head_dim, kernel, dropout, arch, aligned


def _dtype_names(precision):
    return ("bfloat16", "float16") if precision == "16bit" else ("float32",)


def table_tile(key):
    import torch

    from kernels.attention import tiles

    precision, head_dim, kernel, dropout, arch, aligned = key
    return tiles.table_tile(kernel, head_dim, getattr(torch, _dtype_names(precision)[0]), dropout, arch, aligned)


def tile_problems(key, tile):
    """The first compile of `tile` for `key` that the report rejects, as "config: problems", or None if all pass."""
    precision, head_dim, kernel, dropout, arch, aligned = key
    for mask_name, dtype_name in itertools.product(MASKS_MOST_DEMANDING_FIRST, _dtype_names(precision)):
        entry = configs.attention_config(dtype_name, head_dim, kernel, mask_name, dropout, tile, aligned, (arch,))
        found = checks.problems(compile_entry(entry, arch, aligned))
        if found:
            return f"{entry['name']}: {'; '.join(found)}"
    return None


def candidates(kernel, rejected, head_dim):
    """Tiles no larger than `rejected` (each block of (query, key) pairs no larger than its), in the order they are
    tried: most rows held first (each program reads the whole streamed operand once, so the traffic falls with the
    rows it holds), then most rows streamed per step (fewer loop iterations), dK and dV together before apart,
    fewest column slices of the head (at head size 256, the only one they are for), then most stages, then most
    warps."""
    from kernels.attention.tiles import MAX_HEAD_SIZE, BackwardTile, Tile

    if kernel == "forward":
        found = [Tile(m, n, w, s) for m, n, w, s in itertools.product(BLOCK_SIZES, BLOCK_SIZES, WARPS, STAGES)
                 if m * n <= rejected.block_m * rejected.block_n]
    else:
        slices = HEAD_SLICES if head_dim == MAX_HEAD_SIZE else (1,)
        found = [BackwardTile(*blocks, w, s, apart, sliced)
                 for blocks in itertools.product(BLOCK_SIZES, repeat=4)
                 for w, s, apart, sliced in itertools.product(WARPS, STAGES, (False, True), slices)
                 if blocks[0] * blocks[1] <= rejected.block_m1 * rejected.block_n1
                 and blocks[2] * blocks[3] <= rejected.block_m2 * rejected.block_n2]
    return sorted((tile for tile in found if tile != rejected), key=lambda tile: _search_order(kernel, tile))


def _search_order(kernel, tile):
    if kernel == "forward":
        return -tile.block_m, -tile.block_n, -tile.num_stages, -tile.num_warps
    held, streamed = (tile.block_n1, tile.block_m2), (tile.block_m1, tile.block_n2)
    return -min(held), -sum(held), -sum(streamed), tile.dk_dv_apart, tile.head_slices, -tile.num_stages, \
        -tile.num_warps


def search(key):
    """(key, table tile, its problem or None, the first clean candidate or None)."""
    current = table_tile(key)
    problem = tile_problems(key, current)
    if problem is None:
        return key, current, None, None
    clean = (tile for tile in candidates(key[2], current, key[1]) if tile_problems(key, tile) is None)
    return key, current, problem, next(clean, None)


def rank_candidates(kernel, head_dim):
    """The tiles the model ranks for a headline launch: the forward's of BLOCK_SIZES x WARPS x STAGES, the
    backward's paired (M, N, N, M) as FlexAttention's autotuning pairs them, dK and dV apart as well from head
    size 128 (where their two accumulators together are 128 registers per thread); each tile whose warpgroups do
    not repeat each other's wgmma work."""
    from kernels.attention.tiles import BackwardTile, Tile

    if kernel == "forward":
        tiles = [Tile(m, n, w, s) for m, n, w, s in itertools.product(BLOCK_SIZES, BLOCK_SIZES, WARPS, STAGES)]
    else:
        apart = (False, True) if head_dim >= 128 else (False,)
        tiles = [BackwardTile(m, n, n, m, w, s, a)
                 for m, n, w, s, a in itertools.product(BLOCK_SIZES, BLOCK_SIZES, WARPS, STAGES, apart)]
    return [tile for tile in tiles if not speed_model.duplicates_work(kernel, tile)]


def model_reading(task):
    """(head size, kernel, tile, the model's reading of its bf16 causal compile for sm_90 with aligned operands)."""
    head_dim, kernel, tile = task
    entry = configs.attention_config("bfloat16", head_dim, kernel, "causal", False, tile, True, (90,))
    result = compile_entry(entry, 90, True)
    reading = {field: result.get(field) for field in ("model_clocks", "limiter", "registers")}
    return head_dim, kernel, tile, reading


def model_order(entry):
    """Fewest modelled clocks first; among equals, more stages (the model assumes the overlap of loads and
    products that stages buy), then fewer registers."""
    stages = entry["tile"][3] if len(entry["tile"]) == 4 else entry["tile"][5]
    return entry["model_clocks"], -stages, entry["registers"]


def rank(pool):
    """The ranking RANKING_PATH holds: per headline launch, its candidates in model_order, each with its reading
    and, for the best ones until RANKED_CLEAN are clean, whether every variant of the key compiles cleanly
    ("clean": true, or the first problem)."""
    tasks = [(head_dim, kernel, tile) for head_dim, kernel in RANKED_LAUNCHES
             for tile in rank_candidates(kernel, head_dim)]
    readings = {}
    for head_dim, kernel, tile, reading in pool.map(model_reading, tasks):
        readings.setdefault((head_dim, kernel), []).append({"tile": list(tile), **reading})
    ranking = []
    for (head_dim, kernel), entries in readings.items():
        entries = sorted((e for e in entries if e["model_clocks"] is not None), key=model_order)
        key = ("16bit", head_dim, kernel, *HEADLINE_LAUNCH)
        checked = 0
        while checked < len(entries) and sum(e.get("clean") is True for e in entries) < RANKED_CLEAN:
            batch = entries[checked:checked + RANK_CHECK_BATCH]
            for entry, problem in zip(batch, pool.map(tile_problems, [key] * len(batch),
                                                      [configs.as_tile(kernel, e["tile"]) for e in batch])):
                entry["clean"] = problem or True
            checked += len(batch)
        ranking.append({"head_dim": head_dim, "kernel": kernel, "candidates": entries})
    return ranking


def clean_ranked(launch):
    """A ranked launch's RANKED_CLEAN best clean tiles, in model_order."""
    return [entry for entry in launch["candidates"] if entry.get("clean") is True][:RANKED_CLEAN]


def ranked_cells(launch):
    """A ranked launch's best clean tiles as table cells, "tile clocks (limiters)", padded with "—" to
    RANKED_CLEAN."""
    clean = clean_ranked(launch)
    names = [configs.tile_name(configs.as_tile(launch["kernel"], e["tile"])) for e in clean]
    return ([f"{name} {e['model_clocks']} ({e['limiter']})" for name, e in zip(names, clean)]
            + ["—"] * (RANKED_CLEAN - len(clean)))


def ranking_markdown(ranking):
    headers = ["head size", "kernel", "best", "runner-up", "third"]
    rows = [[f"d{launch['head_dim']}", launch["kernel"], *ranked_cells(launch)] for launch in ranking]
    return "\n".join(["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
                     + ["| " + " | ".join(row) + " |" for row in rows])


def load_ranking(path=RANKING_PATH):
    """The committed ranking, or None where it was never written."""
    return json.loads(path.read_text()) if path.exists() else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=WORKERS, help="compile processes")
    p.add_argument("--head-dim", type=int, action="append", help="only these padded head sizes (repeatable)")
    p.add_argument("--kernel", action="append", help="only these kernels: forward, backward (repeatable)")
    p.add_argument("--rank", action="store_true",
                   help="rank the headline launches' tiles by the speed model; write bench/results/model_ranking.json")
    args = p.parse_args(argv)
    with worker_pool(args.workers) as pool:
        if args.rank:
            ranking = rank(pool)
            RANKING_PATH.write_text(json.dumps(ranking, indent=1) + "\n")
            print(ranking_markdown(ranking))
            return
        keys = [key for key in launch_keys() if (not args.head_dim or key[1] in args.head_dim)
                and (not args.kernel or key[2] in args.kernel)]
        print("| precision | head | kernel | dropout | arch | operands | table tile | problem | clean tile |")
        print("|---|---|---|---|---|---|---|---|---|")
        for key, current, problem, replacement in pool.map(search, keys):
            if problem is None:
                continue
            precision, head_dim, kernel, dropout, arch, aligned = key
            print(f"| {precision} | {head_dim} | {kernel} | {dropout} | sm_{arch} | "
                  f"{configs.operands_name(aligned)} | {configs.tile_name(current)} | {problem} | "
                  f"{configs.tile_name(replacement) if replacement else 'NONE'} |", flush=True)


if __name__ == "__main__":
    main()
