"""Linear attention at the MLLA-T / MLLA-B stage shapes: eager reference vs torch.compile(reference)
vs the fused Triton kernels, forward and forward+backward, fp32 and bf16, batch 2.

    python benchmarks/attention.py [--json out.json] [--models T B] [--dtypes fp32 bf16]
                                   [--compile-budget-s 120] [--compile-workers 8] [--cpu-sanity]

Times are medians of triton.testing.do_bench (warm-up first, L2 flushed between runs, inputs
rotated among fresh random sets). GB/s counts each input read once and each output written once:
forward reads qk, v and writes out (4*B*N*C elements); forward+backward also reads grad_out and
writes grad_qk, grad_v (8*B*N*C). The fraction is of a device-to-device copy measured in the same
run. torch.compile compile times are reported apart from the timings (JSON: *_compile_s, and
*_compile_cold_s when --compile-workers compiled the graphs first, in parallel). The "graph"
columns replay each implementation from a CUDA graph (no host launch overhead): the GPU's time.
Peak memory is what one forward+backward allocates beyond its inputs.

Without a GPU it says so and exits 0; --cpu-sanity runs one tiny shape in Triton's interpreter to
check the script itself.
"""
import argparse
import functools
import itertools
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import (copy_bandwidth_gbs, fmt, launch_costs, raise_recompile_limits, ratio,  # noqa: E402
                               timing_device)

STAGE_GRIDS = [(200, 320), (100, 160), (50, 80), (25, 40)]  # 1280x800 image: strides 4, 8, 16, 32
MODELS = {"T": ((64, 128, 256, 512), (2, 4, 8, 16)), "B": ((96, 192, 384, 768), (3, 6, 12, 24))}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BATCH = 2
DEVICE = "cuda"
ROTATION_BYTES = 384 * 2 ** 20  # enough input sets that a rotation outgrows the L2 cache


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--compile-budget-s", type=float, default=float("inf"),
                        help="stop compiling new torch.compile graphs once this much wall time went into them")
    parser.add_argument("--compile-workers", type=int, default=0,
                        help="first compile every torch.compile graph of the run in this many worker processes "
                             "at once (fills Inductor's on-disk caches; their cold compile times are reported); "
                             "the timed run then compiles from the cache")
    parser.add_argument("--compile-worker", help=argparse.SUPPRESS)
    parser.add_argument("--no-variants", action="store_true",
                        help="skip the fused variant with atomic (non-deterministic) reductions")
    parser.add_argument("--sweep-budget-s", type=float, default=0.0,
                        help="first try launch configurations of the fused op for this long")
    parser.add_argument("--sweep-only", action="store_true", help="stop after the sweep")
    parser.add_argument("--sweep-default-only", action="store_true",
                        help="sweep the default launch only (to time two builds of the kernels side by side: "
                             "run each build's copy of this script in turn)")
    parser.add_argument("--sweep-first", type=int, default=0,
                        help="sweep only the first N launch configurations per stage and dtype")
    parser.add_argument("--sweep-config", action="append", type=json.loads, default=[], metavar="JSON",
                        help="sweep this launch_overrides dict (repeatable; '{}' is the default launch; the key "
                             "\"deterministic\": false runs the op's atomic reductions) instead of the built-in list")
    parser.add_argument("--sweep-stages", nargs="+", type=int, default=[1], choices=[1, 2, 3, 4],
                        help="the stages the sweep runs at")
    parser.add_argument("--sweep-models", nargs="+", default=["T"], choices=list(MODELS),
                        help="the models whose stage shapes the sweep runs at")
    parser.add_argument("--profile-host", action="store_true", help="cProfile the fused op's host path first")
    parser.add_argument("--profiler-range", nargs=3, metavar=("MODEL", "STAGE", "DTYPE"),
                        help="only run one fused forward+backward at this stage shape (after warm-up calls) between "
                             "cudaProfilerStart/Stop, for `ncu --profile-from-start off` "
                             "(gpu_session.sh attention-ncu)")
    parser.add_argument("--compile-report", action="store_true",
                        help="no GPU needed: compile the four kernels for sm_90 at the default launch shapes and "
                             "both pipelining depths, and print registers, spills (ptxas -v) and shared memory")
    parser.add_argument("--specialisation-report", action="store_true",
                        help="no GPU needed: the four kernels compiled for sm_90 with and without the size "
                             "integers' divisibility hint (UNSPECIALISED_SIZES), SASS compared")
    parser.add_argument("--cpu-sanity", action="store_true", help="tiny shape in the Triton interpreter")
    return parser.parse_args(argv)


