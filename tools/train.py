"""Train a detector with an MLLA backbone (mmdetection 3.x style).

    python tools/train.py configs/mlla/mask-rcnn_mlla-t_fpn_1x_coco.py [--work-dir DIR] [--amp [fp16|bf16]]
    bash tools/dist_train.sh configs/mlla/mask-rcnn_mlla-t_fpn_1x_coco.py 8 [--amp]

The checks below run before mmengine's Runner starts, so a missing config, dataset or pretrained
checkpoint is reported at once, by its path, instead of minutes later deep inside a dataloader.
tools/test.py reuses them.
"""
import argparse
import glob
import os
import os.path as osp
import sys

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
# Run from a checkout without `pip install -e .`: configs import `mlla_det` through custom_imports.
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from mmengine.config import Config, DictAction  # noqa: E402

COCO_HELP = (
    "The configs in configs/mlla/ expect COCO 2017 under data/coco/ (relative to the working "
    "directory): data/coco/annotations/instances_train2017.json, instances_val2017.json, "
    "data/coco/train2017/ and data/coco/val2017/. Get the 2017 train/val images and annotations "
    "from https://cocodataset.org/#download and unpack (or symlink) them there, or point the "
    "config at another copy with --cfg-options train_dataloader.dataset.data_root=DIR "
    "val_dataloader.dataset.data_root=DIR val_evaluator.ann_file=FILE "
    "test_dataloader.dataset.data_root=DIR test_evaluator.ann_file=FILE.")


class PreflightError(Exception):
    """A problem found before the runner starts; its message says what is wrong and what to do."""


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config: key=value pairs merged into it, e.g. '
        'model.backbone.init_cfg=None train_dataloader.batch_size=4; a list is written '
        'key="[a,b]" or key=a,b, nested lists/tuples as key="[(a,b),(c,d)]" (quotes needed, '
        'no spaces)')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher (tools/dist_*.sh pass "pytorch")')
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or --local_rank.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a detector with an MLLA backbone')
    parser.add_argument('config', help='config file, e.g. configs/mlla/mask-rcnn_mlla-t_fpn_1x_coco.py')
    parser.add_argument('--work-dir', help='directory for logs and checkpoints '
                        '(default: ./work_dirs/<config name>)')
    parser.add_argument('--amp', nargs='?', const='fp16', choices=('fp16', 'bf16'),
                        help='automatic mixed precision (AmpOptimWrapper): --amp or --amp fp16 with a '
                             'dynamic loss scale; --amp bf16 without one (bf16 has fp32\'s range)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate by total batch / auto_scale_lr.base_batch_size')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from this checkpoint, or, with no path, from the latest checkpoint in the '
        'work directory')
    add_common_args(parser)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


# ------------------------------------------------------------------------------ checks

def require_config_file(path: str) -> None:
    if not osp.isfile(path):
        available = sorted(glob.glob(osp.join(REPO_ROOT, 'configs', 'mlla', '*.py')))
        names = ', '.join(osp.relpath(p, REPO_ROOT) for p in available) or 'none found'
        raise PreflightError(f"config file not found: {path} (resolved: {osp.abspath(path)}). "
                             f"Configs in {REPO_ROOT}: {names}")


def import_mlla_det() -> None:
    """Registers the MLLA backbone and, without a compiled mmcv, its torchvision-backed ops.

    Must run before anything imports mmcv.ops (mmdet's models do)."""
    try:
        import mlla_det  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name != 'mlla_det':
            raise
        raise PreflightError(f"cannot import mlla_det from {REPO_ROOT}: run `pip install -e .` "
                             f"in the repository root") from error


def load_config(args: argparse.Namespace) -> Config:
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    # work_dir: command line, then the config, then ./work_dirs/<config name>
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


def _is_remote(path: str) -> bool:
    return '://' in path


def _join_root(data_root, path: str) -> str:
    # As mmengine's BaseDataset does: relative paths are taken under data_root.
    if data_root and not osp.isabs(path):
        return osp.join(data_root, path)
    return path


def dataset_paths(dataset_cfg, where: str):
    """(description, path) for every file and folder a dataset config reads, wrappers included."""
    if not isinstance(dataset_cfg, dict):
        return []
    if dataset_cfg.get('backend_args'):
        return []  # files on a storage backend (petrel, s3, ...) can't be checked with os.path
    found = []
    if isinstance(dataset_cfg.get('dataset'), dict):  # RepeatDataset, ClassBalancedDataset, ...
        found += dataset_paths(dataset_cfg['dataset'], f'{where}.dataset')
    for i, sub in enumerate(dataset_cfg.get('datasets') or []):  # ConcatDataset
        found += dataset_paths(sub, f'{where}.datasets[{i}]')
    data_root = dataset_cfg.get('data_root')
    if data_root:
        found.append((f'{where}.data_root', data_root))
    if dataset_cfg.get('ann_file'):
        found.append((f'{where}.ann_file', _join_root(data_root, dataset_cfg['ann_file'])))
    for key, prefix in (dataset_cfg.get('data_prefix') or {}).items():
        if isinstance(prefix, str) and prefix:
            found.append((f'{where}.data_prefix.{key}', _join_root(data_root, prefix)))
    return found


