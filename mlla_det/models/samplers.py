"""mmdet's RandomSampler with its random permutation drawn where the indices live, and one host
synchronisation per sampling instead of four.

mmdet's ``RandomSampler.random_choice`` draws ``torch.randperm`` of the whole gallery on the CPU
(a workaround for an old CUDA randperm bug, open-mmlab/mmdetection#5014, fixed in PyTorch long
since) and copies the first ``num`` to the GPU. The RPN's gallery is every negative anchor of an
image, 100-250 thousand at the 1x pipeline's sizes: a host-side shuffle of that length per image
and sampler, 8.6-14 ms of host time per iteration on an H100 host (benchmarks/README.md).

mmdet's ``BaseSampler.sample`` then waits for the GPU four times: a ``nonzero`` for the positives
and one for the negatives, whose sizes the host needs, and a ``unique`` of each sample (against
duplicates that a draw without replacement cannot give). Here both sizes come back in one
transfer, the indices are gathered at that known size (``nonzero_static``), and the drawn ones
are sorted, which is what ``unique`` returns for distinct values: the same samples.
"""
from typing import Union

import numpy as np
import torch
from mmdet.models.task_modules.assigners import AssignResult
from mmdet.models.task_modules.samplers import RandomSampler, SamplingResult
from mmdet.registry import TASK_UTILS
from mmdet.structures.bbox import BaseBoxes, cat_boxes
from mmengine.structures import InstanceData

__all__ = ['DeviceRandomSampler']


@TASK_UTILS.register_module()
class DeviceRandomSampler(RandomSampler):
    """``RandomSampler`` (same arguments) whose permutation is drawn on the gallery's device from
    that device's generator. On the CPU it draws exactly what mmdet's does; on a GPU the same
    distribution (a uniform subset without replacement) from the CUDA generator, which
    RNGStateHook keeps in checkpoints like the CPU's. ``sample`` synchronises once."""

    def sample(self, assign_result: AssignResult, pred_instances: InstanceData, gt_instances: InstanceData,
               **kwargs) -> SamplingResult:
        priors, gt_bboxes, gt_labels = pred_instances.priors, gt_instances.bboxes, gt_instances.labels
        if len(priors.shape) < 2:
            priors = priors[None, :]
        gt_flags = priors.new_zeros((priors.shape[0],), dtype=torch.uint8)
        if self.add_gt_as_proposals and len(gt_bboxes) > 0:
            gt_priors = gt_bboxes
            if isinstance(gt_bboxes, BaseBoxes) and isinstance(priors, BaseBoxes):
                gt_priors = gt_bboxes.convert_to(type(priors))
            priors = cat_boxes([gt_priors, priors], dim=0)
            assign_result.add_gt_(gt_labels)
            gt_flags = torch.cat([priors.new_ones(gt_priors.shape[0], dtype=torch.uint8), gt_flags])

        positive, negative = assign_result.gt_inds > 0, assign_result.gt_inds == 0
        num_positive, num_negative = torch.stack([positive.sum(), negative.sum()]).tolist()  # the one wait
        pos_inds = self._draw(positive, num_positive, int(self.num * self.pos_fraction))
        num_expected_neg = self.num - pos_inds.numel()
        if self.neg_pos_ub >= 0:
            num_expected_neg = min(num_expected_neg, int(self.neg_pos_ub * max(1, pos_inds.numel())))
        neg_inds = self._draw(negative, num_negative, num_expected_neg)
        return SamplingResult(pos_inds=pos_inds, neg_inds=neg_inds, priors=priors, gt_bboxes=gt_bboxes,
                              assign_result=assign_result, gt_flags=gt_flags)

    def _draw(self, members: torch.Tensor, count: int, num_expected: int) -> torch.Tensor:
        """The indices of `members` (bool, `count` of them true), all of them in order if there are
        no more than num_expected, else num_expected of them drawn at random, sorted."""
        indices = torch.nonzero_static(members, size=count).squeeze(1)
        if count <= num_expected:
            return indices
        return self.random_choice(indices, num_expected).sort().values

    def random_choice(self, gallery: Union[torch.Tensor, np.ndarray, list], num: int):
        if not isinstance(gallery, torch.Tensor):
            return super().random_choice(gallery, num)
        if num > gallery.numel():
            raise ValueError(f'cannot sample {num} of a gallery of {gallery.numel()} indices')
        return gallery[torch.randperm(gallery.numel(), device=gallery.device)[:num]]
