"""python -m bench.decode: one decoding step against a key/value cache, `kernels.decode_attention` against PyTorch's
SDPA on the same cache, as the bytes of cache read per second and as a fraction of the card's copy ceiling
(measured in the same run).

Points: (query heads, key/value heads, head size) = (32, 8, 128) (a Llama-style grouped-query model), (8, 8, 128)
(multi-head) and (6, 6, 64) (the reference GPT's); contexts 1k ... 128k; batch 1 ... 64; bf16; one new token per
sequence, every sequence's cache filled to the context (Nmax = the context).
Bytes: the cache's keys and values read once, batch * H_KV * context * D * 2 * element size; q and the output (a
few kB) are not counted. The rate is compared with the copy ceiling, which counts bytes read plus written.
What is timed: the attention of the step alone, the same work for every provider (the step's own key and value
already in the cache; decode_attention's append is one more small launch, SDPA has none). Ours is timed as its
operator, torch.ops.decoder_kernels.decode_attention, which is what CUDA graphs and torch.compile run: the public
function adds one host synchronisation per call to check cache_seqlens.
Competitors: SDPA with each backend (flash, cuDNN, memory-efficient, math), given the cache itself and, for
grouped heads, enable_gqa; a backend that refuses the shapes is recorded as failed, not retried another way.
Every provider's output is checked against an fp32 reference on the first and the last sequence before it is
timed. A point whose cache (or, for SDPA's math backend, its copy of the cache expanded to the query heads) would
not fit in 70% of the free memory is recorded as skipped.
Then GPT generation tokens/s at the reference config, with the key/value cache and recomputing the context, per
attention backend (generation_runs).
"""

import time

import torch
import torch.nn.functional as F

from bench import common
from kernels.reference import attention_reference

HEAD_CONFIGS = [(32, 8, 128), (8, 8, 128), (6, 6, 64)]  # (query heads, key/value heads, head size)
CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
BATCHES = [1, 4, 16, 64]
DTYPE = "bf16"
# The decoding speed goals, recorded, not asserted.
CEILING_GOAL, CEILING_GOAL_CONTEXT = 0.8, 8192
FREE_MEMORY_SHARE = 0.7


def sweep_points(quick=False):
    """Every measured point, the grouped-query model first (the goals' headline), then by batch and context."""
    contexts, batches = ([1024, 16384], [1, 64]) if quick else (CONTEXTS, BATCHES)
    return [dict(heads=h, kv_heads=h_kv, head_dim=d, batch=b, context=n, dtype=DTYPE,
                 group=f"H={h} H_KV={h_kv} D={d}")
            for h, h_kv, d in HEAD_CONFIGS for b in batches for n in contexts]


def cache_bytes(point, element_size=2):
    """Bytes of keys and values one decoding step reads: every sequence's whole cache, once."""
    return point["batch"] * point["kv_heads"] * point["context"] * point["head_dim"] * 2 * element_size


def memory_needed(name, point, element_size=2):
    """Bytes a provider needs at this point: the cache, plus the math backend's copy of it expanded to the query
    heads when they are grouped."""
    need = cache_bytes(point, element_size)
    if name == "sdpa-math" and point["heads"] != point["kv_heads"]:
        need += need * point["heads"] // point["kv_heads"]
    return need


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k_cache, v_cache, seqlens):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=q.shape[1] != k_cache.shape[1])

    return run


def providers():
    """name -> (function(q, k_cache, v_cache, cache_seqlens) -> out, core). Core providers are measured even once
    the budget is spent."""
    import kernels  # noqa: F401 - registers the decoder_kernels operators
    from torch.nn.attention import SDPBackend

    def triton(q, k_cache, v_cache, seqlens):
        return torch.ops.decoder_kernels.decode_attention(q, k_cache, v_cache, seqlens, None, None,
                                                          q.shape[-1] ** -0.5, 0)

    table = {"triton": (triton, True)}
    for name, backend, core in [
        ("sdpa-flash", SDPBackend.FLASH_ATTENTION, True),
        ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION, True),
        ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION, False),
        ("sdpa-math", SDPBackend.MATH, False),
    ]:
        table[name] = (_sdpa(backend), core)
    return table


def skip_reason(name, core, point, budget, free_bytes):
    if reason := budget.skip_reason(core):
        return reason
    need = memory_needed(name, point)
    if need > FREE_MEMORY_SHARE * free_bytes:
        return f"skipped: needs ~{need / 2**30:.0f} GiB, {free_bytes / 2**30:.0f} GiB free"
    return None


