"""CachedAnchorGenerator gives mmdet's AnchorGenerator anchors and valid flags bit for bit."""
import pytest
import torch

import mlla_det  # noqa: F401,I001  (the mmcv stand-in: before anything imports mmdet's models)
from mmdet.models.task_modules.prior_generators import AnchorGenerator

from mlla_det.models.anchor_generators import CachedAnchorGenerator

RPN = dict(scales=[8], ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64])
# Padded input sizes in the order a multi-scale run might bring them: growing, shrinking, wider
# than tall and back, the same twice.
PADDED_SIZES = [(800, 1216), (640, 960), (1344, 800), (800, 1216), (1344, 1344), (96, 128), (800, 1216)]


def featmap_sizes(padded):
    return [(-(-padded[0] // s), -(-padded[1] // s)) for s in RPN["strides"]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("settings", [RPN, dict(RPN, center_offset=0.5), dict(octave_base_scale=4, scales_per_octave=3,
                                                                           ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128])])
def test_same_anchors_as_mmdet(dtype, settings):
    mmdet_generator, cached = AnchorGenerator(**settings), CachedAnchorGenerator(**settings)
    for padded in PADDED_SIZES:
        sizes = [(-(-padded[0] // s), -(-padded[1] // s)) for s in settings["strides"]]
        expected = mmdet_generator.grid_priors(sizes, dtype=dtype, device="cpu")
        got = cached.grid_priors(sizes, dtype=dtype, device="cpu")
        for level_expected, level_got in zip(expected, got):
            assert level_got.dtype == level_expected.dtype and level_got.shape == level_expected.shape
            assert torch.equal(level_got, level_expected), padded


def test_callers_own_their_anchors():
    cached = CachedAnchorGenerator(**RPN)
    sizes = featmap_sizes((800, 1216))
    first = cached.grid_priors(sizes, device="cpu")
    for level in first:
        level.fill_(float("nan"))  # what a caller may do with its own tensor
    again = cached.grid_priors(sizes, device="cpu")
    expected = AnchorGenerator(**RPN).grid_priors(sizes, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(again, expected))


def test_box_type_output():
    cached, plain = CachedAnchorGenerator(**RPN, use_box_type=True), AnchorGenerator(**RPN, use_box_type=True)
    sizes = featmap_sizes((640, 960))
    for got, expected in zip(cached.grid_priors(sizes, device="cpu"), plain.grid_priors(sizes, device="cpu")):
        assert type(got) is type(expected) and torch.equal(got.tensor, expected.tensor)


def test_same_valid_flags_as_mmdet():
    mmdet_generator, cached = AnchorGenerator(**RPN), CachedAnchorGenerator(**RPN)
    for padded in PADDED_SIZES:
        sizes = featmap_sizes(padded)
        for pad_shape in [padded, (padded[0] - 40, padded[1]), (padded[0], padded[1] - 100), (33, 65, 3)]:
            expected = mmdet_generator.valid_flags(sizes, pad_shape, device="cpu")
            got = cached.valid_flags(sizes, pad_shape, device="cpu")
            for level_expected, level_got in zip(expected, got):
                assert level_got.dtype == level_expected.dtype and torch.equal(level_got, level_expected)
            assert not all(bool(f.all()) for f in got) or pad_shape[:2] == padded


def test_valid_size_beyond_the_map_is_an_error():
    with pytest.raises(ValueError, match="exceeds the feature map"):
        CachedAnchorGenerator(**RPN).single_level_valid_flags((4, 5), (5, 5), 3, device="cpu")


@pytest.mark.gpu
def test_same_anchors_and_flags_on_the_gpu():
    mmdet_generator, cached = AnchorGenerator(**RPN), CachedAnchorGenerator(**RPN)
    for dtype in (torch.float32, torch.bfloat16):
        for padded in PADDED_SIZES:
            sizes = featmap_sizes(padded)
            for a, b in zip(mmdet_generator.grid_priors(sizes, dtype=dtype, device="cuda"),
                            cached.grid_priors(sizes, dtype=dtype, device="cuda")):
                assert torch.equal(a, b)
            for a, b in zip(mmdet_generator.valid_flags(sizes, (padded[0] - 50, padded[1]), device="cuda"),
                            cached.valid_flags(sizes, (padded[0] - 50, padded[1]), device="cuda")):
                assert torch.equal(a, b)
