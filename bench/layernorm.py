"""python -m bench.layernorm: forward, backward and forward+backward GB/s of `kernels.layer_norm` and
`kernels.add_layer_norm` against PyTorch's paths, on the same card in the same run.

Shapes: 4096 rows x width, widths 384 ... 16384 (several not powers of two), fp16 / bf16 / fp32.
Bytes: the op's inputs read once plus its outputs written once (a kernel's own saved statistics not counted):
    layer_norm      fwd  x, weight, bias -> y                 bwd  dy, x, weight -> dx, dweight, dbias
    add_layer_norm  fwd  x, residual, weight, bias -> y, s    bwd  dy, ds, s, weight -> dx (= dresidual), dweight, dbias
fwd+bwd counts both passes' bytes. Every rate is also shown as a fraction of the card's measured copy bandwidth.
Competitors: F.layer_norm, the same under torch.compile (one static-shape compile per point), and the eager
composite (mean / variance formula); add_layer_norm against add-then-F.layer_norm, eager and compiled.
"""

import torch
import torch.nn.functional as F

from bench import common

ROWS = 4096
WIDTHS = [384, 768, 1024, 2048, 3072, 4096, 6144, 8192, 12288, 16384]
EPS = 1e-5


def layer_norm_bytes(rows, width, element_size, mode, with_residual=False):
    """Bytes read plus written by one call, per the table in the module docstring."""
    big, small = rows * width * element_size, width * element_size
    forward = (4 * big + 2 * small) if with_residual else (2 * big + 2 * small)
    backward = (4 * big + 3 * small) if with_residual else (3 * big + 3 * small)
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]


def sweep_points(quick=False):
    """(op, dtype, width) in priority order: the bf16 points the goals name first."""
    widths = [384, 4096] if quick else WIDTHS
    return [(op, dtype, width) for dtype in ("bf16", "fp16", "fp32") for op in ("layer_norm", "add_layer_norm")
            for width in widths]


