"""Lay the loss curves and throughput of two training runs side by side (issue 6's 2-GPU check).

    python benchmarks/plot_scaling.py RUN_A.log RUN_B.log [--labels "2 GPUs x 2" "1 GPU x 4"]
                                      [--batch 4] [--png OUT.png] [--json OUT.json]

Each log is mmengine's text log of an iteration-based run (the lines `Iter(train) [i/n] ... time:
t ... loss: l`), e.g. what benchmarks/scaling_2gpu.sh keeps. Printed: the total loss of both runs
at every logged iteration they share, the mean and largest gap between them relative to their
mean, and each run's seconds per iteration (median over the logged windows after the first,
which holds start-up) with the images per second it gives for --batch images per iteration.
"""
import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ITER_LINE = re.compile(r"Iter\(train\) \[\s*(\d+)/(\d+)\].*?\btime: ([0-9.]+).*?\bloss: ([0-9.]+)")


def read_log(path: str) -> dict:
    """{iteration: (seconds per iteration over the logged window, total loss)}."""
    points = {}
    with open(path) as f:
        for line in f:
            match = ITER_LINE.search(line)
            if match:
                points[int(match.group(1))] = (float(match.group(3)), float(match.group(4)))
    if not points:
        raise SystemExit(f"error: {path} has no 'Iter(train) [i/n] ... time: ... loss: ...' lines "
                         f"(is it an mmengine text log of an iteration-based run?)")
    return points


def summarize(runs: dict, batch: int) -> dict:
    labels = list(runs)
    shared = sorted(set(runs[labels[0]]) & set(runs[labels[1]]))
    if not shared:
        raise SystemExit("error: the two logs share no logged iteration")
    rows = [{"iter": i, **{label: runs[label][i][1] for label in labels}} for i in shared]
    gaps = [abs(row[labels[0]] - row[labels[1]]) / ((row[labels[0]] + row[labels[1]]) / 2) for row in rows]
    speed = {}
    for label in labels:
        times = [runs[label][i][0] for i in sorted(runs[label])[1:]] or [runs[label][min(runs[label])][0]]
        seconds = statistics.median(times)
        speed[label] = {"s_per_iter": seconds, "images_per_s": batch / seconds,
                        "last_iter": max(runs[label])}
    return {"rows": rows, "mean_relative_gap": statistics.mean(gaps), "max_relative_gap": max(gaps),
            "speed": speed, "batch": batch}


def plot(runs: dict, png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for label, points in runs.items():
        iters = sorted(points)
        ax.plot(iters, [points[i][1] for i in iters], marker="o", markersize=3, label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("total training loss")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("logs", nargs=2, help="the two mmengine text logs")
    parser.add_argument("--labels", nargs=2, default=None, help="names of the runs (default: file names)")
    parser.add_argument("--batch", type=int, default=4, help="images per iteration, all GPUs together")
    parser.add_argument("--png", help="write the loss curves to this PNG")
    parser.add_argument("--json", help="write the summary to this JSON file")
    args = parser.parse_args(argv)
    for path in args.logs:
        if not Path(path).is_file():
            raise SystemExit(f"error: no log at {path}")
    labels = args.labels or [Path(p).stem for p in args.logs]
    runs = {label: read_log(path) for label, path in zip(labels, args.logs)}
    summary = summarize(runs, args.batch)

    print(f"{'iter':>5} | " + " | ".join(f"{label:>12}" for label in labels))
    for row in summary["rows"]:
        print(f"{row['iter']:>5} | " + " | ".join(f"{row[label]:>12.4f}" for label in labels))
    print(f"loss gap between the runs, relative to their mean: mean {summary['mean_relative_gap']:.1%}, "
          f"largest {summary['max_relative_gap']:.1%}")
    for label, speed in summary["speed"].items():
        print(f"{label}: {speed['s_per_iter']:.3f} s/iter (median), {speed['images_per_s']:.1f} images/s, "
              f"logged up to iteration {speed['last_iter']}")
    if args.png:
        plot(runs, args.png)
        print(f"wrote {args.png}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
