"""Whole MLLA backbone: images/s and peak memory, eager vs torch.compile vs fused kernels.

    python benchmarks/backbone.py [--arch t] [--batch 2] [--size 800 1280] [--json PATH]
    python benchmarks/backbone.py --profile          # where the time goes, top ops by CUDA time
    python benchmarks/backbone.py --cpu-sanity       # tiny sizes on the CPU: proves the script runs

What is compared, for each mode (inference: forward under no_grad; train: forward + backward of a
loss on all four outputs, no optimizer) and each dtype (fp32; bf16 = fp32 weights under
torch.autocast(bfloat16)):
- eager:      the paper's block as PyTorch ops (attn_impl and conv_impl 'reference');
- compile:    torch.compile of that eager backbone (default mode, static shapes); the time of the
              first call, which compiles, is reported separately as first_call_s;
- fused-attn: only the attention fused (attn_impl='auto', conv_impl='reference');
- fused:      fused attention and fused depthwise convolutions (conv_impl='auto'): the
              backbone's default on CUDA;
- compile-fused: torch.compile of the fused backbone (the kernels are opaque custom ops there;
              inductor fuses the LayerNorms, activations, casts and adds around them);
- *-graph:    the same four replayed from CUDA graphs, for fixed-size inputs: eager-graph and
              fused-graph capture the module with torch.cuda.make_graphed_callables (train: its
              forward and backward graphs; inference: one forward graph), compile-graph and
              compile-fused-graph are torch.compile(mode="reduce-overhead"). The loss and the
              zeroing of .grad stay outside the graphs. A graph row's time is the GPU's time for
              the step plus those few ops: what is left when the host's launch cost is taken away.
              Peak memory of the make_graphed_callables rows is the peak over warm-up and capture.
The backbone is built from the Mask R-CNN config of the arch (drop_path_rate as in the 1x config),
with random weights and fresh torch.randn images. Timing: triton.testing.do_bench (CUDA events,
warm-up, median of the repeats) after one untimed first call; peak memory: one call after
torch.cuda.reset_peak_memory_stats, weights and inputs included. TF32 settings are torch's defaults.
"""
import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (ARCHS, COMPILED_IMPLS, KERNEL_IMPLS, autocast, bench, collect_rows, compile_in_mode,  # noqa: E402
                               default_impls_without_compile, detector_config, environment, error_text,
                               free_memory, peak_memory_mb, print_speed_table, print_table, set_kernel_impls,
                               synchronize, timing_device, write_json)

# The variants captured with torch.cuda.make_graphed_callables, and the implementation each replays.
GRAPH_IMPLS = {"eager-graph": "eager", "fused-graph": "fused"}
IMPLS = tuple(KERNEL_IMPLS) + tuple(GRAPH_IMPLS)
DTYPES = ("fp32", "bf16")
MODES = ("inference", "train")
PROFILE_LABEL = "mlla_kernels.linear_attention"


def build_backbone(arch: str, device) -> torch.nn.Module:
    import mlla_det  # noqa: F401  registers MLLA
    from mmdet.registry import MODELS
    cfg = detector_config(arch)
    return MODELS.build(cfg.model.backbone).to(device)



def make_step(model, params, images, mode: str, dtype: str, device, graphed: bool = False, step_begin=None):
    """One benchmarked call: a no_grad forward, or forward + backward of a loss on every output
    (params: whose .grad is reset first). graphed: model replays CUDA graphs, so autocast runs
    without its weight-cast cache, as graphs require; step_begin, if given, runs first (the
    marker torch.compile's CUDA-graph trees need)."""
    if mode == "inference":
        def step():
            if step_begin is not None:
                step_begin()
            with torch.no_grad(), autocast(dtype, device, graphed=graphed):
                return model(images)
    else:
        def step():
            if step_begin is not None:
                step_begin()
            for p in params:
                p.grad = None
            with autocast(dtype, device, graphed=graphed):
                outputs = model(images)
            loss = sum(out.float().square().mean() for out in outputs)
            loss.backward()
            return loss
    return step


def graphed_module(backbone, images, mode: str, dtype: str, device):
    """A copy of backbone as a CUDA-graph replay for inputs shaped like images, and the copy's
    parameters: make_graphed_callables in training (forward and backward graphs; it replaces the
    module's forward, hence the copy), one captured no_grad forward for inference."""
    model = copy.deepcopy(backbone)
    # Warm up (Triton compiles, cuDNN picks algorithms) on a side stream, as capture requires.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    if mode == "train":
        with torch.cuda.stream(side), autocast(dtype, device, graphed=True):
            for _ in range(2):
                sum(out.float().sum() for out in model(images)).backward()
        torch.cuda.current_stream().wait_stream(side)
        for p in model.parameters():
            p.grad = None
        with autocast(dtype, device, graphed=True):
            return torch.cuda.make_graphed_callables(model, (images,), num_warmup_iters=1), list(model.parameters())
    static_input = images.clone()
    with torch.cuda.stream(side), torch.no_grad(), autocast(dtype, device, graphed=True):
        for _ in range(2):
            model(static_input)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad(), autocast(dtype, device, graphed=True):
        static_outputs = model(static_input)

    def replay(x):
        static_input.copy_(x)
        graph.replay()
        return static_outputs
    return replay, list(model.parameters())


