"""Chart of a backbone training step: wall time against GPU time, per implementation and dtype.

    python benchmarks/plot_backbone.py TIMING.json [TIMING.json ...] --profile PROFILE.json --out chart.png

TIMING.json: rows of `backbone.py --json` (several files are merged, e.g. a separate compile run;
only rows of the train mode are drawn). PROFILE.json: rows of `backbone.py --profile --json`,
whose `step_ms_cuda` (the sum of the kernel time of one step) is drawn beside the wall time of the
same implementation and dtype. Where the two differ, the host's launches set the pace. A missing
number leaves a gap.
"""
import argparse
import json
import sys

IMPL_ORDER = ("eager", "compile", "fused-attn", "fused", "compile-fused")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("timings", nargs="+", help="outputs of benchmarks/backbone.py --json")
    parser.add_argument("--profile", help="output of benchmarks/backbone.py --profile --json")
    parser.add_argument("--out", required=True, help="PNG to write")
    return parser.parse_args(argv)


def load(paths):
    rows = []
    for path in paths:
        with open(path) as f:
            rows += json.load(f)
    return rows


def collect(timing_rows, profile_rows):
    """{dtype: {impl: (wall ms or None, gpu ms or None)}} for the train mode."""
    wall = {(r["dtype"], r["impl"]): r.get("ms") for r in timing_rows if r.get("mode") == "train"}
    gpu = {(r["dtype"], r["impl"]): r.get("step_ms_cuda") for r in profile_rows if r.get("mode") == "train"}
    if not wall:
        raise SystemExit("error: no train rows in the timing files (run backbone.py with --modes train)")
    table = {}
    for dtype, impl in sorted(set(wall) | set(gpu)):
        table.setdefault(dtype, {})[impl] = (wall.get((dtype, impl)), gpu.get((dtype, impl)))
    return table


def plot(table, title, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted(table, key=lambda d: d != "fp32")
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5.2 * len(dtypes), 3.8), dpi=120, squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        impls = [i for i in IMPL_ORDER if i in table[dtype]] + sorted(set(table[dtype]) - set(IMPL_ORDER))
        for offset, (index, label, color) in zip((-0.2, 0.2), ((0, "wall time", "tab:blue"),
                                                               (1, "GPU kernel time", "tab:orange"))):
            values = [table[dtype][impl][index] for impl in impls]
            positions = [x + offset for x, v in enumerate(values) if v is not None]
            heights = [v for v in values if v is not None]
            bars = ax.bar(positions, heights, width=0.4, label=label, color=color)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(impls)), impls, fontsize=8)
        ax.set_ylabel("ms per training step")
        ax.set_title(dtype, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    timing_rows = load(args.timings)
    profile_rows = load([args.profile]) if args.profile else []
    table = collect(timing_rows, profile_rows)
    first = timing_rows[0]
    title = (f"MLLA-{first.get('arch', '?')} backbone, train step, batch {first.get('batch', '?')} x "
             f"{first.get('size', '?')} ({first.get('device', '?')}, torch {first.get('torch', '?')})")
    plot(table, title, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
