# CI-size variant of mask-rcnn_mlla-t_fpn_shapes.py: the same model and code path, sized for a
# CPU in about a minute: 96 px images, 16 train / 4 val, 40 iterations of 2 images, fp32.
# It shows that everything runs and that the loss falls, not what the model can reach.
#   python tools/shapes_quickstart.py --tiny
_base_ = './mask-rcnn_mlla-t_fpn_shapes.py'

shapes_dataset = dict(seed=0, num_train=16, num_val=4, image_size=96)

data_root = 'data/shapes-tiny/'
image_size = 96

# Fewer RoIs per image keep the 1024-wide box head cheap on a CPU.
model = dict(
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=500, max_per_img=200),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=200)))

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
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

max_iters = 40
warmup_iters = 5
# Validation only once, at the end of training.
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=warmup_iters, end=max_iters,
         T_max=max_iters - warmup_iters, eta_min_ratio=0.1),
]
# fp32: mmengine's AmpOptimWrapper needs a GPU, and this variant is meant for CPUs.
optim_wrapper = dict(_delete_=True, type='OptimWrapper', constructor='MergedGroupsOptimWrapperConstructor',
                     optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=0.05, fused=True),
                     paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}),
                     clip_grad=dict(max_norm=10.0, norm_type=2))

# A logged loss is the mean of the iterations since the previous one, so the first and the last
# few compare fairly (tests/test_shapes.py does).
default_hooks = dict(
    logger=dict(interval=5),
    checkpoint=dict(interval=max_iters))
log_processor = dict(window_size=5)
