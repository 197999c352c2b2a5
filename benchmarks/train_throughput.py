"""Training and evaluation throughput of the shipped 1x config, as tools/train.py runs it.

    python benchmarks/train_throughput.py [--iters 120] [--amp bf16|fp16|off] [--json PATH]
    python benchmarks/train_throughput.py --sanity --json PATH     # CPU, 2 iterations, tiny images, fp32

Each variant runs in its own process: mmengine's Runner built from
configs/mlla/mask-rcnn_mlla-{arch}_fpn_1x_coco.py with its own train pipeline (flip, multi-scale
resize or resize -> crop -> resize, pad to 32), sampler (AspectRatioBatchSampler) and dataloader,
2 images per GPU, random weights, on a generated COCO-like set (COCO image sizes, 3-15 polygon
instances of 80 classes, JPEG + COCO json; nothing downloaded). Only the loop is shortened (an
IterBasedTrainLoop of --iters iterations, no validation, no checkpoints).

Per variant: s/iteration (median and mean after --warmup iterations), images/s, data wait,
distinct padded input sizes, compiles, peak memory, the GPU's busy fraction (kernel time over
wall time, from a profiler window of a few iterations), and each part of the iteration (data,
preprocessing, backbone, neck, RPN with its proposals and losses, RoI heads with targets and
losses, backward, optimizer), host time and GPU time (CUDA events at the part's bounds). From the
median it projects the 1x schedule (88.5k iterations of 16 images) on 8 GPUs at 2 images per GPU,
assuming each GPU keeps the measured pace. Evaluation: images/s of the test pipeline (1333x800
keep-ratio, batch 1, as tools/test.py runs it), the box head's score threshold set on the first
untimed image so that EVAL_NMS_PAIRS (box, class) pairs enter its NMS: random weights then give
the 100 detections and masks per image a trained model gives, through one NMS call.
"""
import argparse
import bisect
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402

from benchmarks.common import (EVAL_NMS_PAIRS, host_waits, launch_costs, round_up,  # noqa: E402
                               scores_into_nms, threshold_passing, write_json)
from mlla_kernels.cached_launch import specialisation_count, specialisations  # noqa: E402

ITERATIONS_1X = 88_500  # 12 epochs of COCO train2017 (118k images) at 16 images per iteration

# COCO's most common image sizes (width, height); every image is one of these.
COCO_SIZES = ((640, 480), (480, 640), (640, 427), (427, 640), (612, 612), (640, 426), (500, 375),
              (375, 500), (640, 360), (640, 512), (512, 640), (640, 424), (333, 500), (640, 640))

# Each variant: the backbone's kernels, the optimizer constructor ("paper": mmengine's default, one
# AdamW group per parameter, as the paper's recipe; "repo": the configs' merged groups and fused
# AdamW), cuDNN on or off (CudnnHook; None: as the config says, i.e. off), extra hooks, and a
# fixed input size instead of the multi-scale resize. The paper's model (reference kernels) keeps
# mmdet's head utilities (assigners, samplers, box coders, anchor generator, RPN and mask heads,
# the data preprocessor: common.HEAD_UTILS); this repository's variants use the configs'.
# `gemm`: the dense convolutions as batched GEMMs (GemmConvHook) or not; None: as the config says
# (on). The baselines given the per-size fix follow the config too.
# The blocks' CUDA graphs (BlockGraphsHook, on in the configs) are this repository's, not a per-size
# fix: the paper's model runs without them.
NO_GRAPHS = [dict(type="BlockGraphsHook", enabled=False)]
VARIANTS = {
    "paper": dict(attn_impl="reference", conv_impl="reference", optimizer="paper", cudnn=True, gemm=False,
                  hooks=NO_GRAPHS, describe="the paper's model and recipe as they ship (eager attention and "
                                            "convs, per-parameter AdamW, cuDNN)"),
    "paper-no-cudnn": dict(attn_impl="reference", conv_impl="reference", optimizer="paper", cudnn=False, gemm=None,
                           hooks=NO_GRAPHS, describe="the paper's model and recipe, cuDNN off"),
    "paper+repo-optim": dict(attn_impl="reference", conv_impl="reference", optimizer="repo", cudnn=False,
                             gemm=None, hooks=NO_GRAPHS,
                             describe="the paper's model with this repository's optimizer, cuDNN off"),
    "default": dict(attn_impl="auto", conv_impl="auto", optimizer="repo", cudnn=None, gemm=None,
                    describe="this repository's defaults (fused kernels, merged fused AdamW, cuDNN off, the "
                             "blocks as CUDA graphs on canvases)"),
}
VARIANTS.update({
    "default-no-graphs": dict(VARIANTS["default"], hooks=NO_GRAPHS,
                              describe="defaults with the blocks launched op by op (BlockGraphsHook off)"),
    "default-no-gemm": dict(VARIANTS["default"], gemm=False,
                            describe="defaults with the dense convolutions on PyTorch's own per-image path "
                                     "(GemmConvHook off)"),
    "default-cudnn": dict(VARIANTS["default"], cudnn=True, gemm=False,
                          describe="this repository's defaults with cuDNN on (before the per-size fix)"),
    # Kept out of the defaults: exact, but each new bucket pays cuDNN's setup (measured: slower
    # than cuDNN off over 40 iterations, README of benchmarks/).
    "default-buckets": dict(VARIANTS["default"], cudnn=True, gemm=False, hooks=[dict(type="ConvShapeBucketsHook")],
                            describe="defaults with cuDNN on and bucketed convolutions (ConvShapeBucketsHook)"),
    # Evaluation on canvases too: the same outputs as the plain model up to rounding (test_canvas.py),
    # one graph per canvas recorded in inference mode; over COCO's 5,000 validation images the
    # recordings are paid once (about a dozen canvases at 1333x800 keep-ratio).
    "default-eval-graphs": dict(VARIANTS["default"], hooks=[dict(type="BlockGraphsHook", evaluation=True)],
                                describe="defaults with the blocks as CUDA graphs on canvases in evaluation too"),
    "default-graphs-inductor": dict(
        VARIANTS["default"], hooks=[dict(type="BlockGraphsHook", backend="inductor")],
        describe="defaults with the blocks compiled by Inductor into CUDA graphs on canvases"),
    # Batches in pinned memory (the dataloader's pin_memory) copied to the GPU without blocking the
    # host (the data preprocessor's non_blocking).
    "default-pinned": dict(VARIANTS["default"], pinned=True,
                           describe="defaults with batches pinned and copied without blocking"),
})
# The per-size target's yardstick: the same model at one input size of about the pipeline's mean
# padded area (704 x 1024 = 0.72 MP; the 1x pipeline over COCO's sizes averages 0.71 MP padded).
FIXED_SIZE = (704, 1024)
VARIANTS["default@fixed"] = dict(VARIANTS["default"], fixed_size=FIXED_SIZE,
                                 describe=f"defaults, every image resized to {FIXED_SIZE[0]}x{FIXED_SIZE[1]}")
