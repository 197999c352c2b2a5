"""What a convolution of Mask R-CNN MLLA costs the first time it meets an input size.

    python benchmarks/conv_setup_cost.py [--sizes 6] [--json PATH]
    python benchmarks/conv_setup_cost.py --cpu-sanity

The 1x pipeline gives almost every batch its own padded size (and the mask head its own RoI
count), so whatever a convolution sets up per input shape is paid nearly every iteration.
For each convolution of the detector that is not one of the fused kernels (stem, downsampling,
FPN, RPN, mask head) this times forward+backward at a run of input sizes never seen before
(first call, synchronised) and again at the same size (warm, median of 3), under each cuDNN
setting in its own process (the settings are read once per process):
  cudnn        torch's default (cuDNN on, benchmark off)
  cudnn-v7     TORCH_CUDNN_V8_API_DISABLED=1: cuDNN's v7 API (algorithm heuristics, no plans)
  cudnn-heurB  TORCH_CUDNN_USE_HEURISTIC_MODE_B=1
  no-cudnn     torch.backends.cudnn.enabled = False (ATen's native convolutions)
Sizes are padded to 32 as the data preprocessor does, drawn from the 1x pipeline's range.
The per-size cost as a whole training iteration sees it: benchmarks/train_throughput.py.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = {
    "cudnn": {},
    "cudnn-v7": {"TORCH_CUDNN_V8_API_DISABLED": "1"},
    "cudnn-heurB": {"TORCH_CUDNN_USE_HEURISTIC_MODE_B": "1"},
    "no-cudnn": {},
}

# name: (in, out, kernel, stride, groups, stride of its input map relative to the image); a
# map stride of 0 means a RoI map of fixed side (the mask head), whose batch is the RoI count.
MLLA_T_CONVS = {
    "stem.conv1 3x3/2 3->32": (3, 32, 3, 2, 1, 1),
    "stem.res 3x3 32->32": (32, 32, 3, 1, 1, 2),
    "stem.conv2 3x3/2 32->256": (32, 256, 3, 2, 1, 2),
    "stem.conv3 1x1 256->64": (256, 64, 1, 1, 1, 4),
    "down1.expand 1x1 64->512": (64, 512, 1, 1, 1, 4),
    "down1.dw 3x3/2 512": (512, 512, 3, 2, 512, 4),
    "down1.reduce 1x1 512->128": (512, 128, 1, 1, 1, 8),
    "fpn.lateral0 1x1 64->256": (64, 256, 1, 1, 1, 4),
    "fpn.conv0 3x3 256->256": (256, 256, 3, 1, 1, 4),
    "fpn.conv2 3x3 256->256": (256, 256, 3, 1, 1, 16),
    "rpn.conv 3x3 256 (P3)": (256, 256, 3, 1, 1, 8),
    "rpn.cls 1x1 256->3 (P3)": (256, 3, 1, 1, 1, 8),
    "mask.conv 3x3 256 14x14": (256, 256, 3, 1, 1, 0),
    "mask.logits 1x1 256->80 28x28": (256, 80, 1, 1, 1, 0),
}


def padded_sizes(count: int, seed: int, scale: float = 1.0):
    import math
    import random

    from benchmarks.common import round_up
    rng = random.Random(seed)
    sizes = set()
    while len(sizes) < count:
        short = rng.choice(range(480, 801, 32)) * scale
        aspect = rng.uniform(1.0, 1.6)
        h, w = short, min(short * aspect, 1333 * scale)
        if rng.random() < 0.5:
            h, w = w, h
        sizes.add((round_up(math.ceil(h), 32), round_up(math.ceil(w), 32)))
    return sorted(sizes)


def measure_mode(mode: str, dtype: str, num_sizes: int, device: str, scale: float, batch: int):
    import torch
    import torch.nn.functional as F

    if mode == "no-cudnn":
        torch.backends.cudnn.enabled = False
    torch.backends.cudnn.benchmark = False

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    rows = []
    for name, (cin, cout, k, stride, groups, map_stride) in MLLA_T_CONVS.items():
        weight = torch.randn(cout, cin // groups, k, k, device=device, requires_grad=True)
        bias = torch.randn(cout, device=device, requires_grad=True)
        if map_stride:
            shapes = [(batch, cin, h // map_stride, w // map_stride)
                      for h, w in padded_sizes(num_sizes, seed=hash(name) % 1000, scale=scale)]
        else:
            side = 28 if "28x28" in name else 14
            shapes = [(n, cin, side, side) for n in range(40 + len(rows), 40 + len(rows) + 7 * num_sizes, 7)]
        firsts, warms = [], []
        for shape in shapes:
            x = torch.randn(shape, device=device, requires_grad=True)

            def step():
                with torch.autocast(device, torch.bfloat16, enabled=dtype == "bf16"):
                    y = F.conv2d(x, weight, bias, stride=stride, padding=k // 2, groups=groups)
                y.float().sum().backward()

            sync()
            start = time.perf_counter()
            step()
            sync()
            firsts.append(time.perf_counter() - start)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - start)
            warms.append(statistics.median(times))
        rows.append(dict(mode=mode, dtype=dtype, conv=name, sizes=len(shapes),
                         first_ms=1e3 * statistics.mean(firsts), first_max_ms=1e3 * max(firsts),
                         warm_ms=1e3 * statistics.mean(warms)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, default=6, help="new input sizes per convolution")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--cpu-sanity", action="store_true", help="tiny sizes on the CPU, one mode")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    device = "cpu" if args.cpu_sanity else "cuda"
    scale, batch = (0.1, 1) if args.cpu_sanity else (1.0, 2)
    if args.child:
        mode, dtype = args.child.split(":")
        print(json.dumps(measure_mode(mode, dtype, args.sizes, device, scale, batch)))
        return

    modes = ["no-cudnn"] if args.cpu_sanity else args.modes.split(",")
    rows = []
    for mode in modes:
        for dtype in ("fp32", "bf16"):
            env = dict(os.environ, **MODES[mode])
            cmd = [sys.executable, __file__, "--child", f"{mode}:{dtype}", "--sizes", str(args.sizes)]
            if args.cpu_sanity:
                cmd.append("--cpu-sanity")
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode:
                print(f"{mode} {dtype} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.extend(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'mode':<12} {'dtype':<5} {'convolution':<32} {'first ms':>9} {'max':>8} {'warm ms':>8}")
    for r in rows:
        print(f"{r['mode']:<12} {r['dtype']:<5} {r['conv']:<32} {r['first_ms']:9.2f} {r['first_max_ms']:8.2f} "
              f"{r['warm_ms']:8.3f}")
    for mode in modes:
        for dtype in ("fp32", "bf16"):
            sel = [r for r in rows if r["mode"] == mode and r["dtype"] == dtype]
            if sel:
                print(f"total {mode:<12} {dtype}: first {sum(r['first_ms'] for r in sel):8.1f} ms, "
                      f"warm {sum(r['warm_ms'] for r in sel):7.2f} ms over {len(sel)} convolutions")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(convolutions=rows), indent=1))


if __name__ == "__main__":
    main()
