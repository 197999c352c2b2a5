"""Instance masks from dataloader workers to the training process through shared memory.

A worker hands its batch to the training process by pickling it into a pipe. Tensors travel as
handles to shared memory (torch registers that with multiprocessing's ForkingPickler), but mmdet's
BitmapMasks hold a numpy array, whose bytes are pickled, written, read and unpickled in full: on
the 1x pipeline (up to ~1333x800 pixels, 3-15 masks an image, a few MB to tens of MB a batch) the
training process spent about 16 ms of every iteration receiving a batch that was already waiting
(this machine's CPU; 20 ms of data wait on an H100's host). Registering BitmapMasks with the same
pickler sends the array as a tensor, so it crosses as a handle too; the training process gets
BitmapMasks holding a numpy view of that memory. Ordinary pickling (checkpoints, results files)
is not affected.
"""
from multiprocessing.reduction import ForkingPickler

import numpy as np
import torch
from mmdet.structures.mask import BitmapMasks

__all__ = ['share_bitmap_masks_between_processes']


def _bitmap_masks_from_tensor(masks: torch.Tensor, height: int, width: int) -> BitmapMasks:
    # Not through BitmapMasks.__init__: its np.stack would copy the array out of shared memory.
    bitmap_masks = BitmapMasks.__new__(BitmapMasks)
    bitmap_masks.height, bitmap_masks.width, bitmap_masks.masks = height, width, masks.numpy()
    return bitmap_masks


def _reduce_bitmap_masks(masks: BitmapMasks):
    array = np.ascontiguousarray(masks.masks)
    return _bitmap_masks_from_tensor, (torch.from_numpy(array), masks.height, masks.width)


def share_bitmap_masks_between_processes() -> None:
    """Make multiprocessing's pickler (dataloader workers' queues) send BitmapMasks through shared
    memory. Idempotent; called when mlla_det is imported."""
    ForkingPickler.register(BitmapMasks, _reduce_bitmap_masks)
