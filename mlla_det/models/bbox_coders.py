"""mmdet's DeltaXYWHBBoxCoder with fewer ops per call and no host-to-device copies.

mmdet's ``bbox2delta`` works coordinate by coordinate (sixteen column selections and as many
arithmetic ops on them), and both directions copy ``means`` and ``stds`` from Python lists to the
device at every call. Each image of each iteration encodes twice (the RPN's targets and the RoI
head's) and decodes once (the proposals). Here the x and y columns go together as pairs, and the
means and stds are made once per device and dtype. The arithmetic is mmdet's, op for op on each
element, so the results are the same bit for bit (tests/test_bbox_coders.py).
"""
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from mmdet.models.task_modules.coders import DeltaXYWHBBoxCoder
from mmdet.registry import TASK_UTILS
from mmdet.structures.bbox import HorizontalBoxes, get_box_tensor

__all__ = ['PairedDeltaXYWHBBoxCoder']


@TASK_UTILS.register_module()
class PairedDeltaXYWHBBoxCoder(DeltaXYWHBBoxCoder):
    """``DeltaXYWHBBoxCoder`` (same arguments and results) computing on (x, y) and (w, h) pairs.
    Batched (3-d) decoding, the centre clamp of YOLOF and ONNX export go to mmdet's code."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._normalisers: Dict[Tuple[torch.dtype, torch.device], Tuple[torch.Tensor, torch.Tensor]] = {}

    def _means_stds(self, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        key = (like.dtype, like.device)
        normalisers = self._normalisers.get(key)
        if normalisers is None:
            normalisers = self._normalisers[key] = (
                torch.tensor(self.means, dtype=like.dtype).view(1, 4).to(like.device),
                torch.tensor(self.stds, dtype=like.dtype).view(1, 4).to(like.device))
        return normalisers

    def encode(self, bboxes, gt_bboxes) -> torch.Tensor:
        boxes, targets = get_box_tensor(bboxes), get_box_tensor(gt_bboxes)
        if boxes.shape != targets.shape or boxes.shape[-1] != 4:
            raise ValueError(f'encode expects boxes and targets of one shape (..., 4), got '
                             f'{tuple(boxes.shape)} and {tuple(targets.shape)}')
        boxes, targets = boxes.float(), targets.float()
        box_centres = (boxes[..., :2] + boxes[..., 2:]) * 0.5
        box_sizes = boxes[..., 2:] - boxes[..., :2]
        target_centres = (targets[..., :2] + targets[..., 2:]) * 0.5
        target_sizes = targets[..., 2:] - targets[..., :2]
        deltas = torch.cat([(target_centres - box_centres) / box_sizes,
                            torch.log(target_sizes / box_sizes)], dim=-1)
        means, stds = self._means_stds(deltas)
        return deltas.sub_(means).div_(stds)

    def decode(self, bboxes, pred_bboxes: torch.Tensor, max_shape: Optional[Sequence[int]] = None,
               wh_ratio_clip: float = 16 / 1000) -> Union[torch.Tensor, HorizontalBoxes]:
        if pred_bboxes.ndim != 2 or self.add_ctr_clamp or torch.onnx.is_in_onnx_export():
            return super().decode(bboxes, pred_bboxes, max_shape, wh_ratio_clip)
        rois = get_box_tensor(bboxes)
        if pred_bboxes.size(0) != rois.size(0):
            raise ValueError(f'decode expects one delta row per box, got {pred_bboxes.size(0)} rows '
                             f'for {rois.size(0)} boxes')
        decoded = pred_bboxes if pred_bboxes.size(0) == 0 else self._decode(rois, pred_bboxes, max_shape,
                                                                            wh_ratio_clip)
        if self.use_box_type:
            if decoded.size(-1) != 4:
                raise ValueError('boxes decoded per class (N, num_classes * 4) cannot be wrapped in a box type')
            decoded = HorizontalBoxes(decoded)
        return decoded

    def _decode(self, rois: torch.Tensor, pred_bboxes: torch.Tensor, max_shape, wh_ratio_clip: float):
        num_boxes, num_classes = pred_bboxes.size(0), pred_bboxes.size(1) // 4
        means, stds = self._means_stds(pred_bboxes)
        deltas = pred_bboxes.reshape(-1, 4) * stds + means
        rois = rois.repeat(1, num_classes).reshape(-1, 4)
        centres = (rois[:, :2] + rois[:, 2:]) * 0.5
        sizes = rois[:, 2:] - rois[:, :2]
        max_log_ratio = float(np.abs(np.log(wh_ratio_clip)))  # as mmdet computes it
        new_centres = centres + sizes * deltas[:, :2]
        new_sizes = sizes * deltas[:, 2:].clamp(min=-max_log_ratio, max=max_log_ratio).exp()
        half_sizes = new_sizes * 0.5
        boxes = torch.cat([new_centres - half_sizes, new_centres + half_sizes], dim=-1)
        if self.clip_border and max_shape is not None:
            boxes[:, 0::2].clamp_(min=0, max=max_shape[1])
            boxes[:, 1::2].clamp_(min=0, max=max_shape[0])
        return boxes.reshape(num_boxes, -1)
