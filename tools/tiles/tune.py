"""python -m tools.tiles.tune: time candidate attention tiles on the GPU at hand and say which table entries should
change.

For each (kernel, head size) of the 16-bit causal launches with aligned operands, the shipped tile, the speed
model's best clean tiles (bench/results/model_ranking.json, written by tools.tiles.search --rank) and the reference
tiles (FlexAttention's sm_90 tiles and the Triton tutorial's: REFERENCE_TILES) are forced into the launcher one at
a time through the table's override (`candidates`), each checked against an fp32 reference on a small ragged shape
(so a tile that breaks the masking shows as wrong, never as fast), then timed on the headline shapes with the
benchmarks' own timing (bench.common). Forward candidates are timed by the forward; backward candidates by the
backward (the delta kernel and the one launch of dK, dV and dQ). The registers,
spills and shared memory of what was compiled are recorded with each candidate. fp16 and bf16 share the 16-bit
tiles; bf16 is timed.

Writes bench/results/<card>/tiles.json and tiles.md. A candidate that fails to compile or launch is a result.
`TRITON_INTERPRET=1 python -m tools.tiles.tune --dry-run` runs everything but the timing on CPU through Triton's
interpreter, with tiny shapes and fp16.
"""

import argparse
import json
import sys
import time

import torch

import kernels
from bench import common
from kernels._gpu import device_arch
from kernels.attention import backward, forward, tiles
from kernels.attention.tiles import BackwardTile, Tile
from kernels.reference import attention_reference
from tools.tiles import configs, search

# Head sizes whose tiles are timed: the headline ones, which tools.tiles.search --rank ranks by the speed model.
TUNED_HEAD_DIMS = (64, 128)
# Timed shapes per head size: FlashAttention's benchmark points (16k tokens, 2048 hidden) and, at head size 64,
# the decoder's own (batch 64, 6 heads, 256 tokens).
TIMED_SEQ_LENS = (1024, 4096)
DECODER_SHAPE = (64, 6, 256, 64)
CHECK_SHAPE = (1, 3, 300, 257)  # batch, heads, Nq, Nk: ragged, Nk < Nq, across several blocks of any tile
DRY_RUN_CHECK_SHAPE = (1, 1, 40, 33)  # ragged is enough for the plumbing
# Tiles timed beside the model's, per (kernel, head size): FlexAttention's sm_90 16-bit tiles
# (torch/_inductor/template_heuristics/triton.py) and the Triton tutorial's (06-fused-attention.py): its backward's
# blocks 32/128/128/32 with 4 warps and 5 stages, and its forward's autotuning space at 3 stages as it filters it for
# sm_90 (8 warps only for 128 x 128 blocks; BLOCK_N at most the head size).
REFERENCE_TILES = {
    ("forward", 64): [Tile(128, 128, 4, 3)] + [Tile(m, n, 4, 3) for m in (64, 128) for n in (32, 64)],
    ("forward", 128): [Tile(128, 64, 8, 3), Tile(128, 128, 8, 3)]
    + [Tile(m, n, 4, 3) for m in (64, 128) for n in (32, 64, 128)],
    ("backward", 64): [BackwardTile(64, 128, 128, 64, 8, 3, False), BackwardTile(32, 128, 128, 32, 4, 5, False)],
    ("backward", 128): [BackwardTile(64, 128, 128, 64, 8, 3, False), BackwardTile(32, 128, 128, 32, 4, 5, False)],
}
# bf16 on the GPU; fp16 in a dry run (the interpreter computes bf16 products wrongly).
DTYPES = {"cuda": torch.bfloat16, "cpu": torch.float16}


