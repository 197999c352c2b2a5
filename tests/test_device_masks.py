"""DeviceMasksDetDataPreprocessor and DeviceBitmapMasks: mmdet's padded masks, bit for bit, on the device."""
import copy

import numpy as np
import pytest
import torch

import mlla_det  # noqa: F401,I001  (the mmcv stand-in: before anything imports mmdet's models)
from mmdet.models.data_preprocessors import DetDataPreprocessor
from mmdet.structures import DetDataSample
from mmdet.structures.mask import BitmapMasks, PolygonMasks
from mmengine.structures import InstanceData

from mlla_det.models.device_masks import DeviceBitmapMasks, DeviceMasksDetDataPreprocessor

PREPROCESSOR = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_mask=True,
                    pad_size_divisor=32)


def random_masks(rng, num_masks, height, width):
    return BitmapMasks((rng.random((num_masks, height, width)) > 0.5).astype(np.uint8), height, width)


def batch(rng, sizes, masks=random_masks):
    inputs, samples = [], []
    for height, width, num_masks in sizes:
        inputs.append(torch.from_numpy(rng.integers(0, 256, (3, height, width), dtype=np.uint8)))
        sample = DetDataSample(metainfo=dict(img_shape=(height, width)))
        sample.gt_instances = InstanceData(bboxes=torch.zeros(num_masks, 4), labels=torch.zeros(num_masks).long(),
                                           masks=masks(rng, num_masks, height, width))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


@pytest.mark.parametrize('pad_value', [0, 1])
def test_preprocessed_batch_is_mmdet_s(pad_value):
    rng = np.random.default_rng()
    for sizes in (((61, 83, 3), (70, 45, 1)), ((64, 64, 0), (33, 97, 5))):
        data = batch(rng, sizes)
        expected = DetDataPreprocessor(**PREPROCESSOR, mask_pad_value=pad_value)(copy.deepcopy(data), training=True)
        got = DeviceMasksDetDataPreprocessor(**PREPROCESSOR, mask_pad_value=pad_value)(copy.deepcopy(data),
                                                                                      training=True)
        assert torch.equal(got['inputs'], expected['inputs'])
        for ours, mmdet_s in zip(got['data_samples'], expected['data_samples']):
            assert ours.metainfo == mmdet_s.metainfo
            masks, reference = ours.gt_instances.masks, mmdet_s.gt_instances.masks
            assert isinstance(masks, DeviceBitmapMasks) and isinstance(reference, BitmapMasks)
            assert (masks.height, masks.width) == (reference.height, reference.width) == ours.batch_input_shape
            assert masks.to_ndarray().dtype == reference.masks.dtype
            np.testing.assert_array_equal(masks.to_ndarray(), reference.masks)


def test_evaluation_and_polygons_are_left_to_mmdet():
    rng = np.random.default_rng()
    data = batch(rng, ((50, 60, 2),))
    unpadded = data['data_samples'][0].gt_instances.masks
    out = DeviceMasksDetDataPreprocessor(**PREPROCESSOR)(data, training=False)
    assert out['data_samples'][0].gt_instances.masks is unpadded

    square = [np.array([2.0, 2.0, 30.0, 2.0, 30.0, 30.0, 2.0, 30.0])]
    data = batch(rng, ((50, 60, 2),), masks=lambda rng, n, h, w: PolygonMasks([square] * n, h, w))
    masks = DeviceMasksDetDataPreprocessor(**PREPROCESSOR)(data, training=True)['data_samples'][0].gt_instances.masks
    assert isinstance(masks, PolygonMasks) and (masks.height, masks.width) == (64, 64)


