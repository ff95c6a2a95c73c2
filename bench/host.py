"""python -m bench.host: what one call costs the host, for every public op and module, beside torch's own op doing
the same job, in the same run.

A small model's training step is host-bound: each kernel runs for a few microseconds, so what decides the step is
how long the Python and C++ around each launch take. This measures that, per call:
- forward with grad (the inputs require grad, so autograd records the call) and forward + backward;
- ours (kernels.attention, attention_varlen, decode_attention, layer_norm, add_layer_norm, FusedMultiHeadAttention,
  FusedLayerNorm) and torch's native equivalent (scaled_dot_product_attention, F.layer_norm, ...), interleaved
  round by round, the fastest round of each, and their ratio;
- a host-bound GPT training step (6 layers, n_embd 48, dropout 0) with our kernels and with SDPA + nn.LayerNorm;
- the Triton launches of one reference GPT training step (n_embd 384, 6 heads, 6 layers, dropout 0.2);
- what each way of wrapping a launch for autograd and torch.compile costs, on a bare one-tensor op.

On a CPU every Triton launch is stubbed out (bench/launches.py): our side is timed up to `kernel[grid](...)` and
the kernels never run (nor do they under the interpreter), while torch's ops run for real on tiny tensors. The
stub leaves out Triton's binder and launcher (JITFunction.run); the binder's share is timed separately on the
recorded arguments of each call (for sm_90), the launcher only on a GPU. A call's time is this thread's CPU time
over a loop of calls on a CPU; on a GPU, where everything runs for real, the wall time of the loop, which the host
bounds at these sizes.

Writes bench/results/host.md and host.json on a CPU, bench/results/<card>/host.md and host.json on a GPU.
"""

import argparse
import gc
import json
import os
import platform
import time
from pathlib import Path

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels' CPU mode

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from bench import common  # noqa: E402
from bench.launches import binder_us, stubbed_launches  # noqa: E402
from gpt.model import GPT, GPTConfig  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
# The host-bound step: the reference model's depth, at a width and length where every kernel is tiny.
HOST_BOUND = dict(vocab_size=65, block_size=32, n_embd=48, n_head=6, n_layer=6, dropout=0.0)
HOST_BOUND_BATCH = 4
# The reference config of gpt-train (GPTConfig's defaults), whose launches per step are counted; its batch and
# length do not change the count, so they are small.
REFERENCE = dict(vocab_size=65, block_size=32, n_embd=384, n_head=6, n_layer=6, dropout=0.2)
GOALS = {"fwd+bwd": 1.5, "fwd": 2.0, "gpt step": 1.3}  # ours / native at most
SAMPLE_S = 0.01  # each timing sample runs calls for about this long


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=True)


def _backward_of(outputs, leaves):
    """A function running one backward of `outputs()` into `leaves` (torch.autograd.grad: nothing accumulates)."""

    def run():
        out = outputs()
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(out, leaves, [torch.ones_like(o) for o in out])

    return run


def _pair(name, ours, native, leaves, native_leaves=None, modes=("fwd", "fwd+bwd")):
    """The rows of one op: per mode, (name, mode, our call, native call). The backward reaches `leaves` (and
    `native_leaves` on torch's side, when its module holds its own parameters)."""
    native_leaves = leaves if native_leaves is None else native_leaves
    calls = {"fwd": (ours, native), "fwd+bwd": (_backward_of(ours, leaves), _backward_of(native, native_leaves))}
    return [(name, mode, *calls[mode]) for mode in modes]


