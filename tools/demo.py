"""Draw a trained detector's predictions (masks, boxes, classes, scores) on one image.

    python tools/demo.py IMAGE CONFIG CHECKPOINT --out OUT.png [--score-thr 0.3] [--device cuda:0]

`render_prediction` is also what tools/shapes_quickstart.py calls after training.
"""
import argparse
import itertools
import os
import sys

# Run as a script, tools/ is on the path but the project root is not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_visualizer_count = itertools.count()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Draw a detector's predictions on one image.")
    parser.add_argument('image', help='input image file')
    parser.add_argument('config', help='config file of the model')
    parser.add_argument('checkpoint', help='checkpoint file (.pth)')
    parser.add_argument('--out', required=True, help='where to write the picture (e.g. out.png)')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='draw predictions scoring at least this (default: 0.3)')
    parser.add_argument('--device', default=None,
                        help='e.g. cuda:0 or cpu (default: cuda:0 when a GPU is there, else cpu)')
    args = parser.parse_args(argv)
    if not 0 <= args.score_thr <= 1:
        parser.error(f'--score-thr must lie in [0, 1], got {args.score_thr}')
    return args


def require_file(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{what} not found: {path!r} (expected an existing file)')


def default_device():
    import torch
    return 'cuda:0' if torch.cuda.is_available() else 'cpu'


def init_model(config, checkpoint, device=None):
    """Build the detector of `config` (a path or an mmengine Config) with `checkpoint`'s weights."""
    import mlla_det  # noqa: F401  registers MLLA, provides mmcv's ops, lets checkpoints load
    from mmdet.apis import init_detector
    from mmengine.config import Config

    if isinstance(config, str):
        require_file(config, 'config')
        config = Config.fromfile(config)
    else:
        config = config.copy()
    require_file(checkpoint, 'checkpoint')
    # Inference needs no ground truth: a bare image has no annotations to load.
    pipeline = config.test_dataloader.dataset.pipeline
    config.test_dataloader.dataset.pipeline = [t for t in pipeline if t['type'] != 'LoadAnnotations']
    return init_detector(config, checkpoint, device=device or default_device())


def render_prediction(model, image_path, out_path, score_thr=0.3):
    """Run `model` on one image and write a picture of its predictions to out_path.

    Returns the number of predictions drawn (those scoring at least score_thr).
    """
    import mmcv
    from mmdet.apis import inference_detector
    from mmdet.visualization import DetLocalVisualizer

    require_file(image_path, 'image')
    image = mmcv.imread(image_path, channel_order='rgb')
    if image is None:
        raise ValueError(f'could not read an image from {image_path!r}')
    result = inference_detector(model, image_path)
    # A name of its own: mmengine keeps visualizers by name, and a training run already made one.
    visualizer = DetLocalVisualizer(name=f'mlla_det_demo_{next(_visualizer_count)}')
    visualizer.dataset_meta = model.dataset_meta
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    visualizer.add_datasample('prediction', image, data_sample=result, draw_gt=False, show=False,
                              pred_score_thr=score_thr, out_file=out_path)
    return int((result.pred_instances.scores >= score_thr).sum())


def main(argv=None):
    args = parse_args(argv)
    try:
        require_file(args.image, 'image')
        model = init_model(args.config, args.checkpoint, args.device)
        drawn = render_prediction(model, args.image, args.out, args.score_thr)
    except (FileNotFoundError, ValueError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    print(f'{drawn} predictions with score >= {args.score_thr} drawn into {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