VARIANTS["default-cudnn@fixed"] = dict(VARIANTS["default-cudnn"], fixed_size=FIXED_SIZE,
                                       describe=f"defaults with cuDNN on, every image resized to "
                                                f"{FIXED_SIZE[0]}x{FIXED_SIZE[1]}")
DEFAULT_VARIANTS = ("paper", "paper-no-cudnn", "paper+repo-optim", "default", "default@fixed")

# "blocks" is inside "backbone": the stages' blocks, which BlockGraphsHook replays from CUDA graphs
# (then the compiled calls' own host time: guards, wrappers, the graphs' bookkeeping).
PARTS = ("preprocess", "backbone", "blocks", "neck", "rpn", "roi", "backward", "optimizer")
# The heads' predict methods: proposals, then the RoI head's boxes and masks (roi_boxes and roi_masks
# are inside roi).
EVAL_PARTS = ("preprocess", "backbone", "neck", "rpn", "roi", "roi_boxes", "roi_masks")
EVAL_WARMUP = 3  # evaluation images run before the timed ones


# ---------------------------------------------------------------------------------------- data

def polygon_instance(rng, width: int, height: int):
    """A random star-convex polygon inside the image: (flat polygon, bbox xywh, area)."""
    cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
    radius = rng.uniform(0.04, 0.3) * min(width, height)
    vertices = int(rng.integers(5, 12))
    angles = sorted(rng.uniform(0, 2 * math.pi, size=vertices))
    radii = radius * rng.uniform(0.5, 1.0, size=vertices)
    xs = [min(max(cx + r * math.cos(a), 0.0), width - 1.0) for r, a in zip(radii, angles)]
    ys = [min(max(cy + r * math.sin(a), 0.0), height - 1.0) for r, a in zip(radii, angles)]
    polygon = [round(v, 2) for xy in zip(xs, ys) for v in xy]
    x0, y0 = min(xs), min(ys)
    w, h = max(xs) - x0, max(ys) - y0
    area = 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(vertices)))
    return polygon, [x0, y0, w, h], area


def write_coco_like(out_dir: Path, num_images: int, seed: int, sizes=COCO_SIZES, scale: float = 1.0) -> Path:
    """Images of COCO's sizes (times scale) with 3-15 polygons of 80 classes each, as JPEG files
    and a COCO instances json; returns the json's path. Reuses a folder written with the same
    arguments."""
    import numpy as np
    from PIL import Image, ImageDraw

    out_dir.mkdir(parents=True, exist_ok=True)
    ann_file = out_dir / "instances.json"
    stamp = dict(num_images=num_images, seed=seed, scale=scale, sizes=[list(s) for s in sizes], version=2)
    if ann_file.is_file() and json.loads(ann_file.read_text()).get("info", {}).get("stamp") == stamp:
        return ann_file
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for index in range(num_images):
        width, height = (max(32, int(side * scale)) for side in sizes[int(rng.integers(len(sizes)))])
        pixels = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((width, height), Image.BILINEAR)
        draw = ImageDraw.Draw(image)
        name = f"{index:06d}.jpg"
        for _ in range(int(rng.integers(3, 16))):
            polygon, bbox, area = polygon_instance(rng, width, height)
            if bbox[2] < 2 or bbox[3] < 2:
                continue
            draw.polygon(polygon, fill=tuple(int(c) for c in rng.integers(0, 256, size=3)))
            annotations.append(dict(id=len(annotations) + 1, image_id=index + 1,
                                    category_id=int(rng.integers(80)) + 1, segmentation=[polygon],
                                    bbox=[round(v, 2) for v in bbox], area=round(area, 2), iscrowd=0))
        image.save(out_dir / name, quality=90)
        images.append(dict(id=index + 1, file_name=name, width=width, height=height))
    import mlla_det  # noqa: F401  the mmcv stand-in, which mmdet.datasets needs
    from mmdet.datasets import CocoDataset  # mmdet maps categories to its classes by COCO's names
    categories = [dict(id=i + 1, name=name, supercategory="thing")
                  for i, name in enumerate(CocoDataset.METAINFO["classes"])]
    ann_file.write_text(json.dumps(dict(info=dict(stamp=stamp), images=images, annotations=annotations,
                                        categories=categories)))
    return ann_file


# ------------------------------------------------------------------------------- measurement

