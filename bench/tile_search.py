"""python -m bench.tile_search: for every attention launch whose table tile (kernels/attention/tiles.py) the compile
report rejects, find the largest tile that compiles cleanly, offline, no GPU needed.

A launch key is what a TileRule can tell apart: precision, padded head size, kernel, dropout, arch (90, or 80 for
every other) and operand alignment. A tile is clean for a key when every compile the report makes of it passes
`compile_report.problems` (no spills, shared memory within the arch's limit, wgmma on sm_90 with aligned operands,
no duplicated warpgroup work): each dtype of the precision under each of compile_report.ATTENTION_MASKS, compiled
exactly as the report compiles it (compile_report.attention_config and compile_entry).

Candidates are no larger than the rejected tile (BLOCK_M x BLOCK_N), tried in the order `candidates` gives; the
first clean one is printed as the replacement. A tile that passes is left alone (timed or modelled faster). The
result is a proposal for the RULES table, which a person edits (merging keys into rules, with each rule's reason);
rerun `python -m bench.compile_report` after. Registers are tight enough that one stage or warp more or less can
decide a spill, so a tile clean for one key is not assumed clean for its neighbours: the report checks them all.
"""

import argparse
import concurrent.futures
import itertools
import multiprocessing

from bench import compile_report

BLOCK_SIZES = (16, 32, 64, 128)
WARPS = (4, 8)
STAGES = (1, 2, 3)
# The compiles most likely to fail come first (the windowed, packed mask has the most scalar state), so a
# candidate is usually rejected by its first compile.
MASKS_MOST_DEMANDING_FIRST = ("window_varlen", "causal")


def launch_keys():
    """Every (precision, head size, kernel, dropout, arch, aligned) the attention launchers can pick a tile for."""
    from kernels._gpu import CHECKED_ARCHS
    from kernels.attention import tiles

    for precision, head_dim in itertools.product(("16bit", "fp32"), compile_report.HEAD_DIMS):
        for kernel in ("forward", *tiles.key_block_passes(head_dim), "dq"):
            for dropout, arch, aligned in itertools.product((False, True), CHECKED_ARCHS, (True, False)):
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
        entry = compile_report.attention_config(dtype_name, head_dim, kernel, mask_name, dropout, tile, aligned,
                                                (arch,))
        found = compile_report.problems(compile_report.compile_entry("attention", entry, arch, aligned))
        if found:
            return f"{entry['name']}: {'; '.join(found)}"
    return None


def candidates(kernel, rejected):
    """Tiles no larger than `rejected` (BLOCK_M x BLOCK_N), in the order they are tried: most rows held first
    (each program reads the whole streamed operand once, so the traffic falls with the rows it holds), then most
    rows streamed per step (fewer loop iterations), then most stages, then most warps."""
    from kernels.attention.tiles import Tile

    def held_and_streamed(tile):
        return (tile.block_m, tile.block_n) if kernel in ("forward", "dq") else (tile.block_n, tile.block_m)

    tiles = [Tile(m, n, w, s) for m, n, w, s in itertools.product(BLOCK_SIZES, BLOCK_SIZES, WARPS, STAGES)
             if m * n <= rejected.block_m * rejected.block_n and Tile(m, n, w, s) != rejected]
    return sorted(tiles, key=lambda t: tuple(-x for x in (*held_and_streamed(t), t.num_stages, t.num_warps)))


def search(key):
    """(key, table tile, its problem or None, the first clean candidate or None)."""
    current = table_tile(key)
    problem = tile_problems(key, current)
    if problem is None:
        return key, current, None, None
    clean = (tile for tile in candidates(key[2], current) if tile_problems(key, tile) is None)
    return key, current, problem, next(clean, None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=compile_report.WORKERS, help="compile processes")
    p.add_argument("--head-dim", type=int, action="append", help="only these padded head sizes (repeatable)")
    p.add_argument("--kernel", action="append", help="only these kernels: forward, dkdv, dk, dv, dq (repeatable)")
    args = p.parse_args(argv)
    keys = [key for key in launch_keys() if (not args.head_dim or key[1] in args.head_dim)
            and (not args.kernel or key[2] in args.kernel)]
    context = multiprocessing.get_context("spawn")
    print("| precision | head | kernel | dropout | arch | operands | table tile | problem | clean tile |")
    print("|---|---|---|---|---|---|---|---|---|")
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context,
                                                initializer=compile_report._start_worker) as pool:
        for key, current, problem, replacement in pool.map(search, keys):
            if problem is None:
                continue
            precision, head_dim, kernel, dropout, arch, aligned = key
            print(f"| {precision} | {head_dim} | {kernel} | {dropout} | sm_{arch} | "
                  f"{compile_report.operands_name(aligned)} | {tuple(current)} | {problem} | "
                  f"{tuple(replacement) if replacement else 'NONE'} |", flush=True)


if __name__ == "__main__":
    main()
