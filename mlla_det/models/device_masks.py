"""Instance masks padded on the training device instead of the host.

With ``pad_mask=True`` mmdet's DetDataPreprocessor pads every image's BitmapMasks to the batch
shape on the host: one OpenCV call per mask and an ``np.stack`` of the results, tens of MB per
batch on the 1x pipeline. The RPN's ``copy.deepcopy`` of the data samples then copies them on the
host again, and the mask head's targets copy them to the GPU, from pinned memory, which costs a
page-locked allocation each time. In the host profile of an H100 run (cProfile, one iteration)
that was 25 ms: ``np.stack`` 9.2, ``copyMakeBorder`` 4.7, ``pin_memory`` 10.6.

``DeviceMasksDetDataPreprocessor`` uploads each image's masks as they arrive from the worker and
pads them with the same value on the device: the same array, bit for bit, as a
``DeviceBitmapMasks``. It is uploaded from pageable memory, which waits for the GPU; here that
costs nothing, because mmengine reads the previous iteration's losses (``.item()``) before the
next batch is preprocessed, so the GPU has nothing queued.
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from mmdet.models.data_preprocessors import DetDataPreprocessor
from mmdet.registry import MODELS
from mmdet.structures.mask import BaseInstanceMasks, BitmapMasks

__all__ = ['DeviceBitmapMasks', 'DeviceMasksDetDataPreprocessor']


def _through_bitmap_masks(name: str):
    def method(self, *args, **kwargs):
        return getattr(self.to_bitmap_masks(), name)(*args, **kwargs)
    method.__name__ = name
    method.__doc__ = f"mmdet's BitmapMasks.{name} on a host copy (returns what it returns)."
    return method


class DeviceBitmapMasks(BaseInstanceMasks):
    """One image's binary masks as an (N, height, width) uint8 tensor on any device.

    Length, indexing, padding, ``to_tensor``, ``to_ndarray``, ``areas`` and ``cat`` work on the
    tensor; the geometric transforms of mmdet's mask API run on a host copy (``to_bitmap_masks``)
    and return mmdet's BitmapMasks: the training step needs none of them.
    """

    def __init__(self, masks: torch.Tensor, height: int, width: int):
        if not isinstance(masks, torch.Tensor) or masks.dim() != 3 or masks.dtype != torch.uint8:
            raise TypeError(f'DeviceBitmapMasks takes an (N, height, width) uint8 tensor, got '
                            f'{type(masks).__name__} {getattr(masks, "dtype", "")} '
                            f'{tuple(getattr(masks, "shape", ()))}')
        if tuple(masks.shape[1:]) != (height, width):
            raise ValueError(f'masks of shape {tuple(masks.shape)} do not match height {height} and width {width}')
        self.masks, self.height, self.width = masks, height, width

    @classmethod
    def from_bitmap_masks(cls, masks: BitmapMasks, device) -> 'DeviceBitmapMasks':
        array = torch.from_numpy(masks.masks).reshape(-1, masks.height, masks.width)
        return cls(array.to(device), masks.height, masks.width)

    def to_bitmap_masks(self) -> BitmapMasks:
        return BitmapMasks(self.to_ndarray(), self.height, self.width)

    def __len__(self) -> int:
        return self.masks.size(0)

    def __getitem__(self, index) -> 'DeviceBitmapMasks':
        return DeviceBitmapMasks(self.masks[index].reshape(-1, self.height, self.width), self.height, self.width)

    def __iter__(self):
        return iter(self.masks)

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(num_masks={len(self)}, height={self.height}, width={self.width}, '
                f'device={self.masks.device})')

    def pad(self, out_shape, pad_val=0) -> 'DeviceBitmapMasks':
        """Zero-extended (pad_val-extended) at the bottom and right to out_shape, as BitmapMasks.pad."""
        out_height, out_width = out_shape
        if out_height < self.height or out_width < self.width:
            raise ValueError(f'cannot pad masks of {self.height}x{self.width} to a smaller {out_height}x{out_width}')
        padded = F.pad(self.masks, (0, out_width - self.width, 0, out_height - self.height), value=pad_val)
        return DeviceBitmapMasks(padded, out_height, out_width)

    def to_ndarray(self):
        return self.masks.cpu().numpy()

    def to_tensor(self, dtype, device) -> torch.Tensor:
        return self.masks.to(device=device, dtype=dtype)

    @property
    def areas(self):
        """Pixels per mask, as a numpy array (as BitmapMasks.areas)."""
        return self.masks.sum((1, 2)).cpu().numpy()

    @classmethod
    def cat(cls, masks: Sequence['DeviceBitmapMasks']) -> 'DeviceBitmapMasks':
        if not masks:
            raise ValueError('DeviceBitmapMasks.cat needs at least one DeviceBitmapMasks')
        if len({(m.height, m.width) for m in masks}) != 1:
            raise ValueError(f'cannot concatenate masks of sizes {sorted({(m.height, m.width) for m in masks})}')
        return cls(torch.cat([m.masks for m in masks]), masks[0].height, masks[0].width)

    rescale = _through_bitmap_masks('rescale')
    resize = _through_bitmap_masks('resize')
    flip = _through_bitmap_masks('flip')
    crop = _through_bitmap_masks('crop')
    crop_and_resize = _through_bitmap_masks('crop_and_resize')
    expand = _through_bitmap_masks('expand')
    translate = _through_bitmap_masks('translate')
    shear = _through_bitmap_masks('shear')
    rotate = _through_bitmap_masks('rotate')
    get_bboxes = _through_bitmap_masks('get_bboxes')


@MODELS.register_module()
class DeviceMasksDetDataPreprocessor(DetDataPreprocessor):
    """mmdet's DetDataPreprocessor (same arguments, same outputs) whose mask padding
    (``pad_mask=True``) turns each image's BitmapMasks into DeviceBitmapMasks on the
    preprocessor's device, padded there. Polygon masks go to mmdet's code."""

    def pad_gt_masks(self, batch_data_samples) -> None:
        if not batch_data_samples or 'masks' not in batch_data_samples[0].gt_instances:
            return
        for data_sample in batch_data_samples:
            masks = data_sample.gt_instances.masks
            if isinstance(masks, BitmapMasks):
                masks = DeviceBitmapMasks.from_bitmap_masks(masks, self.device)
            data_sample.gt_instances.masks = masks.pad(data_sample.batch_input_shape, pad_val=self.mask_pad_value)
