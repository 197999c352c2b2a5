# Mask R-CNN, MLLA-B (width 96, MLLA-S's depths, 3..24 heads), 1x schedule.
_base_ = './mask-rcnn_mlla-t_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        embed_dim=96,
        depths=[3, 6, 21, 6],
        num_heads=[3, 6, 12, 24],
        init_cfg=dict(checkpoint='data/MLLA_B.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))
