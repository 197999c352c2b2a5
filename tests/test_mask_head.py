"""DeviceTargetsFCNMaskHead: mmdet's FCNMaskHead mask targets, bit for bit, without the host."""
import numpy as np
import pytest
import torch

import mlla_det  # noqa: F401,I001  (the mmcv stand-in: before anything imports mmdet's models)
from mmdet.models.roi_heads.mask_heads import FCNMaskHead
from mmdet.structures.mask import BitmapMasks, PolygonMasks
from mmengine.config import ConfigDict
from mmengine.structures import InstanceData

from mlla_det.models.device_masks import DeviceBitmapMasks
from mlla_det.models.mask_head import DeviceTargetsFCNMaskHead

HEAD = dict(num_convs=1, in_channels=8, conv_out_channels=8, num_classes=3)


class Sampled:
    """The two fields of a SamplingResult that mask targets read."""

    def __init__(self, pos_priors, pos_assigned_gt_inds):
        self.pos_priors, self.pos_assigned_gt_inds = pos_priors, pos_assigned_gt_inds


def image(rng, device, height, width, num_masks, num_pos):
    masks = BitmapMasks((rng.random((num_masks, height, width)) > 0.6).astype(np.uint8), height, width)
    corners = rng.uniform(-20, [width, height], size=(num_pos, 2))
    sizes = rng.uniform(1, [width / 2, height / 2], size=(num_pos, 2))
    boxes = torch.tensor(np.concatenate([corners, corners + sizes], 1), dtype=torch.float32, device=device)
    indices = torch.tensor(rng.integers(0, max(num_masks, 1), size=num_pos), device=device)
    return Sampled(boxes, indices), InstanceData(masks=masks)


def copies(sampled):
    return [Sampled(s.pos_priors.clone(), s.pos_assigned_gt_inds.clone()) for s in sampled]


def check_against_mmdet(device):
    rng = np.random.default_rng(0)
    mmdet_head, ours = FCNMaskHead(**HEAD), DeviceTargetsFCNMaskHead(**HEAD)
    for soft in (False, True):
        cfg = ConfigDict(mask_size=28, soft_mask_target=soft)
        for shapes in (((60, 80, 3, 5), (50, 70, 1, 1)), ((64, 64, 2, 0), (90, 40, 4, 9))):
            sampled, instances = zip(*(image(rng, device, *shape) for shape in shapes))
            # Each head gets its own boxes: on the CPU mmdet clips them in place (a numpy view).
            expected = mmdet_head.get_targets(copies(sampled), list(instances), cfg)
            got = ours.get_targets(copies(sampled), list(instances), cfg)
            assert got.device == expected.device and got.dtype == expected.dtype == torch.float32
            assert torch.equal(got, expected)
            assert soft or set(got.unique().tolist()) <= {0.0, 1.0}
            # The masks as the data preprocessor leaves them (device_masks.py): already on the device.
            on_device = [InstanceData(masks=DeviceBitmapMasks.from_bitmap_masks(i.masks, device)) for i in instances]
            assert torch.equal(ours.get_targets(copies(sampled), on_device, cfg), expected)


def test_the_same_targets_as_mmdet():
    check_against_mmdet('cpu')


def test_polygon_masks_go_to_mmdet():
    rng = np.random.default_rng(1)
    sampled, _ = image(rng, 'cpu', 40, 40, 2, 3)
    polygons = PolygonMasks([[np.array([2.0, 2.0, 30.0, 2.0, 30.0, 30.0, 2.0, 30.0])]] * 2, 40, 40)
    cfg = ConfigDict(mask_size=14)
    expected = FCNMaskHead(**HEAD).get_targets(copies([sampled]), [InstanceData(masks=polygons)], cfg)
    got = DeviceTargetsFCNMaskHead(**HEAD).get_targets(copies([sampled]), [InstanceData(masks=polygons)], cfg)
    assert torch.equal(got, expected)


@pytest.mark.gpu
def test_on_the_gpu_the_same_targets_as_mmdet_without_waiting():
    check_against_mmdet('cuda')
    rng = np.random.default_rng(2)
    sampled, instances = image(rng, 'cuda', 800, 1216, 12, 128)
    cfg = ConfigDict(mask_size=28)
    head = DeviceTargetsFCNMaskHead(**HEAD)
    head.get_targets([sampled], [instances], cfg)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        head.get_targets([sampled], [instances], cfg)
    waits = [e.name for e in prof.events() if e.name in ('aten::_local_scalar_dense', 'cudaStreamSynchronize')]
    assert not waits, waits