def eager_composite(x, weight, bias):
    """LayerNorm spelled out with the mean / variance formula, in the input dtype."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) * torch.rsqrt(var + EPS) * weight + bias


def torch_layer_norm(x, weight, bias):
    return F.layer_norm(x, x.shape[-1:], weight, bias, EPS)


def add_then_norm(x, residual, weight, bias):
    s = x + residual
    return torch_layer_norm(s, weight, bias), s


def providers():
    """op -> {name: (function, core)}; core providers are measured even once the budget is spent."""
    import kernels

    common.configure_torch_compile()
    return {
        "layer_norm": {
            "triton": (lambda x, w, b: kernels.layer_norm(x, w, b, EPS), True),
            "torch": (torch_layer_norm, True),
            "torch-compile": (torch.compile(torch_layer_norm, dynamic=False), False),
            "eager-composite": (eager_composite, True),
        },
        "add_layer_norm": {
            "triton": (lambda x, r, w, b: kernels.add_layer_norm(x, r, w, b, EPS), True),
            "add-then-norm": (add_then_norm, True),
            "add-then-norm-compile": (torch.compile(add_then_norm, dynamic=False), False),
        },
    }


def run_point(op, dtype_name, width, table, budget, ceilings):
    dtype = common.DTYPES_BY_NAME[dtype_name]
    with_residual = op == "add_layer_norm"
    torch.manual_seed(width)

    def leaf(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True)

    x, weight, bias = leaf(ROWS, width), leaf(width), leaf(width)
    inputs = [x, leaf(ROWS, width), weight, bias] if with_residual else [x, weight, bias]
    cotangents = [torch.randn(ROWS, width, device="cuda", dtype=dtype) for _ in range(2 if with_residual else 1)]
    reference = fp32_reference(op, inputs, cotangents)

    def backward(outputs, retain_graph):
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        torch.autograd.backward(outputs, cotangents, retain_graph=retain_graph)

    def metrics(mode, ms):
        rate = common.gbps(layer_norm_bytes(ROWS, width, x.element_size(), mode, with_residual), ms)
        return {"gbps": rate, "of_copy_ceiling": rate / ceilings["copy_gbps"]}

    results = []
    for name, (fn, core) in table[op].items():
        entry = {"op": op, "dtype": dtype_name, "rows": ROWS, "width": width, "provider": name}
        if reason := budget.skip_reason(core):
            entry["status"] = reason
        else:
            try:
                entry["max_relative_error"] = check_provider(fn, inputs, cotangents, reference, backward, dtype)
                peak, timings = common.measure_modes(lambda: fn(*inputs), backward, inputs, metrics)
                entry.update(timings, peak_memory_mib=peak / 2**20, status="ok")
            except Exception as exc:  # noqa: BLE001 - a competitor that cannot run a point is a result
                entry["status"] = common.describe_failure(exc)
            for t in inputs:
                t.grad = None
        results.append(entry)
        cells = " ".join(f"{m} {_cell(entry, m)}" for m in common.MODES if m in entry) or entry["status"]
        print(f"  {op:<15} {dtype_name} width={width:<6} {name:<22} {cells}", flush=True)
    common.add_speedups(results)
    return results


def fp32_reference(op, inputs, cotangents):
    """Outputs and input gradients of the op computed in fp32 by F.layer_norm on upcast inputs."""
    leaves = [t.detach().float().requires_grad_() for t in inputs]
    outputs = add_then_norm(*leaves) if op == "add_layer_norm" else (torch_layer_norm(*leaves),)
    torch.autograd.backward(outputs, [c.float() for c in cotangents])
    return [o.detach() for o in outputs], [t.grad for t in leaves]


def check_provider(fn, inputs, cotangents, reference, backward, dtype):
    """Run fn forward and backward once; the largest relative error over its outputs and input gradients."""
    outputs = fn(*inputs)
    backward(outputs, False)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    ref_outputs, ref_grads = reference
    worst = 0.0
    for i, (got, ref) in enumerate(zip(outputs, ref_outputs)):
        worst = max(worst, common.check_close(f"output {i}", got, ref, dtype))
    for i, (t, ref) in enumerate(zip(inputs, ref_grads)):
        worst = max(worst, common.check_close(f"gradient of input {i}", t.grad, ref, dtype))
        t.grad = None
    return worst


def _cell(entry, mode):
    timing = entry[mode]
    return f"{timing['gbps']:.0f}" if "gbps" in timing else common.short_status(timing)


def evaluate_goals(results, ceilings):
    """The LayerNorm speed goals (H100): forward >= 90% of copy bandwidth from width 1024 on, ahead of torch at 384."""
    ours = [r for r in results if r["op"] == "layer_norm" and r["provider"] == "triton" and "gbps" in r.get("fwd", {})]
    wide = [r["fwd"]["of_copy_ceiling"] for r in ours if r["width"] >= 1024]
    narrow = [r["ours_speedup"]["fwd"] for r in results if r["op"] == "layer_norm" and r["provider"] == "torch"
              and r["width"] == 384 and "fwd" in r.get("ours_speedup", {})]
    return [
        {"goal": "LayerNorm forward >= 90% of copy bandwidth from width 1024 on (every dtype)",
         "measured": f"worst {min(wide):.0%} of {ceilings['copy_gbps']:.0f} GB/s" if wide else None,
         "met": min(wide) >= 0.9 if wide else None},
        {"goal": "LayerNorm forward ahead of F.layer_norm at width 384",
         "measured": f"worst {min(narrow):.2f}x" if narrow else None,
         "met": min(narrow) > 1.0 if narrow else None},
    ]


def to_markdown(run):
    results = run["results"]
    parts = [common.markdown_header(run, "LayerNorm: GB/s"), common.goals_markdown(run["goals"]), ""]
    parts.append(
        "Cells: GB/s of inputs read plus outputs written once each (ours' speedup over that provider: its time / "
        "ours). `%copy`: ours as a fraction of the measured copy bandwidth. Rows: 4096."
    )
    for op in dict.fromkeys(r["op"] for r in results):
        for dtype in dict.fromkeys(r["dtype"] for r in results if r["op"] == op):
            entries = [r for r in results if r["op"] == op and r["dtype"] == dtype]
            names = list(dict.fromkeys(r["provider"] for r in entries))
            rows = []
            for width in dict.fromkeys(r["width"] for r in entries):
                at_w = {r["provider"]: r for r in entries if r["width"] == width}
                rows += common.comparison_rows(at_w, names, width, _cell, "of_copy_ceiling")
            parts += [f"\n## {op} {dtype}\n", common.markdown_table(["width", "mode", *names, "%copy"], rows)]
    notes = common.not_measured_notes(results)
    if notes:
        parts += ["\n## Not measured\n", notes]
    return "\n".join(parts)


def main():
    args, run = common.start("bench.layernorm", __doc__.split("\n\n")[0], default_budget_s=75)
    budget = common.Budget(args.budget_s)
    table = providers()
    run["settings"].update(rows=ROWS, eps=EPS, forward_timed_with_grad=True,
                           bytes="inputs read + outputs written once each; fwd+bwd = fwd bytes + bwd bytes")
    run["results"] = []
    for op, dtype, width in sweep_points(args.quick):
        run["results"] += run_point(op, dtype, width, table, budget, run["ceilings"])
        torch.cuda.empty_cache()
    run["goals"] = evaluate_goals(run["results"], run["ceilings"])
    run["seconds"] = budget.elapsed()
    common.write_results(run, "layernorm", to_markdown(run), args.out)


if __name__ == "__main__":
    main()
