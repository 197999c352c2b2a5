# Mask R-CNN, MLLA-T, 3x schedule (36 epochs, steps at 27 and 33), stronger stochastic depth.
_base_ = './mask-rcnn_mlla-t_fpn_1x_coco.py'

model = dict(backbone=dict(drop_path_rate=0.3))

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
