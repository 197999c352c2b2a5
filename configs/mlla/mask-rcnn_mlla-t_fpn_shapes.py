# Mask R-CNN with MLLA-T trained from scratch on the generated "shapes" dataset
# (mlla_det/datasets/shapes.py: circles, rectangles, triangles and stars, COCO format).
# Run it in one command, data generation included:  python tools/shapes_quickstart.py
# Sized for one H100/H200: 600 iterations of 8 images of 256 px, bf16 autocast. On an H200, with
# the fused attention and depthwise convolutions (the defaults), this schedule trained in 268 s to
# bbox mAP 0.707 / segm mAP 0.763 on the val split (docs/logs/shapes_h200_600iters_v3.log); it
# passed 0.6 at the second validation (iteration 400).
_base_ = './mask-rcnn_mlla-t_fpn_1x_coco.py'

# Read by tools/shapes_quickstart.py, which (re)generates data_root from these settings when it
# does not hold them yet (ignored by mmengine's Runner). Keys: mlla_det.datasets.shapes.ShapesSettings.
shapes_dataset = dict(seed=0, num_train=1000, num_val=100, image_size=256)

data_root = 'data/shapes/'
image_size = 256
# Must list mlla_det.datasets.shapes.CLASSES in order (tests/test_shapes.py checks it).
metainfo = dict(
    classes=('circle', 'rectangle', 'triangle', 'star'),
    palette=[(220, 20, 60), (0, 120, 255), (0, 190, 90), (255, 170, 0)])
num_classes = 4

model = dict(
    # From scratch: no ImageNet weights (the attention runs through the fused kernels on a GPU).
    # Less stochastic depth than on COCO: a run this short needs fitting more than regularising.
    backbone=dict(init_cfg=None, drop_path_rate=0.05),
    roi_head=dict(bbox_head=dict(num_classes=num_classes), mask_head=dict(num_classes=num_classes)))

# Shapes look the same mirrored either way; images are generated at the training size already,
# the Resize only keeps the config valid for data generated at another size.
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='RandomFlip', prob=[0.25, 0.25], direction=['horizontal', 'vertical']),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]

train_dataloader = dict(
    batch_size=8,
    num_workers=6,
    persistent_workers=True,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=0),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=2,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
# Per-class AP too: which shape is hard tells more than one number.
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json', classwise=True)
test_evaluator = val_evaluator

# ---------------------------------------------------------------- schedule
# From scratch, so a higher rate than the paper's fine-tuning 1e-4 (at batch 8, not 16), a short
# warmup, then cosine decay: the low-rate tail is what sharpens boxes and masks at high IoU.
# Gradient clipping guards the first iterations of an untrained transformer.
max_iters = 600
warmup_iters = 50
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=200)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=warmup_iters, end=max_iters,
         T_max=max_iters - warmup_iters, eta_min_ratio=0.01),
]
optim_wrapper = dict(
    type='AmpOptimWrapper',
    dtype='bfloat16',
    optimizer=dict(lr=2e-4),
    clip_grad=dict(max_norm=10.0, norm_type=2))
auto_scale_lr = dict(enable=False, base_batch_size=8)

# ---------------------------------------------------------------- runtime
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=200, max_keep_ckpts=1,
                    save_last=True))
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=False)
randomness = dict(seed=0)

# cuDNN stays on here, as in the quick start's measured runs (docs/logs): every image has one size
# (256 x 256), so cuDNN's per-size setup comes back only for new RoI counts of the mask head. The
# COCO configs switch it off (CudnnHook); which is faster for this schedule is not measured yet.
custom_hooks = [dict(type='RNGStateHook'), dict(type='CudnnHook', enabled=True)]
