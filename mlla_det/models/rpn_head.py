"""mmdet's RPNHead with its training losses computed once over all levels instead of per level,
and its proposals selected for all images and levels at once.

mmdet's ``AnchorHead.loss_by_feat`` assigns targets per image on all levels' anchors together, then
splits them into levels (``images_to_levels``) and runs the classification and regression losses
once per level: five times the reshapes, the sigmoid cross-entropy's label expansion, the L1 loss
and their reductions, each a handful of launches and autograd nodes. A level's loss is a sum over
its anchors divided by the images' common ``avg_factor``, so the sum over levels is one sum over
every anchor: the same loss up to the order of the floating-point sum (tests/test_rpn_head.py).

mmdet's ``predict_by_feat`` loops over the images and, inside, over the levels: per image and level
a permute, a sigmoid, a sort and three gathers, then per image a decode, the small-box filter
(a host synchronisation) and the NMS, about 170 aten calls per image. The images of a batch share
their padded feature maps, so every level keeps the same number of anchors in each image: the
sort, the gathers and the decode run once per level over the batch (a sort along a row gives that
row's order whatever the other rows hold), and only the NMS, whose output length varies, stays per
image. The proposals are mmdet's bit for bit (tests/test_rpn_head.py).

mmdet's ``AnchorHead._get_targets_single`` cuts each image's valid anchors out (a ``nonzero``, after
an ``any()`` that only checks there are some), assigns and samples them, and scatters the targets
back with four ``unmap``s: six waits for the GPU per image. Here the valid anchors are assigned in
place (``SyncFreeMaxIoUAssigner.assign_valid``), the sampler draws from the same galleries in
the same order, and the targets are written straight into full-size tensors: the same targets,
no wait but the sampler's one. The sampling result's indices count all the image's anchors
instead of its valid ones.
"""
from typing import List, Optional

import torch
from mmcv.ops import batched_nms
from mmdet.models.dense_heads import RPNHead
from mmdet.models.utils import multi_apply
from mmdet.registry import MODELS
from mmdet.structures.bbox import cat_boxes, empty_box_as
from mmengine.structures import InstanceData

from .assigners import SyncFreeMaxIoUAssigner

__all__ = ['LevelMergedRPNHead']


