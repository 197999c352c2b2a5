"""Shared helpers of the benchmark scripts: timing, memory, bandwidth, tables, JSON, versions.

Plain functions, no mmdet: any script under benchmarks/ may use them.

    bench(fn, warmup_ms, rep_ms) -> median milliseconds of one call of fn
    peak_memory_mb(fn, device)   -> peak allocated memory of one call, MiB (None off CUDA)
    copy_bandwidth_gbs(device)   -> measured device-to-device copy bandwidth, GB/s
    launch_costs(device)         -> host microseconds per Triton launch / ATen op / autograd step
    print_table(rows, columns)   -> prints rows (dicts) as an aligned text table
    collect_rows(configs, measure, env) -> rows of measure(*config), JSON rewritten per row
    print_speed_table(rows, columns, title) -> vs_eager / vs_compile added, then the table
    write_json(path, rows)       -> writes rows as a JSON list (NaN/inf become null)
    environment()                -> {device, torch, triton, cuda, python}
"""
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def cuda_available() -> bool:
    return torch.cuda.is_available()


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], object], warmup_ms: float = 100.0, rep_ms: float = 500.0, device=None) -> float:
    """Median time of one call of fn, in milliseconds.

    On CUDA this is triton.testing.do_bench (CUDA events around each call, L2 flushed between
    calls, warm-up then as many repeats as fit in rep_ms). Elsewhere: wall-clock per call, warm-up
    calls for warmup_ms, then timed calls for rep_ms (at least one). Call fn once before this, so
    that compiling or autotuning is neither timed nor mixed into do_bench's estimate.
    """
    if device is None:
        device = "cuda" if cuda_available() else "cpu"
    if torch.device(device).type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    return _bench_wall_clock(fn, warmup_ms, rep_ms)


def _bench_wall_clock(fn, warmup_ms: float, rep_ms: float) -> float:
    start = time.perf_counter()
    while (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn()
    times = []
    start = time.perf_counter()
    while not times or (time.perf_counter() - start) * 1e3 < rep_ms:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mb(fn: Callable[[], object], device) -> Optional[float]:
    """Peak memory allocated by torch during one call of fn, MiB; None (fn not called) off CUDA.

    Counts everything alive during the call (weights, optimizer state, inputs), as
    torch.cuda.max_memory_allocated does; the counter is reset just before the call.
    """
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


def free_memory(device) -> None:
    """Release cached blocks so the next measurement starts from the same place."""
    import gc
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def copy_bandwidth_gbs(device, size_mb: int = 512) -> float:
    """Device memory bandwidth of a large copy (bytes read + bytes written per second), GB/s.

    Used to turn byte counts into time floors. On the CPU it measures main-memory bandwidth.
    """
    numel = size_mb * 2 ** 20 // 4
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), warmup_ms=25, rep_ms=200, device=device)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


_EMPTY_KERNEL = None


def _empty_triton_kernel():
    """A Triton kernel that does nothing, defined on first use (TRITON_INTERPRET is read then)."""
    global _EMPTY_KERNEL
    if _EMPTY_KERNEL is None:
        import triton

        @triton.jit
        def empty_kernel(ptr):
            pass

        _EMPTY_KERNEL = empty_kernel
    return _EMPTY_KERNEL


def launch_costs(device, calls: int = 2000) -> Dict[str, float]:
    """Host microseconds per call of the cheapest things a training step launches, called back to
    back with one synchronisation at the end (their GPU work is a few microseconds, so the host
    sets the pace): an empty Triton kernel, a one-element ATen add, a one-element multiply through
    autograd (forward + backward: two kernels plus the autograd engine), an allocation, a cast to
    bf16 (what autocast adds per argument), and the three matrix products a training step is built
    on, bf16 64 x 64 (mm, addmm with a bias, bmm of 2): the host profiles of the 1x pipeline put
    70-190 us of own CPU time on each of these, against ~10-40 on the elementwise ops."""
    kernel = _empty_triton_kernel()
    x = torch.ones(1, device=device)
    leaf = torch.ones(1, device=device, requires_grad=True)
    square = torch.ones(64, 64, device=device, dtype=torch.bfloat16)
    bias = torch.ones(64, device=device, dtype=torch.bfloat16)
    batched = torch.ones(2, 64, 64, device=device, dtype=torch.bfloat16)
    square32 = torch.ones(64, 64, device=device)

    def backward_step():
        leaf.grad = None
        (leaf * 2.0).backward()

    cases = {"triton_empty_launch_us": lambda: kernel[(1,)](x),
             "aten_add_us": lambda: torch.add(x, x),
             "autograd_mul_fwd_bwd_us": backward_step,
             "aten_empty_us": lambda: torch.empty(64, device=device),
             "aten_cast_bf16_us": lambda: square32.to(torch.bfloat16),
             "aten_mm_bf16_us": lambda: torch.mm(square, square),
             "aten_addmm_bf16_us": lambda: torch.addmm(bias, square, square),
             "aten_bmm_bf16_us": lambda: torch.bmm(batched, batched)}
    result = {}
    for name, fn in cases.items():
        for _ in range(min(50, calls)):
            fn()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        result[name] = (time.perf_counter() - start) / calls * 1e6
    return result


