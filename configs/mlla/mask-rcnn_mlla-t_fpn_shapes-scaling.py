# The multi-GPU check of the shapes config: a total batch of 4 images, split 2 GPUs x 2 or run
# as 1 GPU x 4, for the same iterations, so that the loss curves can be laid side by side
# (benchmarks/scaling_2gpu.sh runs both; batch_size below is per GPU):
#   bash tools/dist_train.sh configs/mlla/mask-rcnn_mlla-t_fpn_shapes-scaling.py 2
#   python tools/train.py configs/mlla/mask-rcnn_mlla-t_fpn_shapes-scaling.py \
#       --cfg-options train_dataloader.batch_size=4
_base_ = './mask-rcnn_mlla-t_fpn_shapes.py'

max_iters = 500
warmup_iters = 100
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=warmup_iters, end=max_iters,
         T_max=max_iters - warmup_iters, eta_min_ratio=0.01),
]
# Half the base config's total batch (8), half its rate (linear scaling).
optim_wrapper = dict(optimizer=dict(lr=1e-4))
train_dataloader = dict(batch_size=2, num_workers=4)
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(interval=max_iters))
log_processor = dict(window_size=20)
