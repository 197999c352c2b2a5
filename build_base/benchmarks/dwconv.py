"""MLLA's depthwise 3x3 convs at the MLLA-T stage shapes (1280x800, batch 2): the paper-style eager
form (reshape/permute + nn.Conv2d + epilogue) vs torch.compile of it vs the fused Triton op,
forward and forward+backward, fp32 and bf16.

    python benchmarks/dwconv.py [--json out.json] [--dtypes fp32 bf16] [--convs cpe dwc lepe]
                                [--compile dynamic|static|off] [--compile-budget-s 90]
                                [--sweep-budget-s 40] [--cpu-sanity]

Convs (epilogues): cpe = x + conv(x) (CPE1 and CPE2), dwc = SiLU(conv(x)), lepe = attn + conv(v).
"fwd" runs under no_grad; "fwd+bwd" is a forward with autograd plus backward for x, weight, bias
(and the addend). Times are medians of triton.testing.do_bench (L2 flushed between calls). GB/s
counts the fewest bytes: forward reads x (and the addend) and writes out; backward reads grad_out
and x and writes grad_x (weights are noise). "graph" and "eager graph" replay the fused and
the eager fwd+bwd from CUDA graphs (no host launch overhead): the GPU time alone, compared like
for like in the last column. --compile dynamic compiles each (conv, dtype,
mode) once for all four shapes; static compiles every shape (four times the compile time).
The sweep times the kernels alone (no autograd) under other launch configurations.

Without a GPU it says so and exits 0; --cpu-sanity runs one tiny shape in Triton's interpreter.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import (copy_bandwidth_gbs, fmt, launch_costs, raise_recompile_limits, ratio,  # noqa: E402
                               timing_device)

STAGES = [(200, 320, 64), (100, 160, 128), (50, 80, 256), (25, 40, 512)]  # MLLA-T, 1280x800
CONVS = {"cpe": "residual", "dwc": "silu", "lepe": "add"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BATCH = 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--convs", nargs="+", default=list(CONVS), choices=list(CONVS))
    parser.add_argument("--compile", default="dynamic", choices=["dynamic", "static", "off"])
    parser.add_argument("--compile-modes", nargs="+", default=["fwd", "fwd_bwd"], choices=["fwd", "fwd_bwd"],
                        help="which modes get a torch.compile column (each is its own graph to compile)")
    parser.add_argument("--compile-budget-s", type=float, default=90.0,
                        help="stop compiling new graphs once this much wall time went into compiling")
    parser.add_argument("--sweep-only", action="store_true", help="stop after the sweep")
    parser.add_argument("--sweep-budget-s", type=float, default=0.0,
                        help="time other launch configurations of the kernels for at most this long")
    parser.add_argument("--cpu-sanity", action="store_true", help="tiny shape in the Triton interpreter")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------
# The paper-style eager forms (x, weight, bias as inputs so one dynamic compile serves all shapes)
# --------------------------------------------------------------------------------------------
def _conv(maps, weight, bias):
    return F.conv2d(maps, weight, bias, padding=1, groups=maps.shape[1])


def cpe_eager(x, weight, bias, height: int, width: int, addend=None):
    b, n, c = x.shape
    return x + _conv(x.reshape(b, height, width, c).permute(0, 3, 1, 2), weight, bias).flatten(2).permute(0, 2, 1)


def dwc_eager(x, weight, bias, height: int, width: int, addend=None):
    b, n, c = x.shape
    y = F.silu(_conv(x.reshape(b, height, width, c).permute(0, 3, 1, 2), weight, bias))
    return y.permute(0, 2, 3, 1).reshape(b, n, c)


def lepe_eager(v, weight, bias, height: int, width: int, addend=None):
    b, n, c = v.shape
    lepe = _conv(v.transpose(1, 2).reshape(b, c, height, width), weight, bias).permute(0, 2, 3, 1).reshape(b, n, c)
    return addend + lepe


EAGER = {"cpe": cpe_eager, "dwc": dwc_eager, "lepe": lepe_eager}


def fused_form(conv_name, impl="auto"):
    from mlla_kernels.dwconv import dwconv3x3_tokens
    epilogue = CONVS[conv_name]

    def run(x, weight, bias, height, width, addend=None):
        return dwconv3x3_tokens(x, weight, bias, (height, width), epilogue, addend, impl=impl)
    return run


# --------------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------------
def make_inputs(height, width, channels, dtype, conv_name, device="cuda"):
    n = height * width
    x = torch.randn(BATCH, n, channels, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(channels, 1, 3, 3, device=device, dtype=dtype) / 3).requires_grad_()
    bias = torch.randn(channels, device=device, dtype=dtype, requires_grad=True)
    addend = torch.randn_like(x).requires_grad_() if conv_name == "lepe" else None
    grad = torch.randn(BATCH, n, channels, device=device, dtype=dtype)
    return x, weight, bias, addend, grad


def forward_runner(fn, inputs, hw):
    x, weight, bias, addend, _ = inputs

    def run():
        with torch.no_grad():
            fn(x, weight, bias, hw[0], hw[1], addend)
    return run


def forward_backward_runner(fn, inputs, hw):
    x, weight, bias, addend, grad = inputs
    leaves = [t for t in (x, weight, bias, addend) if t is not None]

    def run():
        for t in leaves:
            t.grad = None
        fn(x, weight, bias, hw[0], hw[1], addend).backward(grad)
    return run


def floor_bytes(height, width, channels, dtype, conv_name):
    elems = BATCH * height * width * channels
    size = torch.tensor([], dtype=dtype).element_size()
    fwd = (3 if conv_name == "lepe" else 2) * elems * size
    bwd = 3 * elems * size
    return fwd, fwd + bwd


def bench_case(stage, hw_c, dtype_name, conv_name, args, ctx):
    import triton.testing
    height, width, channels = hw_c
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(height, width, channels, dtype, conv_name)
    bytes_fwd, bytes_fwd_bwd = floor_bytes(height, width, channels, dtype, conv_name)
    row = dict(stage=stage, hw=[height, width], channels=channels, dtype=dtype_name, conv=conv_name,
               epilogue=CONVS[conv_name], batch=BATCH, bytes_fwd=bytes_fwd, bytes_fwd_bwd=bytes_fwd_bwd)
    bench = lambda run: triton.testing.do_bench(run, warmup=10, rep=60, return_mode="median")  # noqa: E731
    eager, fused = EAGER[conv_name], fused_form(conv_name)
    for mode, runner_of in (("fwd", forward_runner), ("fwd_bwd", forward_backward_runner)):
        row[f"{mode}_eager_ms"] = bench(runner_of(eager, inputs, (height, width)))
        row[f"{mode}_fused_ms"] = bench(runner_of(fused, inputs, (height, width)))
        row[f"{mode}_compile_ms"] = None
        key = (conv_name, dtype_name, mode) if args.compile == "dynamic" else (conv_name, dtype_name, mode, stage)
        if args.compile != "off" and mode in args.compile_modes and (
                key in ctx["compiled"] or ctx["compile_spent"] < args.compile_budget_s):
            try:
                if key not in ctx["compiled"]:
                    ctx["compiled"][key] = torch.compile(eager, dynamic=args.compile == "dynamic", fullgraph=True)
                run = runner_of(ctx["compiled"][key], inputs, (height, width))
                start = time.perf_counter()
                run()
                torch.cuda.synchronize()
                ctx["compile_spent"] += time.perf_counter() - start
                row[f"{mode}_compile_ms"] = bench(run)
            except Exception as exc:  # keep the other columns; say why this one is missing
                row[f"{mode}_compile_error"] = f"{type(exc).__name__}: {exc}"[:200]
        row[f"{mode}_fused_gbps"] = row[f"bytes_{mode}"] / (row[f"{mode}_fused_ms"] * 1e-3) / 1e9
        row[f"{mode}_floor_ms"] = row[f"bytes_{mode}"] / (ctx["copy_gbps"] * 1e9) * 1e3
    return row


def graph_times(rows, args):
    """Fused and eager fwd+bwd replayed from CUDA graphs: the GPU's time without host overhead,
    for a like-for-like ratio. Run last: a capture that fails can leave the context unusable, so
    the first failure ends this pass."""
    import triton.testing
    for row in rows:
        height, width = row["hw"]
        inputs = make_inputs(height, width, row["channels"], DTYPES[row["dtype"]], row["conv"])
        try:
            for name, fn in (("fused", fused_form(row["conv"])), ("eager", EAGER[row["conv"]])):
                row[f"fwd_bwd_{name}_graph_ms"] = triton.testing.do_bench_cudagraph(
                    forward_backward_runner(fn, inputs, (height, width)), rep=60, return_mode="median")
        except Exception as exc:
            row["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"CUDA graph timing stopped: {row['graph_error']}", flush=True)
            return


SWEEP_FWD = [dict(), dict(fwd_block_n=32, fwd_tile_w=8, fwd_num_warps=4), dict(fwd_block_n=16, fwd_tile_w=16,
                                                                                 fwd_num_warps=2),
             dict(fwd_block_n=16, fwd_tile_w=8, fwd_num_warps=1), dict(fwd_block_n=8, fwd_tile_w=8, fwd_num_warps=1)]
SWEEP_BWD = [dict(), dict(bwd_num_warps=8, wgrad_programs_per_sm=2), dict(wgrad_programs_per_sm=2),
             dict(wgrad_programs_per_sm=8), dict(bwd_num_warps=2, wgrad_programs_per_sm=8),
             dict(block_n=16, num_warps=2), dict(wgrad_block_n=32, wgrad_tile_w=16), dict(wgrad_stages=2),
             dict(wgrad_stages=3), dict(wgrad_stages=3, wgrad_block_n=32, wgrad_tile_w=16)]


def sweep(args):
    """Kernels alone (no autograd) under other launch configurations (overrides of
    kernels.GPU_DEFAULTS; {} = the defaults), residual epilogue, replayed from CUDA graphs (GPU
    time: the host's launch cost would swamp the differences); the backward (the larger share)
    first, stages 1 to 4, until the budget is spent."""
    import triton.testing
    from mlla_kernels.dwconv import kernels
    plan = [(stage, kind, dtype_name, config) for kind, configs in (("bwd", SWEEP_BWD), ("fwd", SWEEP_FWD))
            for stage in (1, 2, 3, 4)
            for dtype_name in args.dtypes for config in configs]
    results, start, inputs, defaults = [], time.perf_counter(), {}, {}
    for stage, kind, dtype_name, config in plan:
        if time.perf_counter() - start > args.sweep_budget_s:
            break
        height, width, channels = STAGES[stage - 1]
        if (stage, dtype_name) not in inputs:
            inputs[(stage, dtype_name)] = [t.detach() if t is not None else None for t in
                                           make_inputs(height, width, channels, DTYPES[dtype_name], "cpe")]
        x, weight, bias, _, grad = inputs[(stage, dtype_name)]
        if kind == "fwd":
            run = lambda: kernels.dwconv3x3_forward(x, weight, bias, None, height, width,  # noqa: E731
                                                    "residual", **config)
        else:
            run = lambda: kernels.dwconv3x3_backward(grad, x, weight, bias, height, width,  # noqa: E731
                                                     "residual", **config)
        outputs = run()
        outputs = [t.float() for t in (outputs if isinstance(outputs, tuple) else (outputs,))]
        if not config:
            defaults[stage, dtype_name, kind] = outputs
        # Launch shapes change the summation order only: a variant differing from the default by
        # more than rounding is broken, whatever its speed.
        diff = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item()
                   for a, b in zip(outputs, defaults[stage, dtype_name, kind]))
        ms = triton.testing.do_bench_cudagraph(run, rep=40, return_mode="median")
        results.append(dict(dtype=dtype_name, stage=stage, kind=kind, **config, graph_ms=ms, rel_diff_to_default=diff))
        print(f"sweep {dtype_name} stage {stage} {kind} {config}: {ms:.4f} ms (rel diff to default {diff:.1e})",
              flush=True)
    return results


def host_overhead(args):
    """Host time per fused fwd+bwd (stage 4, bf16, cpe): back-to-back calls, one sync at the end;
    the GPU work is ~0.03 ms, so this is the launch path's cost. With and without the cached
    relaunch of compiled kernels (mlla_kernels.cached_launch), and the eager form for scale."""
    from mlla_kernels.cached_launch import CachedLauncher
    height, width, channels = STAGES[3]
    inputs = make_inputs(height, width, channels, torch.bfloat16, "cpe")
    result = {}
    for name, fn, fast in (("fused", fused_form("cpe"), True), ("fused_no_cached_launch", fused_form("cpe"), False),
                           ("eager", EAGER["cpe"], True)):
        CachedLauncher.enabled = fast
        run = forward_backward_runner(fn, inputs, (height, width))
        for _ in range(20):
            run()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(200):
            run()
        torch.cuda.synchronize()
        result[name] = (time.perf_counter() - start) / 200 * 1e3
    CachedLauncher.enabled = True
    print("host ms per fwd+bwd (stage 4 bf16 cpe, back to back): " +
          ", ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)
    # What one launch costs this host, to read the numbers above by.
    costs = launch_costs("cuda")
    print("host us per call: " + ", ".join(f"{k[:-3]} {v:.1f}" for k, v in costs.items()), flush=True)
    result.update(costs)
    return result


def print_table(rows, ctx):
    print(f"\n{ctx['device']}, torch {torch.__version__}, triton {ctx['triton']}; copy bandwidth "
          f"{ctx['copy_gbps']:.0f} GB/s (read + write); batch {BATCH}; ms are medians; compile={ctx['compile']}")
    header = (f"{'conv':4} {'grid':>7} {'C':>4} {'dt':4} | {'mode':7} {'eager':>7} {'compile':>7} {'fused':>7} "
              f"{'vs eag':>6} {'vs cmp':>6} {'GB/s':>6} {'floor':>6} | {'graph':>7} {'eager graph':>11} {'vs eag':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        for mode in ("fwd", "fwd_bwd"):
            graph = fmt(r.get("fwd_bwd_fused_graph_ms")) if mode == "fwd_bwd" else ""
            eager_graph = fmt(r.get("fwd_bwd_eager_graph_ms")) if mode == "fwd_bwd" else ""
            graph_ratio = ratio(r.get("fwd_bwd_eager_graph_ms"), r.get("fwd_bwd_fused_graph_ms")) \
                if mode == "fwd_bwd" else ""
            print(f"{r['conv']:4} {r['hw'][0]:>3}x{r['hw'][1]:<3} {r['channels']:>4} {r['dtype']:4} | {mode:7} "
                  f"{fmt(r[f'{mode}_eager_ms']):>7} {fmt(r[f'{mode}_compile_ms']):>7} {fmt(r[f'{mode}_fused_ms']):>7} "
                  f"{ratio(r[f'{mode}_eager_ms'], r[f'{mode}_fused_ms']):>6} "
                  f"{ratio(r[f'{mode}_compile_ms'], r[f'{mode}_fused_ms']):>6} "
                  f"{r[f'{mode}_fused_gbps']:>6.0f} {fmt(r[f'{mode}_floor_ms']):>6} | {graph:>7} {eager_graph:>11} "
                  f"{graph_ratio:>6}")


def cpu_sanity():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from mlla_kernels.dwconv import dwconv3x3_tokens_reference
    height, width, channels = 5, 7, 32
    worst = 0.0
    for conv_name in CONVS:
        inputs = make_inputs(height, width, channels, torch.float32, conv_name, device="cpu")
        x, weight, bias, addend, grad = inputs
        start = time.perf_counter()
        fused_triton = fused_form(conv_name, impl="triton")  # the interpreter: "auto" would pick the reference
        forward_backward_runner(fused_triton, inputs, (height, width))()
        elapsed = time.perf_counter() - start
        eager = EAGER[conv_name](x.double(), weight.double(), bias.double(), height, width,
                                 None if addend is None else addend.double())
        ref = dwconv3x3_tokens_reference(x.double(), weight.double(), bias.double(), (height, width),
                                         CONVS[conv_name], None if addend is None else addend.double())
        fused = fused_triton(x, weight, bias, height, width, addend)
        err = max(((fused.double() - ref).norm() / ref.norm()).item(), ((eager - ref).norm() / ref.norm()).item())
        worst = max(worst, err)
        print(f"cpu sanity (interpreter): {conv_name} {height}x{width} C={channels}: fwd+bwd {elapsed:.2f} s, "
              f"rel err {err:.1e}")
    return 0 if worst < 1e-5 else 1


def main(argv=None):
    args = parse_args(argv)
    device = timing_device("dwconv.py", args.cpu_sanity)
    if device is None:
        return 0
    if device == "cpu":
        return cpu_sanity()
    import triton

    raise_recompile_limits(256)
    ctx = dict(device=torch.cuda.get_device_name(), triton=triton.__version__, compile=args.compile,
               compiled={}, compile_spent=0.0, copy_gbps=copy_bandwidth_gbs("cuda", size_mb=1024))
    print(f"{ctx['device']}: copy {ctx['copy_gbps']:.0f} GB/s", flush=True)
    host = host_overhead(args)
    sweep_results = sweep(args) if args.sweep_budget_s > 0 else []
    env = dict(device=ctx["device"], torch=torch.__version__, triton=ctx["triton"], copy_gbps=ctx["copy_gbps"],
               compile=args.compile, host_ms_per_fwd_bwd=host)

    def write_results(rows):
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(environment=env, sweep=sweep_results, rows=rows), f, indent=1)
    if args.sweep_only:
        write_results([])
        return 0
    rows = []
    for dtype_name in args.dtypes:
        for conv_name in args.convs:
            for stage, hw_c in enumerate(STAGES, start=1):
                row = bench_case(stage, hw_c, dtype_name, conv_name, args, ctx)
                rows.append(row)
                print(f"{conv_name} {dtype_name} stage {stage}: fwd+bwd eager {row['fwd_bwd_eager_ms']:.3f} "
                      f"compile {fmt(row['fwd_bwd_compile_ms'])} fused {row['fwd_bwd_fused_ms']:.3f} ms", flush=True)
    print(f"compiling took {ctx['compile_spent']:.0f} s", flush=True)
    graph_times(rows, args)
    write_results(rows)
    print(f"host ms per fwd+bwd (stage 4 bf16 cpe, back to back): {host}")
    print_table(rows, ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
