"""python -m bench.attention: forward, backward and forward+backward TFLOP/s of `kernels.attention` against what a
user would pick instead, on the same card in the same run.

Shapes follow FlashAttention's and Triton's benchmarks: sequence length N in 256 ... 16384, head size D in {64, 128},
batch = 16384 // N and heads = 2048 // D (about 16k tokens x 2048 hidden per point), causal and not, fp16 and bf16,
then bf16 causal at head size 256 (every other N), plus the decoder's own shape (batch 64, 6 heads, 256 tokens,
head size 64).
FLOPs as those benchmarks count them: forward 4*B*H*N*N*D, halved when causal; backward 2.5x forward.
Forward is timed as in training (inputs require grad); backward alone is `out.backward(dout)` on a kept graph.

Competitors: SDPA with each backend the card has (flash, cuDNN, memory-efficient, math where it fits), the eager
per-head math of gpt/ (q @ k^T * scale, mask, softmax, @ v; spelled out here since the tests keep their reference
inside tests/), and FlexAttention (torch.compile, default dynamic shapes) when torch has it.
Each provider's output and gradients are checked once against an fp32 reference on two (batch, head) slices
before it is timed. Peak memory is one forward+backward call's allocation beyond its inputs.
"""

import torch
import torch.nn.functional as F

from bench import common
from kernels.reference import attention_reference

