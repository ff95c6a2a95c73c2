"""python -m bench.train: training tokens/s and peak memory of the GPT in gpt/ per backend.

A step is what gpt/train.py does per batch: zero the grads, forward with the loss, backward, AdamW step; under bf16
autocast, on fixed random token ids (the data loader is not what is measured). Backends:
    eager   GPTConfig(attention="eager",  layernorm="eager")    the reference design, head by head
    triton  GPTConfig(attention="triton", layernorm="triton")   this package's kernels
    sdpa    GPTConfig(attention="sdpa",   layernorm="eager")    PyTorch's SDPA + native nn.LayerNorm
each also under torch.compile where it works (a failure is recorded with its reason). Configs: the reference one
(n_embd 384, 6 heads, 6 layers, block 256, batch 64) and a larger one (768 wide, 12 heads, 12 layers, 1024 tokens).
Before timing, each backend's logits (eval mode, same weights) are checked against the eager model's in fp32.
Peak memory is the whole step's (model, optimizer state and activations).
"""

import torch

from bench import common

VOCAB_SIZE = 100
CONFIGS = {
    "reference": dict(n_embd=384, n_head=6, n_layer=6, block_size=256, batch=64),
    "large": dict(n_embd=768, n_head=12, n_layer=12, block_size=1024, batch=16),
}
BACKENDS = {
    "eager": dict(attention="eager", layernorm="eager"),
    "triton": dict(attention="triton", layernorm="triton"),
    "sdpa": dict(attention="sdpa", layernorm="eager"),
}
WARMUP_STEPS = 3
STEP_REP_MS = 300


def runs(quick=False):
    """(config, backend, compiled, core) in priority order: every eager-mode run before any compile, since
    compiling is what the time budget cannot always afford."""
    configs = ["reference"] if quick else list(CONFIGS)
    order = [(c, b, False, True) for c in configs for b in BACKENDS]
    return order + [(c, b, True, False) for c in configs for b in BACKENDS]


def build(config_name, backend, seed=0):
    from gpt.model import GPT, GPTConfig

    sizes = {k: v for k, v in CONFIGS[config_name].items() if k != "batch"}
    torch.manual_seed(seed)  # the same weights for every backend
    model = GPT(GPTConfig(vocab_size=VOCAB_SIZE, **sizes, **BACKENDS[backend])).cuda()
    model.check_token_ids = False  # as gpt-train runs it: no device sync per step
    return model


def batch_of(config_name):
    cfg = CONFIGS[config_name]
    torch.manual_seed(1)
    shape = (cfg["batch"], cfg["block_size"])
    idx = torch.randint(0, VOCAB_SIZE, shape, device="cuda")
    targets = torch.randint(0, VOCAB_SIZE, shape, device="cuda")
    return idx, targets


def reference_logits(config_name, idx):
    """The eager model's logits in fp32, eval mode: the truth each backend's first logits are checked against.
    (Logits, not the loss: at initialisation the loss is ln(vocab) whatever attention computes.)"""
    model = build(config_name, "eager").eval()
    with torch.no_grad():
        return model(idx)[0]


def prepare(config_name, backend, compiled, idx, targets, ref_logits):
    """The model and its training step, after checking its logits (eval mode, bf16 autocast) against the eager
    fp32 logits. Returns (model, step, relative error of the logits)."""
    model = build(config_name, backend)
    step_model = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)

    def forward(targets=None):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return step_model(idx, targets)

    model.eval()
    with torch.no_grad():
        error = common.check_close("logits", forward()[0], ref_logits, torch.bfloat16)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        forward(targets)[1].backward()
        optimizer.step()

    return model, step, error


def measure(config_name, backend, compiled, idx, targets, ref_logits):
    model, step, error = prepare(config_name, backend, compiled, idx, targets, ref_logits)
    for _ in range(WARMUP_STEPS):  # compilation, autotuning and allocator warm-up stay out of the numbers
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    ms = common.median_ms(step, warmup=0, rep=STEP_REP_MS)
    return {"logits_relative_error": error, "step_ms": ms, "tokens_per_s": idx.numel() / (ms * 1e-3),
            "peak_memory_mib": peak / 2**20, "parameters": model.num_parameters()}


