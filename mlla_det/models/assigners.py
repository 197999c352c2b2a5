"""MaxIoUAssigner without host synchronisation: mmdet's assignment, element for element.

mmdet's ``MaxIoUAssigner.assign_wrt_overlaps`` matches low-quality boxes in a Python loop over the
ground-truth boxes with an ``if`` on a GPU value in each turn, and assigns through boolean masks and
``nonzero``: every image of every iteration waits for the GPU once per ground-truth box, twice over
in Mask R-CNN (the RPN's and the RoI head's assigner). The loop's effect has a closed form: an
anchor matched by several boxes keeps the last one, so it takes the largest matching index.

``assign_valid`` assigns a subset of the priors, given as a mask, without cutting it out (which
waits for the GPU): the others get an overlap of -1 with every box, as mmdet's ignored priors do,
so that no box counts them among its best matches, and end up unassigned.
"""
from typing import Optional

import torch
from mmdet.models.task_modules.assigners import AssignResult, MaxIoUAssigner
from mmdet.registry import TASK_UTILS
from mmengine.structures import InstanceData

__all__ = ['SyncFreeMaxIoUAssigner']


@TASK_UTILS.register_module()
class SyncFreeMaxIoUAssigner(MaxIoUAssigner):
    """``MaxIoUAssigner`` with the same arguments and results (tests/test_assigners.py), assigned
    with tensor operations only: no host synchronisation, a fixed number of launches whatever the
    number of ground-truth boxes."""

    def assign_wrt_overlaps(self, overlaps: torch.Tensor, gt_labels: torch.Tensor) -> AssignResult:
        num_gts, num_boxes = overlaps.shape
        if num_gts == 0 or num_boxes == 0:
            return super().assign_wrt_overlaps(overlaps, gt_labels)

        max_overlaps, argmax_overlaps = overlaps.max(dim=0)
        gt_max_overlaps, gt_argmax_overlaps = overlaps.max(dim=1)

        if isinstance(self.neg_iou_thr, float):
            negative = (max_overlaps >= 0) & (max_overlaps < self.neg_iou_thr)
        elif isinstance(self.neg_iou_thr, tuple) and len(self.neg_iou_thr) == 2:
            negative = (max_overlaps >= self.neg_iou_thr[0]) & (max_overlaps < self.neg_iou_thr[1])
        else:
            raise ValueError(f'neg_iou_thr must be a float or a (low, high) tuple, got {self.neg_iou_thr!r}')
        unassigned = torch.full_like(argmax_overlaps, -1)
        assigned_gt_inds = torch.where(negative, torch.zeros_like(unassigned), unassigned)
        assigned_gt_inds = torch.where(max_overlaps >= self.pos_iou_thr, argmax_overlaps + 1, assigned_gt_inds)

        if self.match_low_quality:
            gt_numbers = torch.arange(1, num_gts + 1, device=overlaps.device, dtype=torch.int32)
            qualified = gt_max_overlaps >= self.min_pos_iou
            if self.gt_max_assign_all:
                # Each qualified box claims every anchor at its own maximum IoU.
                claims = (overlaps == gt_max_overlaps[:, None]) & qualified[:, None]
                claimed_by = torch.where(claims, gt_numbers[:, None], 0).amax(dim=0).long()
            else:
                # Each qualified box claims its first anchor of maximum IoU.
                claimed_by = torch.zeros_like(assigned_gt_inds).scatter_reduce(
                    0, gt_argmax_overlaps, torch.where(qualified, gt_numbers, 0).long(), reduce='amax')
            assigned_gt_inds = torch.where(claimed_by > 0, claimed_by, assigned_gt_inds)

        gt_of_each = gt_labels[(assigned_gt_inds - 1).clamp(min=0)].long()
        assigned_labels = torch.where(assigned_gt_inds > 0, gt_of_each, -1)
        return AssignResult(num_gts=num_gts, gt_inds=assigned_gt_inds, max_overlaps=max_overlaps,
                            labels=assigned_labels)

    def can_assign_valid(self, gt_instances: InstanceData) -> bool:
        """Whether assign_valid applies: not when mmdet would move the work to the CPU or permute
        repeated boxes."""
        return self.perm_repeat_gt_cfg is None and not (
            self.gpu_assign_thr > 0 and gt_instances.bboxes.shape[0] > self.gpu_assign_thr)

    def assign_valid(self, pred_instances: InstanceData, gt_instances: InstanceData, valid: torch.Tensor,
                     gt_instances_ignore: Optional[InstanceData] = None) -> AssignResult:
        """mmdet's ``assign`` of the priors where `valid` (bool, one per prior) is true, in the
        index space of all the priors: the rest unassigned (-1). The same as assigning
        ``priors[valid]`` and scattering the result back, without the wait that cutting needs."""
        if not self.can_assign_valid(gt_instances):
            raise ValueError('assign_valid does not cover gpu_assign_thr or perm_repeat_gt_cfg; use assign')
        priors, gt_bboxes, gt_labels = pred_instances.priors, gt_instances.bboxes, gt_instances.labels
        overlaps = self.iou_calculator(gt_bboxes, priors)
        if (self.ignore_iof_thr > 0 and gt_instances_ignore is not None
                and gt_instances_ignore.bboxes.numel() > 0 and priors.numel() > 0):
            ignored = gt_instances_ignore.bboxes
            if self.ignore_wrt_candidates:
                ignore_max = self.iou_calculator(priors, ignored, mode='iof').max(dim=1).values
            else:
                ignore_max = self.iou_calculator(ignored, priors, mode='iof').max(dim=0).values
            overlaps = overlaps.masked_fill(ignore_max[None, :] > self.ignore_iof_thr, -1)
        overlaps = overlaps.masked_fill(~valid[None, :], -1)
        result = self.assign_wrt_overlaps(overlaps, gt_labels)
        # Without boxes mmdet makes every prior a negative; the invalid ones stay out here too.
        result.gt_inds = torch.where(valid, result.gt_inds, -1)
        if result.labels is not None:
            result.labels = torch.where(valid, result.labels, -1)
        return result
