# Mask R-CNN with an MLLA-T backbone, 1x schedule (12 epochs), COCO 2017.
# The paper's recipe: AdamW, DETR-style multi-scale + crop augmentation, batch 16 (2 per GPU x 8).
# The S / B / 3x configs inherit from this file and change only what differs.
_base_ = '../_base_/mask-rcnn_fpn_coco.py'

custom_imports = dict(imports=['mlla_det'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='MLLA',
        embed_dim=64,
        depths=[2, 4, 8, 4],
        num_heads=[2, 4, 8, 16],
        mlp_ratio=4,
        qkv_bias=True,
        drop_rate=0.,
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        use_checkpoint=False,
        # ImageNet-1K weights of the paper (the classification checkpoint, weights under `model`).
        init_cfg=dict(type='Pretrained', checkpoint='data/MLLA_T.pth')),
    neck=dict(in_channels=[64, 128, 256, 512]))

# Flip, then either a multi-scale resize or resize -> absolute-range crop -> multi-scale resize
# (the augmentation of DETR / Sparse R-CNN, as the paper's mmdet 2.x AutoAugment policy).
multi_scale = [(480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333), (640, 1333),
               (672, 1333), (704, 1333), (736, 1333), (768, 1333), (800, 1333)]
# Damaged image files are skipped in training and replaced by a blank image in evaluation, with a
# logged warning naming the file, instead of ending the run (mlla_det/datasets/transforms.py).
train_pipeline = [
    dict(type='LoadImageFromFileOrSkip', unreadable='skip', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[
            [dict(type='RandomChoiceResize', scales=multi_scale, keep_ratio=True)],
            [
                dict(type='RandomChoiceResize', scales=[(400, 1333), (500, 1333), (600, 1333)],
                     keep_ratio=True),
                dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600),
                     allow_negative_crop=True),
                dict(type='RandomChoiceResize', scales=multi_scale, keep_ratio=True),
            ],
        ]),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))
test_pipeline = [
    dict(type='LoadImageFromFileOrSkip', unreadable='blank', backend_args={{_base_.backend_args}}),
    dict(type='Resize', scale=(1333, 800), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

# No weight decay on any norm layer: matches the blocks' LayerNorms (norm1, norm2), the output
# LayerNorms (norm0..norm3) and the BatchNorms of the stem and the downsampling layers (`.norm.`).
# The constructor applies these per-parameter rules as mmengine's default does, then hands AdamW
# one group per distinct setting (2) instead of one per parameter (521 for MLLA-T), and fused=True
# updates each group in one kernel: the same AdamW, but its host time per iteration went from 59-93
# to 5 ms on an H200 host (mlla_det/engine/optim.py, benchmarks/detector.py --sections).
optim_wrapper = dict(
    type='OptimWrapper',
    constructor='MergedGroupsOptimWrapperConstructor',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05, fused=True),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}))

# Schedule and runtime: the base's mmdet 1x (linear warmup over 500 iterations, steps at epochs 8
# and 11); the learning rate is for a total batch of 16, see auto_scale_lr there.

# Keep the RNG states in checkpoints so that `--resume` continues exactly where a run stopped.
# Run every convolution on PyTorch's own kernels instead of cuDNN, which sets a convolution up
# anew at each input size it has not seen; this pipeline brings a new size almost every iteration
# (MLLA-T on an H100: 2.58 s per iteration with cuDNN, 0.31-0.33 s without; CudnnHook in
# mlla_det/engine/hooks.py). Back to cuDNN: --cfg-options custom_hooks.1.enabled=True
# The blocks as CUDA graphs in training, on bounded canvases (BlockGraphsHook; same outputs up to
# rounding): MLLA-T on an H100, 0.178 s per iteration instead of 0.219 (median), each new canvas
# costing ~2.5 s once, about 40 canvases in a run; evaluation runs the plain model; one GPU only
# unless told otherwise (benchmarks/README.md). Off: --cfg-options custom_hooks.2.enabled=False
# Dense convolutions as batched GEMMs (GemmConvHook; same function, tests/test_gemm_conv.py):
# without cuDNN, PyTorch's own path loops over the images (and the mask head's RoIs) one by one
# (MLLA-T on an H100: 4,196 kernel launches per iteration instead of 6,577, 0.27 s instead of 0.34;
# benchmarks/README.md).
# Off: --cfg-options custom_hooks.3.enabled=False
custom_hooks = [dict(type='RNGStateHook'), dict(type='CudnnHook', enabled=False),
                dict(type='BlockGraphsHook'), dict(type='GemmConvHook')]