def make_sets(batch, n, channels, dtype, device, requires_grad):
    per_set = batch * n * channels * 4 * torch.tensor([], dtype=dtype).element_size()
    count = max(2, min(12, math.ceil(ROTATION_BYTES / per_set)))
    sets = []
    for _ in range(count):
        qk = torch.randn(batch, n, 2 * channels, device=device, dtype=dtype).requires_grad_(requires_grad)
        v = torch.randn(batch, n, channels, device=device, dtype=dtype).requires_grad_(requires_grad)
        grad = torch.randn(batch, n, channels, device=device, dtype=dtype)
        sets.append((qk, v, grad))
    return sets


def forward_runner(fn, sets):
    cycle = itertools.cycle(sets)

    def run():
        qk, v, _ = next(cycle)
        with torch.no_grad():
            fn(qk, v)
    return run


def forward_backward_runner(fn, sets):
    cycle = itertools.cycle(sets)

    def run():
        qk, v, grad = next(cycle)
        qk.grad = None
        v.grad = None
        fn(qk, v).backward(grad)
    return run


def peak_megabytes(run):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def bench_case(model, stage, hw, channels, heads, dtype_name, args, ctx):
    from mlla_kernels import linear_attention_reference
    from mlla_kernels.triton import linear_attention_triton

    do_bench, do_bench_graph = ctx["do_bench"], ctx["do_bench_graph"]
    dtype = DTYPES[dtype_name]
    n = hw[0] * hw[1]
    elem = torch.tensor([], dtype=dtype).element_size()
    row = dict(model=model, stage=stage, hw=list(hw), channels=channels, heads=heads, dtype=dtype_name,
               batch=BATCH, bytes_fwd=4 * BATCH * n * channels * elem, bytes_fwd_bwd=8 * BATCH * n * channels * elem)

    eager = lambda qk, v: linear_attention_reference(qk, v, hw, heads)  # noqa: E731
    fused = lambda qk, v: linear_attention_triton(qk, v, hw, heads)  # noqa: E731
    fused_atomic = lambda qk, v: linear_attention_triton(qk, v, hw, heads, deterministic=False)  # noqa: E731

    for mode, runner_of, sets in (("fwd", forward_runner, ctx["sets_fwd"]), ("fwd_bwd", forward_backward_runner,
                                                                              ctx["sets_bwd"])):
        bench = lambda fn: do_bench(runner_of(fn, sets), warmup=10, rep=60, return_mode="median")  # noqa: E731
        row[f"{mode}_eager_ms"] = bench(eager)
        row[f"{mode}_fused_ms"] = bench(fused)

        def bench_graph(name, fn):
            try:
                row[f"{mode}_{name}_graph_ms"] = do_bench_graph(runner_of(fn, sets), rep=60, return_mode="median")
            except Exception as exc:  # report, keep going: graphs are a side measurement
                row[f"{mode}_{name}_graph_ms"] = None
                row[f"{mode}_{name}_graph_error"] = repr(exc)[:200]
        bench_graph("fused", fused)
        bench_graph("eager", eager)
        if not args.no_variants:
            row[f"{mode}_fused_atomic_ms"] = bench(fused_atomic)
        if ctx["compile_spent"] < args.compile_budget_s:
            compiled = torch.compile(linear_attention_reference, dynamic=False)
            start = time.perf_counter()
            runner_of(lambda qk, v: compiled(qk, v, hw, heads), sets)()
            torch.cuda.synchronize()
            row[f"{mode}_compile_s"] = time.perf_counter() - start
            ctx["compile_spent"] += row[f"{mode}_compile_s"]
            cold = ctx["cold_compile_s"].get((model, dtype_name, stage, mode))
            if cold is not None:
                row[f"{mode}_compile_cold_s"] = cold
            row[f"{mode}_compile_ms"] = bench(lambda qk, v: compiled(qk, v, hw, heads))
            bench_graph("compile", lambda qk, v: compiled(qk, v, hw, heads))
        else:
            row[f"{mode}_compile_ms"] = row[f"{mode}_compile_graph_ms"] = None
        best = row[f"{mode}_fused_ms"]
        row[f"{mode}_fused_gbps"] = row[f"bytes_{mode}"] / (best * 1e-3) / 1e9
        row[f"{mode}_fused_copy_fraction"] = row[f"{mode}_fused_gbps"] / ctx["copy_gbps"]
        if row[f"{mode}_fused_graph_ms"]:
            graph_gbps = row[f"bytes_{mode}"] / (row[f"{mode}_fused_graph_ms"] * 1e-3) / 1e9
            row[f"{mode}_fused_graph_copy_fraction"] = graph_gbps / ctx["copy_gbps"]
        # The same bytes moved by one device copy (half read, half written), from a CUDA graph: what
        # the size alone allows, to tell it from the fused op's own latency at the small stages.
        source = torch.empty(row[f"bytes_{mode}"] // 2, dtype=torch.uint8, device=DEVICE)
        target = torch.empty_like(source)
        row[f"{mode}_copy_same_bytes_graph_ms"] = do_bench_graph(lambda: target.copy_(source), rep=60,
                                                                 return_mode="median")
    for name, fn in (("eager", eager), ("fused", fused)):
        row[f"peak_mb_{name}"] = peak_megabytes(forward_backward_runner(fn, ctx["sets_bwd"]))
    return row


# Launch shapes tried per (dtype, stage). At every stage, the polynomial RoPE trig path in each
# direction (v18-v20: slower, except the fp32 backward at stages 3-4 until v20). At stages 1-2 a
# head's tokens split into many programs: how many per SM, and the other pipelining depth (v16
# measured 2 against 3 at stages 1, 3 and 4 only). At stages 3-4 a head has few blocks, so a
# program's time is mostly the latency of its few blocks: the forward with fewer instructions per
# block (the state pass on tensor cores in fp32) or more warps, or 32-token blocks; how finely the
# reducing passes split them, and the backward at 32-token blocks. At every stage, the backward at
# 8 warps (its fp32 query_grad_state_kernel as launched: ~200 registers, one program per SM; 4
# warps: ~250, two per SM), alone or with its reduction at fewer programs per SM. In the v15 sweeps
# (H200) none of these beat the default (8 warps: 1.2-1.4x slower at every stage); they stay listed
# to recheck after kernel changes. Tried and dropped there: the fp32 state pass on tensor cores,
# 1.2-1.9x slower at stage 1 on either MMA; the partial-state sums at 64 entries; folding 0 or 64
# partials.
_SWEEP_LAUNCH = {stage: [dict(), dict(fast_trig_backward=False), dict(fast_trig=False), dict(num_stages=2),
                         dict(num_stages_backward=2), dict(programs_per_sm=2),
                         dict(num_warps_backward=8), dict(num_warps_backward=8, reduce_programs_per_sm=2)]
                 for stage in (1, 2)}
_SWEEP_LAUNCH.update({stage: [dict(), dict(fast_trig_backward=False), dict(fast_trig=False),
                              dict(num_stages_backward=3), dict(num_stages=3),
                              dict(dot_mode_state="tf32x3"), dict(num_warps_forward=8),
                              dict(num_warps_forward=8, dot_mode_state="tf32x3"), dict(block_n_forward=32),
                              dict(reduce_programs_per_sm=4), dict(programs_per_sm=2), dict(programs_per_sm=3),
                              dict(programs_per_sm=2, reduce_programs_per_sm=1), dict(num_warps_backward=8),
                              dict(block_n_backward=32)]
                      for stage in (3, 4)})
SWEEP_CONFIGS = {(dtype, stage): launch for dtype in DTYPES for stage, launch in _SWEEP_LAUNCH.items()}


def sweep(args, ctx):
    """Launch configurations and matrix-product modes of the fused op at the stages (--sweep-stages)
    of the models (--sweep-models): CUDA-graph times (device time without host overhead), the relative error of
    out / grad_qk / grad_v against float64 on one input set, and the time of each kernel
    (torch.profiler, plain calls)."""
    from mlla_kernels import linear_attention_reference
    from mlla_kernels.triton import launch_overrides, linear_attention_triton
    results, start = [], time.perf_counter()
    for model, stage in itertools.product(args.sweep_models, args.sweep_stages):
        hw, channels, heads = STAGE_GRIDS[stage - 1], MODELS[model][0][stage - 1], MODELS[model][1][stage - 1]
        for dtype_name in args.dtypes:
            sets = make_sets(BATCH, hw[0] * hw[1], channels, DTYPES[dtype_name], DEVICE, False)[:2]
            sets_bwd = [(qk.detach().requires_grad_(), v.detach().requires_grad_(), g) for qk, v, g in sets]
            qk, v, grad = sets_bwd[0]
            qk64, v64 = qk.detach().double().requires_grad_(), v.detach().double().requires_grad_()
            ref = linear_attention_reference(qk64, v64, hw, heads)
            ref.backward(grad.double())
            ref = ref.detach()
            configs = [{}] if args.sweep_default_only else args.sweep_config or SWEEP_CONFIGS[dtype_name, stage]
            for config in configs[:args.sweep_first or None]:
                if time.perf_counter() - start > args.sweep_budget_s:
                    break
                # "deterministic" is the op's argument, not a launch override.
                overrides = {key: value for key, value in config.items() if key != "deterministic"}
                deterministic = config.get("deterministic", True)
                fused = functools.partial(linear_attention_triton, hw_shape=hw, num_heads=heads,
                                          deterministic=deterministic)
                with launch_overrides(**overrides):
                    errs = _parity(fused, qk, v, grad, ref, qk64.grad, v64.grad)
                    try:
                        fwd = ctx["do_bench_graph"](forward_runner(fused, sets), rep=40, return_mode="median")
                        fwd_bwd = ctx["do_bench_graph"](forward_backward_runner(fused, sets_bwd), rep=40,
                                                        return_mode="median")
                    except Exception as exc:  # a failed capture must not cost the rest of the run
                        print(f"sweep {dtype_name} {config}: CUDA-graph timing failed: {exc!r}"[:300], flush=True)
                        fwd = fwd_bwd = float("nan")
                    print(f"sweep {model} stage {stage} {dtype_name} {config or 'default'}: graph fwd {fwd:.4f} ms, "
                          f"fwd+bwd {fwd_bwd:.4f} ms; rel err out {errs[0]:.1e} grad_qk {errs[1]:.1e} "
                          f"grad_v {errs[2]:.1e}", flush=True)
                    kernel_us = kernel_times(fused, sets_bwd)
                results.append(dict(model=model, stage=stage, dtype=dtype_name, **config, fwd_graph_ms=fwd,
                                    fwd_bwd_graph_ms=fwd_bwd, rel_err_out=errs[0], rel_err_grad_qk=errs[1],
                                    rel_err_grad_v=errs[2], kernel_us=kernel_us))
    return results


def kernel_times(fused, sets_bwd, steps=10):
    """Mean device time of each kernel of one fused forward+backward (torch.profiler), in us."""
    from torch.profiler import ProfilerActivity, profile
    run = forward_backward_runner(fused, sets_bwd)
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us and event.count:
            times[event.key[:60]] = device_us / steps
    times = dict(sorted(times.items(), key=lambda kv: -kv[1])[:8])
    print("  kernel us per fwd+bwd: " + ", ".join(f"{k.split('(')[0][:40]} {v:.1f}" for k, v in times.items()),
          flush=True)
    return times


def _parity(fused, qk, v, grad, ref_out, ref_grad_qk, ref_grad_v):
    """Relative errors of out, grad_qk, grad_v against float64. Everything autograd built here is
    dropped before returning: a leaf's gradient accumulator left alive on the default stream
    breaks a later CUDA-graph capture of the backward."""
    qk.grad = v.grad = None
    out = fused(qk, v)
    out.backward(grad)
    errs = [((a.double() - b).norm() / b.norm()).item()
            for a, b in ((out, ref_out), (qk.grad, ref_grad_qk), (v.grad, ref_grad_v))]
    qk.grad = v.grad = None
    del out
    return errs


def compile_cases(models, dtypes):
    """Every (model, dtype, stage, mode) the timed run compiles, in its order."""
    return [(model, dtype_name, stage, mode) for model in models for dtype_name in dtypes
            for stage in range(1, len(STAGE_GRIDS) + 1) for mode in ("fwd", "fwd_bwd")]


def compile_worker(spec, models, dtypes):
    """Worker `spec` = "i/k": compile cases i, i+k, ... once each; print one JSON line per case."""
    from mlla_kernels import linear_attention_reference
    index, count = (int(x) for x in spec.split("/"))
    raise_recompile_limits(256)
    for model, dtype_name, stage, mode in compile_cases(models, dtypes)[index::count]:
        hw, channels, heads = STAGE_GRIDS[stage - 1], MODELS[model][0][stage - 1], MODELS[model][1][stage - 1]
        sets = make_sets(BATCH, hw[0] * hw[1], channels, DTYPES[dtype_name], DEVICE, mode == "fwd_bwd")[:1]
        compiled = torch.compile(linear_attention_reference, dynamic=False)
        runner_of = forward_runner if mode == "fwd" else forward_backward_runner
        start = time.perf_counter()
        runner_of(lambda qk, v: compiled(qk, v, hw, heads), sets)()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        print(json.dumps(dict(model=model, dtype=dtype_name, stage=stage, mode=mode,
                              cold_compile_s=time.perf_counter() - start)), flush=True)
    return 0


def warm_compile_caches(args):
    """Run compile_worker in args.compile_workers processes side by side; returns
    {(model, dtype, stage, mode): cold compile seconds} and the wall time it took."""
    import subprocess
    start = time.perf_counter()
    common = [sys.executable, os.path.abspath(__file__), "--models", *args.models, "--dtypes", *args.dtypes]
    workers = [subprocess.Popen(common + ["--compile-worker", f"{i}/{args.compile_workers}"],
                                stdout=subprocess.PIPE, text=True) for i in range(args.compile_workers)]
    cold = {}
    for worker in workers:
        out, _ = worker.communicate()
        for line in out.splitlines():
            if line.startswith("{"):
                case = json.loads(line)
                cold[(case["model"], case["dtype"], case["stage"], case["mode"])] = case["cold_compile_s"]
        if worker.returncode != 0:
            print(f"compile worker exited with {worker.returncode}; its cases compile in the timed run", flush=True)
    wall = time.perf_counter() - start
    print(f"compile warm-up: {len(cold)} graphs in {args.compile_workers} workers, {wall:.0f} s wall "
          f"({sum(cold.values()):.0f} s of compiling)", flush=True)
    return cold, wall


def profile_host(ctx):
    """Where the host time of one fused forward+backward goes (cProfile, MLLA-T stage 4, fp32)."""
    import cProfile
    import pstats
    from mlla_kernels.triton import linear_attention_triton
    hw, channels, heads = STAGE_GRIDS[3], MODELS["T"][0][3], MODELS["T"][1][3]
    sets = make_sets(BATCH, hw[0] * hw[1], channels, torch.float32, DEVICE, True)[:2]
    run = forward_backward_runner(lambda qk, v: linear_attention_triton(qk, v, hw, heads), sets)
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(50):
        run()
    host_ms = (time.perf_counter() - start) / 50 * 1e3
    torch.cuda.synchronize()
    print(f"host: {host_ms:.3f} ms per fused fwd+bwd call (launch only, not synchronized)")
    print("host us per call: " + ", ".join(f"{k[:-3]} {v:.1f}" for k, v in launch_costs(DEVICE).items()))
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(20):
        run()
    profiler.disable()
    torch.cuda.synchronize()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(14)


def print_table(rows, copy_gbps, device_name):
    print(f"\n{device_name}; copy bandwidth {copy_gbps:.0f} GB/s (read + write); batch {BATCH}; ms are medians")
    header = (f"{'model':5} {'grid':>7} {'C':>4} {'hd':>3} {'dt':4} | {'mode':7} {'eager':>7} {'compile':>7} "
              f"{'fused':>7} {'graph':>7} {'vs eag':>6} {'vs cmp':>6} {'GB/s':>6} {'%copy':>5} {'%c grph':>7} | "
              f"{'atomic':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        for mode in ("fwd", "fwd_bwd"):
            frac_graph = r.get(f"{mode}_fused_graph_copy_fraction")
            print(f"{r['model']:5} {r['hw'][0]:>3}x{r['hw'][1]:<3} {r['channels']:>4} {r['heads']:>3} {r['dtype']:4} | "
                  f"{mode:7} {fmt(r[f'{mode}_eager_ms']):>7} {fmt(r[f'{mode}_compile_ms']):>7} "
                  f"{fmt(r[f'{mode}_fused_ms']):>7} {fmt(r.get(f'{mode}_fused_graph_ms')):>7} "
                  f"{ratio(r[f'{mode}_eager_ms'], r[f'{mode}_fused_ms']):>6} "
                  f"{ratio(r[f'{mode}_compile_ms'], r[f'{mode}_fused_ms']):>6} "
                  f"{r[f'{mode}_fused_gbps']:>6.0f} {100 * r[f'{mode}_fused_copy_fraction']:>4.0f}% "
                  f"{fmt(None if frac_graph is None else 100 * frac_graph, '.0f'):>6}% | "
                  f"{fmt(r.get(f'{mode}_fused_atomic_ms')):>7}")
    print("\nGPU time per call (CUDA-graph replay of each implementation: no host launch cost), ms; "
          "'copy': one device copy of the op's bytes, '%copy': fused's share of the large copy's bandwidth, "
          "'%eq cp': copy / fused")
    header = (f"{'model':5} {'grid':>7} {'dt':4} | {'mode':7} {'eager':>7} {'compile':>7} {'fused':>7} "
              f"{'vs eag':>6} {'vs cmp':>6} {'copy':>7} {'%copy':>5} {'%eq cp':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        for mode in ("fwd", "fwd_bwd"):
            eager, compiled, fused = (r.get(f"{mode}_{name}_graph_ms") for name in ("eager", "compile", "fused"))
            copy_ms, frac = r.get(f"{mode}_copy_same_bytes_graph_ms"), r.get(f"{mode}_fused_graph_copy_fraction")
            print(f"{r['model']:5} {r['hw'][0]:>3}x{r['hw'][1]:<3} {r['dtype']:4} | {mode:7} {fmt(eager):>7} "
                  f"{fmt(compiled):>7} {fmt(fused):>7} {ratio(eager, fused):>6} {ratio(compiled, fused):>6} "
                  f"{fmt(copy_ms):>7} {fmt(None if frac is None else 100 * frac, '.0f'):>4}% "
                  f"{fmt(None if copy_ms is None or not fused else 100 * copy_ms / fused, '.0f'):>5}%")
    print("peak MB per fwd+bwd beyond inputs (eager / fused): " + ", ".join(
        f"{r['model']}{r['stage']}-{r['dtype']} {r['peak_mb_eager']:.0f}/{r['peak_mb_fused']:.0f}" for r in rows))


def _sm90_compiles(head_dims=(16, 32, 64)):
    """The four kernels as launched at the default launch shapes, for triton.compile on sm_90: per
    head size, dtype, kernel and pipelining depth, (label, kernel, signature, constexprs, attrs,
    options), attrs marking what Triton specialises as 16-divisible at launch."""
    from mlla_kernels.triton.backward import key_value_grad_kernel, query_grad_state_kernel
    from mlla_kernels.triton.forward import kv_state_kernel, output_kernel
    from mlla_kernels.triton.launch import FEW_BLOCKS_NUM_STAGES, NUM_STAGES, _padded, dot_mode, launch_config

    for head_dim in head_dims:
        forward = launch_config(64000, 4, head_dim, torch.device("cpu"), "forward")
        backward = launch_config(64000, 4, head_dim, torch.device("cpu"), "backward")
        for dtype in ("fp32", "bf16"):
            for kernel, cfg, pass_name in ((kv_state_kernel, forward, "state"), (output_kernel, forward, "output"),
                                           (query_grad_state_kernel, backward, "backward"),
                                           (key_value_grad_kernel, backward, "backward")):
                consts = dict(HEAD_DIM=head_dim, DIM_PAD=_padded(head_dim),
                              BLOCK_N=cfg.block_n, DOT_MODE=dot_mode(DTYPES[dtype], pass_name))
                if "ATOMIC" in kernel.arg_names:
                    consts["ATOMIC"] = False
                if "WRITE_STATE" in kernel.arg_names:
                    consts["WRITE_STATE"] = True
                consts["FAST_TRIG"] = True  # as compiled on the GPU at stage 1
                if "NUM_PARTIALS" in kernel.arg_names:
                    consts["NUM_PARTIALS"] = 1  # stage 1's partial states are summed by their own kernel
                # As launched: Triton specializes the unit channel strides to the constant 1.
                consts.update({name: 1 for name in kernel.arg_names
                               if name.startswith("stride") and name.endswith("_c")})
                signature = {name: "constexpr" if name in consts else
                             ("*fp32" if name in ("state_ptr", "grad_state_ptr") else f"*{dtype}")
                             if name.endswith("_ptr") else "i32" for name in kernel.arg_names}
                # As launched: pointers and row/batch strides 16-divisible (Triton specializes on that;
                # without it the loads are not vectorized and the report overstates the kernels).
                aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                           if name.endswith("_ptr") or (name.startswith("stride") and not name.endswith("_c"))}
                # Both pipelining depths the launch uses (the shallower one where programs run few blocks).
                for num_stages in (NUM_STAGES, FEW_BLOCKS_NUM_STAGES):
                    label = (f"d={head_dim:<3} {dtype} {kernel.__name__:18} {cfg.block_n:>3} tokens x "
                             f"{cfg.num_warps} warps, {num_stages} stages, {consts['DOT_MODE']}")
                    yield label, kernel, signature, consts, aligned, dict(num_warps=cfg.num_warps,
                                                                          num_stages=num_stages)


def _triton_tool(name: str) -> str:
    """The path of a CUDA tool Triton ships (ptxas, cuobjdump)."""
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _compile_sm90(kernel, signature, consts, attrs, options):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def compile_report():
    """Registers and spill bytes per kernel at the default tile shapes, from triton.compile for
    sm_90 and the ptxas Triton ships: the cheapest check that a tile shape fits the register file."""
    import re
    import subprocess
    import tempfile

    import triton

    ptxas = _triton_tool("ptxas")
    print(f"triton {triton.__version__}, sm_90")
    for label, kernel, signature, consts, aligned, options in _sm90_compiles():
        compiled = _compile_sm90(kernel, signature, consts, aligned, options)
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
            ptx.write(compiled.asm["ptx"])
            ptx.flush()
            log = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", ptx.name, "-o", os.devnull],
                                 capture_output=True, text=True).stderr
        regs = re.search(r"Used (\d+) registers", log)
        spills = re.search(r"(\d+) bytes spill stores", log)
        print(f"{label}: {regs.group(1) if regs else '?'} registers, "
              f"{spills.group(1) if spills else '?'} B spilled, {compiled.metadata.shared} B shared")
    return 0


def _sass(compiled) -> list:
    import re
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        listing = subprocess.run([_triton_tool("cuobjdump"), "-sass", cubin.name], capture_output=True,
                                 text=True).stdout
    return [re.sub(r"/\*[0-9a-f]+\*/", "", line).strip() for line in listing.splitlines()
            if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]


def specialisation_report():
    """What Triton's specialisation of the size integers (UNSPECIALISED_SIZES) would change in the
    kernels: each compiled for sm_90 with those integers marked 16-divisible, as Triton would
    specialise them at sizes such as 64x64, and without (as launched), SASS compared."""
    import triton

    from mlla_kernels.triton._common import UNSPECIALISED_SIZES
    print(f"triton {triton.__version__}, sm_90: SASS instructions with the sizes 16-divisible / unspecialised")
    for label, kernel, signature, consts, aligned, options in _sm90_compiles(head_dims=(32, 64)):
        hinted = {**aligned, **{(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                                if name in UNSPECIALISED_SIZES}}
        with_hint = _sass(_compile_sm90(kernel, signature, consts, hinted, options))
        without = _sass(_compile_sm90(kernel, signature, consts, aligned, options))
        print(f"{label}: {len(with_hint)} / {len(without)}"
              f"{' (identical)' if with_hint == without else ' (differ)'}")
    return 0


def cpu_sanity():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from mlla_kernels import linear_attention_reference
    from mlla_kernels.triton import launch_overrides, linear_attention_triton
    hw, channels, heads = (5, 7), 32, 2
    qk = torch.randn(BATCH, hw[0] * hw[1], 2 * channels, requires_grad=True)
    v = torch.randn(BATCH, hw[0] * hw[1], channels, requires_grad=True)
    start = time.perf_counter()
    with launch_overrides(block_n=16, splits=2):
        out = linear_attention_triton(qk, v, hw, heads)
        out.sum().backward()
    elapsed = time.perf_counter() - start
    ref = linear_attention_reference(qk.double(), v.double(), hw, heads)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(f"cpu sanity (interpreter): {hw} C={channels} heads={heads}: fwd+bwd {elapsed:.2f} s, rel err {err:.1e}")
    return 0 if err < 1e-5 else 1


def profiler_range(model, stage, dtype_name):
    """One fused forward+backward at MLLA-`model` stage `stage` between cudaProfilerStart and
    cudaProfilerStop, after three warm-up calls (compiles and caches stay out of the range)."""
    from mlla_kernels.triton import linear_attention_triton
    stage = int(stage)
    hw, channels, heads = STAGE_GRIDS[stage - 1], MODELS[model][0][stage - 1], MODELS[model][1][stage - 1]
    qk, v, grad = make_sets(BATCH, hw[0] * hw[1], channels, DTYPES[dtype_name], DEVICE, True)[0]
    for _ in range(3):
        linear_attention_triton(qk, v, hw, heads).backward(grad)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    linear_attention_triton(qk, v, hw, heads).backward(grad)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.compile_worker:
        return compile_worker(args.compile_worker, args.models, args.dtypes)
    if args.compile_report:
        return compile_report()
    if args.specialisation_report:
        return specialisation_report()
    device = timing_device("attention.py", args.cpu_sanity)
    if device is None:
        return 0
    if device == "cpu":
        return cpu_sanity()
    if args.profiler_range:
        return profiler_range(*args.profiler_range)
    import triton
    import triton.testing

    raise_recompile_limits(256)
    device_name = torch.cuda.get_device_name()
    ctx = dict(do_bench=triton.testing.do_bench, do_bench_graph=triton.testing.do_bench_cudagraph, compile_spent=0.0)
    ctx["copy_gbps"] = copy_bandwidth_gbs(DEVICE, size_mb=1024)
    print(f"{device_name}, torch {torch.__version__}, triton {triton.__version__}: "
          f"copy {ctx['copy_gbps']:.0f} GB/s", flush=True)

    warm_up_compiles = args.compile_workers > 0 and not args.sweep_only
    ctx["cold_compile_s"], warmup_wall = warm_compile_caches(args) if warm_up_compiles else ({}, 0.0)
    if args.profile_host:
        profile_host(ctx)
    sweep_results = sweep(args, ctx) if args.sweep_budget_s > 0 else []

    def write_results(**fields):
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(device=device_name, torch=torch.__version__, triton=triton.__version__,
                               copy_gbps=ctx["copy_gbps"], sweep=sweep_results, **fields), f, indent=1)
    if args.sweep_only:
        write_results()
        return 0
    rows = []
    for model in args.models:
        for dtype_name in args.dtypes:
            for stage, (hw, channels, heads) in enumerate(zip(STAGE_GRIDS, *MODELS[model]), start=1):
                n = hw[0] * hw[1]
                ctx["sets_fwd"] = make_sets(BATCH, n, channels, DTYPES[dtype_name], DEVICE, False)
                ctx["sets_bwd"] = [(qk.detach().requires_grad_(), v.detach().requires_grad_(), g)
                                   for qk, v, g in ctx["sets_fwd"]]
                row = bench_case(model, stage, hw, channels, heads, dtype_name, args, ctx)
                rows.append(row)
                print(json.dumps(row), flush=True)
                del ctx["sets_fwd"], ctx["sets_bwd"]
    write_results(compile_seconds=ctx["compile_spent"], compile_warmup_wall_s=warmup_wall,
                  compile_workers=args.compile_workers, rows=rows)
    print_table(rows, ctx["copy_gbps"], device_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