def evaluator_paths(evaluator_cfg, where: str):
    evaluators = evaluator_cfg if isinstance(evaluator_cfg, (list, tuple)) else [evaluator_cfg]
    return [(f'{where}.ann_file', e['ann_file']) for e in evaluators
            if isinstance(e, dict) and e.get('ann_file') and not e.get('backend_args')]


def require_dataset(cfg: Config, splits) -> None:
    """Every path the given splits ('train', 'val', 'test') read must exist, and the
    evaluators' COCO files must be ones the evaluation can read."""
    paths = []
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if loader is None:
            continue
        paths += dataset_paths(loader.get('dataset'), f'{split}_dataloader.dataset')
        if split != 'train' and cfg.get(f'{split}_evaluator') is not None:
            paths += evaluator_paths(cfg.get(f'{split}_evaluator'), f'{split}_evaluator')
    missing = []
    for where, path in paths:
        if not _is_remote(path) and not osp.exists(path) and path not in (p for _, p in missing):
            missing.append((where, path))
    if not missing:
        require_evaluable_annotations(cfg, splits)
        return
    listing = '\n'.join(f'  {path}  (from {where}; absolute: {osp.abspath(path)})'
                        for where, path in missing)
    toy_help = ''
    if osp.isfile(osp.join(REPO_ROOT, 'tools', 'shapes_quickstart.py')):
        toy_help = ("\nFor a quick run without COCO: python tools/shapes_quickstart.py (generates the "
                    "toy 'shapes' dataset and trains configs/mlla/mask-rcnn_mlla-t_fpn_shapes.py).")
    raise PreflightError(f"dataset not found; missing:\n{listing}\n{COCO_HELP}{toy_help}")


def malformed_polygons(ann_file: str, limit: int = 5):
    """(annotation id, image id, number count) of polygons pycocotools cannot rasterise.

    A polygon needs at least 3 points (6 numbers) in x, y pairs; pycocotools fails on fewer with
    an unhelpful TypeError in the middle of the first evaluation, after a whole epoch of training.
    """
    import json

    with open(ann_file) as f:
        annotations = json.load(f).get('annotations', [])
    bad = []
    for ann in annotations:
        polygons = ann.get('segmentation')
        if not isinstance(polygons, list):  # RLE, or no mask
            continue
        for polygon in polygons:
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                bad.append((ann.get('id'), ann.get('image_id'), len(polygon) if isinstance(polygon, list) else None))
                break
        if len(bad) == limit:
            break
    return bad


def require_evaluable_annotations(cfg: Config, splits) -> None:
    """The COCO files the evaluators read must hold only masks pycocotools can rasterise."""
    for split in splits:
        if split == 'train' or cfg.get(f'{split}_evaluator') is None:
            continue
        for where, path in evaluator_paths(cfg.get(f'{split}_evaluator'), f'{split}_evaluator'):
            if _is_remote(path) or not path.endswith('.json') or not osp.isfile(path):
                continue
            bad = malformed_polygons(path)
            if bad:
                listing = '\n'.join(f'  annotation {ann_id} (image {image_id}): {count} numbers'
                                     for ann_id, image_id, count in bad)
                raise PreflightError(
                    f"{path} (from {where}) holds polygons with fewer than 3 points, which the COCO "
                    f"evaluation cannot rasterise; fix or remove them (first {len(bad)} shown):\n{listing}")


