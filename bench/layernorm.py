"""python -m bench.layernorm: forward, backward and forward+backward GB/s of `kernels.layer_norm`,
`kernels.add_layer_norm` and `kernels.rms_norm` against PyTorch's paths, on the same card in the same run.

Shapes (SHAPES), fp16 / bf16 / fp32: the reference GPT's own (64 x 256 tokens of width 384) and the large config's
(16 x 1024 tokens of 768); a bandwidth-bound sweep, 65536 rows of each width; and 4096 rows of each width, where the
narrow widths are launch-bound on any card (4096 x 384 is 3 MB).
Bytes: the op's inputs read once plus its outputs written once (a kernel's own saved statistics not counted):
    layer_norm      fwd  x, weight, bias -> y                 bwd  dy, x, weight -> dx, dweight, dbias
    add_layer_norm  fwd  x, residual, weight, bias -> y, s    bwd  dy, ds, s, weight -> dx (= dresidual), dweight, dbias
    rms_norm        fwd  x, weight -> y                       bwd  dy, x, weight -> dx, dweight
fwd+bwd counts both passes' bytes. Every rate is also shown as a fraction of the card's measured copy bandwidth.
Competitors: F.layer_norm, the same under torch.compile (one static-shape compile per point), and the eager
composite (mean / variance formula); add_layer_norm against add-then-F.layer_norm, eager and compiled; rms_norm
against F.rms_norm (what torch.nn.RMSNorm runs), eager and compiled.
"""

import torch
import torch.nn.functional as F

from bench import common

# name -> (rows, widths), in the order they are measured
SHAPES = {
    "GPT (64 x 256 tokens)": (64 * 256, [384]),
    "GPT large (16 x 1024 tokens)": (16 * 1024, [768]),
    "bandwidth-bound (65536 rows)": (65536, [384, 1024, 2048, 4096, 8192, 16384]),
    "4096 rows": (4096, [384, 768, 1024, 2048, 3072, 4096, 6144, 8192, 12288, 16384]),
}
QUICK_WIDTHS = {"bandwidth-bound (65536 rows)": [1024], "4096 rows": [384, 4096]}
BANDWIDTH_BOUND = "bandwidth-bound (65536 rows)"
EPS = 1e-5


# op -> ((rows x width tensors, width vectors) read plus written by the forward, (the same) by the backward), per
# the table in the module docstring
TENSORS_MOVED = {
    "layer_norm": ((2, 2), (3, 3)),
    "add_layer_norm": ((4, 2), (4, 3)),
    "rms_norm": ((2, 1), (3, 2)),
}


def norm_bytes(op, rows, width, element_size, mode):
    """Bytes read plus written by one call of op."""
    big, small = rows * width * element_size, width * element_size
    forward, backward = (big * n_big + small * n_small for n_big, n_small in TENSORS_MOVED[op])
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]


def sweep_points(quick=False):
    """Points (op, dtype, shape name, rows, width) in priority order: the bf16 points first, and in each dtype the
    model shapes, then the bandwidth-bound sweep."""
    return [(op, dtype, shape, rows, width) for dtype in ("bf16", "fp16", "fp32")
            for op in TENSORS_MOVED for shape, (rows, widths) in SHAPES.items()
            for width in (QUICK_WIDTHS.get(shape, widths) if quick else widths)]


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


def torch_rms_norm(x, weight):
    return F.rms_norm(x, x.shape[-1:], weight, EPS)


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
        "rms_norm": {
            "triton": (lambda x, w: kernels.rms_norm(x, w, EPS), True),
            "torch": (torch_rms_norm, True),
            "torch-compile": (torch.compile(torch_rms_norm, dynamic=False), False),
        },
    }


def run_point(op, dtype_name, shape, rows, width, table, budget, ceilings):
    dtype = common.DTYPES_BY_NAME[dtype_name]
    with_residual = op == "add_layer_norm"
    torch.manual_seed(width)

    def leaf(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True)

    x, weight, bias = leaf(rows, width), leaf(width), leaf(width)
    inputs = {"layer_norm": [x, weight, bias], "add_layer_norm": [x, leaf(rows, width), weight, bias],
              "rms_norm": [x, weight]}[op]
    cotangents = [torch.randn(rows, width, device="cuda", dtype=dtype) for _ in range(2 if with_residual else 1)]
    reference = fp32_reference(op, inputs, cotangents)

    def backward(outputs, retain_graph):
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        torch.autograd.backward(outputs, cotangents, retain_graph=retain_graph)

    def metrics(mode, ms):
        rate = common.gbps(norm_bytes(op, rows, width, x.element_size(), mode), ms)
        return {"gbps": rate, "of_copy_ceiling": rate / ceilings["copy_gbps"]}

    results = []
    for name, (fn, core) in table[op].items():
        entry = {"op": op, "dtype": dtype_name, "shape": shape, "rows": rows, "width": width, "provider": name}
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
        print(f"  {op:<15} {dtype_name} rows={rows:<6} width={width:<6} {name:<22} {cells}", flush=True)
    common.add_speedups(results)
    return results