def environment(device=None) -> Dict[str, str]:
    """Names and versions that a number is meaningless without."""
    if device is None:
        device = "cuda" if cuda_available() else "cpu"
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": str(torch.version.cuda),
        "python": platform.python_version(),
    }


def _format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and abs(value) < 0.1:
            return f"{value:.3g}"
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def print_table(rows: Sequence[dict], columns: Sequence[str], title: Optional[str] = None, file=None) -> None:
    """Print rows (dicts) as a Markdown-style table of the given columns (missing cells: '-')."""
    file = file or sys.stdout
    cells = [[_format_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    if title:
        print(title, file=file)
    print("| " + " | ".join(col.ljust(w) for col, w in zip(columns, widths)) + " |", file=file)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=file)
    for r in cells:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |", file=file)
    file.flush()


def _json_safe(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path, rows: Iterable[dict]) -> None:
    """Write rows as a JSON list (strict JSON: NaN and inf are written as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_json_safe(list(rows)), f, indent=2, default=str, allow_nan=False)
        f.write("\n")


def add_repo_to_path() -> None:
    """Let `python benchmarks/x.py` import mlla_det and mlla_kernels from the source tree."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def error_text(exc: BaseException, limit: int = 160) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- mmdetection side (imported lazily: the helpers above must work without mmdet) ---

ARCHS = ("t", "s", "b")


def config_path(arch: str, schedule: str = "1x") -> Path:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return REPO_ROOT / "configs" / "mlla" / f"mask-rcnn_mlla-{arch}_fpn_{schedule}_coco.py"


def detector_config(arch: str, attn_impl: str = "auto", conv_impl: str = "reference"):
    """The Mask R-CNN config of the paper's row for `arch`, without pretrained weights."""
    add_repo_to_path()
    from mmengine.config import Config
    path = config_path(arch)
    if not path.is_file():
        raise FileNotFoundError(f"no config for MLLA-{arch.upper()} at {path}")
    cfg = Config.fromfile(str(path))
    # Random weights: the numbers measured here do not depend on them, and no checkpoint is needed.
    cfg.model.backbone.init_cfg = None
    cfg.model.backbone.attn_impl = attn_impl
    cfg.model.backbone.conv_impl = conv_impl
    return cfg


# The box assigners, samplers, box coders and anchor generator of the paper's model (mmdet's) and
# of this repository's configs (the same results, or on a GPU the same sampling distribution, with
# fewer launches, no host synchronisation and no host-side shuffle: mlla_det/models/).
HEAD_UTILS = {"paper": dict(assigner="MaxIoUAssigner", sampler="RandomSampler", bbox_coder="DeltaXYWHBBoxCoder",
                            anchor_generator="AnchorGenerator", rpn_head="RPNHead", mask_head="FCNMaskHead",
                            roi_extractor="SingleRoIExtractor", data_preprocessor="DetDataPreprocessor"),
              "repo": dict(assigner="SyncFreeMaxIoUAssigner", sampler="DeviceRandomSampler",
                           bbox_coder="PairedDeltaXYWHBBoxCoder", anchor_generator="CachedAnchorGenerator",
                           rpn_head="LevelMergedRPNHead", mask_head="DeviceTargetsFCNMaskHead",
                           roi_extractor="LevelSortedRoIExtractor", data_preprocessor="DeviceMasksDetDataPreprocessor")}


def set_head_utils(model_cfg, kind: str) -> None:
    """Point a Mask R-CNN config's RPN and mask head types, its RoI extractors, its RPN and RoI-head
    assigners, samplers and box coders and its anchor generator at `kind` (a key of HEAD_UTILS)."""
    types = HEAD_UTILS[kind]
    for stage in ("rpn", "rcnn"):
        model_cfg.train_cfg[stage]["assigner"]["type"] = types["assigner"]
        model_cfg.train_cfg[stage]["sampler"]["type"] = types["sampler"]
    model_cfg.rpn_head["type"] = types["rpn_head"]
    model_cfg.roi_head.mask_head["type"] = types["mask_head"]
    model_cfg.roi_head.bbox_roi_extractor["type"] = types["roi_extractor"]
    model_cfg.roi_head.mask_roi_extractor["type"] = types["roi_extractor"]
    model_cfg.rpn_head.bbox_coder["type"] = types["bbox_coder"]
    model_cfg.roi_head.bbox_head.bbox_coder["type"] = types["bbox_coder"]
    model_cfg.rpn_head.anchor_generator["type"] = types["anchor_generator"]
    model_cfg.data_preprocessor["type"] = types["data_preprocessor"]


def use_heads(model, kind: str) -> None:
    """Make a detector's RPN and mask heads, its RoI extractors and its data preprocessor
    HEAD_UTILS[kind]'s types. The objects stay (their classes are switched: this repository's
    versions only override methods of mmdet's and add no state), so that what holds a head, such
    as detector.py's compiled methods, keeps holding it."""
    from mmdet.registry import MODELS
    for owner, name, util in ((model, "rpn_head", "rpn_head"), (model.roi_head, "mask_head", "mask_head"),
                              (model.roi_head, "bbox_roi_extractor", "roi_extractor"),
                              (model.roi_head, "mask_roi_extractor", "roi_extractor"),
                              (model, "data_preprocessor", "data_preprocessor")):
        head = getattr(owner, name)
        head_type, current = MODELS.get(HEAD_UTILS[kind][util]), type(head)
        if not (issubclass(head_type, current) or issubclass(current, head_type)):
            raise TypeError(f"cannot switch a {name} of type {current.__name__} to {head_type.__name__}")
        head.__class__ = head_type


def use_head_utils(model, kind: str, model_cfg) -> None:
    """set_head_utils on a detector built from `model_cfg`: its heads switched (use_heads), its
    assigners, samplers, box coders and anchor generator rebuilt."""
    from mmdet.registry import TASK_UTILS
    use_heads(model, kind)
    types = HEAD_UTILS[kind]
    model.rpn_head.assigner = TASK_UTILS.build(dict(model.rpn_head.train_cfg["assigner"], type=types["assigner"]))
    model.roi_head.bbox_assigner = TASK_UTILS.build(dict(model.roi_head.train_cfg["assigner"], type=types["assigner"]))
    model.rpn_head.sampler = TASK_UTILS.build(
        dict(model.rpn_head.train_cfg["sampler"], type=types["sampler"]), default_args=dict(context=model.rpn_head))
    model.roi_head.bbox_sampler = TASK_UTILS.build(
        dict(model.roi_head.train_cfg["sampler"], type=types["sampler"]), default_args=dict(context=model.roi_head))
    model.rpn_head.bbox_coder = TASK_UTILS.build(dict(model_cfg.rpn_head.bbox_coder, type=types["bbox_coder"]))
    model.roi_head.bbox_head.bbox_coder = TASK_UTILS.build(
        dict(model_cfg.roi_head.bbox_head.bbox_coder, type=types["bbox_coder"]))
    model.rpn_head.prior_generator = TASK_UTILS.build(
        dict(model_cfg.rpn_head.anchor_generator, type=types["anchor_generator"]))


def build_detector(cfg):
    import mlla_det  # noqa: F401  registers MLLA and provides mmcv's ops without compiling mmcv
    # mlla_det's mmcv._ext stand-in imports torchvision at the first nms/roi_align. Inside a
    # torch.jit trace (flops.py) that first import fails: it calls torchvision::_cuda_version,
    # whose int output the tracer rejects. Importing it here keeps the import out of any trace.
    import torchvision  # noqa: F401
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    init_default_scope(cfg.get("default_scope", "mmdet"))
    model = MODELS.build(cfg.model)
    with quiet_mmengine():  # mmdet's own initialisation, without its INFO line per tensor
        model.init_weights()
    return model


@contextlib.contextmanager
def quiet_mmengine():
    """Silence mmengine's INFO logging (one line per tensor from init_weights and optimizers)."""
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel("WARNING")
    try:
        yield
    finally:
        logger.setLevel(level)


# What each benchmarked implementation sets on the backbone: (attn_impl, conv_impl).
# eager/compile: the paper's block as PyTorch ops; fused-attn: only the attention fused;
# fused: everything the package fuses (the backbone's default on CUDA); compile-fused: torch.compile
# of the fused backbone (the kernels stay opaque custom ops, inductor fuses what lies between them);
# *-graph: the same compiled with mode="reduce-overhead" (CUDA graphs).
KERNEL_IMPLS = {
    "eager": ("reference", "reference"),
    "compile": ("reference", "reference"),
    "fused-attn": ("auto", "reference"),
    "fused": ("auto", "auto"),
    "compile-fused": ("auto", "auto"),
    "compile-graph": ("reference", "reference"),
    "compile-fused-graph": ("auto", "auto"),
}
# The implementations that run the backbone under torch.compile, and its mode for each:
# "reduce-overhead" replays the compiled code from CUDA graphs (one recorded per input shape).
COMPILE_MODES = {"compile": "default", "compile-fused": "default", "compile-graph": "reduce-overhead",
                 "compile-fused-graph": "reduce-overhead"}
COMPILED_IMPLS = tuple(COMPILE_MODES)


def compile_in_mode(fn, impl: str):
    """(torch.compile of fn (a module or a method) in impl's mode, the marker to call at the start
    of every step or None). CUDA-graph replays need the marker: it tells torch that the outputs of
    the previous step are no longer read, so their memory may be overwritten."""
    mode = COMPILE_MODES[impl]
    marker = torch.compiler.cudagraph_mark_step_begin if mode == "reduce-overhead" else None
    return torch.compile(fn, mode=mode), marker


def timing_device(script: str, cpu_sanity: bool):
    """"cuda" to time on, "cpu" for a --cpu-sanity run, or None (after saying so) when there is no
    GPU and no sanity run was asked for: the caller then exits 0."""
    if cpu_sanity:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    print(f"{script}: no CUDA device; nothing to time. Use --cpu-sanity to check the script on the CPU.")
    return None


def default_impls_without_compile(impls, all_impls, also_skip=()):
    """--cpu-sanity: torch.compile on the CPU needs a C++ toolchain and minutes, so the default
    list of implementations drops the compiled ones and those in also_skip (asked for by name,
    they stay)."""
    if list(impls) == list(all_impls):
        return [impl for impl in all_impls if impl not in COMPILED_IMPLS and impl not in also_skip]
    return impls


def raise_recompile_limits(limit: int = 256) -> None:
    """Let torch.compile keep one graph per benchmarked shape and dtype instead of falling back to
    eager after its default handful of recompiles."""
    torch._dynamo.config.cache_size_limit = limit
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = limit


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= value (a padded side, a canvas side)."""
    return -(-value // multiple) * multiple


def fmt(x, spec=".3f") -> str:
    """A number for a text table, "-" for a missing one."""
    return "-" if x is None else format(x, spec)


def ratio(a, b) -> str:
    """a / b as "1.5x", "-" when either is missing."""
    return "-" if a is None or b is None else f"{a / b:.1f}x"


def autocast(dtype: str, device, graphed: bool = False):
    """The benchmarks' dtypes: "fp32" runs as is, "bf16" is fp32 weights under torch.autocast(bfloat16).
    graphed: for CUDA-graph capture and replay, which need autocast's weight-cast cache off."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, cache_enabled=not graphed)


def add_speedups(rows) -> None:
    """vs_eager / vs_compile: the eager / compile row's time over this row's (same mode, dtype and,
    where rows carry one, round)."""
    for base_impl in ("eager", "compile"):
        base_ms = {(r["mode"], r["dtype"], r.get("round")): r.get("ms") for r in rows if r["impl"] == base_impl}
        for row in rows:
            base = base_ms.get((row["mode"], row["dtype"], row.get("round")))
            if base and row.get("ms"):
                row[f"vs_{base_impl}"] = base / row["ms"]


def collect_rows(configs, measure: Callable[..., dict], env: dict, json_path=None, echo: bool = True) -> list:
    """Rows of measure(*config) for each config, each with the environment's fields. The JSON is
    rewritten after every row, so a run cut short still leaves its numbers; echo prints a line per
    row as it comes."""
    rows = []
    for config in configs:
        row = dict(measure(*config), **env)
        rows.append(row)
        if json_path:
            write_json(json_path, rows)
        if echo:
            impl = row["impl"] + (f" [{row['compiled']}]" if row.get("compiled") else "")
            print(f"  {row['mode']:9s} {impl:10s} {row['dtype']}: "
                  + (f"{row['ms']:.2f} ms" if "ms" in row else "failed"), flush=True)
    return rows


def print_speed_table(rows: Sequence[dict], columns: Sequence[str], title: str) -> None:
    """add_speedups, then the table of `columns` (plus an error column when a row failed)."""
    add_speedups(rows)
    print_table(rows, list(columns) + (["error"] if any("error" in r for r in rows) else []), title=title)


def set_kernel_impls(model: torch.nn.Module, impl: str) -> int:
    """Switch every MLLA attention and block of model to the implementation `impl` (a key of
    KERNEL_IMPLS); returns how many modules were switched."""
    attn_impl, conv_impl = KERNEL_IMPLS[impl]
    switched = 0
    for module in model.modules():
        if hasattr(module, "attn_impl"):
            module.attn_impl = attn_impl
            switched += 1
        if hasattr(module, "conv_impl"):
            module.conv_impl = conv_impl
            switched += 1
    if switched == 0:
        raise ValueError("model has no module with an `attn_impl` or `conv_impl` attribute (is it an MLLA model?)")
    return switched


# Random weights score every class near 1/81, under the configs' 0.05: the box head would keep
# nothing and the mask head never run. With no threshold (what train_throughput.py and detector.py
# used before 2026-12-07, seventh session) all 1,000 x 80 (box, class) pairs enter the box head's
# NMS, over the 10,000 above which mmdet's batched NMS loops over the classes with host
# synchronisations in each (78-94 ms of an evaluation image on an H100, in every model), which a
# trained model does not do. So the benchmarks set the threshold on an untimed first image to let
# this many pairs through (threshold_passing): still 100 detections and masks per image, one NMS call.
EVAL_NMS_PAIRS = 2000


@contextlib.contextmanager
def scores_into_nms(enabled: bool = True):
    """Collects the class scores (rois x (classes + 1)) the RoI box head hands to multiclass_nms, one
    tensor per image, while `enabled`."""
    import mmdet.models.roi_heads.bbox_heads.bbox_head as bbox_head_module
    seen = []
    if not enabled:
        yield seen
        return
    original = bbox_head_module.multiclass_nms

    def recording_nms(multi_bboxes, multi_scores, *args, **kwargs):
        seen.append(multi_scores.detach().float())
        return original(multi_bboxes, multi_scores, *args, **kwargs)

    bbox_head_module.multiclass_nms = recording_nms
    try:
        yield seen
    finally:
        bbox_head_module.multiclass_nms = original


def threshold_passing(scores: list, pairs: int) -> float:
    """The score threshold under which about `pairs` (box, class) pairs of the first image's scores
    (background column left out) stay: the (pairs + 1)-th largest score, or 0 with fewer pairs."""
    flat = scores[0][:, :-1].reshape(-1)
    if flat.numel() <= pairs:
        return 0.0
    return float(torch.topk(flat, pairs + 1).values[-1])


@contextlib.contextmanager
def host_waits():
    """The host's waits for the GPU inside the block: torch.cuda's sync debug mode warns at every
    synchronising call made from this thread; yields a list that holds those warnings once the
    block ends (each with the file and line that made the call). GPU only."""
    import warnings
    waits = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield waits
        finally:
            torch.cuda.set_sync_debug_mode(0)
    waits.extend(w for w in caught if "synchroniz" in str(w.message).lower())
