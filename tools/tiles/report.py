"""python -m tools.tiles.report: compile every shipped kernel config for the checked architectures (sm_90 and sm_80)
on this machine, no GPU needed, and write registers, spills, shared memory, the matrix instructions and the speed
model's clocks to bench/results/compile_report.md (or --output), with every config's problems (tools.tiles.checks).

The configs come from the kernels' own tile tables (tools/tiles/configs.py), each compiled as a launch would be
(tools/tiles/compile.py). The headline launches (tools.tiles.search.HEADLINE_LAUNCH) are set against the speed
model's goals and the Triton tutorial's figures under the same model, and, where `python -m tools.tiles.search
--rank` has been run, beside the model's best tiles. tests/test_compile_report.py asserts on the same compiles.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from bench.common import RESULTS_DIR
from tools.tiles import checks, configs, search, speed_model
from tools.tiles.compile import WORKERS, compile_all
from tools.tiles.configs import operands_name
from tools.tiles.search import HEADLINE_LAUNCH

REPORT_PATH = RESULTS_DIR / "compile_report.md"
# Goals of the speed model for the headline configs (16-bit, causal, aligned, sm_90, no dropout), in modelled clocks
# per 128 x 128 block, and the Triton tutorial's fused attention (06-fused-attention.py) under the same model: a
# static estimate, not a timing. The floor is the tensor cores' alone: 2 products of 128 x 128 x D in the forward,
# 7 in the backward (dK/dV + dQ).
MODEL_GOALS = {64: {"forward": 1075, "backward": 3950}, 128: {"forward": 2150, "backward": 7900}}
TUTORIAL_MODEL = {64: {"forward": 1088, "backward": 4608}, 128: {"forward": 2048, "backward": 8960}}


def _headline_clocks(results):
    """{(head size, kernel): modelled clocks} of the shipped headline launches (bf16 causal)."""
    return {(r["head_dim"], r["kernel"]): r["model_clocks"] for r in results
            if r["op"] == "attention" and (r.get("dropout"), r["arch"], r["aligned"]) == HEADLINE_LAUNCH
            and r.get("mask") == "causal" and r.get("dtype") == "bfloat16" and r.get("model_clocks") is not None}


def headline_model(results, ranking):
    """[(head_dim, part, shipped tiles' modelled clocks, the model's best tiles' clocks, floor, goal, tutorial)]
    for the headline configs: the forward, and the backward launch (dK/dV and dQ programs; the delta kernel aside).
    The model's best: tools.tiles.search's ranking (None where it was never run)."""
    shipped = _headline_clocks(results)
    best = {(launch["head_dim"], launch["kernel"]): clean[0]["model_clocks"]
            for launch in ranking or [] for clean in [search.clean_ranked(launch)] if clean}
    rows = []
    for head_dim in sorted(MODEL_GOALS):
        floor = 128 * 128 * head_dim // 2048
        for kernel, part, products in (("forward", "forward", 2), ("backward", "backward (dK/dV + dQ)", 7)):
            rows.append((head_dim, part, shipped.get((head_dim, kernel)), best.get((head_dim, kernel)),
                         products * floor, MODEL_GOALS[head_dim][kernel], TUTORIAL_MODEL[head_dim][kernel]))
    return rows


def headline_rule(head_dim, kernel):
    """The TileRule of a headline launch (16-bit, sm_90, aligned, no dropout)."""
    from kernels.attention import tiles

    dropout, arch, aligned = HEADLINE_LAUNCH
    return tiles.TABLE.rule_for(precision="16bit", head=head_dim, kernel=kernel, dropout=dropout, arch=arch,
                                aligned=aligned)


def ranking_rows(results, ranking):
    """Per ranked headline launch: the shipped tile (its clocks and how it was chosen) beside the model's best,
    runner-up and third clean tiles."""
    shipped = _headline_clocks(results)
    rows = []
    for launch in ranking:
        head_dim, kernel = launch["head_dim"], launch["kernel"]
        rule = headline_rule(head_dim, kernel)
        ours = f"{configs.tile_name(rule.tile)} {shipped.get((head_dim, kernel), '—')} ({rule.chosen_by})"
        rows.append([f"d{head_dim}", kernel, ours, *search.ranked_cells(launch)])
    return rows


def resolved_table():
    """The attention launch table resolved per key, a line per (precision, head size, kernel) and a column per
    (arch, operands, dropout): what every launch gets, without reading the rules' wildcards ("copied aligned" where
    misaligned operands are copied aligned before the launch)."""
    import itertools

    from kernels._gpu import CHECKED_ARCHS
    from kernels.attention import tiles

    columns = list(itertools.product(CHECKED_ARCHS, (True, False), (False, True)))
    headers = ["precision", "head", "kernel"] + [f"sm_{arch} {operands_name(aligned)}{' dropout' if dropout else ''}"
                                                 for arch, aligned, dropout in columns]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for precision, head, kernel in itertools.product(("16bit", "fp32"), configs.HEAD_DIMS, configs.ATTENTION_KERNELS):
        cells = ["copied aligned" if not aligned and tiles.copies_misaligned_operands(kernel, head, precision)
                 else configs.tile_name(tiles.TABLE.lookup(precision=precision, head=head, kernel=kernel,
                                                           dropout=dropout, arch=arch, aligned=aligned))
                 for arch, aligned, dropout in columns]
        lines.append("| " + " | ".join([precision, str(head), kernel, *cells]) + " |")
    return lines


def matrix_instructions(result):
    if result["dots"] == 0:
        return "— (no tl.dot)"
    wanted, used = ("wgmma", result["wgmma"]) if result["arch"] == 90 else ("mma.sync", result["mma_sync"])
    if used:
        return wanted
    return "mma.sync (no wgmma)" if result["mma_sync"] else "NONE (FMA)"


def layer_norm_limit_rows(probes):
    """[direction, precision, operands, widest row on chip, the next width's tile, its worst spills per arch]."""
    from kernels.layer_norm import tiles

    rows = []
    for (direction, precision, aligned), limit in tiles.MAX_ON_CHIP_WIDTH.items():
        dtype, kernel = configs.limit_probe(direction, precision)
        spills = [f"sm_{r['arch']}: {max(r['spill_store_bytes'], r['spill_load_bytes'])} B" if "error" not in r
                  else f"sm_{r['arch']}: does not compile" for r in probes
                  if (r["kernel"], r["width"], r["aligned"], r["dtype"]) == (kernel, 2 * limit, aligned, dtype)]
        warps = next(r["num_warps"] for r in probes if (r["kernel"], r["width"]) == (kernel, 2 * limit))
        rows.append([direction, precision, operands_name(aligned), limit, f"{2 * limit} ({warps} warps)",
                     ", ".join(spills)])
    return rows


def to_markdown(results, probes=()):
    import triton

    headers = ["config", "arch", "operands", "warps", "stages", "registers", "spills (st/ld B)", "stack B",
               "shared KiB", "tl.dot", "matrix instr.", "model clk", "limiter", "status"]
    rows = []
    for r in results:
        base = [r["name"], f"sm_{r['arch']}", operands_name(r["aligned"]), r.get("num_warps", "—"),
                r.get("num_stages", "—")]
        if "error" in r:
            rows.append(base + ["—"] * 8 + ["FAILS TO COMPILE"])
            continue
        found = checks.problems(r)
        rows.append(base + [r["registers"], f"{r['spill_store_bytes']}/{r['spill_load_bytes']}", r["stack_bytes"],
                            f"{r['shared_bytes'] / 1024:.1f}", r["dots"], matrix_instructions(r),
                            r.get("model_clocks") or "—", r.get("limiter") or "—",
                            "; ".join(found) if found else "ok"])
    failing = [r for r in results if checks.problems(r)]
    ranking = search.load_ranking()

    def meets(clocks, goal):
        return "—" if clocks is None else "yes" if clocks <= goal else "no"

    model_rows = [[f"d{head_dim}", part, ours if ours is not None else "—", best if best is not None else "—",
                   floor, goal, tutorial, meets(ours, goal), meets(best, goal)]
                  for head_dim, part, ours, best, floor, goal, tutorial in headline_model(results, ranking)]
    rates = ", ".join(f"sm_{arch}: " + ", ".join(f"{unit} {rate}" for unit, rate in units.items())
                      for arch, units in speed_model.RATES.items())
    lines = [
        "# Compile report",
        "",
        f"Every shipped kernel config of {', '.join(configs.OPS)}, compiled without a GPU by triton "
        f"{triton.__version__} for sm_90 (sm_90a) and sm_80 (whose code sm_86 and sm_89 run: held to their shared "
        "memory too); registers, stack and spills from the wheel's ptxas -v on the PTX, shared memory as Triton "
        "allocates it, matrix instructions read off the PTX. "
        "Operands \"aligned\": pointers and strides known to be multiples of 16 bytes (marked by Triton's JIT, "
        "or for the attention kernels' strides by the kernel itself); \"any\": nothing marked, the worst case. "
        "A config is compiled for the (arch, operands) launches that run its tile (a name ends in the attention "
        "tile, BLOCK_M x BLOCK_N, warps and stages). Regenerate with `python -m tools.tiles.report`.",
        "",
        "\"model clk\": the speed model's clocks per 128 x 128 block of (query, key) pairs for one SM, a lower bound "
        "read off the SASS of the main loop (tools/tiles/speed_model.py; per SM per clock " + rates + "), and the "
        "unit that limits it. A static estimate, not a timing.",
        "",
        "## The headline configs under the model (bf16, causal, aligned, sm_90, no dropout)",
        "",
        "Shipped: the tiles kernels/attention/tiles.py launches (some chosen by timing on a GPU, which wins over "
        "the model where they disagree). The model's best: the clean tiles with the fewest modelled clocks "
        "(`python -m tools.tiles.search --rank`, bench/results/model_ranking.json), dK/dV fused or split.",
        "",
        "| head size | kernels | shipped: model clk | model's best: model clk | tensor floor | goal | "
        "tutorial (model) | shipped meets goal | best meets goal |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in model_rows]
    if ranking:
        lines += [
            "",
            "## The headline launches' tiles ranked by the model",
            "",
            "Per launch (bf16 causal for the clocks; clean: no spills in fp16 and bf16 under every mask), the "
            "shipped tile with its clocks and how it was chosen, and the model's three best clean tiles: "
            "tile, clocks (limiters).",
            "",
            "| head size | kernel | shipped | best | runner-up | third |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in ranking_rows(results, ranking)]
    if probes:
        lines += [
            "",
            "## LayerNorm: the widest rows held on chip",
            "",
            "Per direction, precision and operand alignment, the widest row the LayerNorm kernels hold in registers "
            "(kernels/layer_norm/tiles.py MAX_ON_CHIP_WIDTH), and the next width up compiled the same way (the add "
            "variant, twice the columns and warps of the limit's tile): its spills are why the limit stops there. "
            "Wider rows are streamed in the forward and take two column-tiled passes in the backward.",
            "",
            "| direction | precision | operands | widest on chip | next width up | its spills (most of stores, "
            "loads) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in layer_norm_limit_rows(probes)]
    lines += [
        "",
        "## The attention launch table, resolved",
        "",
        "The tile of every launch key (kernels/attention/tiles.py), as tools.tiles.configs names it: forward "
        "BLOCK_M x BLOCK_N; backward block_m1 x block_n1 (its key programs: queries streamed x keys held), "
        "block_m2 x block_n2 (its query programs: queries held x keys streamed), \"apart\" where dK and dV have "
        "programs of their own; then warps and stages.",
        "",
        *resolved_table(),
        "",
        "## Every config",
        "",
        f"{len(results)} compiles, {len(failing)} with problems.",
        "",
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---" for _ in headers) + " |",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    for r in results:
        if "error" in r:
            lines += ["", f"## {r['name']} sm_{r['arch']} {operands_name(r['aligned'])}: compile error", "", "```",
                      r["error"], "```"]
    return "\n".join(lines) + "\n"


JSON_FIELDS = ("op", "name", "kernel", "dtype", "head_dim", "width", "causal", "mask", "dropout", "arch", "aligned",
               "tile", "num_warps", "num_stages", "registers", "spills", "shared_bytes", "model_clocks", "limiter",
               "duplicated", "loop_instructions", "loop_exp2", "wgmma_shapes", "error")


def json_records(results):
    """The results for machines to read: one object per (config, arch, operands), the fields of JSON_FIELDS that
    apply (spills: bytes stored plus loaded; causal: the causal mask variant)."""
    records = []
    for r in results:
        record = dict(r, spills=r.get("spill_store_bytes", 0) + r.get("spill_load_bytes", 0),
                      causal=r.get("mask") == "causal" if r["op"] == "attention" else None)
        records.append({field: record.get(field) for field in JSON_FIELDS})
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description="Compile every shipped kernel config for the checked GPU architectures "
                                "(no GPU needed) and write the report of registers, spills, shared memory and "
                                "matrix instructions.")
    p.add_argument("--output", type=Path, default=REPORT_PATH, help=f"the report to write (default {REPORT_PATH})")
    p.add_argument("--workers", type=int, default=WORKERS, help=f"compile processes (default {WORKERS})")
    p.add_argument("--json", type=Path, help="also write every record as JSON to this file")
    args = p.parse_args(argv)
    started = time.perf_counter()
    results = compile_all(workers=args.workers)
    probes = compile_all(configs.layer_norm_limit_probes(), workers=args.workers)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(to_markdown(results, probes))
    if args.json:
        args.json.write_text(json.dumps(json_records(results), indent=1) + "\n")
    failing = [r for r in results if checks.problems(r)]
    for r in failing:
        print(f"PROBLEM {r['name']} sm_{r['arch']} {operands_name(r['aligned'])}: {'; '.join(checks.problems(r))}")
    print(f"compiled {len(results)} (config, target) pairs in {time.perf_counter() - started:.0f} s; "
          f"{len(failing)} with problems; wrote {args.output}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
