"""Where each kernel's warps waited, from Nsight Compute's per-instruction stall samples.

    ncu ... --section SourceCounters -o report python3 benchmarks/attention.py --profiler-range T 4 fp32
    ncu --import report.ncu-rep --page source --csv --print-source sass > source.csv
    python benchmarks/ncu_stalls.py source.csv [--top 10]

For every kernel in the CSV: its sampled stall reasons as shares of all samples, the running
share of samples at each branch, barrier and exit (the code before a kernel's first loop branch is
its prologue: launch, first loads, state loads), and the instructions with the most samples.
`benchmarks/gpu_session.sh attention-ncu` writes such CSVs.
"""
import argparse
import collections
import csv
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"
MARKERS = ("BRA", "BAR.SYNC", "EXIT")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    parser.add_argument("--top", type=int, default=10, help="instructions with the most samples to list per kernel")
    return parser.parse_args(argv)


def read_kernels(path):
    """{kernel name: [row dicts in address order]} from the CSV: one 'Kernel Name' line, one header
    line and the instruction rows per kernel."""
    kernels, rows, header = {}, None, None
    with open(path, newline="") as f:
        for line in csv.reader(f):
            if not line:
                continue
            if line[0] == "Kernel Name":
                rows, header = kernels.setdefault(line[1], []), None
            elif line[0] == "Address" and rows is not None:
                header = line
            elif header is not None:
                rows.append(dict(zip(header, line)))
    if not kernels:
        raise ValueError(f"{path} holds no 'Kernel Name' sections: is it ncu's --page source --csv output?")
    return kernels


def count(value):
    return int(float(value)) if value not in (None, "") else 0


def summarize(name, rows, top):
    total = sum(count(r.get(SAMPLES)) for r in rows)
    lines = [f"== {name}: {len(rows)} instructions, {total} samples"]
    if total == 0:
        return lines
    reasons = collections.Counter()
    for row in rows:
        for key, value in row.items():
            if key.startswith("stall_") and "Not Issued" not in key:
                reasons[key[len("stall_"):]] += count(value)
    lines.append("   reasons: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in reasons.most_common(8)))
    running = 0
    for index, row in enumerate(rows):
        running += count(row.get(SAMPLES))
        source = row.get("Source", "")
        if any(marker in source for marker in MARKERS):
            lines.append(f"   {index:5d} {source.strip()[:48]:48s} executed {row.get('Instructions Executed', '?'):>8s}"
                         f"  samples so far {100 * running / total:5.1f}%")
    busiest = sorted(rows, key=lambda r: -count(r.get(SAMPLES)))[:top]
    lines.append("   most sampled:")
    for row in busiest:
        waits = {k[len("stall_"):]: count(v) for k, v in row.items()
                 if k.startswith("stall_") and "Not Issued" not in k and count(v)}
        lines.append(f"   {count(row.get(SAMPLES)):6d} {row.get('Source', '').strip()[:56]:56s} {waits}")
    return lines


def main(argv=None):
    args = parse_args(argv)
    for name, rows in read_kernels(args.csv).items():
        print("\n".join(summarize(name, rows, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
