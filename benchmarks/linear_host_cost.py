"""Host time of the backbone's linear layers (F.linear forward + backward) under cuBLAS settings.

    python benchmarks/linear_host_cost.py [--json PATH]          # needs CUDA

A host profile of the 1x training loop (train_throughput.py --host-profile) put 70-130 us of own
CPU time on each aten::mm / aten::addmm call, more than a kernel launch. Here the MLLA-T block's
linear shapes run at a token count small enough for the GPU to keep up (so wall time is host
time), bf16 autocast as in training, each setting in its own process (DISABLE_ADDMM_CUDA_LT is
read once per process):
    default             as torch ships
    no-addmm-lt         DISABLE_ADDMM_CUDA_LT=1: addmm with a bias through cuBLAS, not cuBLASLt
    blas-cublas         torch.backends.cuda.preferred_blas_library("cublas")
    blas-cublaslt       torch.backends.cuda.preferred_blas_library("cublaslt")
Reports microseconds per forward+backward of one linear layer, median of rounds.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "default": ({}, None),
    "no-addmm-lt": ({"DISABLE_ADDMM_CUDA_LT": "1"}, None),
    "blas-cublas": ({}, "cublas"),
    "blas-cublaslt": ({}, "cublaslt"),
}
# (in, out) of MLLA-T's block linears: in_proj / act_proj / out_proj (C -> C), qk (C -> 2C),
# fc1 (C -> 4C), fc2 (4C -> C), at C = 64, 128, 256, 512.
SHAPES = [(c, c) for c in (64, 128, 256, 512)] + [(c, 2 * c) for c in (64, 512)] + \
         [(c, 4 * c) for c in (64, 512)] + [(4 * c, c) for c in (64, 512)]


def measure(setting: str, tokens: int, calls: int, rounds: int) -> dict:
    import torch
    import torch.nn.functional as F
    blas = SETTINGS[setting][1]
    if blas is not None:
        torch.backends.cuda.preferred_blas_library(blas)
    layers = [(torch.randn(out_f, in_f, device="cuda", requires_grad=True),
               torch.randn(out_f, device="cuda", requires_grad=True),
               torch.randn(2, tokens, in_f, device="cuda", requires_grad=True)) for in_f, out_f in SHAPES]

    def one_pass():
        for weight, bias, x in layers:
            with torch.autocast("cuda", torch.bfloat16):
                out = F.linear(x, weight, bias)
            out.float().sum().backward()

    for _ in range(3):
        one_pass()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            one_pass()
        torch.cuda.synchronize()
        per_call.append(1e6 * (time.perf_counter() - start) / (calls * len(layers)))
    return dict(setting=setting, tokens=tokens, us_per_linear_fwd_bwd=statistics.median(per_call),
                rounds_us=per_call, device=torch.cuda.get_device_name(), torch=torch.__version__)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.tokens, args.calls, args.rounds)))
        return
    rows = []
    for setting in args.settings.split(","):
        env = dict(os.environ, **SETTINGS[setting][0])
        result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", setting,
                                 "--tokens", str(args.tokens), "--calls", str(args.calls),
                                 "--rounds", str(args.rounds)], env=env, capture_output=True, text=True)
        if result.returncode != 0:
            rows.append(dict(setting=setting, error=result.stderr[-500:]))
        else:
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(f"{setting:14s} " + (f"{row['us_per_linear_fwd_bwd']:7.1f} us per linear fwd+bwd"
                                   if "error" not in row else f"error: {row['error']}"), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