class PartClock:
    """Host time and GPU time of each part of a training iteration.

    Wraps the parts' methods on the model and the optimizer wrapper; each call records the host
    clock and (on CUDA) an event at entry and exit. GPU time of a part is the time between its two
    events: its kernels plus any gap in which the GPU waited for the host inside that part."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.records = []  # per iteration: {part: [(host_s, start_event, end_event), ...]}
        self.scoped = False  # name each part's calls in the profiler (HostProfile's window only)

    def new_iteration(self):
        self.records.append({})

    def wrap(self, owner, method: str, part: str):
        original = getattr(owner, method)
        clock = self

        def timed(*args, **kwargs):
            if not clock.records:
                return original(*args, **kwargs)
            start_event = end_event = None
            if clock.cuda:
                start_event = torch.cuda.Event(enable_timing=True)
                end_event = torch.cuda.Event(enable_timing=True)
                start_event.record()
            start = time.perf_counter()
            try:
                if clock.scoped:
                    with torch.profiler.record_function(f"part::{part}"):
                        return original(*args, **kwargs)
                return original(*args, **kwargs)
            finally:
                host = time.perf_counter() - start
                if clock.cuda:
                    end_event.record()
                clock.records[-1].setdefault(part, []).append((host, start_event, end_event))

        setattr(owner, method, timed)

    def medians(self, skip: int, leave_out=(), parts=PARTS) -> dict:
        """Median per iteration of each of `parts`' host and GPU milliseconds, over iterations after
        skip except those in leave_out."""
        if self.cuda:
            torch.cuda.synchronize()
        result = {}
        for part in parts:
            host, gpu = [], []
            for index, record in enumerate(self.records):
                if index < skip or index in leave_out:
                    continue
                calls = record.get(part, [])
                host.append(1e3 * sum(c[0] for c in calls))
                if self.cuda:
                    gpu.append(sum(c[1].elapsed_time(c[2]) for c in calls))
            result[part] = dict(host_ms=statistics.median(host) if host else None,
                                gpu_ms=statistics.median(gpu) if gpu else None)
        return result


class ThroughputHook(Hook):
    """Iteration times, data wait, padded input sizes, a profiler window for the GPU's busy
    fraction, and the part clock's iteration boundaries. Registered on the Runner."""

    priority = "VERY_LOW"

    def __init__(self, clock: PartClock, profile_window: tuple, pad_divisor: int = 32,
                 host_profile: "HostProfile" = None, host_waits: "HostWaitProbe" = None):
        self.clock, self.profile_window, self.pad_divisor = clock, profile_window, pad_divisor
        self.host_profile, self.host_waits = host_profile, host_waits
        self.iteration_s, self.data_wait_s, self.sizes = [], [], []
        self.last_end = None
        self.profiler, self.profile_start, self.busy_fraction = None, None, None
        self.compiles = []
        self.kernel_specialisations = []
        self.cudnn = None
        self.gemm_convolutions = None

    def before_train(self, runner):
        from mlla_det.models.gemm_conv import gemm_convolution_count
        self.cudnn = torch.backends.cudnn.enabled  # as CudnnHook (a higher priority) left it
        self.gemm_convolutions = gemm_convolution_count(runner.model)
        # The runner builds its optimizer wrapper inside train(), so its parts are wrapped here;
        # so are the blocks, which BlockGraphsHook (run before) may have compiled.
        for stage in getattr(getattr(runner.model, "backbone", None), "layers", []):
            on_canvas = getattr(stage, "canvas_multiple", None) is not None
            self.clock.wrap(stage, "run_blocks_on_canvas" if on_canvas else "run_blocks", "blocks")
        self.clock.wrap(runner.optim_wrapper, "backward", "backward")
        self.clock.wrap(runner.optim_wrapper, "step", "optimizer")
        self.clock.wrap(runner.optim_wrapper, "zero_grad", "optimizer")

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        now = time.perf_counter()
        if self.last_end is not None:
            self.data_wait_s.append(now - self.last_end)
        heights = [img.shape[-2] for img in data_batch["inputs"]]
        widths = [img.shape[-1] for img in data_batch["inputs"]]
        d = self.pad_divisor
        self.sizes.append((round_up(max(heights), d), round_up(max(widths), d)))
        if batch_idx == self.profile_window[0]:
            self._start_profiler()
        if self.host_profile is not None:
            self.host_profile.before_iter(batch_idx)
        if self.host_waits is not None:
            self.host_waits.before_iter(batch_idx)
        self.clock.new_iteration()

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        now = time.perf_counter()
        if self.last_end is not None:
            self.iteration_s.append(now - self.last_end)
        self.last_end = now
        self.compiles.append(compile_count())
        self.kernel_specialisations.append(specialisation_count())
        if self.host_waits is not None:
            self.host_waits.after_iter(batch_idx)
        if self.host_profile is not None:
            self.host_profile.after_iter(batch_idx)
        if batch_idx + 1 == self.profile_window[1] and self.profiler is not None:
            self._stop_profiler()

    def _start_profiler(self):
        if not torch.cuda.is_available():
            return
        torch.cuda.synchronize()
        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
        self.profiler.__enter__()
        self.profile_start = time.perf_counter()

    def _stop_profiler(self):
        torch.cuda.synchronize()
        wall = time.perf_counter() - self.profile_start
        self.profiler.__exit__(None, None, None)
        intervals = sorted((e.time_range.start, e.time_range.end) for e in self.profiler.events()
                           if e.device_type == torch.autograd.DeviceType.CUDA)
        busy_us, end = 0.0, -math.inf
        for start, stop in intervals:  # union of kernel intervals (streams may overlap)
            if stop > end:
                busy_us += stop - max(start, end)
                end = stop
        self.busy_fraction = busy_us / 1e6 / wall
        self.profiler = None


def compile_count() -> int:
    """Graphs torch.compile has produced in this process so far (0 when nothing is compiled)."""
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return 0


def _outside_torch(name: str) -> bool:
    return ".py(" in name and not name.startswith("torch/") and "/torch/" not in name \
        and "train_throughput.py" not in name


def _call_sites(events, traced, frames: int = 2) -> dict:
    """For each event in `traced`, the innermost `frames` Python frames outside torch and this
    script (the profiler's python_function events, with_stack=True) whose time span holds it. By
    time rather than by cpu_parent, which on some torch builds does not link aten ops to the Python
    tracer's events; an op run by the autograd engine's thread gets the frames of the Python call
    that ran the backward. Where that finds nothing, the op's own recorded stack."""
    python = sorted((e.time_range.start, e.time_range.end, e.name.split("site-packages/")[-1])
                    for e in events if _outside_torch(e.name))
    queries = sorted(((e.time_range.start, e.time_range.end, i) for i, e in enumerate(traced)))
    sites, open_frames, next_frame = {}, [], 0
    for start, end, i in queries:
        while next_frame < len(python) and python[next_frame][0] <= start:
            frame = python[next_frame]
            while open_frames and open_frames[-1][1] < frame[0]:
                open_frames.pop()
            open_frames.append(frame)
            next_frame += 1
        while open_frames and open_frames[-1][1] < start:
            open_frames.pop()
        holding = [f[2] for f in reversed(open_frames) if f[1] >= end]
        sites[i] = holding[:frames]
    # Builds whose events() leave the Python tracer's events out (torch 2.11 with CUDA on the GPU
    # machine: every site came back empty) fill each op's own stack, innermost frame first, when
    # the profiler is verbose (host_profiler).
    for i, e in enumerate(traced):
        if not sites[i] and getattr(e, "stack", None):
            sites[i] = [frame.split("site-packages/")[-1] for frame in e.stack if _outside_torch(frame)][:frames]
    return sites


