"""mmdet's SingleRoIExtractor with one host synchronisation per call instead of one per level.

mmdet's ``SingleRoIExtractor.forward`` finds each FPN level's RoIs with a ``nonzero``, which waits
for the GPU, then RoIAligns them and writes them back by index: four waits per call, two calls per
training iteration (the box and the mask head) and per evaluation image. Here the RoIs are sorted
by level once (stable, so each level keeps mmdet's order), the level sizes come back to the host in
one transfer, and each level RoIAligns its contiguous slice: the same RoIAlign on the same RoIs,
written to the same rows, so the features and their gradients are mmdet's bit for bit
(tests/test_roi_extractors.py).
"""
from typing import Optional, Tuple

import torch
from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor
from mmdet.registry import MODELS

__all__ = ['LevelSortedRoIExtractor']


@MODELS.register_module()
class LevelSortedRoIExtractor(SingleRoIExtractor):
    """``SingleRoIExtractor`` (same arguments, same features) that sorts the RoIs by level once
    instead of selecting each level's with a ``nonzero``."""

    def forward(self, feats: Tuple[torch.Tensor], rois: torch.Tensor,
                roi_scale_factor: Optional[float] = None) -> torch.Tensor:
        num_levels = len(feats)
        if num_levels == 1 or rois.size(0) == 0:
            return super().forward(feats, rois, roi_scale_factor)
        rois = rois.type_as(feats[0])  # bf16/fp16 under autocast, as mmdet does
        out_size = self.roi_layers[0].output_size
        target_levels = self.map_roi_levels(rois, num_levels)
        if roi_scale_factor is not None:
            rois = self.roi_rescale(rois, roi_scale_factor)
        # The level sizes by comparison, not bincount: on a GPU bincount waits for its input's max.
        levels = torch.arange(num_levels, device=target_levels.device)
        counts = (target_levels[None, :] == levels[:, None]).sum(dim=1).tolist()  # the one synchronisation
        order = torch.argsort(target_levels, stable=True)
        level_rois = rois[order].split(counts)
        roi_feats = feats[0].new_zeros(rois.size(0), self.out_channels, *out_size)
        pieces = []
        for level, (count, level_feats) in enumerate(zip(counts, feats)):
            if count:
                pieces.append(self.roi_layers[level](level_feats, level_rois[level]))
            else:
                # mmdet keeps an unused level in the autograd graph (a zero added to every RoI's
                # features), so that under DDP every process reduces the same gradients.
                roi_feats += sum(x.view(-1)[0] for x in self.parameters()) * 0. + level_feats.sum() * 0.
        roi_feats[order] = torch.cat(pieces)
        return roi_feats
