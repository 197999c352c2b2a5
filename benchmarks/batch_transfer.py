"""How long the training process takes to receive a batch its dataloader workers already made.

    python benchmarks/batch_transfer.py [--arch t] [--batches 20] [--workers 2] [--json PATH]

The 1x config's train dataloader (its pipeline, sampler and 2 images per batch) over the generated
COCO-like set of train_throughput.py. After a few batches the loop sleeps between draws, so that
the workers are always ahead: what `next()` then costs is the hand-over alone (unpickling the
batch, attaching shared memory), paid by the training process in every iteration as data wait.
Two modes, each with fresh workers: "plain", BitmapMasks pickled as bytes (mmdet as it is), and
"shared", the masks sent through shared memory (mlla_det/datasets/worker_transfer.py, registered
when mlla_det is imported). CPU only; no GPU is used.
"""
import argparse
import statistics
import sys
import tempfile
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, write_json  # noqa: E402


def receive_times(cfg, batches: int, warmup: int, pause_s: float) -> tuple:
    from mmengine.runner import Runner
    loader = Runner.build_dataloader(cfg.train_dataloader, seed=0)
    iterator = iter(loader)
    times, mask_bytes = [], []
    for index in range(warmup + batches):
        if index >= warmup:
            time.sleep(pause_s)
        start = time.perf_counter()
        batch = next(iterator)
        if index >= warmup:
            times.append(time.perf_counter() - start)
            mask_bytes.append(sum(s.gt_instances.masks.masks.nbytes for s in batch["data_samples"]))
    del iterator, loader  # the workers stop before the next mode forks its own
    return times, mask_bytes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="t", choices=("t", "s", "b"))
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between draws, so the workers are ahead")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import mlla_det  # noqa: F401  registers the shared-memory transfer
    from mmdet.structures.mask import BitmapMasks
    from mmdet.utils import register_all_modules

    from benchmarks import train_throughput
    from mlla_det.datasets.worker_transfer import share_bitmap_masks_between_processes
    register_all_modules(init_default_scope=True)
    data = Path(tempfile.mkdtemp(prefix="coco_like_"))
    ann_file = train_throughput.write_coco_like(data, args.images, seed=0)
    options = argparse.Namespace(arch=args.arch, amp="off", workers=args.workers, seed=0, iters=1, sanity=False)
    cfg = train_throughput.build_config(options, train_throughput.VARIANTS["default"], data, ann_file,
                                        Path(tempfile.mkdtemp()))
    rows = []
    for mode in ("plain", "shared"):
        if mode == "plain":
            ForkingPickler._extra_reducers.pop(BitmapMasks, None)
        else:
            share_bitmap_masks_between_processes()
        times, mask_bytes = receive_times(cfg, args.batches, args.warmup, args.pause)
        rows.append(dict(mode=mode, workers=args.workers, batches=args.batches,
                         receive_ms_median=1e3 * statistics.median(times), receive_ms_max=1e3 * max(times),
                         mask_mb_per_batch_median=statistics.median(mask_bytes) / 2 ** 20))
        print(f"{mode:>6}: receiving a ready batch takes {rows[-1]['receive_ms_median']:.2f} ms median "
              f"(max {rows[-1]['receive_ms_max']:.2f}); masks {rows[-1]['mask_mb_per_batch_median']:.1f} MB a batch",
              flush=True)
    if args.json:
        write_json(args.json, [dict(row, environment=environment("cpu")) for row in rows])


if __name__ == "__main__":
    main()
