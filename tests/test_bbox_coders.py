"""PairedDeltaXYWHBBoxCoder gives mmdet's DeltaXYWHBBoxCoder results bit for bit."""
import pytest
import torch

import mlla_det  # noqa: F401,I001  (the mmcv stand-in: before anything imports mmdet's models)
from mmdet.models.task_modules.coders import DeltaXYWHBBoxCoder
from mmdet.structures.bbox import HorizontalBoxes

from mlla_det.models.bbox_coders import PairedDeltaXYWHBBoxCoder

RPN = dict(target_means=[0.0, 0.0, 0.0, 0.0], target_stds=[1.0, 1.0, 1.0, 1.0])
RCNN = dict(target_means=[0.0, 0.0, 0.0, 0.0], target_stds=[0.1, 0.1, 0.2, 0.2])
OTHER = dict(target_means=[0.05, -0.1, 0.02, 0.3], target_stds=[0.3, 0.7, 1.3, 0.9], clip_border=False)


def random_boxes(generator, n, device, dtype=torch.float32, extent=1333.0):
    corners = torch.rand(n, 2, generator=generator, dtype=torch.float64) * extent
    sizes = torch.rand(n, 2, generator=generator, dtype=torch.float64) * extent / 3 + 0.5
    return torch.cat([corners, corners + sizes], dim=1).to(device=device, dtype=dtype)


def assert_bitwise(got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected), (got - expected).abs().max()


def check_against_mmdet(device):
    generator = torch.Generator().manual_seed(0)
    for settings in (RPN, RCNN, OTHER):
        mmdet_coder, coder = DeltaXYWHBBoxCoder(**settings), PairedDeltaXYWHBBoxCoder(**settings)
        for n in (1, 7, 256, 3001):
            boxes, targets = random_boxes(generator, n, device), random_boxes(generator, n, device)
            assert_bitwise(coder.encode(boxes, targets), mmdet_coder.encode(boxes, targets))
            for num_classes in (1, 3):
                deltas = (torch.randn(n, 4 * num_classes, generator=generator) * 2).to(device)
                for max_shape in (None, (800, 1216)):
                    assert_bitwise(coder.decode(boxes, deltas, max_shape),
                                   mmdet_coder.decode(boxes, deltas, max_shape))
        # Box types in, box types out; half-precision boxes are encoded in fp32 as mmdet does.
        boxes, targets = random_boxes(generator, 50, device), random_boxes(generator, 50, device)
        assert_bitwise(coder.encode(HorizontalBoxes(boxes), HorizontalBoxes(targets.half())),
                       mmdet_coder.encode(HorizontalBoxes(boxes), HorizontalBoxes(targets.half())))
        deltas = torch.randn(50, 4, generator=generator).to(device)
        mmdet_boxed, boxed = (DeltaXYWHBBoxCoder(**settings, use_box_type=True),
                              PairedDeltaXYWHBBoxCoder(**settings, use_box_type=True))
        got, expected = boxed.decode(boxes, deltas, (640, 480)), mmdet_boxed.decode(boxes, deltas, (640, 480))
        assert isinstance(got, HorizontalBoxes)
        assert_bitwise(got.tensor, expected.tensor)


def test_the_same_as_mmdet_bit_for_bit():
    check_against_mmdet('cpu')


def test_extreme_deltas_are_clipped_as_in_mmdet():
    coder, mmdet_coder = PairedDeltaXYWHBBoxCoder(**RCNN), DeltaXYWHBBoxCoder(**RCNN)
    boxes = torch.tensor([[10.0, 10.0, 20.0, 30.0], [0.0, 0.0, 1.0, 1.0]])
    deltas = torch.tensor([[0.0, 0.0, 100.0, -100.0], [1e3, -1e3, 3.0, 3.0]])
    assert_bitwise(coder.decode(boxes, deltas, (50, 60)), mmdet_coder.decode(boxes, deltas, (50, 60)))


def test_empty_inputs():
    coder = PairedDeltaXYWHBBoxCoder(**RCNN)
    assert coder.encode(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)
    assert coder.decode(torch.zeros(0, 4), torch.zeros(0, 8)).shape == (0, 8)


def test_mismatched_shapes_say_what_is_wrong():
    coder = PairedDeltaXYWHBBoxCoder(**RCNN)
    with pytest.raises(ValueError, match=r'one shape \(\.\.\., 4\), got \(3, 4\) and \(2, 4\)'):
        coder.encode(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match='one delta row per box, got 2 rows for 3 boxes'):
        coder.decode(torch.zeros(3, 4), torch.zeros(2, 4))


@pytest.mark.gpu
def test_on_the_gpu_the_same_as_mmdet_bit_for_bit():
    check_against_mmdet('cuda')
