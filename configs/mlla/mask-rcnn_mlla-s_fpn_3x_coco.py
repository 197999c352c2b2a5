# Mask R-CNN, MLLA-S, 3x schedule (36 epochs, steps at 27 and 33); drop path 0.3 as in the
# paper's mlla_s_mrcnn_3x config.
_base_ = './mask-rcnn_mlla-s_fpn_1x_coco.py'

model = dict(backbone=dict(drop_path_rate=0.3))

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