def prepare(backbone, arch_images, mode: str, impl: str, dtype: str, device):
    """Set the kernel implementations and mode; returns the step to time."""
    set_kernel_impls(backbone, GRAPH_IMPLS.get(impl, impl))
    backbone.train(mode == "train")
    model, params, step_begin = backbone, list(backbone.parameters()), None
    if impl in COMPILED_IMPLS:
        torch._dynamo.reset()  # a fresh compile per configuration, so its time is its own
        model, step_begin = compile_in_mode(backbone, impl)
    elif impl in GRAPH_IMPLS:
        if torch.device(device).type != "cuda":
            raise ValueError(f"{impl} replays CUDA graphs: it needs a CUDA device, got {device}")
        model, params = graphed_module(backbone, arch_images, mode, dtype, device)
    graphed = impl in GRAPH_IMPLS or step_begin is not None
    return make_step(model, params, arch_images, mode, dtype, device, graphed, step_begin)


def measure(backbone, args, mode: str, impl: str, dtype: str, device) -> dict:
    row = {"arch": args.arch.upper(), "mode": mode, "impl": impl, "dtype": dtype, "batch": args.batch,
           "size": f"{args.size[0]}x{args.size[1]}"}
    step = None
    try:
        free_memory(device)
        images = torch.randn(args.batch, 3, *args.size, device=device)
        graphed = impl in GRAPH_IMPLS and torch.device(device).type == "cuda"
        if graphed:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        step = prepare(backbone, images, mode, impl, dtype, device)
        step()  # compiles (torch.compile), JIT-compiles the kernels (fused), captures (graphs)
        synchronize(device)
        row["first_call_s"] = round(time.perf_counter() - start, 2)
        # A replay allocates nothing: a graph's memory is what its capture (and the warm-up
        # before it) allocated, so graph rows report the peak over those.
        row["peak_mem_MB"] = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if graphed
                              else peak_memory_mb(step, device))
        ms = bench(step, args.warmup_ms, args.rep_ms, device)
        row["ms"] = ms
        row["images_per_s"] = args.batch / (ms / 1e3)
    except Exception as exc:  # one failing configuration (OOM, kernels missing) must not stop the rest
        row["error"] = error_text(exc)
        print(f"  {mode} {impl} {dtype}: {row['error']}", flush=True)
    finally:
        del step
        free_memory(device)
        if impl in COMPILED_IMPLS:
            torch._dynamo.reset()
    return row



# --- --profile ---------------------------------------------------------------------------------

@contextlib.contextmanager
def label_attention_op():
    """Wrap the backbone's attention op in a profiler range, so its share of the time shows."""
    from mlla_det.models.backbones import mlla as mlla_module
    original = mlla_module.linear_attention

    def labelled(*args, **kwargs):
        with torch.profiler.record_function(PROFILE_LABEL):
            return original(*args, **kwargs)

    mlla_module.linear_attention = labelled
    try:
        yield
    finally:
        mlla_module.linear_attention = original


def _event_time(event, name: str) -> float:
    """Microseconds; torch >= 2.4 names device times `device_*`, older ones `cuda_*`."""
    value = getattr(event, name, None)
    if value is None:
        value = getattr(event, name.replace("device", "cuda"), 0.0)
    return float(value)


def profile_or_error(backbone, args, mode: str, impl: str, dtype: str, device) -> dict:
    try:
        return profile(backbone, args, mode, impl, dtype, device)
    except Exception as exc:  # e.g. kernels missing: profile the other configurations anyway
        print(f"  profile {mode} {impl} {dtype}: {error_text(exc)}", flush=True)
        free_memory(device)
        return {"arch": args.arch.upper(), "mode": mode, "impl": impl, "dtype": dtype, "error": error_text(exc)}


def _is_kernel(event) -> bool:
    """A device-side event (a kernel or memcpy), as opposed to the CPU op that launched it.
    A profiler range also gets a GPU-side copy (a user annotation spanning its kernels): not one."""
    return (getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA
            and not getattr(event, "is_user_annotation", False))