def evaluate_goals(results):
    """The training speed goals at the reference config: >= 3x eager and ahead of SDPA + native LayerNorm."""

    def tokens(backend):
        return next((r["tokens_per_s"] for r in results if r["config"] == "reference" and r["backend"] == backend
                     and not r["compiled"] and r["status"] == "ok"), None)

    ours, eager, sdpa = tokens("triton"), tokens("eager"), tokens("sdpa")
    goals = []
    for text, other, target in [("training (reference config) >= 3x eager", eager, 3.0),
                                ("training (reference config) ahead of SDPA + native LayerNorm", sdpa, 1.0)]:
        ratio = ours / other if ours and other else None
        met = None if ratio is None else (ratio >= target if target > 1 else ratio > target)
        goals.append({"goal": text, "measured": None if ratio is None else f"{ratio:.2f}x", "met": met})
    return goals


def to_markdown(run):
    results = run["results"]
    rows = []
    for r in results:
        eager = next((e for e in results if e["config"] == r["config"] and e["backend"] == "eager"
                      and not e["compiled"] and e["status"] == "ok"), None)
        if r["status"] == "ok":
            vs_eager = f"{r['tokens_per_s'] / eager['tokens_per_s']:.2f}x" if eager else "—"
            rows.append([r["config"], r["backend"], "yes" if r["compiled"] else "no", f"{r['tokens_per_s']:,.0f}",
                         vs_eager, f"{r['step_ms']:.1f}", f"{r['peak_memory_mib']:,.0f}", "ok"])
        else:
            rows.append([r["config"], r["backend"], "yes" if r["compiled"] else "no", "—", "—", "—", "—",
                         r["status"]])
    configs = "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in cfg.items()) for name, cfg in CONFIGS.items())
    return "\n".join([
        common.markdown_header(run, "GPT training: tokens/s"),
        common.goals_markdown(run["goals"]),
        "",
        f"Configs ({configs}; vocab {VOCAB_SIZE}, dropout 0.2, bf16 autocast, AdamW). A step: zero_grad, "
        "forward with loss, backward, optimizer step. Peak memory: the whole step's.",
        "",
        common.markdown_table(["config", "backend", "compiled", "tokens/s", "vs eager", "step ms", "peak MiB",
                               "status"], rows),
    ])


def main():
    args, run = common.start("bench.train", __doc__.split("\n\n")[0], default_budget_s=150)
    budget = common.Budget(args.budget_s)
    run["settings"].update(autocast="bf16", optimizer="AdamW", warmup_steps=WARMUP_STEPS, step_rep_ms=STEP_REP_MS,
                           configs=CONFIGS, vocab_size=VOCAB_SIZE)
    run["results"] = []
    data = {}
    for config_name, backend, compiled, core in runs(args.quick):
        entry = {"config": config_name, "backend": backend, "compiled": compiled}
        if reason := budget.skip_reason(core):
            entry["status"] = reason
        else:
            if config_name not in data:
                idx, targets = batch_of(config_name)
                data[config_name] = (idx, targets, reference_logits(config_name, idx))
            try:
                entry.update(measure(config_name, backend, compiled, *data[config_name]), status="ok")
            except Exception as exc:  # noqa: BLE001 - a backend that cannot train (or compile) is a result
                entry["status"] = common.describe_failure(exc)
            torch.cuda.empty_cache()
        run["results"].append(entry)
        shown = f"{entry['tokens_per_s']:,.0f} tokens/s" if entry["status"] == "ok" else entry["status"]
        print(f"  {config_name:<10} {backend:<7} {'compiled' if compiled else 'eager-mode':<11} {shown}", flush=True)
    run["goals"] = evaluate_goals(run["results"])
    run["seconds"] = budget.elapsed()
    common.write_results(run, "train", to_markdown(run), args.out)


if __name__ == "__main__":
    main()
