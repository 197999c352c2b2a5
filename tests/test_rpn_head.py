"""LevelMergedRPNHead: mmdet's RPNHead losses and gradients from one loss over all levels."""
import os.path as osp

import pytest
import torch

import mlla_det  # noqa: F401,I001  (the mmcv stand-in: before anything imports mmdet's models)
from mmdet.models.dense_heads import RPNHead
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config, ConfigDict
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


@pytest.mark.parametrize('boxes_per_image', [(6, 2), (3, 0)])
def test_targets_of_the_valid_anchors_assigned_in_place_are_mmdets(boxes_per_image):
    """Each image's anchors outside its own padded shape (the batch pads to the largest) are
    invalid: mmdet cuts the valid ones out, ours assigns them in place; the same targets."""
    mmdet_head, ours = rpn_heads()
    assert ours.train_cfg['allowed_border'] < 0  # the in-place path, not mmdet's
    generator = torch.Generator().manual_seed(sum(boxes_per_image))
    sizes = ((224, 320), (130, 200))
    features, metas, instances = batch(generator, torch.float32, image_sizes=sizes, boxes_per_image=boxes_per_image)
    for meta, (height, width) in zip(metas, sizes):
        meta['pad_shape'] = (-(-height // 32) * 32, -(-width // 32) * 32)
    featmap_sizes = [f.shape[-2:] for f in features]
    anchors, flags = ours.get_anchors(featmap_sizes, metas, device='cpu')
    for index, (meta, image_instances) in enumerate(zip(metas, instances)):
        flat_anchors, valid = torch.cat(anchors[index]), torch.cat(flags[index])
        torch.manual_seed(index)
        expected = mmdet_head._get_targets_single(flat_anchors, valid, image_instances, meta)
        torch.manual_seed(index)
        got = ours._get_targets_single(flat_anchors, valid, image_instances, meta)
        for name, e, g in zip(('labels', 'label_weights', 'bbox_targets', 'bbox_weights'), expected[:4], got[:4]):
            assert e.dtype == g.dtype and torch.equal(e, g), name
        e_result, g_result = expected[-1], got[-1]
        assert torch.equal(g_result.pos_priors, e_result.pos_priors)
        assert torch.equal(g_result.neg_priors, e_result.neg_priors)
        assert g_result.avg_factor == e_result.avg_factor
        assert (got[1] > 0).sum() == 256 or not bool(valid.all())
        if index == 1:
            assert not bool(valid.all())  # the smaller image has invalid anchors
        if len(image_instances) > 0:
            assert (got[0] == 0).any()  # positives


@pytest.mark.gpu
def test_on_the_gpu_the_rpn_loss_waits_once_per_image_and_twice_for_its_losses():
    """The sampler's one wait per image, and mmdet's two in the losses (the sigmoid cross-entropy's
    label expansion, the L1 loss's check for any weight); the targets add none."""
    from benchmarks.common import host_waits
    _, ours = rpn_heads()
    ours = ours.cuda()
    generator = torch.Generator().manual_seed(4)
    sizes = ((224, 320), (130, 200))
    features, metas, instances = batch(generator, torch.float32, image_sizes=sizes, boxes_per_image=(6, 2))
    for meta, (height, width) in zip(metas, sizes):
        meta['pad_shape'] = (-(-height // 32) * 32, -(-width // 32) * 32)
    features = [f.cuda() for f in features]
    instances = [i.to('cuda') for i in instances]
    cls_scores, bbox_preds = ours(features)
    with host_waits() as waits:
        losses = ours.loss_by_feat(cls_scores, bbox_preds, instances, metas)
    assert len(waits) <= len(metas) + 2, [str(w.message) for w in waits]
    assert float(losses['loss_rpn_bbox']) > 0


def test_an_image_without_boxes_trains_on_negatives_only():
    mmdet_head, ours = rpn_heads()
    features, metas, instances = batch(torch.Generator().manual_seed(1), torch.float64, boxes_per_image=(0, 0))
    mmdet_head, ours = mmdet_head.double(), ours.double()
    expected, _, _ = losses_and_grads(mmdet_head, features, metas, instances, 0)
    got, _, _ = losses_and_grads(ours, features, metas, instances, 0)
    assert got['loss_rpn_bbox'] == expected['loss_rpn_bbox'] == 0
    assert got['loss_rpn_cls'] == pytest.approx(expected['loss_rpn_cls'], rel=1e-6) and got['loss_rpn_cls'] > 0


def proposals(head, features, metas, cfg, rescale=False):
    head.eval()
    with torch.no_grad():
        return head.predict_by_feat(*head(features), batch_img_metas=metas, cfg=cfg, rescale=rescale)


def assert_same_proposals(expected, got):
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert set(g.keys()) == set(e.keys()) == {'bboxes', 'scores', 'labels'}
        for key in ('bboxes', 'scores', 'labels'):
            assert g[key].dtype == e[key].dtype and torch.equal(g[key], e[key]), key


# The RPN's proposals in training (rpn_proposal) and testing (test_cfg.rpn), and with a small-box
# filter that removes some of them; bf16 is the features' dtype under the configs' autocast.
@pytest.mark.parametrize('stage', ['train', 'test', 'min_bbox_size'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_proposals_are_mmdets_bit_for_bit(stage, dtype):
    check_proposals(stage, dtype, 'cpu')


# On a GPU the batch's sort along rows and mmdet's sort of each image's scores must give each
# row the same order, ties in bf16 included.
@pytest.mark.gpu
@pytest.mark.parametrize('stage', ['train', 'min_bbox_size'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_proposals_are_mmdets_bit_for_bit_on_the_gpu(stage, dtype):
    check_proposals(stage, dtype, 'cuda')


def check_proposals(stage, dtype, device):
    mmdet_head, ours = rpn_heads()
    mmdet_head, ours = mmdet_head.to(device, dtype), ours.to(device, dtype)
    model = Config.fromfile(osp.join(REPO_ROOT, 'configs', '_base_', 'mask-rcnn_fpn_coco.py')).model
    cfg = model.train_cfg.rpn_proposal if stage == 'train' else ours.test_cfg
    assert cfg.nms_pre < 224 * 320 // 16 * 3  # the first levels are ranked and cut, the last not
    if stage == 'min_bbox_size':
        cfg = ConfigDict(cfg, min_bbox_size=12)
    generator = torch.Generator().manual_seed(2)
    for _ in range(2):
        features, metas, _ = batch(generator, dtype, image_sizes=((224, 320), (160, 288), (224, 192)),
                                   boxes_per_image=(1, 1, 1))
        features = [f.to(device) for f in features]
        expected = proposals(mmdet_head, features, metas, cfg)
        got = proposals(ours, features, metas, cfg)
        assert_same_proposals(expected, got)
        assert all(len(result) > 100 for result in got)
        if stage == 'min_bbox_size':  # the filter removes boxes that the unfiltered proposals hold
            def smallest_side(results):
                return min(float(torch.minimum(r.bboxes[:, 2] - r.bboxes[:, 0], r.bboxes[:, 3] - r.bboxes[:, 1]).min())
                           for r in results)
            assert smallest_side(got) > 12 >= smallest_side(proposals(ours, features, metas, ours.test_cfg))


def test_proposals_when_every_box_is_filtered_out_or_rescaled():
    mmdet_head, ours = rpn_heads()
    features, metas, _ = batch(torch.Generator().manual_seed(3), torch.float32)
    cfg = ConfigDict(ours.test_cfg, min_bbox_size=10_000)
    expected, got = proposals(mmdet_head, features, metas, cfg), proposals(ours, features, metas, cfg)
    assert all(len(result) == 0 for result in got)
    for e, g in zip(expected, got):
        assert g.bboxes.shape == e.bboxes.shape == (0, 4)
        assert g.labels.dtype == e.labels.dtype and g.scores.dtype == e.scores.dtype
    for meta in metas:
        meta['scale_factor'] = (0.5, 0.75)
    assert_same_proposals(proposals(mmdet_head, features, metas, ours.test_cfg, rescale=True),
                          proposals(ours, features, metas, ours.test_cfg, rescale=True))