def profile(backbone, args, mode: str, impl: str, dtype: str, device, top: int = 25) -> dict:
    """Profile a few steps; print the top ops (by self CUDA time: the kernels each op launched
    itself) and the top kernels, per step, as shares of all the kernel time."""
    from torch.profiler import ProfilerActivity
    on_cuda = torch.device(device).type == "cuda"
    images = torch.randn(args.batch, 3, *args.size, device=device)
    step = prepare(backbone, images, mode, impl, dtype, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    steps = args.profile_steps
    with label_attention_op():
        for _ in range(2):  # warm-up: compile, autotune, cuDNN algorithm choice
            step()
        synchronize(device)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            synchronize(device)
    averages = prof.key_averages()
    if on_cuda:
        self_key, total_key, clock = "self_device_time_total", "device_time_total", "CUDA"
        kernels = sorted((e for e in averages if _is_kernel(e)), key=lambda e: -_event_time(e, self_key))
        ops = [e for e in averages if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA]
        step_us = sum(_event_time(e, self_key) for e in kernels) / steps
    else:
        self_key, total_key, clock = "self_cpu_time_total", "cpu_time_total", "CPU"
        kernels, ops = [], list(averages)
        step_us = sum(_event_time(e, self_key) for e in ops) / steps
    ops = sorted((e for e in ops if _event_time(e, self_key) > 0), key=lambda e: -_event_time(e, self_key))

    def rows_of(events, count):
        return [{"op": e.key[:80], "calls": e.count // steps,
                 "self_ms": _event_time(e, self_key) / steps / 1e3,
                 "total_ms": _event_time(e, total_key) / steps / 1e3,
                 "self_%": 100 * _event_time(e, self_key) / steps / step_us if step_us else None}
                for e in events[:count]]

    what = "forward" if mode == "inference" else "forward+backward"
    op_rows, kernel_rows = rows_of(ops, top), rows_of(kernels, top // 2)
    print_table(op_rows, ["op", "calls", "self_ms", "total_ms", "self_%"],
                title=f"\n## {args.arch.upper()} {mode} ({what}), {impl}, {dtype}, batch {args.batch}, "
                      f"{args.size[0]}x{args.size[1]}: top {top} ops by self {clock} time, per step "
                      f"(all {clock} time: {step_us / 1e3:.2f} ms per step)")
    if kernel_rows:
        print_table(kernel_rows, ["op", "calls", "self_ms", "self_%"], title=f"top {top // 2} kernels")
    # The CPU-side range: its device time is the sum of the kernels launched inside it.
    attention = [e for e in averages if e.key == PROFILE_LABEL
                 and getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA]
    attention_ms = _event_time(attention[0], total_key) / steps / 1e3 if attention else None
    if attention_ms is not None:
        print(f"attention op forward ({PROFILE_LABEL}: steps 2-4, no LePE): {attention_ms:.2f} ms per step "
              f"= {100 * attention_ms / (step_us / 1e3):.1f}% of the {clock} time "
              f"(its backward appears as autograd nodes and kernels above)")
    del step
    free_memory(device)
    return {"arch": args.arch.upper(), "mode": mode, "impl": impl, "dtype": dtype, "profile_steps": steps,
            "step_ms_" + clock.lower(): step_us / 1e3, "attention_forward_ms": attention_ms,
            "top_ops": op_rows, "top_kernels": kernel_rows}


# --- main --------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--arch", choices=ARCHS, default="t")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", nargs=2, type=int, default=(800, 1280), metavar=("H", "W"))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--warmup-ms", type=float, default=200.0)
    parser.add_argument("--rep-ms", type=float, default=1000.0)
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing, profile each configuration and print its top ops")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--cpu-sanity", action="store_true",
                        help="run on the CPU at tiny sizes with 1-2 repeats (checks the script, not speed)")
    parser.add_argument("--json", metavar="PATH", help="write the rows as a JSON list to PATH")
    args = parser.parse_args(argv)
    if args.cpu_sanity:
        args.batch, args.size = 1, (32, 64)
        args.warmup_ms, args.rep_ms, args.profile_steps = 0.0, 0.0, 1
        args.impls = default_impls_without_compile(args.impls, IMPLS, also_skip=GRAPH_IMPLS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = timing_device("backbone.py", args.cpu_sanity)
    if device is None:
        return 0
    env = environment(device)
    print(f"# MLLA-{args.arch.upper()} backbone, batch {args.batch} x 3 x {args.size[0]} x {args.size[1]} | "
          f"{env['device']} | torch {env['torch']} | triton {env['triton']}", flush=True)
    torch.manual_seed(0)
    backbone = build_backbone(args.arch, device)

    configs = [(m, i, d) for m in args.modes for d in args.dtypes for i in args.impls]
    run = profile_or_error if args.profile else measure
    rows = collect_rows(configs, lambda *config: run(backbone, args, *config, device), env, args.json,
                        echo=not args.profile)
    if not args.profile:
        print_speed_table(rows, ["mode", "impl", "dtype", "ms", "images_per_s", "vs_eager", "vs_compile",
                                 "peak_mem_MB", "first_call_s"],
                          title=f"\n## MLLA-{args.arch.upper()} backbone, batch {args.batch}, "
                                f"{args.size[0]}x{args.size[1]} ({env['device']})")
    if args.json:
        write_json(args.json, rows)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