def host_profiler(activities) -> "torch.profiler.profile":
    """torch.profiler with Python stacks. `verbose` makes each op keep its own stack (`e.stack`),
    which _call_sites falls back on where the Python tracer's events are missing; without it the
    stacks stay empty (torch 2.11 and 2.14)."""
    options = {}
    try:
        options["experimental_config"] = torch._C._profiler._ExperimentalConfig(verbose=True)
    except (AttributeError, TypeError):  # torch builds without the option keep the time-range sites
        pass
    return torch.profiler.profile(activities=activities, with_stack=True, **options)


def _synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# Ops whose call sites the host profile always reports: the linear layers (the block's GEMMs, with
# autocast's weight casts) and the ops the first profile found costly without saying where from.
ALWAYS_TRACED = ("aten::linear", "aten::randperm", "aten::max", "aten::select", "aten::copy_")

LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC",
                 "cudaGraphLaunch")


class HostWaitProbe:
    """The host's waits for the GPU over one training iteration (common.host_waits), counted by the
    Python line that made them. The backward's autograd threads are not seen (their warnings do not
    reach Python's)."""

    def __init__(self, iteration: int):
        self.iteration = iteration
        self.count, self.sites = None, None
        self._recording = self._waits = None

    def before_iter(self, batch_idx: int):
        if batch_idx == self.iteration and torch.cuda.is_available():
            self._recording = host_waits()
            self._waits = self._recording.__enter__()

    def after_iter(self, batch_idx: int):
        if self._recording is None:
            return
        self._recording.__exit__(None, None, None)
        sites = {}
        for w in self._waits:
            site = f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}"
            sites[site] = sites.get(site, 0) + 1
        self.count, self.sites = len(self._waits), dict(sorted(sites.items(), key=lambda kv: -kv[1]))
        self._recording = self._waits = None


class HostProfile:
    """Where the host's time goes, over a window of iterations before the GPU-busy window (whose
    CUDA-only profiler stays free of this one's overhead): torch.profiler with CPU and CUDA
    activity over `iterations` iterations, then one more iteration under cProfile.

    Summary (per iteration): aten ops by self CPU time, kernel launches and top-level aten calls per
    part (the parts' record_function scopes; the backward's launches come from autograd's device
    thread, so they are counted by time range over all threads), and Python functions by
    cumulative and own time (cProfile's overhead inflates Python-heavy code: read it as a ranking).
    """

    def __init__(self, clock: PartClock, first: int, iterations: int, top: int = 40):
        self.clock, self.first, self.iterations, self.top = clock, first, iterations, top
        self.profiler = self.cprofile = None
        self.summary = None

    def iterations_profiled(self) -> range:
        return range(self.first, self.first + self.iterations + 1)

    def before_iter(self, batch_idx: int):
        if batch_idx == self.first:
            _synchronize()
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = host_profiler(activities)
            self.profiler.__enter__()
            self.clock.scoped = True
        elif batch_idx == self.first + self.iterations and self.summary is not None:
            import cProfile
            self.cprofile = cProfile.Profile()
            self.cprofile.enable()

    def after_iter(self, batch_idx: int):
        if batch_idx + 1 == self.first + self.iterations and self.profiler is not None:
            _synchronize()
            self.profiler.__exit__(None, None, None)
            self.clock.scoped = False
            self.summary = self._summarise_torch(self.profiler)
            self.profiler = None
        elif self.cprofile is not None:
            _synchronize()
            self.cprofile.disable()
            self.summary["python"] = self._summarise_cprofile(self.cprofile)
            self.cprofile = None

    def _summarise_torch(self, profiler) -> dict:
        n = self.iterations
        events = profiler.events()
        cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
        ops = {}
        for e in cpu:
            if e.name.startswith("aten::"):
                entry = ops.setdefault(e.name, [0, 0.0])
                entry[0] += 1
                entry[1] += e.self_cpu_time_total
        top_ops = sorted(ops.items(), key=lambda kv: -kv[1][1])[:self.top]
        launches = sorted(e.time_range.start for e in cpu if e.name in LAUNCH_EVENTS)
        top_level = sorted(e.time_range.start for e in cpu if e.name.startswith("aten::") and (
            e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
        parts = {}
        for e in cpu:
            if e.name.startswith("part::"):
                part = parts.setdefault(e.name[len("part::"):], dict(host_ms=0.0, launches=0, aten_calls=0))
                start, end = e.time_range.start, e.time_range.end
                part["host_ms"] += (end - start) / 1e3 / n
                part["launches"] += (bisect.bisect_left(launches, end) - bisect.bisect_left(launches, start)) / n
                part["aten_calls"] += (bisect.bisect_left(top_level, end) - bisect.bisect_left(top_level, start)) / n
        # Where the costliest and the most frequent ops are called from (outside torch).
        traced = {name for name, _ in top_ops[:12]} | {name for name, (calls, _) in ops.items() if calls >= 300 * n} \
            | set(ALWAYS_TRACED)
        traced_events = [e for e in cpu if e.name in traced]
        frames_of = _call_sites(cpu, traced_events)
        sites = {}
        for i, e in enumerate(traced_events):
            site = " < ".join(frames_of[i]) or "(no Python frame)"
            entry = sites.setdefault(e.name, {}).setdefault(site, [0, 0.0])
            entry[0] += 1
            entry[1] += e.self_cpu_time_total
        call_sites = {name: [dict(site=site, calls=c / n, self_cpu_ms=us / 1e3 / n)
                             for site, (c, us) in sorted(by_site.items(), key=lambda kv: -kv[1][1])[:4]]
                      for name, by_site in sites.items()}
        return dict(
            iterations=n,
            launches_per_iteration=len(launches) / n,
            aten_calls_per_iteration=len(top_level) / n,
            parts=parts,
            aten_by_self_cpu=[dict(op=name, calls=calls / n, self_cpu_ms=us / 1e3 / n)
                              for name, (calls, us) in top_ops],
            call_sites=call_sites)

    def _summarise_cprofile(self, profile) -> dict:
        import pstats
        stats = pstats.Stats(profile).stats
        rows = [dict(function=f"{Path(file).name}:{line}({name})", calls=calls, own_ms=1e3 * own,
                     cumulative_ms=1e3 * cumulative)
                for (file, line, name), (_, calls, own, cumulative, _) in stats.items()]
        return dict(by_cumulative=sorted(rows, key=lambda r: -r["cumulative_ms"])[:self.top],
                    by_own=sorted(rows, key=lambda r: -r["own_ms"])[:self.top])


def build_config(args, variant: dict, data_dir: Path, ann_file: Path, work_dir: Path):
    from mmengine.config import Config

    from benchmarks.common import config_path, set_head_utils
    cfg = Config.fromfile(str(config_path(args.arch)))
    cfg.work_dir = str(work_dir)
    cfg.model.backbone.init_cfg = None
    cfg.model.backbone.attn_impl = variant["attn_impl"]
    cfg.model.backbone.conv_impl = variant["conv_impl"]
    set_head_utils(cfg.model, "paper" if variant["attn_impl"] == "reference" else "repo")
    if variant["optimizer"] == "paper":
        cfg.optim_wrapper.pop("constructor", None)
        cfg.optim_wrapper.optimizer.pop("fused", None)
    if args.amp != "off":
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.dtype = {"bf16": "bfloat16", "fp16": "float16"}[args.amp]
        # bf16 has fp32's range: a loss scaler only adds its unscale, inf checks and a host sync.
        cfg.optim_wrapper.loss_scale = "dynamic" if args.loss_scale == "dynamic" else dict(enabled=False)
    # A variant's hooks replace the config's of the same type.
    replaced = {h["type"] for h in variant.get("hooks", [])}
    replaced |= {"CudnnHook"} if variant["cudnn"] is not None else set()
    replaced |= {"GemmConvHook"} if variant["gemm"] is not None else set()
    hooks = [h for h in cfg.get("custom_hooks", []) if h["type"] not in replaced]
    if variant["cudnn"] is not None:
        hooks.append(dict(type="CudnnHook", enabled=variant["cudnn"]))
    if variant["gemm"] is not None:
        hooks.append(dict(type="GemmConvHook", enabled=variant["gemm"]))
    cfg.custom_hooks = hooks + list(variant.get("hooks", []))
    for loader in ("train_dataloader", "test_dataloader"):
        dataset = cfg[loader].dataset
        dataset.data_root = str(data_dir)
        dataset.ann_file = str(ann_file)
        dataset.data_prefix = dict(img="")
        if args.workers is not None:
            cfg[loader].num_workers = args.workers
            cfg[loader].persistent_workers = args.workers > 0
    if variant.get("pinned"):
        cfg.train_dataloader.pin_memory = True
        cfg.model.data_preprocessor.non_blocking = True
    if variant.get("fixed_size"):
        height, width = variant["fixed_size"]
        cfg.train_dataloader.dataset.pipeline = [
            dict(type="Resize", scale=(width, height), keep_ratio=False) if step["type"] == "RandomChoice" else step
            for step in cfg.train_dataloader.dataset.pipeline]
    cfg.train_dataloader.sampler = dict(type="InfiniteSampler", shuffle=True, seed=args.seed)
    cfg.test_evaluator.ann_file = str(ann_file)
    cfg.test_evaluator.metric = ["bbox"]
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=args.iters, val_interval=10 ** 9)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.param_scheduler = [dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=500)]
    # No checkpoint at the end either: writing it would land in the last iteration's time and in
    # the profiler window (the runs before 2026-12-07 (third session) had it there: 1.7-2.6 s).
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=10 ** 9, by_epoch=False, save_last=False)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=10 ** 9)
    cfg.default_hooks.visualization = dict(type="DetVisualizationHook", draw=False)
    cfg.log_processor = dict(type="LogProcessor", window_size=10, by_epoch=False)
    cfg.randomness = dict(seed=args.seed)
    cfg.log_level = "WARNING"
    if args.sanity:
        from benchmarks.detector import shrink_heads_workload
        shrink_heads_workload(cfg)
        cfg.model.backbone.update(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2])
        cfg.model.neck.in_channels = [16, 32, 64, 128]
        small = [(int(s * 0.25), 1333) for s in range(480, 801, 32)]
        _scale_resizes(cfg.train_dataloader.dataset.pipeline, small)
        _scale_resizes(cfg.test_dataloader.dataset.pipeline, [(200, 333)])
    return cfg


