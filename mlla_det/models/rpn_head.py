"""mmdet's RPNHead with its training losses computed once over all levels instead of per level.

mmdet's ``AnchorHead.loss_by_feat`` assigns targets per image on all levels' anchors together, then
splits them into levels (``images_to_levels``) and runs the classification and regression losses
once per level: five times the reshapes, the sigmoid cross-entropy's label expansion, the L1 loss
and their reductions, each a handful of launches and autograd nodes. A level's loss is a sum over
its anchors divided by the images' common ``avg_factor``, so the sum over levels is one sum over
every anchor: the same loss up to the order of the floating-point sum (tests/test_rpn_head.py).
"""
from typing import List, Optional

import torch
from mmdet.models.dense_heads import RPNHead
from mmdet.models.utils import multi_apply
from mmdet.registry import MODELS
from mmdet.structures.bbox import cat_boxes

__all__ = ['LevelMergedRPNHead']


@MODELS.register_module()
class LevelMergedRPNHead(RPNHead):
    """``RPNHead`` (same arguments, same proposals) whose ``loss_by_feat`` returns one
    classification and one regression loss over all levels instead of a list of five."""

    def loss_by_feat(self, cls_scores: List[torch.Tensor], bbox_preds: List[torch.Tensor], batch_gt_instances,
                     batch_img_metas: List[dict], batch_gt_instances_ignore: Optional[list] = None) -> dict:
        if self.reg_decoded_bbox:
            return super().loss_by_feat(cls_scores, bbox_preds, batch_gt_instances, batch_img_metas,
                                        batch_gt_instances_ignore)
        num_images = len(batch_img_metas)
        featmap_sizes = [score.shape[-2:] for score in cls_scores]
        anchor_list, valid_flag_list = self.get_anchors(featmap_sizes, batch_img_metas, device=cls_scores[0].device)
        if batch_gt_instances_ignore is None:
            batch_gt_instances_ignore = [None] * num_images
        # The targets of each image over all its levels, in the level-major order of its anchors.
        (labels, label_weights, bbox_targets, bbox_weights, _, _, sampling_results) = multi_apply(
            self._get_targets_single, [cat_boxes(anchors) for anchors in anchor_list],
            [torch.cat(flags) for flags in valid_flag_list], batch_gt_instances, batch_img_metas,
            batch_gt_instances_ignore, unmap_outputs=True)
        avg_factor = sum(result.avg_factor for result in sampling_results)
        self._raw_positive_infos.update(sampling_results=sampling_results)

        # The predictions in the same order: per image, level after level, each level (H, W, A).
        scores = torch.cat([score.permute(0, 2, 3, 1).reshape(num_images, -1, self.cls_out_channels)
                            for score in cls_scores], dim=1)
        deltas = torch.cat([pred.permute(0, 2, 3, 1).reshape(num_images, -1, self.bbox_coder.encode_size)
                            for pred in bbox_preds], dim=1)
        loss_cls = self.loss_cls(scores.reshape(-1, self.cls_out_channels), torch.cat(labels),
                                 torch.cat(label_weights), avg_factor=avg_factor)
        loss_bbox = self.loss_bbox(deltas.reshape(-1, self.bbox_coder.encode_size), torch.cat(bbox_targets),
                                   torch.cat(bbox_weights), avg_factor=avg_factor)
        return dict(loss_rpn_cls=loss_cls, loss_rpn_bbox=loss_bbox)
