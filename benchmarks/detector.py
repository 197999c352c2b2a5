"""Mask R-CNN with an MLLA backbone: training iterations and inference, eager vs fused kernels.

    python benchmarks/detector.py [--arch t] [--json PATH]
    python benchmarks/detector.py --cpu-sanity       # tiny sizes on the CPU: proves the script runs

What is measured, for each dtype (fp32; bf16 = torch.autocast(bfloat16) over the forward and the
losses, fp32 weights and AdamW state, as mmengine's AmpOptimWrapper(dtype='bfloat16') does minus
its loss scaler, which bf16 does not need) and each backbone implementation (eager: the paper's
block as PyTorch ops; compile: that eager backbone under torch.compile (default mode; the heads
stay eager; compile time goes into first_call_s); fused-attn: only the attention fused; fused:
fused attention and depthwise convolutions, the default on CUDA; compile-fused: the fused
backbone under torch.compile; compile-graph and compile-fused-graph: the same two compiled with
mode="reduce-overhead", which replays them from CUDA graphs, one recorded per input size). What the
compiled impls compile is --compile-scopes (one row each): "backbone" alone, "backbone-neck"
(default; extract_feat: backbone and FPN), or "features": the whole part whose shapes the
batch's padded size fixes, i.e. extract_feat, the RPN head's convolutions and the box head's FC
layers on the 512 sampled RoIs per image. Target assignment, sampling, RoIAlign, the mask head
(its RoI count varies), losses and AdamW stay eager.
- train: one full iteration as the runner does it: data preprocessor (normalise, pad to 32),
  forward with losses (RPN, bbox, mask), backward, AdamW step with the config's optimizer wrapper
  (lr 1e-4, weight decay 0.05, none on norms). Batch: 2 synthetic images of 800x1216 and 800x1184
  (random pixels) with 8 random boxes each and an elliptic mask inside each box.
- inference: test_step on --infer-batch images (default 1, 800x1216): preprocessing, backbone,
  RPN + NMS, RoI heads, mask pasting at image size. The box head's score threshold is set after
  the first call so that common.EVAL_NMS_PAIRS (box, class) pairs enter its NMS (the row's
  score_thr): the random weights still give the full 100 detections per image a trained model
  gives, the mask head and pasting do their usual amount of work, and the NMS runs once, not once
  per class (a zero threshold, used before 2026-12-07, sent all 80,000 pairs).
The detector is built from configs/mlla/mask-rcnn_mlla-{arch}_fpn_1x_coco.py with random weights.
Timing: triton.testing.do_bench (CUDA events, warm-up, median) after one untimed first call,
whose time (kernel JIT, cuDNN autotuning) is reported as first_call_s; peak memory: one call after
torch.cuda.reset_peak_memory_stats, weights, optimizer state and inputs included.
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (ARCHS, COMPILED_IMPLS, EVAL_NMS_PAIRS, KERNEL_IMPLS, autocast, bench,  # noqa: E402
                               build_detector, compile_in_mode, collect_rows, default_impls_without_compile,
                               detector_config, environment, error_text, free_memory, peak_memory_mb,
                               print_speed_table, print_table, quiet_mmengine, scores_into_nms, set_kernel_impls,
                               synchronize, threshold_passing, timing_device, use_head_utils, write_json)

IMPLS = tuple(KERNEL_IMPLS)
PAPER_IMPLS = ("eager", "compile", "compile-graph")  # the paper's model, as it is and under torch.compile
SECTION_GPU = ("forward", "backward", "update")
SECTION_HOST = SECTION_GPU + ("tail", "iteration")
DTYPES = ("fp32", "bf16")
MODES = ("train", "inference")
TRAIN_SIZES = ((800, 1216), (800, 1184))
INFER_SIZE = (800, 1216)
# The callables a compiled impl compiles, as "submodule.method" paths from the detector.
COMPILE_SCOPES = {
    "backbone": ("backbone.forward",),
    "backbone-neck": ("extract_feat",),
    "features": ("extract_feat", "rpn_head.forward", "roi_head.bbox_head.forward"),
}


def compile_scope(model, scope: str, impl: str):
    """torch.compile each callable of COMPILE_SCOPES[scope] in impl's mode, in place (an instance
    attribute shadows the method); returns the marker to call at the start of every step (CUDA-graph
    replays: the previous step's outputs may then be overwritten) or None. uncompile_scope undoes it."""
    marker = None
    for path in COMPILE_SCOPES[scope]:
        owner, method = _scope_owner(model, path)
        compiled, marker = compile_in_mode(getattr(owner, method), impl)
        setattr(owner, method, compiled)
    return marker


def uncompile_scope(model, scope: str) -> None:
    for path in COMPILE_SCOPES[scope]:
        owner, method = _scope_owner(model, path)
        if method in vars(owner):
            delattr(owner, method)


def _scope_owner(model, path: str):
    module_path, _, method = path.rpartition(".")
    return (model.get_submodule(module_path) if module_path else model), method


def elliptic_mask(height: int, width: int, box) -> np.ndarray:
    """A filled ellipse inscribed in box (x1, y1, x2, y2), as an (H, W) uint8 mask."""
    x1, y1, x2, y2 = box
    rows, cols = np.ogrid[:height, :width]
    cy, cx = (y1 + y2) / 2, (x1 + x2) / 2
    ry, rx = max((y2 - y1) / 2, 1.0), max((x2 - x1) / 2, 1.0)
    return (((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0).astype(np.uint8)


def synthetic_sample(height: int, width: int, num_instances: int, num_classes: int, rng: np.random.Generator,
                     device, with_targets: bool):
    """One image (uint8, 3 x H x W, random pixels) and its DetDataSample, as a dataloader gives them."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.bbox import HorizontalBoxes
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    image = torch.from_numpy(rng.integers(0, 256, size=(3, height, width), dtype=np.uint8)).to(device)
    sample = DetDataSample(metainfo=dict(img_shape=(height, width), ori_shape=(height, width),
                                         scale_factor=(1.0, 1.0), flip=False, img_id=0))
    if with_targets:
        box_size = rng.uniform(16, [width / 2, height / 2], size=(num_instances, 2))
        corner = rng.uniform(0, 1, size=(num_instances, 2)) * ([width, height] - box_size)
        boxes = np.concatenate([corner, corner + box_size], axis=1).astype(np.float32)
        masks = np.stack([elliptic_mask(height, width, box) for box in boxes])
        instances = InstanceData()
        instances.bboxes = HorizontalBoxes(torch.from_numpy(boxes))
        instances.labels = torch.from_numpy(rng.integers(0, num_classes, size=num_instances))
        instances.masks = BitmapMasks(masks, height, width)
        sample.gt_instances = instances
    return image, sample


def synthetic_batch(sizes, num_instances: int, num_classes: int, seed: int, device, with_targets: bool) -> dict:
    rng = np.random.default_rng(seed)
    images, samples = zip(*(synthetic_sample(h, w, num_instances, num_classes, rng, device, with_targets)
                            for h, w in sizes))
    return {"inputs": list(images), "data_samples": list(samples)}


def train_step_parts(model, optim_wrapper, batch: dict, dtype: str, device, step_begin=None):
    """A training iteration as its three parts: forward (preprocessing, forward and losses under
    autocast, AmpOptimWrapper's split; step_begin, if given, runs first: compile_scope's marker),
    backward, and the optimizer update (step and zero_grad). make_train_step runs them as one;
    --sections times them apart."""
    def forward():
        if step_begin is not None:
            step_begin()
        with autocast(dtype, device):
            data = model.data_preprocessor(batch, True)
            losses = model(**data, mode="loss")
        return model.parse_losses(losses)[0]

    def update():
        optim_wrapper.step()
        optim_wrapper.zero_grad()
    return forward, optim_wrapper.backward, update


def make_train_step(forward, optim_wrapper):
    """model.train_step: train_step_parts' forward, then update_params (backward, AdamW step,
    zero_grad)."""
    def step():
        loss = forward()
        optim_wrapper.update_params(loss)
        return loss
    return step


def make_inference_step(model, batch: dict, dtype: str, device, step_begin=None):
    def step():
        if step_begin is not None:
            step_begin()
        with torch.no_grad(), autocast(dtype, device):
            return model.test_step(batch)
    return step


def shrink_heads_workload(cfg) -> None:
    """--cpu-sanity: fewer RoIs and detections. The RoI heads cost the same at any image size
    (512 sampled RoIs per training image, 1000 proposals and 100 masks at test time), which on a
    small CPU is tens of seconds per iteration; the code paths stay the same."""
    cfg.model.train_cfg.rpn_proposal.max_per_img = 64
    cfg.model.train_cfg.rcnn.sampler.num = 16
    cfg.model.test_cfg.rpn.nms_pre = 64
    cfg.model.test_cfg.rpn.max_per_img = 32
    cfg.model.test_cfg.rcnn.max_per_img = 5


class Bench:
    """One detector, switched between attention implementations and modes."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        cfg = detector_config(args.arch)
        if args.cpu_sanity:
            shrink_heads_workload(cfg)
        torch.manual_seed(0)
        self.model = build_detector(cfg).to(device)
        self.optim_wrapper_cfg = cfg.optim_wrapper
        self.model_cfg = cfg.model
        self.optim_wrapper = None
        self.num_classes = cfg.model.roi_head.bbox_head.num_classes
        self.scope = None  # what is compiled now

    def use_impl(self, impl: str, scope: str = None) -> None:
        """The eager model, or (compiled impls) a fresh torch.compile of the scope's callables, so
        that each configuration's compile time is its own."""
        if self.scope is not None:
            uncompile_scope(self.model, self.scope)
        self.step_begin, self.scope = None, None
        set_kernel_impls(self.model, impl)
        use_head_utils(self.model, "paper" if impl in PAPER_IMPLS else "repo", self.model_cfg)
        if impl in COMPILED_IMPLS:
            scope = scope or self.args.compile_scopes[0]
            torch._dynamo.reset()
            self.step_begin = compile_scope(self.model, scope, impl)
            self.scope = scope

    def use_optimizer(self, impl: str, optimizer: str = None) -> str:
        """A fresh optimizer wrapper (no AdamW state yet): optimizer "paper" is the paper's
        construction, one parameter group per parameter (mmengine's default constructor, as the
        paper's mmcv one) and AdamW's multi-tensor path; "config" is the config's (MergedGroups
        constructor, fused AdamW). None: "paper" for the paper's model (PAPER_IMPLS), "config" for
        ours. Returns a description."""
        from mmengine.optim import build_optim_wrapper
        self.optim_wrapper = None
        free_memory(self.device)
        cfg = copy.deepcopy(self.optim_wrapper_cfg)
        optimizer = optimizer or ("paper" if impl in PAPER_IMPLS else "config")
        if optimizer == "paper":
            cfg.pop("constructor", None)
            cfg.optimizer.pop("fused", None)
        with quiet_mmengine():
            self.optim_wrapper = build_optim_wrapper(self.model, cfg)
        fused = " fused" if self.optim_wrapper.optimizer.defaults.get("fused") else ""
        return f"{optimizer}: {len(self.optim_wrapper.optimizer.param_groups)} groups{fused}"

    def train_parts(self, impl: str, dtype: str, seed: int, optimizer: str = None):
        """After use_impl: train mode, the batch and a fresh optimizer wrapper (its description in
        self.optimizer_kind); returns (train_step_parts, images per step)."""
        self.model.train()
        batch = synthetic_batch(self.args.train_sizes, self.args.instances, self.num_classes, seed,
                                self.device, with_targets=True)
        self.optimizer_kind = self.use_optimizer(impl, optimizer)
        return (train_step_parts(self.model, self.optim_wrapper, batch, dtype, self.device, self.step_begin),
                len(batch["inputs"]))

    def step(self, mode: str, impl: str, dtype: str, seed: int, scope: str = None, optimizer: str = None):
        self.use_impl(impl, scope)
        if mode == "train":
            parts, num_images = self.train_parts(impl, dtype, seed, optimizer)
            return make_train_step(parts[0], self.optim_wrapper), num_images
        self.model.eval()
        batch = synthetic_batch([self.args.infer_size] * self.args.infer_batch, 0, self.num_classes, seed,
                                self.device, with_targets=False)
        return make_inference_step(self.model, batch, dtype, self.device, self.step_begin), len(batch["inputs"])

    def set_score_threshold(self, step) -> None:
        """The box head's score threshold from one untimed inference call: EVAL_NMS_PAIRS (box, class)
        pairs over it (common.EVAL_NMS_PAIRS says why). The scores are recorded before any threshold
        applies, so whatever the threshold was does not matter."""
        with scores_into_nms() as scores:
            step()
        self.model.roi_head.test_cfg.score_thr = threshold_passing(scores, EVAL_NMS_PAIRS)

    def measure(self, mode: str, impl: str, dtype: str, seed: int, scope: str = None, round_: int = None,
                optimizer: str = None) -> dict:
        """One configuration's row. optimizer: see use_optimizer; a row whose optimizer is not
        impl's own is labelled "IMPL+OPTIMIZER-optim" (vs_eager stays against the plain eager row)."""
        args = self.args
        row = {"arch": args.arch.upper(), "mode": mode, "impl": row_label(impl, optimizer), "dtype": dtype}
        if impl in COMPILED_IMPLS:
            row["compiled"] = scope
        if round_ is not None:
            row["round"] = round_
        step = None
        try:
            free_memory(self.device)
            step, num_images = self.step(mode, impl, dtype, seed, scope, optimizer)
            sizes = args.train_sizes if mode == "train" else [args.infer_size] * num_images
            row["images"] = " + ".join(f"{h}x{w}" for h, w in sizes)
            if mode == "train":
                row["optimizer"] = self.optimizer_kind
            start = time.perf_counter()
            step()
            synchronize(self.device)
            row["first_call_s"] = round(time.perf_counter() - start, 2)
            if mode == "inference":
                self.set_score_threshold(step)
                row["score_thr"] = self.model.roi_head.test_cfg.score_thr
            row["peak_mem_MB"] = peak_memory_mb(step, self.device)
            ms = bench(step, args.warmup_ms, args.rep_ms, self.device)
            row["ms"] = ms
            row["images_per_s"] = num_images / (ms / 1e3)
        except Exception as exc:  # one failing configuration must not stop the others
            row["error"] = error_text(exc)
            print(f"  {mode} {impl} {dtype}: {row['error']}", flush=True)
        finally:
            del step
            self.release(impl)
        return row

    def release(self, impl: str) -> None:
        """After a configuration: drop its optimizer state and compiled graphs, free the memory."""
        self.optim_wrapper = None
        if impl in COMPILED_IMPLS:
            self.use_impl("eager")
            torch._dynamo.reset()
        free_memory(self.device)

    def sections(self, mode: str, impl: str, dtype: str, seed: int, scope: str = None, round_: int = None,
                 optimizer: str = None) -> dict:
        """--sections: median host and GPU milliseconds of each part of a training iteration
        (train_step_parts) over --sections iterations after 3 untimed ones. Host: from entering a part
        to leaving it (waits at the host syncs inside included); GPU: between CUDA events recorded at
        the parts' boundaries (gaps where the GPU waits for the host included); tail: the wait for the
        GPU after the host has issued the whole iteration."""
        args = self.args
        row = {"arch": args.arch.upper(), "mode": "train-sections", "impl": row_label(impl, optimizer), "dtype": dtype}
        try:
            free_memory(self.device)
            self.use_impl(impl, scope)
            (forward, backward, update), _ = self.train_parts(impl, dtype, seed, optimizer)
            row["optimizer"] = self.optimizer_kind
            host = {name: [] for name in SECTION_HOST}
            gpu = {name: [] for name in SECTION_GPU} if torch.device(self.device).type == "cuda" else {}
            for it in range(3 + args.sections):
                stamps, events = [], []

                def mark():  # a boundary between parts: host clock, and a CUDA event on the GPU
                    stamps.append(time.perf_counter())
                    if gpu:
                        events.append(torch.cuda.Event(enable_timing=True))
                        events[-1].record()
                mark()
                loss = forward()
                mark()
                backward(loss)
                mark()
                update()
                mark()
                synchronize(self.device)
                stamps.append(time.perf_counter())
                if it < 3:
                    continue
                for index, name in enumerate(SECTION_GPU):
                    host[name].append((stamps[index + 1] - stamps[index]) * 1e3)
                    if gpu:
                        gpu[name].append(events[index].elapsed_time(events[index + 1]))
                host["tail"].append((stamps[4] - stamps[3]) * 1e3)
                host["iteration"].append((stamps[4] - stamps[0]) * 1e3)
            for name, values in host.items():
                row[f"host_{name}_ms"] = statistics.median(values)
            for name, values in gpu.items():
                row[f"gpu_{name}_ms"] = statistics.median(values)
        except Exception as exc:
            row["error"] = error_text(exc)
            print(f"  sections {impl} {dtype}: {row['error']}", flush=True)
        finally:
            self.release(impl)
        return row


def row_label(impl: str, optimizer: str = None) -> str:
    return impl if optimizer is None else f"{impl}+{optimizer}-optim"


def configurations(args) -> list:
    """(mode, impl, dtype, seed, scope, round, optimizer) to measure, in order: each round runs
    every impl once (a compiled impl once per scope; with --eager-config-optimizer, eager twice in
    train). One seed per (mode, dtype): every impl trains on the same batch."""
    rounds = range(args.rounds) if args.rounds > 1 else [None]
    configs = []
    for round_ in rounds:
        for seed, (mode, dtype) in enumerate((m, d) for m in args.modes for d in args.dtypes):
            for impl in args.impls:
                for scope in (args.compile_scopes if impl in COMPILED_IMPLS else [None]):
                    configs.append((mode, impl, dtype, seed, scope, round_, None))
                if impl == "eager" and mode == "train" and args.eager_config_optimizer:
                    configs.append((mode, impl, dtype, seed, None, round_, "config"))
    return configs


def summarize_rounds(rows) -> list:
    """One row per configuration: its median / min / max time over the rounds and the median of
    its same-round ratios to eager."""
    groups = {}
    for row in rows:
        if "ms" in row:
            groups.setdefault((row["mode"], row["impl"], row.get("compiled"), row["dtype"]), []).append(row)
    summary = []
    for (mode, impl, scope, dtype), group in groups.items():
        times = [r["ms"] for r in group]
        ratios = [r["vs_eager"] for r in group if "vs_eager" in r]
        summary.append({"mode": mode, "impl": impl, "compiled": scope, "dtype": dtype, "rounds": len(group),
                        "median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
                        "median_vs_eager": statistics.median(ratios) if ratios else None})
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--arch", choices=ARCHS, default="t")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--compile-scopes", nargs="+", choices=tuple(COMPILE_SCOPES), default=["backbone-neck"],
                        help="what the compiled impls compile (see above); one row per scope")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every configuration this many times, interleaved (eager, then the others, "
                             "then again); the summary gives each one's median and the median same-round ratio")
    parser.add_argument("--instances", type=int, default=8, help="objects per training image")
    parser.add_argument("--infer-batch", type=int, default=1, help="images per inference call")
    parser.add_argument("--warmup-ms", type=float, default=300.0)
    parser.add_argument("--rep-ms", type=float, default=1500.0)
    parser.add_argument("--cpu-sanity", action="store_true",
                        help="run on the CPU at tiny sizes with 1-2 repeats (checks the script, not speed)")
    parser.add_argument("--eager-config-optimizer", action="store_true",
                        help="train: also time the eager model with the config's optimizer construction (row "
                             "'eager+config-optim'); the paper's model otherwise steps AdamW as the paper's code "
                             "does, one parameter group per parameter")
    parser.add_argument("--sections", type=int, default=0, metavar="N",
                        help="instead of timing whole iterations, time the training iteration's parts (forward with "
                             "losses, backward, optimizer update) on the host and on the GPU, median of N")
    parser.add_argument("--json", metavar="PATH", help="write the rows as a JSON list to PATH")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    args.train_sizes, args.infer_size = list(TRAIN_SIZES), INFER_SIZE
    if args.cpu_sanity:
        args.train_sizes, args.infer_size = [(64, 96), (64, 80)], (64, 96)
        args.instances, args.warmup_ms, args.rep_ms = 3, 0.0, 0.0
        args.impls = default_impls_without_compile(args.impls, IMPLS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = timing_device("detector.py", args.cpu_sanity)
    if device is None:
        return 0
    env = environment(device)
    print(f"# Mask R-CNN MLLA-{args.arch.upper()} | {env['device']} | torch {env['torch']} | "
          f"triton {env['triton']}", flush=True)
    bench_ = Bench(args, device)
    if args.sections:
        rows = [bench_.sections(*config) for config in configurations(args) if config[0] == "train"]
        print_table(rows, ["impl", "dtype", "optimizer"] + [f"host_{n}_ms" for n in SECTION_HOST] +
                    [f"gpu_{n}_ms" for n in SECTION_GPU],
                    title=f"\n## Mask R-CNN MLLA-{args.arch.upper()} training iteration by part ({env['device']}), "
                          f"median of {args.sections}")
        if args.json:
            write_json(args.json, rows)
        return 0
    rows = collect_rows(configurations(args), bench_.measure, env, args.json)
    columns = ["mode", "impl", "compiled", "dtype", "optimizer", "images", "ms", "images_per_s", "vs_eager", "vs_compile",
               "peak_mem_MB", "first_call_s"]
    print_speed_table(rows, columns[:1] + (["round"] if args.rounds > 1 else []) + columns[1:],
                      title=f"\n## Mask R-CNN MLLA-{args.arch.upper()} ({env['device']}); train = one iteration "
                            f"incl. AdamW step")
    if args.rounds > 1:
        print_table(summarize_rounds(rows), ["mode", "impl", "compiled", "dtype", "rounds", "median_ms", "min_ms",
                                             "max_ms", "median_vs_eager"],
                    title=f"\n## Over {args.rounds} interleaved rounds (ratios within a round)")
    if args.json:
        write_json(args.json, rows)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