def fp32_reference(op, inputs, cotangents):
    """Outputs and input gradients of the op computed in fp32 by torch's own ops on upcast inputs."""
    leaves = [t.detach().float().requires_grad_() for t in inputs]
    outputs = {"layer_norm": lambda: (torch_layer_norm(*leaves),), "add_layer_norm": lambda: add_then_norm(*leaves),
               "rms_norm": lambda: (torch_rms_norm(*leaves),)}[op]()
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
    """The LayerNorm speed goals: on the bandwidth-bound shape from width 1024 on, the forward >= 90% and the
    backward >= 80% of the copy bandwidth (both ops, every dtype); and at least as fast as PyTorch's eager path
    (F.layer_norm, add then F.layer_norm, F.rms_norm) at every point, in every mode."""
    ours = [r for r in results if r["provider"] == "triton" and r["shape"] == BANDWIDTH_BOUND and r["width"] >= 1024]
    goals = []
    for mode, share in (("fwd", 0.9), ("bwd", 0.8)):
        shares = [r[mode]["of_copy_ceiling"] for r in ours if "gbps" in r.get(mode, {})]
        goals.append({"goal": f"{mode} >= {share:.0%} of copy bandwidth on the bandwidth-bound shape from width 1024 "
                              "on",
                      "measured": f"worst {min(shares):.0%} of {ceilings['copy_gbps']:.0f} GB/s" if shares else None,
                      "met": min(shares) >= share if shares else None})
    speedups = [r["ours_speedup"][mode] for r in results if r["provider"] in ("torch", "add-then-norm")
                for mode in common.MODES if mode in r.get("ours_speedup", {})]
    goals.append({"goal": "at least as fast as torch's eager path (F.layer_norm; add then F.layer_norm; "
                          "F.rms_norm) at every shape, width and mode",
                  "measured": f"worst {min(speedups):.2f}x" if speedups else None,
                  "met": min(speedups) >= 1.0 if speedups else None})
    return goals


def to_markdown(run):
    results = run["results"]
    parts = [common.markdown_header(run, "LayerNorm: GB/s"), common.goals_markdown(run["goals"]), ""]
    parts.append(
        "Cells: GB/s of inputs read plus outputs written once each (ours' speedup over that provider: its time / "
        "ours). `%copy`: ours as a fraction of the measured copy bandwidth."
    )
    for op in dict.fromkeys(r["op"] for r in results):
        for dtype in dict.fromkeys(r["dtype"] for r in results if r["op"] == op):
            for shape in dict.fromkeys(r["shape"] for r in results if (r["op"], r["dtype"]) == (op, dtype)):
                entries = [r for r in results if (r["op"], r["dtype"], r["shape"]) == (op, dtype, shape)]
                names = list(dict.fromkeys(r["provider"] for r in entries))
                rows = []
                for width in dict.fromkeys(r["width"] for r in entries):
                    at_w = {r["provider"]: r for r in entries if r["width"] == width}
                    rows += common.comparison_rows(at_w, names, width, _cell, "of_copy_ceiling")
                parts += [f"\n## {op} {dtype}, {shape}\n",
                          common.markdown_table(["width", "mode", *names, "%copy"], rows)]
    notes = common.not_measured_notes(results)
    if notes:
        parts += ["\n## Not measured\n", notes]
    return "\n".join(parts)


def main():
    args, run = common.start("bench.layernorm", __doc__.split("\n\n")[0], default_budget_s=75)
    budget = common.Budget(args.budget_s)
    table = providers()
    run["settings"].update(shapes={name: rows for name, (rows, _) in SHAPES.items()}, eps=EPS,
                           forward_timed_with_grad=True,
                           bytes="inputs read + outputs written once each; fwd+bwd = fwd bytes + bwd bytes")
    run["results"] = []
    for op, dtype, shape, rows, width in sweep_points(args.quick):
        run["results"] += run_point(op, dtype, shape, rows, width, table, budget, run["ceilings"])
        torch.cuda.empty_cache()
    run["goals"] = evaluate_goals(run["results"], run["ceilings"])
    run["seconds"] = budget.elapsed()
    common.write_results(run, "layernorm", to_markdown(run), args.out)


if __name__ == "__main__":
    main()