def reference_slices(q, k_cache, v_cache):
    """fp32 outputs of the first and the last sequence (the reference repeats grouped key/value heads itself)."""
    return {b: attention_reference(q[b:b + 1].float(), k_cache[b:b + 1].float(), v_cache[b:b + 1].float(),
                                   causal=True)
            for b in {0, q.shape[0] - 1}}


def run_point(point, table, budget, ceilings):
    dtype = common.DTYPES_BY_NAME[point["dtype"]]
    b, h, h_kv, d, n = (point[key] for key in ("batch", "heads", "kv_heads", "head_dim", "context"))
    free = torch.cuda.mem_get_info()[0]  # before this point's cache, which every provider shares
    skipped = {name: skip_reason(name, core, point, budget, free) for name, (_, core) in table.items()}
    if None in skipped.values():
        torch.manual_seed(n + b)
        q = torch.randn(b, h, 1, d, device="cuda", dtype=dtype)
        k_cache, v_cache = (torch.randn(b, h_kv, n, d, device="cuda", dtype=dtype) for _ in range(2))
        seqlens = torch.full((b,), n, device="cuda", dtype=torch.int32)
        references = reference_slices(q, k_cache, v_cache)
    results = []
    for name, (fn, _) in table.items():
        entry = {**point, "provider": name, "status": skipped[name]}
        if entry["status"] is None:
            try:
                out = fn(q, k_cache, v_cache, seqlens)
                entry["max_relative_error"] = max(common.check_close(f"out[{i}]", out[i:i + 1], ref, dtype)
                                                  for i, ref in references.items())
                del out
                ms = common.median_ms(lambda: fn(q, k_cache, v_cache, seqlens))
                rate = common.gbps(cache_bytes(point, torch.finfo(dtype).bits // 8), ms)
                entry.update(ms=ms, gbps=rate, of_copy_ceiling=rate / ceilings["copy_gbps"], status="ok")
            except Exception as exc:  # a competitor that cannot run this point is a result, not a crash
                entry["status"] = common.describe_failure(exc)
            torch.cuda.empty_cache()
        results.append(entry)
        print(f"  {point['group']:<22} B={b:<3} N={n:<7} {name:<15} "
              + (f"{entry['gbps']:.0f} GB/s" if entry["status"] == "ok" else entry["status"]), flush=True)
    common.add_speedups(results, modes=None)
    return results


def evaluate_goals(results):
    """The decoding speed goals (on an H100), read off the results."""
    ours = [r for r in results if r["provider"] == "triton" and r["status"] == "ok"
            and r["context"] >= CEILING_GOAL_CONTEXT]
    worst_share = min((r["of_copy_ceiling"] for r in ours), default=None)
    speedups = [r["ours_speedup"] for r in results if "ours_speedup" in r]
    worst_speedup = min(speedups, default=None)
    return [
        {"goal": f"decode reads the cache at >= {CEILING_GOAL:.0%} of the copy ceiling at contexts >= "
                 f"{CEILING_GOAL_CONTEXT // 1024}k",
         "measured": None if worst_share is None else f"worst {worst_share:.0%}",
         "met": None if worst_share is None else worst_share >= CEILING_GOAL},
        {"goal": "decode ahead of every SDPA backend at every point",
         "measured": None if worst_speedup is None else f"worst {worst_speedup:.2f}x",
         "met": None if worst_speedup is None else worst_speedup > 1.0},
    ]


def _cell(entry, ours):
    if entry is None or entry["status"] != "ok":
        return common.short_status(entry)
    if ours:
        return f"{entry['gbps']:.0f} ({entry['of_copy_ceiling']:.0%})"
    return f"{entry['gbps']:.0f}" + (f" ({entry['ours_speedup']:.2f}x)" if "ours_speedup" in entry else "")


def to_markdown(run):
    results = run["results"]
    names = list(dict.fromkeys(r["provider"] for r in results))
    parts = [common.markdown_header(run, "Decoding: cache bytes read per second"), common.goals_markdown(run["goals"]),
             "", "Cells: GB/s of cache read (keys and values, once); triton's as a share of the measured copy "
             "ceiling, each competitor's with ours' speedup over it (its time / ours). One new token per sequence, "
             f"{DTYPE}, the cache filled to the context."]
    for group in dict.fromkeys(r["group"] for r in results):
        entries = [r for r in results if r["group"] == group]
        rows = []
        for batch, context in dict.fromkeys((r["batch"], r["context"]) for r in entries):
            at = {r["provider"]: r for r in entries if (r["batch"], r["context"]) == (batch, context)}
            rows.append([batch, context] + [_cell(at.get(name), name == "triton") for name in names])
        parts += [f"\n## {group}\n", common.markdown_table(["batch", "context", *names], rows)]
    notes = common.not_measured_notes(results)
    if notes:
        parts += ["\n## Not measured\n", notes]
    return "\n".join(parts)


# GPT generation at the reference config (gpt/model.py, vocab 100, bf16 weights): GENERATED_TOKENS new tokens
# after a one-token prompt, so the context stays within block_size (256), per backend and batch, with the cache and
# recomputing the context. The goal: cached generation >= 10x the recompute path.
GENERATION_BATCHES = (1, 64)
GENERATED_TOKENS = 255
GENERATION_GOAL = 10.0


def generation_runs(quick=False):
    """(backend, batch, use_cache) in priority order: every cached run first."""
    batches = GENERATION_BATCHES[:1] if quick else GENERATION_BATCHES
    return [(backend, batch, use_cache) for use_cache in (True, False) for batch in batches
            for backend in ("triton", "sdpa", "eager")]


def generation_tokens_per_s(backend, batch, use_cache):
    """New tokens per second of GPT.generate (all sequences together), after a short warm-up generation."""
    from gpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=100, attention=backend, dropout=0.0)).cuda().to(torch.bfloat16).eval()
    model.check_token_ids = False
    prompt = torch.zeros((batch, 1), dtype=torch.long, device="cuda")
    model.generate(prompt, 8, use_cache=use_cache)  # compile the kernels, warm the allocator
    torch.cuda.synchronize()
    started = time.perf_counter()
    model.generate(prompt, GENERATED_TOKENS, use_cache=use_cache)
    torch.cuda.synchronize()
    return batch * GENERATED_TOKENS / (time.perf_counter() - started)


