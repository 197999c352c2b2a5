"""LevelMergedRPNHead: mmdet's RPNHead losses and gradients from one loss over all levels."""
import os.path as osp

import pytest
import torch

import mlla_det  # noqa: F401,I001  (the mmcv stand-in: before anything imports mmdet's models)
from mmdet.models.dense_heads import RPNHead
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.structures import InstanceData

from mlla_det.models.rpn_head import LevelMergedRPNHead

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
STRIDES = (4, 8, 16, 32, 64)


def rpn_heads():
    """mmdet's RPNHead and ours, built from the configs' RPN settings, with the same weights."""
    register_all_modules(init_default_scope=True)
    model = Config.fromfile(osp.join(REPO_ROOT, 'configs', '_base_', 'mask-rcnn_fpn_coco.py')).model
    settings = dict(model.rpn_head, train_cfg=model.train_cfg.rpn, test_cfg=model.test_cfg.rpn)
    assert settings['type'] == 'LevelMergedRPNHead'
    ours = MODELS.build(settings)
    mmdet_head = MODELS.build(dict(settings, type='RPNHead'))
    assert type(ours) is LevelMergedRPNHead and type(mmdet_head) is RPNHead
    mmdet_head.load_state_dict(ours.state_dict())
    return mmdet_head, ours


def batch(generator, dtype, image_sizes=((224, 320), (200, 288)), boxes_per_image=(4, 1)):
    """Two images' FPN-like features (5 levels, padded to 32) and ground-truth boxes."""
    padded = (max(h for h, _ in image_sizes), max(w for _, w in image_sizes))
    features = [torch.randn(len(image_sizes), 256, -(-padded[0] // s), -(-padded[1] // s), generator=generator,
                            dtype=dtype) for s in STRIDES]
    metas, instances = [], []
    for (height, width), count in zip(image_sizes, boxes_per_image):
        metas.append(dict(img_shape=(height, width), pad_shape=padded, batch_input_shape=padded))
        corner = torch.rand(count, 2, generator=generator) * torch.tensor([width * 0.6, height * 0.6])
        size = torch.rand(count, 2, generator=generator) * torch.tensor([width * 0.4, height * 0.4]) + 8
        instances.append(InstanceData(bboxes=torch.cat([corner, corner + size], 1), labels=torch.zeros(count).long()))
    return features, metas, instances


def losses_and_grads(head, features, metas, instances, seed):
    head.zero_grad(set_to_none=True)
    inputs = [f.clone().requires_grad_() for f in features]
    torch.manual_seed(seed)  # the sampler's draws, alike for both heads
    cls_scores, bbox_preds = head(inputs)
    losses = head.loss_by_feat(cls_scores, bbox_preds, instances, metas)
    totals = {name: sum(value) if isinstance(value, list) else value for name, value in losses.items()}
    sum(totals.values()).backward()
    grads = [p.grad for p in head.parameters()] + [f.grad for f in inputs]
    return {name: float(value.detach()) for name, value in totals.items()}, grads, losses


# mmdet's sigmoid cross-entropy casts the labels, and with them the loss, to float32 even for
# float64 scores: the sums of both heads are then fp32 sums in different orders.
@pytest.mark.parametrize('dtype, tolerance', [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_the_same_losses_and_gradients_as_mmdet(dtype, tolerance):
    mmdet_head, ours = rpn_heads()
    mmdet_head, ours = mmdet_head.to(dtype), ours.to(dtype)
    generator = torch.Generator().manual_seed(0)
    for seed in range(3):
        features, metas, instances = batch(generator, dtype)
        expected, expected_grads, mmdet_losses = losses_and_grads(mmdet_head, features, metas, instances, seed)
        got, grads, losses = losses_and_grads(ours, features, metas, instances, seed)
        assert isinstance(mmdet_losses['loss_rpn_cls'], list) and len(mmdet_losses['loss_rpn_cls']) == 5
        assert torch.is_tensor(losses['loss_rpn_cls']) and losses['loss_rpn_cls'].dim() == 0
        assert expected.keys() == got.keys() == {'loss_rpn_cls', 'loss_rpn_bbox'}
        for name in expected:
            assert got[name] == pytest.approx(expected[name], rel=tolerance), name
        assert expected['loss_rpn_bbox'] > 0
        for expected_grad, grad in zip(expected_grads, grads):
            assert torch.allclose(grad, expected_grad, rtol=tolerance, atol=tolerance * expected_grad.abs().max())


def test_an_image_without_boxes_trains_on_negatives_only():
    mmdet_head, ours = rpn_heads()
    features, metas, instances = batch(torch.Generator().manual_seed(1), torch.float64, boxes_per_image=(0, 0))
    mmdet_head, ours = mmdet_head.double(), ours.double()
    expected, _, _ = losses_and_grads(mmdet_head, features, metas, instances, 0)
    got, _, _ = losses_and_grads(ours, features, metas, instances, 0)
    assert got['loss_rpn_bbox'] == expected['loss_rpn_bbox'] == 0
    assert got['loss_rpn_cls'] == pytest.approx(expected['loss_rpn_cls'], rel=1e-6) and got['loss_rpn_cls'] > 0


def test_proposals_are_mmdets():
    mmdet_head, ours = rpn_heads()
    features, metas, _ = batch(torch.Generator().manual_seed(2), torch.float32)
    mmdet_head.eval(), ours.eval()
    with torch.no_grad():
        expected = mmdet_head.predict_by_feat(*mmdet_head(features), batch_img_metas=metas, rescale=False)
        got = ours.predict_by_feat(*ours(features), batch_img_metas=metas, rescale=False)
    for e, g in zip(expected, got):
        assert torch.equal(g.bboxes, e.bboxes) and torch.equal(g.scores, e.scores)