def timed_shapes(head_dim, dry_run):
    if dry_run:
        return [(1, 2, 40, head_dim)]
    shapes = [(16384 // n, 2048 // head_dim, n, head_dim) for n in TIMED_SEQ_LENS]
    return shapes + ([DECODER_SHAPE] if head_dim == DECODER_SHAPE[3] else [])


def forced_tile(kernel, head_dim, tile):
    """Within the block the launcher picks `tile` for `kernel` at this head size (16-bit, any dropout, arch and
    alignment): the attention table's override."""
    return tiles.override(tile, precision="16bit", head=tiles.block_d(head_dim), kernel=kernel)


def candidates():
    """{(kernel, head size): [tile, ...]}: the tuned launches, each with the ranking's clean tiles (fewest
    modelled clocks first), then the reference tiles."""
    ranking = search.load_ranking()
    if ranking is None:
        raise SystemExit(f"{search.RANKING_PATH} is missing: run python -m tools.tiles.search --rank first")
    # A ranking written before a launch was removed (the backward's dkdv, dk, dv and dq before its one launch)
    # ranks nothing the launchers run: only the launches they still make are read (rerun --rank for the others).
    ranked = {(launch["kernel"], launch["head_dim"]): [configs.as_tile(launch["kernel"], e["tile"])
                                                       for e in search.clean_ranked(launch)]
              for launch in ranking if launch["kernel"] in configs.ATTENTION_KERNELS}
    found = {}
    for head_dim in TUNED_HEAD_DIMS:
        for kernel in configs.ATTENTION_KERNELS:
            tried = ranked.get((kernel, head_dim), []) + REFERENCE_TILES[(kernel, head_dim)]
            found[(kernel, head_dim)] = list(dict.fromkeys(tried))
    return found


def gpu_arch(device):
    """The GPU's arch (90 for sm_90), or sm_90's in a dry run."""
    return device_arch(device) if device.type == "cuda" else 90


def shipped_tile(kernel, head_dim, device):
    """The tile the launcher picks today on this GPU (sm_90's in a dry run)."""
    return tiles.table_tile(kernel, head_dim, DTYPES[device.type], False, gpu_arch(device), True)


def compiled_kernels():
    """Every kernel Triton has compiled so far in this process, by identity."""
    found = {}
    for jit_fn in (forward.attention_forward_kernel, backward.attention_backward_kernel):
        for kernel_cache, *_ in getattr(jit_fn, "device_caches", {}).values():
            for compiled in kernel_cache.values():
                found[id(compiled)] = compiled
    return found


def resources(new_kernels):
    """Registers, spilled bytes and shared memory of the kernels a candidate compiled (None on the interpreter)."""
    out = []
    for compiled in new_kernels:
        out.append({"kernel": getattr(compiled, "name", "?"), "registers": getattr(compiled, "n_regs", None),
                    "spills": getattr(compiled, "n_spills", None),
                    "shared_bytes": getattr(getattr(compiled, "metadata", None), "shared", None)})
    return out


def random_inputs(shape, device, seed):
    batch, heads, n_q, head_dim = shape[:4]
    n_k = shape[4] if len(shape) > 4 else n_q
    generator = torch.Generator().manual_seed(seed)
    dtype = DTYPES[device.type]
    make = lambda n: torch.randn((batch, heads, n, head_dim), generator=generator).to(device, dtype)  # noqa: E731
    q, k, v, dout = make(n_q), make(n_k), make(n_k), make(n_q)
    return [t.requires_grad_() for t in (q, k, v)], dout


def check_candidate(head_dim, device):
    """Output and gradients of the forced tile on CHECK_SHAPE (a small one on CPU) against the fp32 reference;
    raises when wrong."""
    batch, heads, n_q, n_k = CHECK_SHAPE if device.type == "cuda" else DRY_RUN_CHECK_SHAPE
    (q, k, v), dout = random_inputs((batch, heads, n_q, head_dim, n_k), device, seed=head_dim)
    out = kernels.attention(q, k, v, causal=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*ref_inputs, causal=True)
    ref_grads = torch.autograd.grad(ref, ref_inputs, dout.float())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        common.check_close(name, got, want, DTYPES[device.type])


def time_candidate(kernel, shape, device):
    """TFLOP/s of the forward (forward candidates) or of the backward (backward candidates)."""
    batch, heads, n, head_dim = shape
    (q, k, v), dout = random_inputs(shape, device, seed=n)
    forward_flops = 2 * batch * heads * n * n * head_dim  # causal: half of 4 B H N^2 D
    if kernel == "forward":
        ms = common.median_ms(lambda: kernels.attention(q, k, v, causal=True))
        return common.tflops(forward_flops, ms), ms
    out = kernels.attention(q, k, v, causal=True)
    ms = common.median_ms(lambda: out.backward(dout, retain_graph=True), grad_to_none=[q, k, v])
    return common.tflops(2.5 * forward_flops, ms), ms


def run_candidate(kernel, head_dim, tile, device, dry_run):
    entry = {"tile": configs.tile_name(tile), "status": "ok", "timings": []}
    before = compiled_kernels()
    try:
        with forced_tile(kernel, head_dim, tile):
            assert tiles.table_tile(kernel, head_dim, DTYPES[device.type], False, 90, True) == tile
            check_candidate(head_dim, device)
            for shape in timed_shapes(head_dim, dry_run):
                if dry_run:
                    time_forward_and_backward_once(shape, device)
                    continue
                rate, ms = time_candidate(kernel, shape, device)
                entry["timings"].append({"shape": list(shape), "tflops": rate, "ms": ms})
    except Exception as exc:  # noqa: BLE001 - a tile that cannot compile, launch or compute right is a result
        entry["status"] = common.describe_failure(exc)
    entry["compiled"] = resources(c for i, c in compiled_kernels().items() if i not in before)
    return entry


def time_forward_and_backward_once(shape, device):
    (q, k, v), dout = random_inputs(shape, device, seed=0)
    kernels.attention(q, k, v, causal=True).backward(dout)


def score(entry):
    """A candidate's figure of merit: the mean TFLOP/s over the timed shapes (0 when it failed)."""
    rates = [t["tflops"] for t in entry["timings"]]
    return sum(rates) / len(rates) if entry["status"] == "ok" and rates else 0.0


def to_markdown(run):
    lines = [common.markdown_header(run, "Attention tiles timed on this card") if "ceilings" in run else "# Tiles",
             "16-bit (bf16 timed) causal, aligned operands. Forward candidates: forward TFLOP/s; dK/dV and dQ "
             "candidates: whole-backward TFLOP/s with only that kernel's tile changed. Shapes (B, H, N, D).", ""]
    changes = []
    for key in run["keys"]:
        rows = []
        best = max(key["candidates"], key=score)
        for c in key["candidates"]:
            regs = ", ".join(f"{r['registers']}r/{r['spills']}s" for r in c["compiled"]) or "—"
            rates = " / ".join(f"{t['tflops']:.0f}" for t in c["timings"]) or "—"
            mark = ("shipped" if c["tile"] == key["shipped"] else "") + (" best" if c is best and score(c) else "")
            rows.append([c["tile"], rates, f"{score(c):.0f}", regs, mark.strip(), c["status"]])
        shapes = " / ".join(str(tuple(s)) for s in key["shapes"])
        lines += [f"## {key['kernel']}, head size {key['head_dim']}", "",
                  common.markdown_table(["tile (tools.tiles.configs.tile_name)", f"TFLOP/s at {shapes}", "mean",
                                         "registers/spills", "", "status"], rows), ""]
        shipped = next(c for c in key["candidates"] if c["tile"] == key["shipped"])
        if best is not shipped and score(best) > 1.03 * score(shipped):
            changes.append(f"- {key['kernel']} d{key['head_dim']}: {key['shipped']} -> {best['tile']} "
                           f"({score(best) / max(score(shipped), 1e-9):.2f}x)")
    lines += ["## Table entries that should change (> 3% faster)", ""] + (changes or ["- none"])
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=240, help="no new candidate starts after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="no timing: CPU interpreter, tiny shapes")
    p.add_argument("--out", default=None, help="results folder (default bench/results/<card>/)")
    args = p.parse_args()
    if args.dry_run:
        device = torch.device("cpu")
        run = {"benchmark": "tools.tiles.tune", "dry_run": True}
    else:
        common.require_gpu("tools.tiles.tune")
        device = torch.device("cuda")
        run = {"benchmark": "tools.tiles.tune", "environment": common.environment(),
               "ceilings": common.measure_ceilings(),
               "settings": {"warmup_ms": common.WARMUP_MS, "rep_ms": common.REP_MS, "dtype": "bf16"}}
    started = time.perf_counter()
    run["keys"] = []
    for (kernel, head_dim), tried in candidates().items():
        shipped = shipped_tile(kernel, head_dim, device)
        key = {"kernel": kernel, "head_dim": head_dim, "shipped": configs.tile_name(shipped),
               "shapes": [list(s) for s in timed_shapes(head_dim, args.dry_run)], "candidates": []}
        for tile in [shipped] + [t for t in tried if t != shipped]:
            if time.perf_counter() - started > args.budget_s:
                key["candidates"].append({"tile": configs.tile_name(tile), "status": "skipped: time budget spent",
                                          "timings": [], "compiled": []})
                continue
            entry = run_candidate(kernel, head_dim, tile, device, args.dry_run)
            key["candidates"].append(entry)
            print(f"  {kernel:<8} d{head_dim:<4} {configs.tile_name(tile):<26} {score(entry):7.1f} TFLOP/s  "
                  f"{entry['status']}", flush=True)
        run["keys"].append(key)
    run["seconds"] = time.perf_counter() - started
    if args.dry_run:
        print(to_markdown(run))
        bad = [c["status"] for k in run["keys"] for c in k["candidates"] if c["status"] != "ok"]
        return 1 if bad else 0
    out_dir = common.write_results(run, "tiles", to_markdown(run), args.out)
    print(f"tiles: {run['seconds']:.0f} s, {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
