"""How many distinct input shapes the shipped 1x pipeline gives the backbone, and how many canvases.

    python benchmarks/input_sizes.py [--iters 5000] [--multiples 64 128 192 256] [--json PATH]

CPU only, no model: the config's own resize / crop transforms (the RandomChoice step of its train
pipeline) run on blank images of COCO's common sizes (train_throughput.COCO_SIZES, drawn
uniformly); pairs of images of the same orientation form a batch, as AspectRatioBatchSampler does
at 2 images per GPU, and the batch is padded to multiples of 32 as the data preprocessor does.
For each padded size sequence it reports how many distinct sizes have appeared after k
iterations, and the same for canvases whose sides are rounded up to each multiple
(BlockGraphsHook's CUDA graphs are recorded once per canvas), with the mean canvas area over the
mean padded area (the extra GPU work a canvas costs).
"""
import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import round_up, write_json  # noqa: E402
from benchmarks.train_throughput import COCO_SIZES  # noqa: E402

PAD_DIVISOR = 32
CHECKPOINTS = (50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


def padded_batch_sizes(iterations: int, arch: str = "t", seed: int = 0, images_per_gpu: int = 2):
    """The padded (H, W) of each of `iterations` batches of the config's train pipeline."""
    from mmengine.config import Config

    import mlla_det  # noqa: F401  registers the transforms
    from benchmarks.common import config_path
    from mmdet.registry import TRANSFORMS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(str(config_path(arch)))
    (resize,) = [step for step in cfg.train_pipeline if step["type"] == "RandomChoice"]
    transform = TRANSFORMS.build(resize)
    random.seed(seed)
    np.random.seed(seed)
    pending = {False: [], True: []}  # by orientation, as AspectRatioBatchSampler groups
    sizes = []
    while len(sizes) < iterations:
        width, height = random.choice(COCO_SIZES)
        out = transform(dict(img=np.zeros((height, width, 3), np.uint8), img_shape=(height, width),
                             ori_shape=(height, width)))
        group = pending[width < height]
        group.append(out["img"].shape[:2])
        if len(group) == images_per_gpu:
            sizes.append((round_up(max(h for h, _ in group), PAD_DIVISOR),
                          round_up(max(w for _, w in group), PAD_DIVISOR)))
            group.clear()
    return sizes


def summarize(sizes, multiples):
    mean_area = float(np.mean([h * w for h, w in sizes]))
    rows = []
    for multiple in (None, *multiples):
        shapes = sizes if multiple is None else [(round_up(h, multiple), round_up(w, multiple)) for h, w in sizes]
        rows.append(dict(
            canvas_multiple=multiple,
            distinct=len(set(shapes)),
            distinct_after={k: len(set(shapes[:k])) for k in CHECKPOINTS if k <= len(shapes)},
            area_over_padded=float(np.mean([h * w for h, w in shapes])) / mean_area))
    return dict(iterations=len(sizes), mean_padded_area=mean_area, rows=rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="t")
    parser.add_argument("--iters", type=int, default=5000)
    parser.add_argument("--multiples", type=int, nargs="+", default=[64, 128, 192, 256])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args(argv)
    summary = summarize(padded_batch_sizes(args.iters, args.arch, args.seed), args.multiples)
    checkpoints = [k for k in CHECKPOINTS if k <= summary["iterations"]]
    print(f"{summary['iterations']} iterations, mean padded area {summary['mean_padded_area'] / 1e6:.3f} MP")
    print("shapes            " + " ".join(f"{k:>6}" for k in checkpoints) + "   area")
    for row in summary["rows"]:
        name = "padded sizes" if row["canvas_multiple"] is None else f"canvas x{row['canvas_multiple']}"
        print(f"{name:<18}" + " ".join(f"{row['distinct_after'][k]:>6}" for k in checkpoints)
              + f"   x{row['area_over_padded']:.3f}")
    if args.json:
        write_json(args.json, [summary])


if __name__ == "__main__":
    main()