SEQ_LENS = [256, 512, 1024, 2048, 4096, 8192, 16384]
HEAD_DIMS = [128, 64]
TOKENS_PER_POINT = 16384
HIDDEN = 2048
DECODER_SHAPE = {"batch": 64, "heads": 6, "seq_len": 256, "head_dim": 64}
MODES = common.MODES
# Providers that hold N x N scores, with the bytes per score element a forward+backward keeps alive at its peak
# (about five N x N tensors: scores, masked scores, probabilities, two gradients; the math backend's in fp32);
# they are skipped where that would not fit.
QUADRATIC_BYTES_PER_SCORE = {"eager": lambda dtype: 5 * torch.finfo(dtype).bits // 8, "sdpa-math": lambda dtype: 24}


def attention_flops(batch, heads, seq_q, seq_k, head_dim, causal, mode):
    """FLOPs of one call as FlashAttention's benchmark counts them: two matrix products of 2*Nq*Nk*D each per
    head in the forward, half of that when causal; the backward is 2.5x the forward."""
    forward = 4 * batch * heads * seq_q * seq_k * head_dim
    if causal:
        forward //= 2
    return {"fwd": forward, "bwd": 2.5 * forward, "fwd+bwd": 3.5 * forward}[mode]


def sweep_shapes(quick=False):
    """Every measured point, the goals' headline (bf16, causal, D 128) first so a spent budget cuts the rest."""
    seq_lens = [1024, 4096] if quick else SEQ_LENS
    shapes = []
    for dtype in ("bf16", "fp16"):
        for causal in (True, False):
            for head_dim in HEAD_DIMS:
                for n in seq_lens:
                    batch, heads = max(1, TOKENS_PER_POINT // n), HIDDEN // head_dim
                    shapes.append(dict(dtype=dtype, causal=causal, head_dim=head_dim, seq_len=n, batch=batch,
                                       heads=heads, group=f"{dtype} D={head_dim} {'causal' if causal else 'full'}"))
    for n in seq_lens[1::2]:  # head size 256: dK and dV in two launches, its own tiles
        batch, heads = max(1, TOKENS_PER_POINT // n), HIDDEN // 256
        shapes.append(dict(dtype="bf16", causal=True, head_dim=256, seq_len=n, batch=batch, heads=heads,
                           group="bf16 D=256 causal"))
    for dtype in ("bf16", "fp16"):
        shapes.append(dict(dtype=dtype, causal=True, group="decoder (B64 H6 N256 D64)", **DECODER_SHAPE))
    return shapes


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def _flex():
    """FlexAttention under torch.compile's default (automatic) dynamic shapes, or None when torch lacks it: a
    static compile per sweep point would cost more time than the whole suite has."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    common.configure_torch_compile()
    compiled = torch.compile(flex_attention)
    masks = {}

    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def run(q, k, v, causal):
        block_mask = None
        if causal:
            key = (q.shape[-2], k.shape[-2])
            if key not in masks:
                masks[key] = create_block_mask(causal_mask, None, None, *key, device=q.device)
            block_mask = masks[key]
        return compiled(q, k, v, block_mask=block_mask)

    return run


def providers():
    """name -> (function(q, k, v, causal) -> out, core). Core providers are measured even once the budget is spent."""
    import kernels

    table = {"triton": (lambda q, k, v, causal: kernels.attention(q, k, v, causal=causal), True)}
    for name, backend, core in common.sdpa_backends():
        table[name] = (_sdpa(backend), core)
    table["eager"] = (attention_reference, False)
    flex = _flex()
    if flex is not None:
        table["flex"] = (flex, False)
    return table


def reference_slices(q, k, v, dout, causal):
    """fp32 reference output and gradients on the first and the last (batch, head) slice: heads are independent,
    so a slice's gradients need only that slice, and the last one exercises every stride."""
    refs = []
    for b, h in {(0, 0), (q.shape[0] - 1, q.shape[1] - 1)}:
        qs, ks, vs = (t[b, h].float().detach().requires_grad_() for t in (q, k, v))
        out = attention_reference(qs, ks, vs, causal)
        out.backward(dout[b, h].float())
        refs.append(((b, h), out.detach(), qs.grad, ks.grad, vs.grad))
    return refs


def check_provider(fn, q, k, v, dout, causal, refs, dtype):
    """Run fn once forward and backward; return the largest relative error over output and gradients."""
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v, causal)
    out.backward(dout)
    worst = 0.0
    for (b, h), ref_out, ref_dq, ref_dk, ref_dv in refs:
        for name, got, ref in [("out", out[b, h], ref_out), ("dq", q.grad[b, h], ref_dq),
                               ("dk", k.grad[b, h], ref_dk), ("dv", v.grad[b, h], ref_dv)]:
            worst = max(worst, common.check_close(name, got, ref, dtype))
    for t in (q, k, v):
        t.grad = None
    return worst


def skip_reason(name, core, shape, dtype, budget):
    if reason := budget.skip_reason(core):
        return reason
    if name in QUADRATIC_BYTES_PER_SCORE:
        need = shape["batch"] * shape["heads"] * shape["seq_len"] ** 2 * QUADRATIC_BYTES_PER_SCORE[name](dtype)
        free = torch.cuda.mem_get_info()[0]
        if need > 0.7 * free:
            return f"skipped: needs ~{need / 2**30:.0f} GiB of N x N scores, {free / 2**30:.0f} GiB free"
    return None


def run_shape(shape, table, budget, ceilings):
    dtype = common.DTYPES_BY_NAME[shape["dtype"]]
    b, h, n, d, causal = shape["batch"], shape["heads"], shape["seq_len"], shape["head_dim"], shape["causal"]
    torch.manual_seed(n * d + causal)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(b, h, n, d, device="cuda", dtype=dtype)
    refs = reference_slices(q, k, v, dout, causal)

    def metrics(mode, ms):
        rate = common.tflops(attention_flops(b, h, n, n, d, causal, mode), ms)
        return {"tflops": rate, "of_matmul_ceiling": rate / ceilings["matmul_bf16_tflops"]}

    results = []
    for name, (fn, core) in table.items():
        entry = {**shape, "provider": name}
        entry["status"] = skip_reason(name, core, shape, dtype, budget)
        if entry["status"] is None:
            try:
                entry["max_relative_error"] = check_provider(fn, q, k, v, dout, causal, refs, dtype)
                peak, timings = common.measure_modes(
                    lambda: fn(q, k, v, causal),
                    lambda out, retain: out.backward(dout, retain_graph=retain),
                    [q, k, v],
                    metrics,
                )
                entry["peak_memory_mib"] = peak / 2**20
                entry.update(timings)
                entry["status"] = "ok"
            except Exception as exc:  # a competitor that cannot run this shape is a result, not a crash
                entry["status"] = common.describe_failure(exc)
            for t in (q, k, v):
                t.grad = None
            torch.cuda.empty_cache()
        results.append(entry)
        cells = " ".join(f"{m} {_cell(entry, m)}" for m in MODES if m in entry) or entry["status"]
        print(f"  {shape['group']:<28} N={n:<6} {name:<15} {cells}", flush=True)
    common.add_speedups(results)
    return results


def evaluate_goals(results):
    """The attention speed goals (H100, bf16, causal, D 128, N >= 2048), read off the results."""

    def worst_speedup(competitor, mode):
        values = [r["ours_speedup"][mode] for r in results
                  if r["provider"] == competitor and "ours_speedup" in r and r["dtype"] == "bf16" and r["causal"]
                  and r.get("head_dim") == 128 and r["seq_len"] >= 2048 and mode in r["ours_speedup"]]
        return min(values) if values else None

    goals = []
    for text, competitor, mode, target in [
        ("forward >= 1.2x SDPA flash (bf16 causal D128, N >= 2k)", "sdpa-flash", "fwd", 1.2),
        ("forward >= SDPA cuDNN (bf16 causal D128, N >= 2k)", "sdpa-cudnn", "fwd", 1.0),
        ("backward >= 1.2x SDPA flash (bf16 causal D128, N >= 2k)", "sdpa-flash", "bwd", 1.2),
    ]:
        worst = worst_speedup(competitor, mode)
        goals.append({"goal": text, "measured": None if worst is None else f"worst {worst:.2f}x",
                      "met": None if worst is None else worst >= target})
    return goals


def to_markdown(run):
    results = run["results"]
    names = list(dict.fromkeys(r["provider"] for r in results))
    parts = [common.markdown_header(run, "Attention: TFLOP/s"), common.goals_markdown(run["goals"]), ""]
    parts.append(
        "Cells: TFLOP/s (ours' speedup over that provider: its time / ours). FLOPs: forward 4*B*H*N*N*D, halved "
        "when causal; backward 2.5x forward. `%ceil`: ours as a fraction of the measured bf16 matmul ceiling."
    )
    for group in dict.fromkeys(r["group"] for r in results):
        rows, memory_rows = [], []
        entries = [r for r in results if r["group"] == group]
        for n in dict.fromkeys(r["seq_len"] for r in entries):
            at_n = {r["provider"]: r for r in entries if r["seq_len"] == n}
            rows += common.comparison_rows(at_n, names, n, _cell, "of_matmul_ceiling")
            memory_rows.append([n] + [f"{at_n[x]['peak_memory_mib']:.0f}" if x in at_n and "peak_memory_mib"
                                      in at_n[x] else common.short_status(at_n.get(x)) for x in names])
        parts += [f"\n## {group}\n", common.markdown_table(["N", "mode", *names, "%ceil"], rows)]
        parts += ["\nPeak memory of one forward+backward (MiB beyond the inputs):\n",
                  common.markdown_table(["N", *names], memory_rows)]
    notes = common.not_measured_notes(results)
    if notes:
        parts += ["\n## Not measured\n", notes]
    return "\n".join(parts)


def _cell(entry, mode):
    """A measured mode's TFLOP/s, or a short word for why it has none."""
    timing = entry[mode]
    return f"{timing['tflops']:.1f}" if "tflops" in timing else common.short_status(timing)


def main():
    args, run = common.start("bench.attention", __doc__.split("\n\n")[0], default_budget_s=180)
    budget = common.Budget(args.budget_s)
    table = providers()
    run["settings"].update(tokens_per_point=TOKENS_PER_POINT, hidden=HIDDEN, forward_timed_with_grad=True,
                           flops="fwd 4*B*H*N*N*D (halved when causal); bwd 2.5x fwd; fwd+bwd 3.5x fwd",
                           eager_reference="kernels.reference.attention_reference (gpt/model.py Head's math on B,H,N,D)")
    run["results"] = []
    for shape in sweep_shapes(args.quick):
        run["results"] += run_shape(shape, table, budget, run["ceilings"])
    run["goals"] = evaluate_goals(run["results"])
    run["seconds"] = budget.elapsed()
    common.write_results(run, "attention", to_markdown(run), args.out)


if __name__ == "__main__":
    main()
