"""Chart of benchmarks/attention.py's JSON: eager vs torch.compile vs fused, per stage shape.

    python benchmarks/plot_attention.py benchmarks/results/attention_h200_v1.json --out chart.png

One panel per (dtype, forward / forward+backward), bars per stage of the chosen model, log scale
in ms. Missing numbers (a torch.compile budget that ran out) leave a gap, not a zero.
"""
import argparse
import json
import math
import sys

SERIES = (("eager", "eager"), ("compile", "torch.compile"), ("fused", "fused"),
          ("fused_graph", "fused, CUDA graph"))
MODES = (("fwd", "forward"), ("fwd_bwd", "forward+backward"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", help="output of benchmarks/attention.py --json")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--model", default="T", help="model whose stages to draw (default T)")
    return parser.parse_args(argv)


def load_rows(path, model):
    with open(path) as f:
        result = json.load(f)
    rows = [r for r in result.get("rows", []) if r.get("model") == model]
    if not rows:
        raise SystemExit(f"error: {path} holds no rows for model {model!r}")
    return result, rows


def plot(result, rows, model, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows}, key=lambda d: d != "fp32")
    fig, axes = plt.subplots(len(dtypes), len(MODES), figsize=(11, 3.6 * len(dtypes)), squeeze=False)
    width = 0.8 / len(SERIES)
    for row_axes, dtype in zip(axes, dtypes):
        stages = sorted((r for r in rows if r["dtype"] == dtype), key=lambda r: r["stage"])
        labels = [f"{r['hw'][0]}x{r['hw'][1]}\nC={r['channels']}" for r in stages]
        for ax, (mode, mode_name) in zip(row_axes, MODES):
            for i, (key, name) in enumerate(SERIES):
                values = [r.get(f"{mode}_{key}_ms") for r in stages]
                values = [math.nan if v is None else v for v in values]
                ax.bar([x + (i - len(SERIES) / 2 + 0.5) * width for x in range(len(stages))], values,
                       width, label=name)
            ax.set_xticks(range(len(stages)), labels)
            ax.set_yscale("log")
            ax.set_ylabel("ms (median)")
            ax.set_title(f"MLLA-{model} attention, {dtype}, {mode_name}")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=len(SERIES), bbox_to_anchor=(0.5, 0.965))
    fig.suptitle(f"{result.get('device', '?')}, torch {result.get('torch', '?')}, "
                 f"triton {result.get('triton', '?')}, batch {rows[0].get('batch', '?')}")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    result, rows = load_rows(args.json, args.model)
    plot(result, rows, args.model, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
