"""mmdet's FCNMaskHead with its training targets cut out of the masks on the device.

mmdet's ``mask_target`` takes each image's positive proposals and their box indices to the host
(two waits for the GPU), clips the proposals in numpy, copies the image's masks to the GPU, cuts
and resizes them with RoIAlign there, copies the result back to the host as a boolean array and
then to the GPU again as floats. Here the same RoIAlign runs on the same clipped boxes without
leaving the device: the same targets bit for bit (tests/test_mask_head.py, CPU and GPU) and no
wait. Masks that the data preprocessor has put on the device already (DeviceBitmapMasks,
device_masks.py) are used where they are; mmdet's BitmapMasks are copied up from pinned memory.
"""
from typing import List

import torch
from mmcv.ops.roi_align import roi_align
from mmdet.models.roi_heads.mask_heads import FCNMaskHead
from mmdet.registry import MODELS
from mmdet.structures.mask import BitmapMasks
from torch.nn.modules.utils import _pair

from .device_masks import DeviceBitmapMasks

__all__ = ['DeviceTargetsFCNMaskHead', 'bitmap_mask_targets']


def _masks_on(device: torch.device, masks) -> torch.Tensor:
    if isinstance(masks, DeviceBitmapMasks):
        return masks.masks.to(device)
    # From pageable memory the upload waits for the GPU (a stream synchronisation in the copy);
    # from pinned memory it is queued like a kernel.
    host_masks = torch.from_numpy(masks.masks)
    if device.type == 'cuda':
        host_masks = host_masks.pin_memory()
    return host_masks.to(device, non_blocking=True)


def bitmap_mask_targets(boxes: torch.Tensor, mask_indices: torch.Tensor, masks, mask_size,
                        binarize: bool = True) -> torch.Tensor:
    """(N, *mask_size) float32 targets: masks[mask_indices[i]] (BitmapMasks or DeviceBitmapMasks)
    inside boxes[i] (clipped to the image), resized by RoIAlign (aligned, adaptive sampling, as
    mmdet's BitmapMasks do), then thresholded at 0.5 unless binarize is False. On boxes' device."""
    height, width = _pair(mask_size)
    if boxes.size(0) == 0 or len(masks) == 0:
        return boxes.new_zeros((0, height, width))
    clipped = boxes.clone()
    clipped[:, 0::2].clamp_(0, masks.width)
    clipped[:, 1::2].clamp_(0, masks.height)
    rois = torch.cat([torch.arange(boxes.size(0), device=boxes.device, dtype=boxes.dtype)[:, None], clipped], dim=1)
    chosen = _masks_on(boxes.device, masks).index_select(0, mask_indices).to(boxes.dtype)
    targets = roi_align(chosen[:, None], rois, (height, width), 1.0, 0, 'avg', True).squeeze(1)
    return (targets >= 0.5).float() if binarize else targets.float()


@MODELS.register_module()
class DeviceTargetsFCNMaskHead(FCNMaskHead):
    """``FCNMaskHead`` (same arguments, same targets and losses) whose ``get_targets`` stays on
    the device for bitmap masks (mmdet's or DeviceBitmapMasks); polygon masks go to mmdet's code."""

    def get_targets(self, sampling_results: List, batch_gt_instances: List, rcnn_train_cfg) -> torch.Tensor:
        masks = [instances.masks for instances in batch_gt_instances]
        if not all(isinstance(m, (BitmapMasks, DeviceBitmapMasks)) for m in masks):
            return super().get_targets(sampling_results, batch_gt_instances, rcnn_train_cfg)
        binarize = not rcnn_train_cfg.get('soft_mask_target', False)
        return torch.cat([
            bitmap_mask_targets(result.pos_priors, result.pos_assigned_gt_inds, image_masks,
                                rcnn_train_cfg.mask_size, binarize)
            for result, image_masks in zip(sampling_results, masks)])