def _scale_resizes(pipeline, scales) -> None:
    """--sanity: every resize of the pipeline to small sides, keeping the pipeline's structure."""
    for step in pipeline:
        if step.get("type") == "RandomChoice":
            for branch in step["transforms"]:
                _scale_resizes(branch, scales)
        elif step.get("type") == "RandomChoiceResize":
            step["scales"] = scales
        elif step.get("type") == "Resize":
            step["scale"] = scales[0][::-1] if len(scales) == 1 else scales[-1]
        elif step.get("type") == "RandomCrop":
            step["crop_size"] = (max(8, step["crop_size"][0] // 4), max(8, step["crop_size"][1] // 4))


def run_variant(args, name: str, data_dir: Path, ann_file: Path) -> dict:
    from mmengine.runner import Runner

    import mlla_det  # noqa: F401  registers MLLA and the mmcv stand-in
    from benchmarks.common import environment, quiet_mmengine

    variant = VARIANTS[name]
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as work_dir:
        cfg = build_config(args, variant, data_dir, ann_file, Path(work_dir))
        images_per_gpu = cfg.train_dataloader.batch_size
        row = dict(variant=name, describe=variant["describe"], arch=args.arch.upper(), amp=args.amp,
                   loss_scale=args.loss_scale if args.amp != "off" else None,
                   images_per_gpu=images_per_gpu, iterations=args.iters, warmup=args.warmup,
                   dataloader_workers=cfg.train_dataloader.num_workers)
        with quiet_mmengine():
            runner = Runner.from_cfg(cfg)
        clock = PartClock(cuda)
        window = (max(args.warmup, args.iters - args.profile_iters), args.iters)
        host_profile = None
        if args.host_profile:
            # Its window and the cProfile iteration end where the GPU-busy window starts.
            first = window[0] - args.host_profile - 1
            if first < args.warmup:
                raise ValueError(f"--host-profile {args.host_profile} needs --iters >= --warmup + "
                                 f"--profile-iters + {args.host_profile + 1}")
            host_profile = HostProfile(clock, first, args.host_profile)
        # The wait count's iteration comes just before the profiles' (left out of the medians too).
        probe_iteration = (host_profile.first if host_profile is not None else window[0]) - 1
        host_waits = HostWaitProbe(probe_iteration) if probe_iteration >= args.warmup else None
        hook = ThroughputHook(clock, window, host_profile=host_profile, host_waits=host_waits)
        runner.register_hook(hook)
        model = runner.model
        clock.wrap(model.data_preprocessor, "forward", "preprocess")
        clock.wrap(model.backbone, "forward", "backbone")
        clock.wrap(model.neck, "forward", "neck")
        clock.wrap(model.rpn_head, "loss_and_predict", "rpn")
        clock.wrap(model.roi_head, "loss", "roi")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with quiet_mmengine():
            runner.train()
        row["train_wall_s"] = time.perf_counter() - start
        # iteration_s[k] is iteration k + 1's; the host profile's iterations are left out.
        profiled = set(host_profile.iterations_profiled()) if host_profile is not None else set()
        if host_waits is not None:
            profiled.add(host_waits.iteration)
        steady = [t for k, t in enumerate(hook.iteration_s) if k >= args.warmup and k + 1 not in profiled]
        steady = steady or hook.iteration_s
        median = statistics.median(steady)
        row.update(
            s_per_iter_median=median, s_per_iter_mean=statistics.mean(steady),
            images_per_s=images_per_gpu / median,
            data_wait_ms=1e3 * statistics.median(hook.data_wait_s[args.warmup:] or hook.data_wait_s or [0.0]),
            distinct_input_sizes=len(set(hook.sizes)),
            distinct_input_sizes_after_warmup=len(set(hook.sizes[args.warmup:])),
            distinct_canvases=_distinct_canvases(runner, hook.sizes),
            compiles=hook.compiles[-1] if hook.compiles else 0,
            compiles_after_warmup=(hook.compiles[-1] - hook.compiles[min(args.warmup, len(hook.compiles)) - 1])
            if hook.compiles else 0,
            kernel_specialisations=hook.kernel_specialisations,
            cudnn=hook.cudnn,
            gemm_convolutions=hook.gemm_convolutions,
            assigner=cfg.model.train_cfg.rpn.assigner.type,
            anchor_generator=cfg.model.rpn_head.anchor_generator.type,
            sampler=cfg.model.train_cfg.rpn.sampler.type,
            bbox_coder=cfg.model.rpn_head.bbox_coder.type,
            rpn_head=cfg.model.rpn_head.type,
            mask_head=cfg.model.roi_head.mask_head.type,
            roi_extractor=cfg.model.roi_head.bbox_roi_extractor.type,
            data_preprocessor=cfg.model.data_preprocessor.type,
            optimizer_groups=len(runner.optim_wrapper.optimizer.param_groups),
            peak_memory_gb=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
            gpu_busy_fraction=hook.busy_fraction,
            parts=clock.medians(args.warmup, leave_out=profiled),
            iteration_s=hook.iteration_s,
            padded_sizes=hook.sizes,
            slow_iterations=slow_iterations(hook, args.warmup, median),
            projection_1x_hours=ITERATIONS_1X * median / 3600,
            host_profile=host_profile.summary if host_profile is not None else None,
            host_waits_per_iteration=host_waits.count if host_waits is not None else None,
            host_wait_sites=host_waits.sites if host_waits is not None else None,
        )
        row.update(evaluate(args, runner, clock) if args.eval_images else {})
    row["environment"] = environment()
    # What single calls cost this host, to read the parts' host times by (common.launch_costs).
    row["launch_costs_us"] = launch_costs("cuda", calls=500) if torch.cuda.is_available() else None
    return row


def slow_iterations(hook, warmup: int, median: float) -> list:
    """The iterations after warm-up that took over twice the median: their data wait, whether each
    brought a padded size not seen before and how many new kernel specialisations (Triton
    compiles) it made."""
    slow = []
    for index in range(max(warmup, 1), len(hook.sizes)):
        seconds = hook.iteration_s[index - 1]  # iteration_s starts at the second iteration
        if seconds > 2 * median:
            first, end = hook.kernel_specialisations[index - 1], hook.kernel_specialisations[index]
            slow.append(dict(iteration=index, s=seconds, data_wait_s=hook.data_wait_s[index - 1],
                             new_size=hook.sizes[index] not in hook.sizes[:index],
                             new_specialisations=end - first, specialised=specialisations(first)[:end - first]))
    return slow


def _distinct_canvases(runner, sizes) -> Optional[int]:
    """How many canvases the padded input sizes fell into, at the canvas multiple of the run's
    BlockGraphsHook; None where no hook set the blocks up as CUDA graphs (off, or without CUDA)."""
    from mlla_det.engine import BlockGraphsHook
    for h in runner.hooks:
        if isinstance(h, BlockGraphsHook) and h.active:
            return len({tuple(round_up(side, h.canvas_multiple) for side in size) for size in sizes})
    return None


def evaluate(args, runner, clock: PartClock) -> dict:
    """Images/s of the test pipeline over --eval-images images (after EVAL_WARMUP untimed ones), with the
    run-scoped hooks (cuDNN switch, GEMM convolutions) in force as tools/test.py's runner.test()
    has them: runner.train() has undone them by now. (Before 2026-12-07, fourth session, this
    evaluation ran with cuDNN on in every variant, CudnnHook having restored it.) Also each
    image's median host and GPU milliseconds per part (EVAL_PARTS), from the training's part
    clock, started afresh, with the heads' predict methods wrapped too."""
    from mlla_det.engine import BlockGraphsHook, CudnnHook, GemmConvHook
    from mlla_det.models.gemm_conv import gemm_convolution_count
    loader = runner.build_dataloader(runner.cfg.test_dataloader)
    model = runner.model
    model.eval()
    times = []
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run_hooks = [hook for hook in runner.hooks if isinstance(hook, (CudnnHook, GemmConvHook))]
    graph_hooks = [hook for hook in runner.hooks if isinstance(hook, BlockGraphsHook)]
    for hook in run_hooks:
        hook.before_run(runner)
    for hook in graph_hooks:  # the test loop's: evaluation on canvases only if the hook says so
        hook.before_test(runner)
    backbone = getattr(model, "backbone", None)
    in_force = dict(eval_cudnn=torch.backends.cudnn.enabled,
                    eval_gemm_convolutions=gemm_convolution_count(model),
                    eval_canvas_multiples=[stage.canvas_multiple for stage in getattr(backbone, "layers", [])])
    clock.records = []
    clock.wrap(model.rpn_head, "predict", "rpn")
    clock.wrap(model.roi_head, "predict", "roi")
    clock.wrap(model.roi_head, "predict_bbox", "roi_boxes")
    clock.wrap(model.roi_head, "predict_mask", "roi_masks")
    detections = []
    score_thr = model.roi_head.test_cfg.score_thr

    def test_step(batch, record_scores: bool):
        with torch.no_grad(), torch.autocast(device, amp or torch.float32, enabled=amp is not None), \
                scores_into_nms(enabled=record_scores) as scores:
            return model.test_step(batch), scores

    try:
        last = time.perf_counter()
        for index, batch in enumerate(loader):
            if index >= args.eval_images + EVAL_WARMUP:
                break
            clock.new_iteration()
            for hook in graph_hooks:  # what the test loop would call: a new step for CUDA graphs
                hook.before_test_iter(runner, index, batch)
            results, scores = test_step(batch, record_scores=index == 0)
            if index == 0:
                score_thr = threshold_passing(scores, EVAL_NMS_PAIRS)
                model.roi_head.test_cfg.score_thr = score_thr
            if device == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            if index >= EVAL_WARMUP:
                times.append(now - last)
            detections.extend(len(result.pred_instances) for result in results)
            last = now
        # How many (box, class) pairs passed the threshold into the box head's NMS, per image of the
        # last batch, run again outside the timing.
        nms_inputs = None
        if times:
            for hook in graph_hooks:
                hook.before_test_iter(runner, index, batch)
            _, scores = test_step(batch, record_scores=True)
            nms_inputs = [int((s[:, :-1] > score_thr).sum()) for s in scores]
    finally:
        for hook in graph_hooks:
            hook.after_test(runner)
        for hook in reversed(run_hooks):
            hook.after_run(runner)
    median = statistics.median(times) if times else float("nan")
    parts = clock.medians(EVAL_WARMUP, parts=EVAL_PARTS)
    return dict(eval_s_per_image_median=median, eval_images_per_s=1.0 / median, eval_images=len(times),
                eval_parts=parts,
                eval_detections_median=statistics.median(detections) if detections else None,
                eval_score_thr=score_thr, eval_boxes_into_nms=nms_inputs, **in_force)


# ------------------------------------------------------------------------------------ driver

def paper_baseline(rows):
    """The row the ratios are taken against: the paper's model with the same per-size fix
    (cuDNN off) where the run has it, else the paper's model as it ships."""
    by_name = {r["variant"]: r for r in rows if "error" not in r}
    return by_name.get("paper-no-cudnn") or by_name.get("paper")


def print_rows(rows) -> None:
    from benchmarks.common import print_table
    table = []
    paper = paper_baseline(rows)
    for r in rows:
        if "error" in r:
            table.append(dict(variant=r["variant"], error=r["error"]))
            continue
        table.append(dict(
            variant=r["variant"], s_iter_median=r["s_per_iter_median"], s_iter_mean=r["s_per_iter_mean"],
            images_per_s=r["images_per_s"],
            vs_paper=(r["images_per_s"] / paper["images_per_s"]) if paper else None,
            data_wait_ms=r["data_wait_ms"], sizes=r["distinct_input_sizes"], compiles=r["compiles"],
            peak_gb=r["peak_memory_gb"], gpu_busy=r["gpu_busy_fraction"],
            proj_1x_h=r["projection_1x_hours"], eval_img_s=r.get("eval_images_per_s")))
    columns = ["variant", "s_iter_median", "s_iter_mean", "images_per_s", "vs_paper", "data_wait_ms", "sizes",
               "compiles", "peak_gb", "gpu_busy", "proj_1x_h", "eval_img_s", "error"]
    print_table(table, [c for c in columns if any(c in t for t in table)],
                title="training on the 1x pipeline (2 images per GPU); 1x projection: 8 GPUs, 88.5k iterations")
    print_table(_parts_cells(rows, "parts"), ["variant", *PARTS], title="median ms per iteration, host (GPU)")
    eval_parts = _parts_cells(rows, "eval_parts")
    if eval_parts:
        print_table(eval_parts, ["variant", *EVAL_PARTS], title="median ms per evaluation image, host (GPU)")
        for r in rows:
            if r.get("eval_parts"):
                print(f"{r['variant']}: detections per image (median) {r.get('eval_detections_median')}, "
                      f"(box, class) pairs into the box head's NMS {r.get('eval_boxes_into_nms')}")
    for r in rows:
        if r.get("host_waits_per_iteration") is not None:
            sites = ", ".join(f"{site} x{n}" for site, n in list(r["host_wait_sites"].items())[:8])
            print(f"{r['variant']}: {r['host_waits_per_iteration']} host waits for the GPU in one iteration "
                  f"(forward and optimizer): {sites}")
    for r in rows:
        if r.get("host_profile"):
            print_host_profile(r["variant"], r["host_profile"])


def _parts_cells(rows, key: str) -> list:
    """One table row per result row holding `key` (PartClock.medians): "host (GPU)" ms per part,
    parts without a host time left blank."""
    table = []
    for r in rows:
        if r.get(key):
            cells = {"variant": r["variant"]}
            for part, t in r[key].items():
                if t["host_ms"] is not None:
                    gpu = "-" if t["gpu_ms"] is None else f"{t['gpu_ms']:.1f}"
                    cells[part] = f"{t['host_ms']:.1f} ({gpu})"
            table.append(cells)
    return table


def print_host_profile(variant: str, summary: dict, top: int = 25) -> None:
    from benchmarks.common import print_table
    print(f"\nhost profile of {variant} ({summary['iterations']} iterations): "
          f"{summary['launches_per_iteration']:.0f} kernel launches and "
          f"{summary['aten_calls_per_iteration']:.0f} aten calls per iteration")
    print_table([dict(part=name, **cells) for name, cells in summary["parts"].items()],
                ["part", "host_ms", "launches", "aten_calls"], title="per part, per iteration (profiled)")
    print_table(summary["aten_by_self_cpu"][:top], ["op", "calls", "self_cpu_ms"],
                title="aten ops by self CPU time per iteration")
    sites = [dict(op=op, **site) for op, by_site in summary.get("call_sites", {}).items() for site in by_site]
    print_table(sites, ["op", "site", "calls", "self_cpu_ms"], title="where they are called from")
    python = summary.get("python")
    if python:
        print_table(python["by_cumulative"][:top], ["function", "calls", "cumulative_ms", "own_ms"],
                    title="Python functions by cumulative time, one iteration under cProfile")
        print_table(python["by_own"][:top], ["function", "calls", "own_ms", "cumulative_ms"],
                    title="Python functions by own time")


def markdown_table(rows, link: str) -> str:
    """The README's table: one line per variant, ratios against the paper's rows of the same run."""
    by_name = {r["variant"]: r for r in rows if "error" not in r}
    lines = ["| variant | s / iteration (median) | images / s | vs the paper's model | GPU busy | "
             "distinct sizes | eval images / s | 1x on 8 GPUs |",
             "|---|---|---|---|---|---|---|---|"]
    paper = paper_baseline(rows)
    for r in by_name.values():
        ratio = f"{r['images_per_s'] / paper['images_per_s']:.2f}x" if paper else "-"
        busy = "-" if r.get("gpu_busy_fraction") is None else f"{100 * r['gpu_busy_fraction']:.0f}%"
        evaluation = "-" if r.get("eval_images_per_s") is None else f"{r['eval_images_per_s']:.1f}"
        lines.append(f"| {r['describe']} | {r['s_per_iter_median']:.3f} | {r['images_per_s']:.2f} | {ratio} | {busy} | "
                     f"{r['distinct_input_sizes']} | {evaluation} | {r['projection_1x_hours']:.1f} h |")
    return "\n".join(lines) + f"\n\n([JSON]({link}))"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="t", choices=("t", "s", "b"))
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--iters", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=20, help="iterations left out of the statistics")
    parser.add_argument("--profile-iters", type=int, default=5, help="iterations in the profiler window")
    parser.add_argument("--prewarm", action="store_true",
                        help="first run the first variant with the fused kernels once more, unreported (its row "
                             "beside --json as .prewarm.json; with --host-profile, the profile is taken there): it "
                             "compiles the Triton kernels' specialisations for this run's input sizes into "
                             "Triton's disk cache, as a real run's first hundreds of iterations do, so that no "
                             "timed variant pays compiles that the others do not")
    parser.add_argument("--host-profile", type=int, default=0, metavar="N",
                        help="profile the host (torch.profiler, CPU and CUDA) over N iterations before the "
                             "GPU-busy window, then one iteration under cProfile")
    parser.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"))
    parser.add_argument("--loss-scale", choices=("dynamic", "off"),
                        help="AmpOptimWrapper's loss scaling (default: as tools/train.py --amp has it, dynamic "
                             "for fp16, off for bf16; the runs before the sixth session of 2026-12-07 used "
                             "dynamic for bf16 too)")
    parser.add_argument("--images", type=int, default=400, help="images in the generated set")
    parser.add_argument("--eval-images", type=int, default=50)
    parser.add_argument("--workers", type=int, help="dataloader workers (default: the config's, as "
                                                     "tools/train.py runs it; the runs before 2026-12-07 used 4)")
    parser.add_argument("--data", help="folder for the generated set (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--sanity", action="store_true",
                        help="CPU, 2 iterations of each variant on small images, a small model")
    parser.add_argument("--from-json", metavar="PATH", help="print the tables of an earlier run and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loss_scale is None:
        args.loss_scale = "off" if args.amp == "bf16" else "dynamic"
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
        print_rows(rows)
        print(markdown_table(rows, args.from_json))
        return
    if args.sanity:
        args.iters, args.warmup, args.images, args.eval_images, args.workers = 2, 0, 6, 2, 0
        args.profile_iters = 1
        if args.host_profile:  # its window and the cProfile iteration come before the busy window's
            args.iters += args.host_profile + 1
        args.amp = "off"  # mmengine's AmpOptimWrapper refuses the CPU

    data_parent = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="coco_like_"))
    scale = 0.25 if args.sanity else 1.0
    ann_file = write_coco_like(data_parent, args.images, args.seed, scale=scale)
    if args.child:
        try:
            row = run_variant(args, args.child, data_parent, ann_file)
        except Exception as exc:  # the parent reports it beside the other variants
            import traceback
            traceback.print_exc()
            row = dict(variant=args.child, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        write_json(args.json, [row])
        return

    names = args.variants.split(",")
    for name in names:
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    if args.prewarm:
        fused = [name for name in names if "reference" not in (VARIANTS[name]["attn_impl"], VARIANTS[name]["conv_impl"])]
        if fused:
            print(f"--- prewarm, not reported: {fused[0]} once more, filling Triton's disk cache", flush=True)
            row = run_child(args, fused[0], data_parent)
            if args.json:
                write_json(Path(args.json).with_suffix(".prewarm.json"), [row])
            if row.get("host_profile"):
                print_host_profile(f"{fused[0]} (prewarm)", row["host_profile"])
    rows = []
    for name in names:
        print(f"--- {name}: {VARIANTS[name]['describe']}", flush=True)
        rows.append(run_child(args, name, data_parent, host_profile=not args.prewarm))
        if args.json:  # after every variant: a run cut short keeps what it measured
            write_json(args.json, rows)
    print_rows(rows)
    if args.json:
        write_json(args.json, rows)


def run_child(args, name: str, data_parent: Path, host_profile: bool = True) -> dict:
    """One variant in a process of its own; its row, or what went wrong."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--json", out.name,
               "--data", str(data_parent)]
        flags = ["arch", "iters", "warmup", "profile_iters", "amp", "loss_scale", "images", "eval_images", "workers",
                 "seed"] + (["host_profile"] if host_profile else [])
        for flag in flags:
            if getattr(args, flag) is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        if args.sanity:
            cmd.append("--sanity")
        start = time.perf_counter()
        subprocess.run(cmd, check=False)
        text = Path(out.name).read_text()
        row = json.loads(text)[0] if text else dict(variant=name, error="the variant's process wrote nothing")
        row["process_s"] = time.perf_counter() - start
        return row


if __name__ == "__main__":
    main()