@MODELS.register_module()
class LevelMergedRPNHead(RPNHead):
    """``RPNHead`` (same arguments, same proposals) whose ``loss_by_feat`` returns one
    classification and one regression loss over all levels instead of a list of five, whose
    targets are made without cutting the valid anchors out, and whose ``predict_by_feat`` ranks,
    gathers and decodes all images' anchors level by level at once."""

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

    def _get_targets_single(self, flat_anchors, valid_flags: torch.Tensor, gt_instances: InstanceData,
                            img_meta: dict, gt_instances_ignore: Optional[InstanceData] = None,
                            unmap_outputs: bool = True) -> tuple:
        # The in-place path covers the configs' RPN: anchors as plain tensors, no border allowance
        # (the valid anchors are then exactly the valid flags), deltas as targets.
        if (self.train_cfg['allowed_border'] >= 0 or not unmap_outputs or self.reg_decoded_bbox
                or not isinstance(flat_anchors, torch.Tensor) or not isinstance(self.assigner, SyncFreeMaxIoUAssigner)
                or not self.assigner.can_assign_valid(gt_instances)):
            return super()._get_targets_single(flat_anchors, valid_flags, gt_instances, img_meta,
                                               gt_instances_ignore, unmap_outputs)
        # mmdet checks that some anchor is valid on the GPU; the valid flags come from the padded
        # shape (get_anchors), so some are valid unless that shape is empty.
        height, width = img_meta['pad_shape'][:2]
        if height <= 0 or width <= 0:
            raise ValueError(f'There is no valid anchor inside the image boundary: the padded image shape is '
                             f'{tuple(img_meta["pad_shape"])}; check the image size')
        pred_instances = InstanceData(priors=flat_anchors)
        assign_result = self.assigner.assign_valid(pred_instances, gt_instances, valid_flags, gt_instances_ignore)
        sampling_result = self.sampler.sample(assign_result, pred_instances, gt_instances)

        num_anchors = flat_anchors.shape[0]
        bbox_targets = flat_anchors.new_zeros(num_anchors, self.bbox_coder.encode_size)
        bbox_weights = flat_anchors.new_zeros(num_anchors, self.bbox_coder.encode_size)
        labels = flat_anchors.new_full((num_anchors,), self.num_classes, dtype=torch.long)
        label_weights = flat_anchors.new_zeros(num_anchors, dtype=torch.float)
        pos_inds, neg_inds = sampling_result.pos_inds, sampling_result.neg_inds
        if len(pos_inds) > 0:
            bbox_targets[pos_inds, :] = self.bbox_coder.encode(sampling_result.pos_priors,
                                                               sampling_result.pos_gt_bboxes)
            bbox_weights[pos_inds, :] = 1.0
            labels[pos_inds] = sampling_result.pos_gt_labels
            pos_weight = self.train_cfg['pos_weight']
            label_weights[pos_inds] = 1.0 if pos_weight <= 0 else pos_weight
        if len(neg_inds) > 0:
            label_weights[neg_inds] = 1.0
        return labels, label_weights, bbox_targets, bbox_weights, pos_inds, neg_inds, sampling_result

    def predict_by_feat(self, cls_scores: List[torch.Tensor], bbox_preds: List[torch.Tensor],
                        score_factors: Optional[List[torch.Tensor]] = None, batch_img_metas: Optional[List[dict]] = None,
                        cfg=None, rescale: bool = False, with_nms: bool = True) -> List[InstanceData]:
        cfg = self.test_cfg if cfg is None else cfg
        # What the batched path does not cover goes to mmdet's per-image code: rescaled boxes
        # (the two-stage detectors ask for none), softmax scores, box types, no NMS.
        if (score_factors is not None or rescale or not with_nms or not self.use_sigmoid_cls
                or self.cls_out_channels != 1 or self.bbox_coder.encode_size != 4
                or getattr(self.bbox_coder, 'use_box_type', False)):
            return super().predict_by_feat(cls_scores, bbox_preds, score_factors, batch_img_metas, cfg, rescale,
                                           with_nms)
        num_images = len(batch_img_metas)
        featmap_sizes = [score.shape[-2:] for score in cls_scores]
        mlvl_priors = self.prior_generator.grid_priors(featmap_sizes, dtype=cls_scores[0].dtype,
                                                       device=cls_scores[0].device)
        nms_pre = cfg.get('nms_pre', -1)
        level_scores, level_deltas, level_priors, level_ids = [], [], [], []
        for level, (score, deltas, priors) in enumerate(zip(cls_scores, bbox_preds, mlvl_priors)):
            # (B, A, H, W) -> (B, H * W * A): each row in the order of mmdet's per-image permute.
            score = score.detach().permute(0, 2, 3, 1).reshape(num_images, -1).sigmoid()
            deltas = deltas.detach().permute(0, 2, 3, 1).reshape(num_images, -1, 4)
            if 0 < nms_pre < score.shape[1]:
                ranked, order = score.sort(dim=1, descending=True)
                order = order[:, :nms_pre]
                score = ranked[:, :nms_pre]
                deltas = deltas.gather(1, order.unsqueeze(-1).expand(-1, -1, 4))
                priors = priors[order]
            else:
                priors = priors.expand(num_images, -1, -1)
            level_scores.append(score)
            level_deltas.append(deltas)
            level_priors.append(priors)
            level_ids.append(score.new_full((score.shape[1],), level, dtype=torch.long))
        scores = torch.cat(level_scores, dim=1)
        deltas = torch.cat(level_deltas, dim=1)
        priors = torch.cat(level_priors, dim=1)
        level_ids = torch.cat(level_ids)
        # Decoded without a border, then clipped per image as the coder's max_shape would.
        boxes = self.bbox_coder.decode(priors.reshape(-1, 4), deltas.reshape(-1, 4)).view(num_images, -1, 4)
        if self.bbox_coder.clip_border:
            for image_boxes, meta in zip(boxes, batch_img_metas):
                height, width = meta['img_shape'][:2]
                image_boxes[:, 0::2].clamp_(min=0, max=width)
                image_boxes[:, 1::2].clamp_(min=0, max=height)

        min_bbox_size = cfg.get('min_bbox_size', -1)
        valid = all_valid = None
        if min_bbox_size >= 0:
            valid = ((boxes[..., 2] - boxes[..., 0] > min_bbox_size)
                     & (boxes[..., 3] - boxes[..., 1] > min_bbox_size))
            all_valid = valid.all(dim=1).tolist()  # one synchronisation for the batch
        results = []
        for index in range(num_images):
            image_boxes, image_scores, image_levels = boxes[index], scores[index], level_ids
            if valid is not None and not all_valid[index]:
                keep = valid[index]
                image_boxes, image_scores, image_levels = image_boxes[keep], image_scores[keep], image_levels[keep]
            results.append(self._nms_single(image_boxes, image_scores, image_levels, cfg))
        return results

    @staticmethod
    def _nms_single(boxes: torch.Tensor, scores: torch.Tensor, level_ids: torch.Tensor, cfg) -> InstanceData:
        """The end of mmdet's ``RPNHead._bbox_post_process`` for one image: NMS within each level,
        the best ``max_per_img``, label 0."""
        result = InstanceData()
        if boxes.numel() == 0:
            result.bboxes = empty_box_as(boxes)
            result.scores = scores.new_zeros(0)
            result.labels = scores.new_zeros(0)  # as mmdet has it: float, for the empty case
            return result
        kept, keep = batched_nms(boxes, scores, level_ids, cfg.nms)
        result.bboxes = boxes[keep][:cfg.max_per_img]
        result.scores = kept[:cfg.max_per_img, -1]
        result.labels = result.scores.new_zeros(len(result.scores), dtype=torch.long)
        return result