def generation_results(quick, budget):
    results = []
    for backend, batch, use_cache in generation_runs(quick):
        entry = {"backend": backend, "batch": batch, "use_cache": use_cache}
        if reason := budget.skip_reason(core=True):
            entry["status"] = reason
        else:
            try:
                entry.update(tokens_per_s=generation_tokens_per_s(backend, batch, use_cache), status="ok")
            except Exception as exc:  # noqa: BLE001 - a backend that cannot generate is a result
                entry["status"] = common.describe_failure(exc)
        results.append(entry)
    return results


def generation_markdown(results):
    rows = []
    for backend, batch in dict.fromkeys((r["backend"], r["batch"]) for r in results):
        at = {r["use_cache"]: r for r in results if (r["backend"], r["batch"]) == (backend, batch)}
        rates = [at[c]["tokens_per_s"] if c in at and at[c]["status"] == "ok" else None for c in (True, False)]
        speedup = f"{rates[0] / rates[1]:.1f}x" if None not in rates else "—"
        rows.append([backend, batch] + [f"{r:,.0f}" if r else common.short_status(at.get(c))
                                        for r, c in zip(rates, (True, False))] + [speedup])
    return ("\n## GPT generation, tokens/s\n\n"
            f"The reference config, bf16, {GENERATED_TOKENS} new tokens after a one-token prompt. Goal: the cache "
            f">= {GENERATION_GOAL:.0f}x recomputing.\n\n"
            + common.markdown_table(["backend", "batch", "with the cache", "recomputing", "cache speedup"], rows))


def main():
    args, run = common.start("bench.decode", __doc__.split("\n\n")[0], default_budget_s=120)
    budget = common.Budget(args.budget_s)
    table = providers()
    run["settings"].update(dtype=DTYPE, new_tokens=1, bytes="batch * H_KV * context * D * 2 * element size",
                           timed="attention of the step alone (no append), cache filled to the context")
    run["results"] = []
    for point in sweep_points(args.quick):
        run["results"] += run_point(point, table, budget, run["ceilings"])
    run["generation"] = generation_results(args.quick, budget)
    run["goals"] = evaluate_goals(run["results"])
    run["seconds"] = budget.elapsed()
    common.write_results(run, "decode", to_markdown(run) + "\n" + generation_markdown(run["generation"]), args.out)


if __name__ == "__main__":
    main()