def op_cases():
    """(name, mode, ours, native) for every public op and module, on tiny fp32 tensors of the host-bound model's
    shapes: batch 2, 6 heads of size 8 over 16 tokens, width 48."""
    batch, heads, n, head_dim, width = 2, 6, 16, 8, 48
    q, k, v = (_leaf(batch, heads, n, head_dim) for _ in range(3))
    cases = _pair("kernels.attention (causal)", lambda: kernels.attention(q, k, v),
                  lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v])

    packed = [_leaf(batch * n, heads, head_dim) for _ in range(3)]
    cu_seqlens = torch.tensor([0, n, 2 * n], dtype=torch.int32, device=DEVICE)
    dense = [t.view(batch, n, heads, head_dim).transpose(1, 2) for t in packed]
    cases += _pair("kernels.attention_varlen (vs SDPA on the dense batch)",
                   lambda: kernels.attention_varlen(*packed, cu_seqlens, cu_seqlens, n, n),
                   lambda: F.scaled_dot_product_attention(*dense, is_causal=True), packed)

    x, residual = _leaf(batch, n, width), _leaf(batch, n, width)
    weight, bias = _leaf(width), _leaf(width)
    cases += _pair("kernels.layer_norm", lambda: kernels.layer_norm(x, weight, bias),
                   lambda: F.layer_norm(x, (width,), weight, bias), [x, weight, bias])

    def add_then_norm():
        s = x + residual
        return F.layer_norm(s, (width,), weight, bias), s

    cases += _pair("kernels.add_layer_norm (vs add, then F.layer_norm)",
                   lambda: kernels.add_layer_norm(x, residual, weight, bias), add_then_norm,
                   [x, residual, weight, bias])

    ours_mha = kernels.FusedMultiHeadAttention(width, heads).to(DEVICE)
    sdpa_mha = kernels.FusedMultiHeadAttention(width, heads, backend="sdpa").to(DEVICE)
    sdpa_mha.load_state_dict(ours_mha.state_dict())
    cases += _pair("FusedMultiHeadAttention (vs its SDPA backend)", lambda: ours_mha(x), lambda: sdpa_mha(x),
                   [x, *ours_mha.parameters()], [x, *sdpa_mha.parameters()])

    ours_ln, native_ln = kernels.FusedLayerNorm(width).to(DEVICE), nn.LayerNorm(width).to(DEVICE)
    cases += _pair("FusedLayerNorm (vs nn.LayerNorm)", lambda: ours_ln(x), lambda: native_ln(x),
                   [x, *ours_ln.parameters()], [x, *native_ln.parameters()])
    cases.append(("kernels.decode_attention (vs append, then SDPA)", "fwd (no grad)", *_decode_calls()))
    return cases


def _decode_calls():
    """One decoding step of one new token against caches holding 15: ours, and torch's (the two appends, then SDPA
    on the filled slots), under no_grad."""
    batch, heads, n_max, head_dim, filled = 2, 6, 32, 8, 15
    k_cache, v_cache = (torch.randn(batch, heads, n_max, head_dim, device=DEVICE) for _ in range(2))
    q, k_new, v_new = (torch.randn(batch, heads, 1, head_dim, device=DEVICE) for _ in range(3))

    @torch.no_grad()
    def ours():
        return kernels.decode_attention(q, k_cache, v_cache, filled, k_new=k_new, v_new=v_new)

    @torch.no_grad()
    def native():
        k_cache[:, :, filled:filled + 1] = k_new
        v_cache[:, :, filled:filled + 1] = v_new
        return F.scaled_dot_product_attention(q, k_cache[:, :, :filled + 1], v_cache[:, :, :filled + 1])

    return ours, native


def gpt_step_case():
    """One training step's forward and backward (gradients set to None first) of the host-bound GPT: our kernels
    against SDPA + nn.LayerNorm, with the same weights and batch."""
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**HOST_BOUND, attention="triton", layernorm="triton")).to(DEVICE)
    native = GPT(GPTConfig(**HOST_BOUND, attention="sdpa", layernorm="eager")).to(DEVICE)
    native.load_state_dict(ours.state_dict())
    idx = torch.randint(0, HOST_BOUND["vocab_size"], (HOST_BOUND_BATCH, HOST_BOUND["block_size"]), device=DEVICE)

    def step_of(model):
        model.check_token_ids = False  # as gpt-train runs it: no host read of the batch

        def step():
            model.zero_grad(set_to_none=True)
            _, loss = model(idx, idx)
            loss.backward()

        return step

    return ("GPT step (6 layers, n_embd 48, batch 4 x 32)", "fwd+bwd", step_of(ours), step_of(native))


# --------------------------------------------------------------------------------------------------------------
# The wrapping of one launch: a bare one-tensor op (out = x * 2, grad = g * 2) in each way torch offers


