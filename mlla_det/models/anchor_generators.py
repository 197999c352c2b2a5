"""mmdet's AnchorGenerator with its grids kept on the device: the same anchors and flags, fewer launches.

mmdet builds each level's anchors from scratch at every call: the base anchors copied to the GPU,
two aranges, a meshgrid by repeats, a stack, an add, about twenty launches a level, five levels,
twice an iteration (targets and proposals), and the valid flags the same way for every image.
An anchor depends on its grid position only, not on the grid's size, so one grid as large as any
seen so far serves every smaller feature map as its top-left corner.
"""
from typing import Dict, Tuple

import torch
from mmdet.models.task_modules.prior_generators import AnchorGenerator
from mmdet.registry import TASK_UTILS
from mmdet.structures.bbox import HorizontalBoxes

__all__ = ['CachedAnchorGenerator']


@TASK_UTILS.register_module()
class CachedAnchorGenerator(AnchorGenerator):
    """``AnchorGenerator`` (same arguments, same anchors and valid flags bit for bit:
    tests/test_anchor_generators.py) that keeps, per level, dtype and device, the anchors of the
    largest feature map seen so far and cuts smaller maps' anchors out of it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._grids: Dict[tuple, torch.Tensor] = {}   # (level, dtype, device) -> (H, W, A, 4)
        self._positions: Dict[tuple, torch.Tensor] = {}  # (device, length) -> arange(length)

    def _grid(self, level_idx: int, feat_h: int, feat_w: int, dtype, device) -> torch.Tensor:
        key = (level_idx, dtype, torch.device(device))
        grid = self._grids.get(key)
        if grid is None or grid.shape[0] < feat_h or grid.shape[1] < feat_w:
            height = max(feat_h, grid.shape[0] if grid is not None else 0)
            width = max(feat_w, grid.shape[1] if grid is not None else 0)
            # mmdet's arithmetic, on the larger grid: the values at each position do not change.
            anchors = super().single_level_grid_priors((height, width), level_idx, dtype=dtype, device=device)
            if self.use_box_type:
                anchors = anchors.tensor
            grid = self._grids[key] = anchors.view(height, width, -1, 4)
        return grid

    def single_level_grid_priors(self, featmap_size: Tuple[int, int], level_idx: int,
                                 dtype: torch.dtype = torch.float32, device='cuda'):
        feat_h, feat_w = featmap_size
        grid = self._grid(level_idx, feat_h, feat_w, dtype, device)
        anchors = grid[:feat_h, :feat_w].reshape(-1, 4)
        if anchors.data_ptr() == grid.data_ptr():
            anchors = anchors.clone()  # callers own what they get, as with mmdet's
        return HorizontalBoxes(anchors) if self.use_box_type else anchors

    def _arange(self, length: int, device) -> torch.Tensor:
        key = (torch.device(device), length)
        positions = self._positions.get(key)
        if positions is None:
            positions = self._positions[key] = torch.arange(length, device=device)
        return positions

    def single_level_valid_flags(self, featmap_size: Tuple[int, int], valid_size: Tuple[int, int],
                                 num_base_anchors: int, device='cuda') -> torch.Tensor:
        feat_h, feat_w = featmap_size
        valid_h, valid_w = valid_size
        if not (valid_h <= feat_h and valid_w <= feat_w):
            raise ValueError(f'valid size {valid_size} exceeds the feature map {featmap_size}')
        valid = (self._arange(feat_h, device) < valid_h)[:, None] & (self._arange(feat_w, device) < valid_w)
        return valid[:, :, None].expand(feat_h, feat_w, num_base_anchors).reshape(-1)
