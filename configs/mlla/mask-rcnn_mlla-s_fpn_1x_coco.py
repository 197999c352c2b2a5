# Mask R-CNN, MLLA-S (MLLA-T's widths, deeper stages), 1x schedule.
_base_ = './mask-rcnn_mlla-t_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        depths=[3, 6, 21, 6],
        init_cfg=dict(checkpoint='data/MLLA_S.pth')))