def wrapper_cases():
    """(name, fwd+bwd call): the same doubling, called plainly, through an autograd.Function calling the body,
    through an autograd.Function calling an operator registered with torch.library.define / impl, and as a
    torch.library.custom_op with register_autograd (what every call paid before)."""
    namespace = "decoder_kernels_host_bench"
    lib = torch.library.Library(namespace, "FRAGMENT")
    lib.define("double(Tensor x) -> Tensor")
    lib.impl("double", lambda x: x * 2, "CompositeExplicitAutograd")
    defined = getattr(torch.ops, namespace).double.default

    @torch.library.custom_op(f"{namespace}::double_custom", mutates_args=())
    def custom(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    custom.register_autograd(lambda ctx, g: g * 2)

    def function_calling(body):
        class Double(torch.autograd.Function):  # forward(ctx, ...): a separate setup_context costs ~10 us more
            @staticmethod
            def forward(ctx, x):
                return body(x)

            @staticmethod
            def backward(ctx, g):
                return body(g)

        return Double.apply

    x = _leaf(4, 48)
    ways = [("plain call", lambda t: t * 2), ("autograd.Function calling the body", function_calling(lambda t: t * 2)),
            ("autograd.Function calling a torch.library.define'd operator", function_calling(defined)),
            ("torch.library.custom_op + register_autograd", custom)]
    wrappers = [(name, _backward_of(lambda fn=fn: fn(x), [x])) for name, fn in ways]
    return wrappers, lib  # the library keeps its operators registered while it lives


# --------------------------------------------------------------------------------------------------------------
# Timing


def _synchronize():
    if ON_GPU:
        torch.cuda.synchronize()


# On a GPU the wall time (the host and the device overlap; the slower bounds the loop). On a CPU this thread's CPU
# time: a shared machine's other processes then do not count, and nothing is waited for.
_clock_ns = time.perf_counter_ns if ON_GPU else time.thread_time_ns


def _sample_us(fn, calls):
    _synchronize()
    start = _clock_ns()
    for _ in range(calls):
        fn()
    _synchronize()
    return (_clock_ns() - start) / calls / 1e3


def _calls_per_sample(fns):
    """Calls per timing sample: about SAMPLE_S of the slowest function, at least 3."""
    for fn in fns:
        for _ in range(3):
            fn()  # warm-up: lazy initialisation, first launches (compiles on a GPU)
    slowest = max(_sample_us(fn, 3) for fn in fns)
    return max(3, int(SAMPLE_S * 1e6 / slowest))


def interleaved_us(fns, rounds):
    """Microseconds per call of each function: timed round by round in turn, so that whatever else the machine does
    falls on all of them alike, and the fastest round kept (other work on a shared machine only adds time)."""
    calls = _calls_per_sample(fns)
    samples = [[] for _ in fns]
    gc.disable()
    try:
        for _ in range(rounds):
            for fn, times in zip(fns, samples):
                times.append(_sample_us(fn, calls))
    finally:
        gc.enable()
    return [min(times) for times in samples]


def binder_share_us(ours):
    """Triton's binder time for the launches of one call of `ours` (the CPU stub leaves it out)."""
    with stubbed_launches(record=True) as launches:
        ours()
    return binder_us(launches.recorded), launches.total()


def reference_step_launches():
    """Triton launches per kernel in one forward + backward of the reference GPT (every launch stubbed)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**REFERENCE, attention="triton", layernorm="triton")).to(DEVICE)
    model.check_token_ids = False
    idx = torch.randint(0, REFERENCE["vocab_size"], (1, REFERENCE["block_size"]), device=DEVICE)
    with stubbed_launches() as launches:
        _, loss = model(idx, idx)
        loss.backward()
    return dict(launches.counts)


def measure(rounds):
    cases = op_cases() + [gpt_step_case()]
    wrappers, library = wrapper_cases()
    rows = []
    for name, mode, ours, native in cases:
        ours_us, native_us = interleaved_us([ours, native], rounds)
        row = dict(call=name, mode=mode, ours_us=ours_us, native_us=native_us, ratio=ours_us / native_us)
        if not ON_GPU:
            row["binder_us"], row["launches"] = binder_share_us(ours)
        rows.append(row)
        print(f"{name:58} {mode:14} ours {ours_us:8.1f} us  native {native_us:8.1f} us  {row['ratio']:5.2f}x",
              flush=True)
    wrapper_us = interleaved_us([fn for _, fn in wrappers], rounds)
    del library
    return rows, [dict(wrapper=name, us=us) for (name, _), us in zip(wrappers, wrapper_us)]


# --------------------------------------------------------------------------------------------------------------
# Report


def _goal(row):
    if row["call"].startswith("GPT step"):
        return GOALS["gpt step"]
    return GOALS.get(row["mode"])


def goals(rows):
    """Each goal's rows (layer_norm, add_layer_norm and attention per mode; the GPT step) and whether they meet it."""
    checked = [r for r in rows if _goal(r) is not None and (
        r["call"].startswith(("kernels.layer_norm", "kernels.add_layer_norm", "kernels.attention (", "GPT step")))]
    return [dict(goal=f"{r['call'].split(' (')[0]} {r['mode']}: ours / native <= {_goal(r)}x",
                 measured=f"{r['ratio']:.2f}x", met=r["ratio"] <= _goal(r)) for r in checked]


def environment():
    import triton

    if ON_GPU:
        env = common.environment()
        return env, f"{env['card']}, driver {env['driver']}, CUDA {env['cuda']}"
    env = dict(card="cpu", processor=platform.processor() or platform.machine(), torch=torch.__version__,
               triton=triton.__version__, python=platform.python_version(), threads=torch.get_num_threads())
    return env, f"CPU ({env['processor']}, {env['threads']} torch threads), Triton launches stubbed"


def markdown(run):
    env = run["environment"]
    lines = [
        "# Host cost per call: ours against torch's own ops",
        "",
        f"{run['where']}; torch {env['torch']}, triton {env['triton']}, python {env['python']}, {run['date']}. "
        f"fp32; per call, the fastest of {run['rounds']} interleaved rounds; `python -m bench.host`.",
        "",
    ]
    if not ON_GPU:
        lines += [
            "Our side runs everything up to each `kernel[grid](...)`, which is stubbed (no kernel runs); torch's "
            "side runs its ops for real on the same tiny tensors. Left out of ours: Triton's binder (its column: "
            "timed separately, for sm_90, on each call's recorded launch arguments) and its launcher (the driver "
            "call: on a GPU only).",
            "",
        ]
    headers = ["call", "mode", "ours µs", "native µs", "ours / native"]
    if not ON_GPU:
        headers += ["Triton launches", "binder µs (not in ours)"]
    table = []
    for r in run["rows"]:
        row = [r["call"], r["mode"], r["ours_us"], r["native_us"], f"{r['ratio']:.2f}x"]
        if not ON_GPU:
            row += [r["launches"], r["binder_us"]]
        table.append(row)
    lines += [common.markdown_table(headers, table), ""]
    launches = run["reference_step_launches"]
    lines += [
        f"## Triton launches per reference GPT training step: {sum(launches.values())}",
        "",
        "n_embd 384, 6 heads, 6 layers, dropout 0.2, forward and backward: "
        + ", ".join(f"{name} {count}" for name, count in sorted(launches.items())) + ".",
        "",
        "## What wrapping one launch costs",
        "",
        "A bare one-tensor op (x * 2, its gradient g * 2), forward and backward, per way of wrapping it:",
        "",
        common.markdown_table(["wrapping", "µs"], [[w["wrapper"], w["us"]] for w in run["wrappers"]]),
        "",
        common.goals_markdown(run["goals"]),
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=21, help="interleaved timing rounds per row (the fastest)")
    parser.add_argument("--quick", action="store_true", help="3 rounds: to check the script runs")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default bench/results/ on a CPU, bench/results/<card>/ on a GPU)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds the cost of waking it
    try:
        run = run_all(3 if args.quick else args.rounds)
    finally:
        torch.set_num_threads(threads)
    out = args.out or (common.RESULTS_DIR / run["environment"]["card_slug"] if ON_GPU else common.RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host.json").write_text(json.dumps(run, indent=1) + "\n")
    (out / "host.md").write_text(markdown(run) + "\n")
    print(markdown(run))
    print(f"\nwrote {out / 'host.md'} and host.json", flush=True)


def run_all(rounds):
    """Every measurement, as the dict host.json holds."""
    env, where = environment()
    print(f"bench.host: {where}", flush=True)
    if ON_GPU:
        rows, wrappers = measure(rounds)
    else:
        with stubbed_launches():
            rows, wrappers = measure(rounds)
    return dict(benchmark="bench.host", environment=env, where=where, rounds=rounds, rows=rows, wrappers=wrappers,
                reference_step_launches=reference_step_launches(), goals=goals(rows),
                date=time.strftime("%Y-%m-%d", time.gmtime()))


if __name__ == "__main__":
    main()