def test_device_bitmap_masks_behave_as_bitmap_masks():
    rng = np.random.default_rng()
    reference = random_masks(rng, 6, 23, 31)
    masks = DeviceBitmapMasks.from_bitmap_masks(reference, 'cpu')
    assert len(masks) == 6
    for index in (2, slice(1, 4), np.array([True, False, True, True, False, False]), np.array([5, 0, 0]),
                  torch.tensor([3, 1])):
        np.testing.assert_array_equal(masks[index].to_ndarray(), reference[index].masks)
    np.testing.assert_array_equal(masks.areas, reference.areas)
    assert torch.equal(masks.to_tensor(torch.float32, 'cpu'), reference.to_tensor(torch.float32, 'cpu'))
    np.testing.assert_array_equal(masks.pad((40, 31), 0).to_ndarray(), reference.pad((40, 31), 0).masks)
    both = DeviceBitmapMasks.cat([masks, masks[1:3]])
    np.testing.assert_array_equal(both.to_ndarray(), BitmapMasks.cat([reference, reference[1:3]]).masks)
    # The transforms run through mmdet's code on a host copy.
    np.testing.assert_array_equal(masks.flip('horizontal').masks, reference.flip('horizontal').masks)
    assert torch.equal(masks.get_bboxes('hbox').tensor, reference.get_bboxes('hbox').tensor)
    # The RPN deep-copies the data samples: the copy must not share the masks.
    copied = copy.deepcopy(masks)
    copied.masks.zero_()
    np.testing.assert_array_equal(masks.to_ndarray(), reference.masks)
    empty = DeviceBitmapMasks.from_bitmap_masks(BitmapMasks([], 7, 9), 'cpu')
    assert len(empty) == 0 and empty.pad((8, 9)).masks.shape == (0, 8, 9)


def test_device_bitmap_masks_reject_what_they_cannot_hold():
    with pytest.raises(TypeError, match='uint8'):
        DeviceBitmapMasks(torch.zeros(2, 5, 5), 5, 5)
    with pytest.raises(TypeError, match='uint8'):
        DeviceBitmapMasks(np.zeros((2, 5, 5), np.uint8), 5, 5)
    with pytest.raises(ValueError, match='do not match'):
        DeviceBitmapMasks(torch.zeros(2, 5, 6, dtype=torch.uint8), 5, 5)
    masks = DeviceBitmapMasks(torch.zeros(2, 5, 6, dtype=torch.uint8), 5, 6)
    with pytest.raises(ValueError, match='smaller'):
        masks.pad((4, 8))
    with pytest.raises(ValueError, match='sizes'):
        DeviceBitmapMasks.cat([masks, masks.pad((6, 6))])


def test_detector_training_step_is_bitwise_mmdet_s():
    """A whole Mask R-CNN training step (the configs' heads, which take the masks where they are)
    with the batch padded by mmdet's preprocessor and by ours: the same losses and gradients."""
    from benchmarks.common import use_heads
    from tests.test_conv_buckets import detector_and_batch, training_step

    model, data = detector_and_batch('cpu')
    assert type(model.data_preprocessor) is DeviceMasksDetDataPreprocessor
    ours = training_step(model, copy.deepcopy(data))
    rpn_head, mask_head = type(model.rpn_head), type(model.roi_head.mask_head)
    use_heads(model, 'paper')
    assert type(model.data_preprocessor) is DetDataPreprocessor
    # Only the preprocessor differs between the two steps.
    model.rpn_head.__class__, model.roi_head.mask_head.__class__ = rpn_head, mask_head
    mmdet_s = training_step(model, copy.deepcopy(data))
    assert ours[0] == mmdet_s[0]
    assert ours[1].keys() == mmdet_s[1].keys()
    for name, grad in ours[1].items():
        assert torch.equal(grad, mmdet_s[1][name]), name


@pytest.mark.gpu
def test_on_the_gpu_the_masks_are_mmdet_s_on_the_device():
    rng = np.random.default_rng()
    data = batch(rng, ((600, 901, 7), (799, 512, 2)))
    expected = DetDataPreprocessor(**PREPROCESSOR).cuda()(copy.deepcopy(data), training=True)
    got = DeviceMasksDetDataPreprocessor(**PREPROCESSOR).cuda()(copy.deepcopy(data), training=True)
    for ours, mmdet_s in zip(got['data_samples'], expected['data_samples']):
        assert ours.gt_instances.masks.masks.is_cuda
        np.testing.assert_array_equal(ours.gt_instances.masks.to_ndarray(), mmdet_s.gt_instances.masks.masks)
