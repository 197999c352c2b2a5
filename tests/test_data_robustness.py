"""Bad data must not kill a run: images without annotations, degenerate boxes (zero width or
height, outside the image), invalid polygons, tiny images (< 32 px) and damaged image files
(truncated, garbage, empty) go through training and evaluation.

What handles what:
- mmdet's CocoDataset drops boxes that are degenerate or entirely outside the image when it
  parses the annotations, and keeps boxes partly outside; LoadAnnotations ignores instances
  whose polygons are invalid. Empty images and tiny images (padded to 32 by the data
  preprocessor) go through the model as they are (filter_empty_gt=False, min_size=0 here).
- Damaged files: mmcv's LoadImageFromFile raises, which kills the run. mlla_det's
  LoadImageFromFileOrSkip logs the file and the reason, then returns None in training (mmengine's
  BaseDataset draws another image) or, in evaluation, a blank image of the annotated size.

The end-to-end test trains one epoch (every image drawn once) of a tiny MLLA Mask R-CNN with
validation through tools/train.py, then evaluates the checkpoint with tools/test.py.
"""
import json
import logging
import os
import os.path as osp
import re
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import mlla_det  # noqa: F401  (mmcv ops without a compiled mmcv)
import mlla_det.datasets.transforms  # noqa: F401  (registers LoadImageFromFileOrSkip)
from helpers_coco import (CLASSES, CORRUPTIONS, REPO_ROOT, TEST_PIPELINE, TRAIN_PIPELINE, ImageCase,
                          clean_cases, write_config, write_split)
from mlla_det.datasets.transforms import LoadImageFromFileOrSkip, UnreadableImageError
from mmcv.transforms import LoadImageFromFile
from mmengine.logging import MMLogger
from mmdet.registry import DATASETS
from mmdet.utils import register_all_modules

TRAIN_SKIP_PIPELINE = [dict(type='LoadImageFromFileOrSkip', unreadable='skip')] + TRAIN_PIPELINE[1:]
TEST_BLANK_PIPELINE = [dict(type='LoadImageFromFileOrSkip', unreadable='blank')] + TEST_PIPELINE[1:]
NO_FILTER = dict(filter_empty_gt=False, min_size=0)

# Annotations of the 'degenerate' image: one usable box, then what CocoDataset must drop or keep.
USABLE_BOX = (0, 10, 10, 20, 20)
DEGENERATE = [
    dict(category=0, bbox=[30, 30, 0, 10], area=0.0, segmentation=[[30, 30, 30, 30, 30, 40, 30, 40]]),
    dict(category=1, bbox=[5, 40, 12, 0], area=0.0, segmentation=[[5, 40, 17, 40, 17, 40, 5, 40]]),
    dict(category=0, bbox=[70, 70, 10, 10], area=100.0, segmentation=[[70, 70, 80, 70, 80, 80, 70, 80]]),
    dict(category=1, bbox=[-20, -20, 10, 10], area=100.0, segmentation=[[-20, -20, -10, -20, -10, -10]]),
]
PARTLY_OUTSIDE = dict(category=1, bbox=[50, 50, 30, 30], area=900.0,
                      segmentation=[[50, 50, 80, 50, 80, 80, 50, 80]])
# A polygon of two points: mmdet's LoadAnnotations ignores the instance in training. Not in the
# validation file: pycocotools' segm evaluation crashes on it (see the report / notes).
INVALID_POLYGON = dict(category=0, bbox=[40, 5, 10, 10], area=100.0, segmentation=[[40, 5, 50, 5]])


def bad_cases(prefix, invalid_polygon):
    extra = DEGENERATE + [PARTLY_OUTSIDE] + ([INVALID_POLYGON] if invalid_polygon else [])
    return [
        ImageCase(f'{prefix}_no_annotations.png', 64, 64),
        ImageCase(f'{prefix}_degenerate.png', 64, 64, boxes=[USABLE_BOX], extra_annotations=extra),
        ImageCase(f'{prefix}_only_degenerate.png', 64, 64, extra_annotations=DEGENERATE[:1]),
        # Portrait, unlike every other image, so the aspect-ratio sampler batches them together:
        # a batch of only tiny images, padded to 32 x 32.
        ImageCase(f'{prefix}_tiny_a.png', 20, 24, boxes=[(0, 4, 4, 10, 12)]),
        ImageCase(f'{prefix}_tiny_b.png', 16, 28, boxes=[(1, 2, 3, 8, 20)]),
    ]


def damaged_cases(prefix, corruptions=CORRUPTIONS):
    return [ImageCase(f'{prefix}_{kind}.png', 64, 64, boxes=[(0, 5, 5, 20, 20)], corruption=kind)
            for kind in corruptions]


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('robustness') / 'data')
    train = clean_cases('train_clean', 4, seed=5) + bad_cases('train', True) + damaged_cases('train')
    val = (clean_cases('val_clean', 2, seed=6) + bad_cases('val', False)[:4]
           + damaged_cases('val', ['garbage']))
    write_split(root, 'train', train, seed=5)
    write_split(root, 'val', val, seed=6)
    return root