def pretrained_checkpoints(node, where: str = 'model'):
    """(description, path) of every `Pretrained` init_cfg under a model config."""
    found = []
    if isinstance(node, dict):
        if node.get('type') == 'Pretrained' and isinstance(node.get('checkpoint'), str):
            found.append((f'{where}.checkpoint', node['checkpoint']))
        for key, value in node.items():
            found += pretrained_checkpoints(value, f'{where}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            found += pretrained_checkpoints(value, f'{where}[{i}]')
    return found


def require_pretrained(cfg: Config) -> None:
    # The runner initialises weights even when resuming, so the file is needed in every case.
    for where, path in pretrained_checkpoints(cfg.model):
        if _is_remote(path) or osp.isfile(path):
            continue
        owner = where[:-len('.init_cfg.checkpoint')] if where.endswith('.init_cfg.checkpoint') else None
        scratch = (f" or train from scratch with --cfg-options {owner}.init_cfg=None" if owner else '')
        raise PreflightError(
            f"pretrained weights not found: {path} (from {where}; absolute: {osp.abspath(path)}). "
            f"Put the paper's ImageNet-1K checkpoint there ({osp.basename(path)}, released with "
            f"https://github.com/LeapLabTHU/MLLA),{scratch}.")


def require_checkpoint(path: str, what: str) -> None:
    if not _is_remote(path) and not osp.isfile(path):
        raise PreflightError(f"{what} not found: {path} (absolute: {osp.abspath(path)})")


def init_distributed_without_cuda(cfg: Config) -> None:
    """Make `--launcher pytorch` work on a machine without CUDA (gloo backend).

    mmengine's init_dist(launcher='pytorch') calls torch.cuda.set_device(LOCAL_RANK) before it
    creates the process group, whatever the backend, and its Runner wraps the model in DDP with
    device_ids=[LOCAL_RANK], which DDP refuses for a module on the CPU. So create the process
    group here (the Runner skips init_dist when one exists) and wrap without device ids."""
    import datetime

    import torch
    import torch.distributed as torch_dist

    if cfg.launcher == 'none' or torch.cuda.is_available() or torch_dist.is_initialized():
        return
    dist_cfg = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}))
    backend = dist_cfg.get('backend', 'nccl')
    if backend != 'gloo':
        raise PreflightError(f"launcher {cfg.launcher!r} without CUDA: the {backend!r} backend "
                             f"needs GPUs; on the CPU use gloo: --cfg-options "
                             f"env_cfg.dist_cfg.backend=gloo")
    timeout = dist_cfg.get('timeout')
    kwargs = {} if timeout is None else dict(timeout=datetime.timedelta(seconds=timeout))
    torch_dist.init_process_group(backend='gloo', **kwargs)
    wrapper = cfg.get('model_wrapper_cfg') or dict(
        type='MMDistributedDataParallel', broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))
    if wrapper.get('type', 'MMDistributedDataParallel') == 'MMDistributedDataParallel':
        wrapper.setdefault('device_ids', None)
    cfg.model_wrapper_cfg = wrapper


# ------------------------------------------------------------------------------ main

def apply_amp(cfg: Config, amp: str) -> None:
    """--amp: mmengine's AmpOptimWrapper in fp16 with a dynamic loss scale, or in bf16 without one
    (a loss scaler would only add its unscaling, inf checks and a host sync per iteration)."""
    cfg.optim_wrapper.type = 'AmpOptimWrapper'
    if amp == 'bf16':
        cfg.optim_wrapper.dtype = 'bfloat16'
        cfg.optim_wrapper.loss_scale = dict(enabled=False)
    elif amp == 'fp16':
        cfg.optim_wrapper.dtype = 'float16'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    else:
        raise ValueError(f"--amp takes fp16 or bf16, got {amp!r}")


def prepare(args: argparse.Namespace) -> Config:
    require_config_file(args.config)
    import_mlla_det()
    cfg = load_config(args)

    if args.amp:
        apply_amp(cfg, args.amp)
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise PreflightError("--auto-scale-lr needs auto_scale_lr = dict(enable=..., "
                                 "base_batch_size=...) in the config")
        cfg.auto_scale_lr.enable = True
    # An explicit checkpoint wins over looking for the latest one in the work directory.
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        require_checkpoint(args.resume, 'checkpoint to resume from')
        cfg.resume = True
        cfg.load_from = args.resume
    if cfg.get('load_from') and not cfg.get('resume'):
        require_checkpoint(cfg.load_from, 'load_from checkpoint')

    splits = ['train'] + (['val'] if cfg.get('val_cfg') and cfg.get('val_dataloader') else [])
    require_dataset(cfg, splits)
    require_pretrained(cfg)
    return cfg


def checked_config(prepare_fn, args: argparse.Namespace) -> Config:
    """The tool's config after its checks (and, without CUDA, the gloo process group); exits
    with the check's message when one fails."""
    try:
        cfg = prepare_fn(args)
        init_distributed_without_cuda(cfg)
    except PreflightError as error:
        fail(str(error))
    return cfg


def build_runner(cfg: Config):
    from mmdet.utils import setup_cache_size_limit_of_dynamo
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    setup_cache_size_limit_of_dynamo()
    return Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)


def leave_process_group() -> None:
    """Shut the distributed process group down before the interpreter does, once every rank is
    done with it: a rank that tears its gloo threads down (explicitly or at exit) while another
    rank still talks to it aborts ('terminate called without an active exception', seen twice
    in CI at the end of a finished two-process evaluation), hence the barrier first."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    build_runner(checked_config(prepare, args)).train()
    leave_process_group()


if __name__ == '__main__':
    main()
