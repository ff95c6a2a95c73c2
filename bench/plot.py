"""python -m bench.plot bench/results/<card>/: PNG plots from the JSON files a GPU run wrote there.

    attention_<dtype>.png        TFLOP/s against sequence length per provider: a row per (head size, causal),
                                 a column per mode; the dashed line is the card's measured bf16 matmul ceiling
    layernorm_<op>_<rows>_rows.png
                                 GB/s against width per provider, one plot per row count swept: a row per dtype,
                                 a column per mode; the dashed line is the card's measured copy bandwidth
    train.png                    tokens/s per backend and config, eager-mode and compiled

Needs matplotlib (not a dependency of the package: `pip install matplotlib`, or the `bench` extra). Runs anywhere,
no GPU needed.
"""

import argparse
import json
import sys
from pathlib import Path

MODES = ("fwd", "bwd", "fwd+bwd")


def _load(folder, name):
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _series(entries, x_key, mode, metric):
    """provider -> (xs, ys) of the points it measured."""
    series = {}
    for r in entries:
        if r["status"] == "ok" and metric in r.get(mode, {}):
            xs, ys = series.setdefault(r["provider"], ([], []))
            xs.append(r[x_key])
            ys.append(r[mode][metric])
    return series


def _grid(plt, row_names, title):
    fig, axes = plt.subplots(len(row_names), len(MODES), figsize=(5 * len(MODES), 3.6 * len(row_names)),
                             squeeze=False)
    fig.suptitle(title)
    return fig, axes


def _draw(ax, series, ceiling, ceiling_label, xlabel, ylabel, panel_title):
    for provider, (xs, ys) in series.items():
        style = dict(linewidth=2.5, color="black") if provider == "triton" else dict(linewidth=1.2)
        ax.plot(xs, ys, marker="o", markersize=3, label=provider, **style)
    ax.axhline(ceiling, linestyle="--", color="gray", linewidth=1, label=ceiling_label)
    ax.set_xscale("log", base=2)
    ticks = sorted({x for xs, _ in series.values() for x in xs})
    ax.set_xticks(ticks, [str(x) for x in ticks], rotation=45, fontsize=8)
    ax.minorticks_off()
    ax.set_title(panel_title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def plot_attention(plt, run, folder):
    written = []
    ceiling = run["ceilings"]["matmul_bf16_tflops"]
    sweep = [r for r in run["results"] if not r["group"].startswith("decoder")]
    for dtype in dict.fromkeys(r["dtype"] for r in sweep):
        groups = list(dict.fromkeys(r["group"] for r in sweep if r["dtype"] == dtype))
        fig, axes = _grid(plt, groups, f"Attention {dtype}, {run['environment']['card']}: TFLOP/s (B*N = 16k, H*D = 2048)")
        for row, group in enumerate(groups):
            entries = [r for r in sweep if r["group"] == group]
            for col, mode in enumerate(MODES):
                _draw(axes[row][col], _series(entries, "seq_len", mode, "tflops"), ceiling,
                      f"bf16 matmul {ceiling:.0f}", "sequence length", "TFLOP/s", f"{group}, {mode}")
        axes[0][0].legend(fontsize=8)
        written.append(_save(plt, fig, folder / f"attention_{dtype}.png"))
    return written


def plot_layernorm(plt, run, folder):
    written = []
    ceiling = run["ceilings"]["copy_gbps"]
    for op in dict.fromkeys(r["op"] for r in run["results"]):
        for rows in dict.fromkeys(r["rows"] for r in run["results"] if r["op"] == op):
            entries = [r for r in run["results"] if (r["op"], r["rows"]) == (op, rows)]
            if len({r["width"] for r in entries}) < 2:
                continue  # a model's single shape: in the markdown table only
            dtypes = list(dict.fromkeys(r["dtype"] for r in entries))
            fig, axes = _grid(plt, dtypes, f"{op}, {run['environment']['card']}: GB/s ({rows} rows)")
            for row, dtype in enumerate(dtypes):
                for col, mode in enumerate(MODES):
                    _draw(axes[row][col], _series([r for r in entries if r["dtype"] == dtype], "width", mode,
                                                  "gbps"), ceiling, f"copy {ceiling:.0f}", "width", "GB/s",
                          f"{dtype}, {mode}")
            axes[0][0].legend(fontsize=8)
            written.append(_save(plt, fig, folder / f"layernorm_{op}_{rows}_rows.png"))
    return written


def plot_train(plt, run, folder):
    configs = list(dict.fromkeys(r["config"] for r in run["results"]))
    fig, axes = plt.subplots(1, len(configs), figsize=(6 * len(configs), 4), squeeze=False)
    fig.suptitle(f"GPT training, {run['environment']['card']}: tokens/s of gpt-train's step")
    for ax, config in zip(axes[0], configs):
        entries = [r for r in run["results"] if r["config"] == config]
        labels = [f"{r['backend']}, {r['mode']}" for r in entries]
        values = [r.get("tokens_per_s", 0.0) for r in entries]
        bars = ax.bar(range(len(entries)), values, color=["black" if r["backend"] == "triton" else "tab:blue"
                                                          for r in entries])
        for bar, r in zip(bars, entries):
            if r["status"] != "ok":
                ax.annotate(r["status"].split(":")[0], (bar.get_x() + bar.get_width() / 2, 0), ha="center",
                            va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(range(len(entries)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(config)
        ax.set_ylabel("tokens/s")
    return [_save(plt, fig, folder / "train.png")]


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_folder(folder):
    """Write every plot whose JSON is in `folder`; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, draw in [("attention", plot_attention), ("layernorm", plot_layernorm), ("train", plot_train)]:
        run = _load(folder, name)
        if run is not None:
            written += draw(plt, run, folder)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("folder", type=Path, help="a GPU run's results folder, bench/results/<card>/")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        problem = "is a file, not" if args.folder.exists() else "does not exist; it should be"
        print(f"bench.plot: error: {args.folder} {problem} a results folder (bench/results/<card>/, with the JSON "
              f"files a GPU run wrote)", file=sys.stderr)  # fmt: skip
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("bench.plot needs matplotlib, which is not installed here (it is not a dependency of the package).\n"
              "Install it (`pip install matplotlib`, or the `bench` extra) or plot on a machine that has it; the "
              "JSON and markdown results are complete without the plots.", file=sys.stderr)
        return 2
    written = plot_folder(args.folder)
    if not written:
        print(f"no attention.json, layernorm.json or train.json in {args.folder}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