@pytest.fixture(scope='module', autouse=True)
def mmdet_scope():
    register_all_modules(init_default_scope=True)


@contextmanager
def captured_log():
    """Messages mmengine's current logger receives (where print_log(logger='current') goes)."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append((record.levelno, record.getMessage()))
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def sample(root, split, name, **extra):
    return dict(img_path=osp.join(root, split, name), **extra)


def build_dataset(root, split, pipeline, test_mode=False, filter_cfg=None):
    return DATASETS.build(dict(
        type='CocoDataset', data_root=root, ann_file=f'annotations/instances_{split}.json',
        data_prefix=dict(img=f'{split}/'), metainfo=dict(classes=CLASSES), test_mode=test_mode,
        filter_cfg=filter_cfg, pipeline=pipeline))


# ------------------------------------------------------------------------- the transform

@pytest.mark.parametrize('kind', CORRUPTIONS)
def test_mmcv_loader_stops_on_a_damaged_file(data_root, kind):
    """Why the transform exists: one bad file ends the run."""
    with pytest.raises(Exception):
        LoadImageFromFile()(sample(data_root, 'train', f'train_{kind}.png'))


@pytest.mark.parametrize('kind, reason', [('truncated', 'decoder found no image'),
                                          ('garbage', 'decoder found no image'),
                                          ('empty', 'the file is empty'),
                                          ('missing', 'FileNotFoundError')])
def test_skip_mode_returns_none_and_logs_the_file_and_why(data_root, kind, reason):
    name = 'not_there.png' if kind == 'missing' else f'train_{kind}.png'
    with captured_log() as log:
        assert LoadImageFromFileOrSkip()(sample(data_root, 'train', name)) is None
    warnings = [message for level, message in log if level == logging.WARNING]
    assert len(warnings) == 1, log
    assert osp.join(data_root, 'train', name) in warnings[0] and reason in warnings[0]
    assert 'draws another image' in warnings[0]


def test_readable_image_loads_as_with_mmcv(data_root):
    path_sample = sample(data_root, 'train', 'train_tiny_a.png')
    expected = LoadImageFromFile(to_float32=True)(dict(path_sample))
    with captured_log() as log:
        got = LoadImageFromFileOrSkip(to_float32=True)(dict(path_sample))
    assert not [m for level, m in log if level >= logging.WARNING]
    assert got['img'].dtype == np.float32 and np.array_equal(got['img'], expected['img'])
    assert got['img_shape'] == got['ori_shape'] == (24, 20)
    assert got['img_unreadable'] is None


def test_blank_mode_stands_in_an_image_of_the_annotated_size(data_root):
    transform = LoadImageFromFileOrSkip(unreadable='blank', blank_value=77)
    with captured_log() as log:
        got = transform(sample(data_root, 'val', 'val_garbage.png', height=40, width=50))
    assert got['img'].shape == (40, 50, 3) and got['img'].dtype == np.uint8
    assert (got['img'] == 77).all()
    assert got['img_shape'] == got['ori_shape'] == (40, 50)
    assert 'decoder found no image' in got['img_unreadable']
    [(level, message)] = log
    assert level == logging.WARNING and 'val_garbage.png' in message and 'blank 50x40' in message


def test_blank_mode_without_an_annotated_size_says_so(data_root):
    with pytest.raises(UnreadableImageError, match=r"val_garbage.png.*needs the image's annotated "
                                                   r"size.*height=None, width=None"):
        LoadImageFromFileOrSkip(unreadable='blank')(sample(data_root, 'val', 'val_garbage.png'))


@pytest.mark.parametrize('kwargs, message', [
    (dict(unreadable='ignore'), r"unreadable must be one of \('skip', 'blank'\)"),
    (dict(blank_value=300), r'blank_value is a grey level in \[0, 255\]'),
    (dict(ignore_empty=True), 'use unreadable=\'skip\''),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoadImageFromFileOrSkip(**kwargs)


# ------------------------------------------------------------------- datasets, in process

def test_training_dataset_draws_another_image_for_a_damaged_one(data_root):
    dataset = build_dataset(data_root, 'train', [dict(type='LoadImageFromFileOrSkip')],
                            filter_cfg=NO_FILTER)
    index = next(i for i in range(len(dataset))
                 if dataset.get_data_info(i)['img_path'].endswith('train_garbage.png'))
    np.random.seed(0)  # BaseDataset picks the replacement with numpy's global generator
    with captured_log() as log:
        got = dataset[index]
    assert not got['img_path'].endswith('train_garbage.png') and got['img'].size > 0
    assert any('train_garbage.png' in message for _, message in log)


def test_evaluation_dataset_needs_the_blank_stand_in(data_root):
    """In test mode mmengine refuses a None sample, so 'skip' cannot work there; 'blank' does."""
    skipping = build_dataset(data_root, 'val', [dict(type='LoadImageFromFileOrSkip')], test_mode=True)
    blanking = build_dataset(data_root, 'val', TEST_BLANK_PIPELINE, test_mode=True)
    index = next(i for i in range(len(skipping))
                 if skipping.get_data_info(i)['img_path'].endswith('val_garbage.png'))
    with pytest.raises(Exception, match='should not get `None`'):
        skipping[index]
    packed = blanking[index]
    assert packed['inputs'].shape == (3, 64, 64)
    assert packed['data_samples'].img_path.endswith('val_garbage.png')
    assert len(packed['data_samples'].gt_instances) == 1  # its object is still there to be missed


def test_coco_dataset_keeps_only_usable_boxes(data_root):
    """mmdet's own handling, which the end-to-end run relies on: degenerate boxes and boxes
    entirely outside the image are dropped at parse time, boxes partly outside are kept."""
    dataset = build_dataset(data_root, 'train', [], filter_cfg=NO_FILTER)
    infos = {osp.basename(dataset.get_data_info(i)['img_path']): dataset.get_data_info(i)
             for i in range(len(dataset))}
    x, y, w, h = USABLE_BOX[1:]
    px, py, pw, ph = PARTLY_OUTSIDE['bbox']
    ix, iy, iw, ih = INVALID_POLYGON['bbox']
    boxes = [inst['bbox'] for inst in infos['train_degenerate.png']['instances']]
    assert boxes == [[x, y, x + w, y + h], [px, py, px + pw, py + ph], [ix, iy, ix + iw, iy + ih]]
    assert infos['train_only_degenerate.png']['instances'] == []
    assert infos['train_no_annotations.png']['instances'] == []
    # ...and the polygon of two points is ignored when the masks are loaded.
    loading = build_dataset(data_root, 'train', TRAIN_PIPELINE[:2], filter_cfg=NO_FILTER)
    index = list(infos).index('train_degenerate.png')
    loaded = loading[index]
    assert loaded['gt_ignore_flags'].tolist() == [False, False, True]
    assert loaded['gt_masks'].masks.shape == (3, 64, 64)


# ------------------------------------------------------------------------------ end to end

def run_tool(tool, *args, cwd):
    command = [sys.executable, osp.join(REPO_ROOT, 'tools', tool), *args]
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    done = subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert done.returncode == 0, (f'{" ".join(command)} failed (exit {done.returncode}):\n'
                                  f'{done.stdout[-6000:]}')
    return done.stdout


def assert_metrics_logged(log):
    for key in ('coco/bbox_mAP', 'coco/segm_mAP'):
        values = re.findall(rf'{key}: (-?[0-9.]+)', log)
        assert values, f'no {key} in the log'
        assert all(-1 <= float(v) <= 1 for v in values)


@pytest.mark.slow
def test_training_and_evaluation_survive_bad_data(data_root, tmp_path):
    config = write_config(str(tmp_path / 'cfg.py'), data_root, loop='epoch', length=1,
                          val_interval=1, checkpoint_interval=1, filter_cfg=NO_FILTER,
                          train_pipeline=TRAIN_SKIP_PIPELINE, test_pipeline=TEST_BLANK_PIPELINE,
                          extra_imports=['mlla_det.datasets.transforms'])
    work_dir = str(tmp_path / 'work')
    log = run_tool('train.py', config, '--work-dir', work_dir, cwd=str(tmp_path))

    # One epoch: every one of the 12 training images was drawn once, the damaged ones replaced.
    assert 'Epoch(train) [1][6/6]' in log
    assert 'Epoch(val) [1][7/7]' in log
    for kind, reason in [('truncated', 'decoder found no image'),
                         ('garbage', 'decoder found no image'), ('empty', 'the file is empty')]:
        assert re.search(rf'WARNING - LoadImageFromFileOrSkip: skipping an image: cannot decode '
                         rf'\S*train_{kind}\.png.*{reason}', log), f'no warning for train_{kind}.png'
    assert re.search(r'WARNING - LoadImageFromFileOrSkip: cannot decode \S*val_garbage\.png.*'
                     r'Evaluating a blank 64x64 image', log)
    assert_metrics_logged(log)
    scalars = [json.loads(line) for line in open(next(
        osp.join(root, 'scalars.json') for root, _, files in os.walk(work_dir) if 'scalars.json' in files))]
    losses = [entry['loss'] for entry in scalars if 'loss' in entry]
    assert len(losses) == 6 and all(np.isfinite(losses)), losses
    checkpoint = torch.load(osp.join(work_dir, 'epoch_1.pth'), map_location='cpu', weights_only=True)
    assert all(torch.isfinite(t).all() for t in checkpoint['state_dict'].values())

    # Evaluation on its own, as users run it.
    log = run_tool('test.py', config, osp.join(work_dir, 'epoch_1.pth'),
                   '--work-dir', str(tmp_path / 'test'), cwd=str(tmp_path))
    assert re.search(r'WARNING - LoadImageFromFileOrSkip: cannot decode \S*val_garbage\.png', log)
    assert re.search(r'\(test\) \[7/7\]', log), 'the test loop did not reach the last image'
    assert_metrics_logged(log)
