"""Test helpers: a tiny COCO-format instance-segmentation dataset with chosen defects, and a
config for a drastically reduced MLLA Mask R-CNN that trains on it in seconds on a CPU.

The images are filled rectangles on noise; each drawn rectangle is annotated with its box and a
rectangle polygon, so the ground truth is exact. Faults are added on purpose per image: extra
annotations that are not drawn (degenerate or outside the image) and damaged files.
"""
import dataclasses
import json
import os
import os.path as osp
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CLASSES = ('square', 'bar')
# (category index, x, y, w, h) in pixels
Box = Tuple[int, float, float, float, float]

CORRUPTIONS = ('truncated', 'garbage', 'empty')


@dataclasses.dataclass
class ImageCase:
    name: str
    width: int
    height: int
    boxes: Sequence[Box] = ()
    # Raw COCO annotations written as given (not drawn): degenerate boxes, boxes off the image.
    # 'category' is a class index; id, image_id and category_id are filled in.
    extra_annotations: Sequence[dict] = ()
    corruption: Optional[str] = None  # one of CORRUPTIONS: the file written is damaged


def random_boxes(rng: np.random.Generator, width: int, height: int, count: int) -> List[Box]:
    boxes = []
    for _ in range(count):
        category = int(rng.integers(len(CLASSES)))
        w = float(rng.integers(max(4, width // 6), max(5, width // 2)))
        h = float(rng.integers(max(4, height // 6), max(5, height // 2)))
        if category == 1:  # bars are elongated
            w = max(4.0, w / 2)
        x = float(rng.integers(0, width - int(w) + 1))
        y = float(rng.integers(0, height - int(h) + 1))
        boxes.append((category, x, y, w, h))
    return boxes


def clean_cases(prefix: str, count: int, size: Tuple[int, int] = (64, 64), seed: int = 0,
                max_boxes: int = 3) -> List[ImageCase]:
    rng = np.random.default_rng(seed)
    width, height = size
    return [ImageCase(f'{prefix}{i:03d}.png', width, height,
                      random_boxes(rng, width, height, int(rng.integers(1, max_boxes + 1))))
            for i in range(count)]


def render(case: ImageCase, rng: np.random.Generator) -> np.ndarray:
    img = rng.integers(0, 60, size=(case.height, case.width, 3), dtype=np.uint8)
    for category, x, y, w, h in case.boxes:
        colour = (230, 60, 60) if category == 0 else (60, 200, 230)
        img[int(y):int(y + h), int(x):int(x + w)] = colour
    return img


def _damage(png_bytes: bytes, corruption: str, rng: np.random.Generator) -> bytes:
    if corruption == 'truncated':
        return png_bytes[:len(png_bytes) // 2]
    if corruption == 'garbage':
        return rng.integers(0, 256, size=len(png_bytes), dtype=np.uint8).tobytes()
    if corruption == 'empty':
        return b''
    raise ValueError(f'corruption must be one of {CORRUPTIONS}, got {corruption!r}')


def _box_annotation(category: int, x, y, w, h) -> dict:
    polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
    return dict(category=category, bbox=[x, y, w, h], area=float(w * h),
                segmentation=[polygon], iscrowd=0)


def write_split(root: str, split: str, cases: Sequence[ImageCase], seed: int = 0) -> str:
    """Write root/<split>/*.png and root/annotations/instances_<split>.json; returns the latter."""
    rng = np.random.default_rng(seed)
    os.makedirs(osp.join(root, split), exist_ok=True)
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    images, annotations = [], []
    for image_id, case in enumerate(cases, start=1):
        path = osp.join(root, split, case.name)
        Image.fromarray(render(case, rng)).save(path)
        if case.corruption is not None:
            with open(path, 'rb') as f:
                data = f.read()
            with open(path, 'wb') as f:
                f.write(_damage(data, case.corruption, rng))
        images.append(dict(id=image_id, file_name=case.name, width=case.width, height=case.height))
        raw = [_box_annotation(*box) for box in case.boxes] + [dict(a) for a in case.extra_annotations]
        for ann in raw:
            ann['category_id'] = ann.pop('category') + 1
            ann.update(id=len(annotations) + 1, image_id=image_id)
            ann.setdefault('iscrowd', 0)
            annotations.append(ann)
    coco = dict(images=images, annotations=annotations,
                categories=[dict(id=i + 1, name=name) for i, name in enumerate(CLASSES)])
    ann_file = osp.join(root, 'annotations', f'instances_{split}.json')
    with open(ann_file, 'w') as f:
        json.dump(coco, f)
    return ann_file


# ------------------------------------------------------------------------------------- config

BASE_CONFIG = osp.join(REPO_ROOT, 'configs', 'mlla', 'mask-rcnn_mlla-t_fpn_1x_coco.py')

CONFIG_TEMPLATE = '''\
# Written by tests/helpers_coco.py: the MLLA-T Mask R-CNN config, shrunk to train in seconds on a CPU.
_base_ = {base!r}
custom_imports = dict(imports={imports!r}, allow_failed_imports=False)

data_root = {data_root!r}
metainfo = dict(classes={classes!r})
num_classes = {num_classes}
width = 32  # channels of the neck and heads

model = dict(
    backbone=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 4],
                  drop_path_rate={drop_path_rate}, attn_impl='reference', init_cfg=None),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=width),
    rpn_head=dict(in_channels=width, feat_channels=width),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=width),
        bbox_head=dict(in_channels=width, fc_out_channels=64, num_classes=num_classes),
        mask_roi_extractor=dict(out_channels=width),
        mask_head=dict(num_convs=1, in_channels=width, conv_out_channels=width,
                       num_classes=num_classes)),
    train_cfg=dict(rpn_proposal=dict(nms_pre=200, max_per_img=100),
                   rcnn=dict(sampler=dict(num=32))),
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=100)))

train_pipeline = {train_pipeline!r}
test_pipeline = {test_pipeline!r}
train_dataloader = dict(
    batch_size={batch_size}, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/instances_train.json',
                 data_prefix=dict(img='train/'), filter_cfg={filter_cfg!r}, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size={val_batch_size}, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/instances_val.json',
                 data_prefix=dict(img='val/'), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

train_cfg = {train_cfg!r}
# Warmup that spans the checkpoints, so a scheduler state lost on resume would show.
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
                        end={warmup_iters})]
optim_wrapper = dict(_delete_=True, type='OptimWrapper',
                     optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
                     paramwise_cfg=dict(custom_keys={{'norm': dict(decay_mult=0.)}}))
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=1),
    checkpoint=dict(type='CheckpointHook', by_epoch={by_epoch}, interval={checkpoint_interval},
                    max_keep_ckpts=-1, save_last=True))
custom_hooks = {custom_hooks!r}
log_processor = dict(type='LogProcessor', window_size=1, by_epoch={by_epoch})
randomness = dict(seed=0, deterministic=True)
'''

TRAIN_PIPELINE = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
TEST_PIPELINE = [
    dict(type='LoadImageFromFile'),
    # Keeps the size; the mask head needs the scale_factor it records.
    dict(type='Resize', scale_factor=1.0),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]


def write_config(path: str, data_root: str, *, loop: str = 'iter', length: int, val_interval: int,
                 checkpoint_interval: int, train_pipeline=TRAIN_PIPELINE,
                 test_pipeline=TEST_PIPELINE, custom_hooks=(), extra_imports=(),
                 batch_size: int = 2, val_batch_size: int = 1, drop_path_rate: float = 0.5,
                 filter_cfg=None, warmup_iters: int = 6) -> str:
    """A config file for tools/train.py / tools/test.py or Runner.from_cfg.

    loop: 'iter' (IterBasedTrainLoop, `length` iterations, checkpoints every
    `checkpoint_interval` iterations) or 'epoch' (EpochBasedTrainLoop, `length` epochs,
    checkpoints every `checkpoint_interval` epochs). No Resize in the default pipelines: the
    images go through the model at their own size."""
    if loop == 'iter':
        train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=length,
                         val_interval=val_interval)
    elif loop == 'epoch':
        train_cfg = dict(_delete_=True, type='EpochBasedTrainLoop', max_epochs=length,
                         val_interval=val_interval)
    else:
        raise ValueError(f"loop is 'iter' or 'epoch', got {loop!r}")
    if filter_cfg is None:
        filter_cfg = dict(filter_empty_gt=True, min_size=0)
    text = CONFIG_TEMPLATE.format(
        base=BASE_CONFIG, imports=['mlla_det', *extra_imports], data_root=data_root.rstrip('/') + '/',
        classes=CLASSES, num_classes=len(CLASSES), drop_path_rate=drop_path_rate,
        train_pipeline=list(train_pipeline), test_pipeline=list(test_pipeline),
        batch_size=batch_size, val_batch_size=val_batch_size, filter_cfg=filter_cfg,
        train_cfg=train_cfg, warmup_iters=warmup_iters, by_epoch=loop == 'epoch',
        checkpoint_interval=checkpoint_interval, custom_hooks=list(custom_hooks))
    with open(path, 'w') as f:
        f.write(text)
    return path
