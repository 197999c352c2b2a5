"""LevelSortedRoIExtractor: mmdet's SingleRoIExtractor features and gradients, bit for bit."""
import os.path as osp

import pytest
import torch

import mlla_det  # noqa: F401,I001  (the mmcv stand-in: before anything imports mmdet's models)
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config

from mlla_det.models.roi_extractors import LevelSortedRoIExtractor

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
STRIDES = (4, 8, 16, 32)


def extractor_pair(name):
    """mmdet's extractor and ours from the configs' settings (name: bbox_ or mask_roi_extractor)."""
    register_all_modules(init_default_scope=True)
    settings = Config.fromfile(osp.join(REPO_ROOT, 'configs', '_base_', 'mask-rcnn_fpn_coco.py')).model.roi_head[name]
    assert settings['type'] == 'LevelSortedRoIExtractor'
    ours, mmdet_extractor = MODELS.build(settings), MODELS.build(dict(settings, type='SingleRoIExtractor'))
    assert type(ours) is LevelSortedRoIExtractor and type(mmdet_extractor).__name__ == 'SingleRoIExtractor'
    return mmdet_extractor, ours


def features_and_rois(generator, device, dtype, num_rois, sides=(8, 500), height=160, width=224):
    feats = [torch.randn(2, 256, height // s, width // s, generator=generator).to(device, dtype) for s in STRIDES]
    corner = torch.rand(num_rois, 2, generator=generator) * torch.tensor([width * 0.8, height * 0.8])
    size = sides[0] + torch.rand(num_rois, 2, generator=generator) * (sides[1] - sides[0])
    images = torch.randint(0, 2, (num_rois, 1), generator=generator).float()
    rois = torch.cat([images, corner, corner + size], 1).to(device)
    return feats, rois


def features_and_gradients(extractor, feats, rois, upstream, roi_scale_factor=None):
    inputs = [f.clone().requires_grad_() for f in feats]
    out = extractor(inputs, rois, roi_scale_factor)
    out.backward(upstream.to(out.dtype))
    return out.detach(), [f.grad for f in inputs]


def check_against_mmdet(device, dtype, gradient_tolerance=0.0):
    """Features bit for bit; gradients too where RoIAlign's backward sums in a fixed order (the
    CPU), within gradient_tolerance of the largest where it adds atomically (a GPU)."""
    generator = torch.Generator().manual_seed(0)
    for name in ('bbox_roi_extractor', 'mask_roi_extractor'):
        mmdet_extractor, ours = extractor_pair(name)
        # RoIs of every level; RoIs of the first levels only (the others unused); one RoI.
        for num_rois, sides, scale in ((300, (8, 500), None), (60, (4, 40), None), (1, (60, 90), None),
                                       (120, (8, 500), 1.5)):
            feats, rois = features_and_rois(generator, device, dtype, num_rois, sides)
            levels = mmdet_extractor.map_roi_levels(rois, len(STRIDES))
            size = 7 if name == 'bbox_roi_extractor' else 14
            upstream = torch.randn(num_rois, 256, size, size, generator=generator).to(device)
            expected, expected_grads = features_and_gradients(mmdet_extractor, feats, rois, upstream, scale)
            got, grads = features_and_gradients(ours, feats, rois, upstream, scale)
            assert got.dtype == expected.dtype == dtype and torch.equal(got, expected)
            assert got.abs().sum() > 0
            for level, (g, e) in enumerate(zip(grads, expected_grads)):
                assert g is not None and e is not None, level  # unused levels stay in the graph
                if gradient_tolerance:
                    assert torch.allclose(g.float(), e.float(), rtol=0,
                                          atol=gradient_tolerance * float(e.float().abs().max())), level
                else:
                    assert torch.equal(g, e), level
            if num_rois == 300:
                assert set(levels.tolist()) == {0, 1, 2, 3}
            elif num_rois == 60:
                assert 3 not in set(levels.tolist())


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16])
def test_the_same_features_and_gradients_as_mmdet(dtype):
    check_against_mmdet('cpu', dtype)


def test_no_rois_go_to_mmdet():
    mmdet_extractor, ours = extractor_pair('bbox_roi_extractor')
    feats, rois = features_and_rois(torch.Generator().manual_seed(1), 'cpu', torch.float32, 0)
    expected, expected_grads = features_and_gradients(mmdet_extractor, feats, rois, torch.zeros(0, 256, 7, 7))
    got, grads = features_and_gradients(ours, feats, rois, torch.zeros(0, 256, 7, 7))
    assert got.shape == expected.shape == (0, 256, 7, 7)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads))


@pytest.mark.gpu
@pytest.mark.parametrize('dtype, gradient_tolerance', [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_the_same_features_and_gradients_as_mmdet_on_the_gpu(dtype, gradient_tolerance):
    check_against_mmdet('cuda', dtype, gradient_tolerance)


@pytest.mark.gpu
def test_on_the_gpu_an_extraction_waits_for_the_gpu_once():
    from benchmarks.common import host_waits
    _, ours = extractor_pair('mask_roi_extractor')
    feats, rois = features_and_rois(torch.Generator().manual_seed(2), 'cuda', torch.float32, 300)
    with torch.no_grad(), host_waits() as waits:
        features = ours(feats, rois)
    assert len(waits) == 1, [str(w.message) for w in waits]
    assert features.shape == (300, 256, 14, 14)
