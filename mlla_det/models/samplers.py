"""mmdet's RandomSampler with its random permutation drawn where the indices live.

mmdet's ``RandomSampler.random_choice`` draws ``torch.randperm`` of the whole gallery on the CPU
(a workaround for an old CUDA randperm bug, open-mmlab/mmdetection#5014, fixed in PyTorch long
since) and copies the first ``num`` to the GPU. The RPN's gallery is every negative anchor of an
image, 100-250 thousand at the 1x pipeline's sizes: a host-side shuffle of that length per image
and sampler, 8.6-14 ms of host time per iteration on an H100 host (benchmarks/README.md).
"""
from typing import Union

import numpy as np
import torch
from mmdet.models.task_modules.samplers import RandomSampler
from mmdet.registry import TASK_UTILS

__all__ = ['DeviceRandomSampler']


@TASK_UTILS.register_module()
class DeviceRandomSampler(RandomSampler):
    """``RandomSampler`` (same arguments) whose permutation is drawn on the gallery's device from
    that device's generator. On the CPU it draws exactly what mmdet's does; on a GPU the same
    distribution (a uniform subset without replacement) from the CUDA generator, which
    RNGStateHook keeps in checkpoints like the CPU's."""

    def random_choice(self, gallery: Union[torch.Tensor, np.ndarray, list], num: int):
        if not isinstance(gallery, torch.Tensor):
            return super().random_choice(gallery, num)
        if num > gallery.numel():
            raise ValueError(f'cannot sample {num} of a gallery of {gallery.numel()} indices')
        return gallery[torch.randperm(gallery.numel(), device=gallery.device)[:num]]
