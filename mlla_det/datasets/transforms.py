"""Data transforms of mlla_det (registered in mmdet's TRANSFORMS when this module is imported).

LoadImageFromFileOrSkip: mmcv's LoadImageFromFile, except that an image file that cannot be read
or decoded (missing, empty, truncated, not an image) does not stop the run. mmcv's loader raises
(or, for undecodable bytes, fails an assertion), which kills a training run hours in because of
one bad file. Here the file is named in a warning, with the reason, and then:

- ``unreadable='skip'`` (training): the transform returns None, and mmengine's BaseDataset draws
  another image in its place (up to its ``max_refetch`` times in a row).
- ``unreadable='blank'`` (evaluation): a dataset in test mode cannot drop a sample (mmengine
  raises on None there), and leaving the image out would not take it out of the metric anyway:
  CocoMetric scores every image of the annotation file. So the image is replaced by a uniform one
  of its annotated size: the run finishes, its objects count as missed, and the log says why.
"""
import logging
from typing import Optional

import mmcv
import numpy as np
from mmcv.transforms import LoadImageFromFile
from mmengine import fileio
from mmengine.logging import print_log

from mmdet.registry import TRANSFORMS

__all__ = ['LoadImageFromFileOrSkip', 'UnreadableImageError']

_MODES = ('skip', 'blank')


class UnreadableImageError(Exception):
    """An image file could not be read or decoded; the message says which and why."""


@TRANSFORMS.register_module()
class LoadImageFromFileOrSkip(LoadImageFromFile):
    """Load an image like LoadImageFromFile; skip or blank out files that cannot be decoded.

    Args:
        unreadable: 'skip' (return None, so a training dataset fetches another image) or
            'blank' (a uniform image of the annotated height x width, for evaluation).
        blank_value: grey level of the 'blank' stand-in.
        to_float32, color_type, imdecode_backend, backend_args: as for LoadImageFromFile.

    Adds ``results['img_unreadable']``: None, or the reason the file could not be used.
    """

    def __init__(self, unreadable: str = 'skip', blank_value: int = 128, **kwargs):
        if unreadable not in _MODES:
            raise ValueError(f"unreadable must be one of {_MODES} ('skip' for training, 'blank' "
                             f"for evaluation), got {unreadable!r}")
        if not 0 <= blank_value <= 255:
            raise ValueError(f'blank_value is a grey level in [0, 255], got {blank_value!r}')
        if kwargs.get('ignore_empty'):
            raise ValueError("ignore_empty is LoadImageFromFile's silent skipping; "
                             "LoadImageFromFileOrSkip replaces it (use unreadable='skip')")
        if kwargs.get('file_client_args') is not None:
            raise ValueError('file_client_args is deprecated in mmcv 2; pass backend_args')
        super().__init__(**kwargs)
        self.unreadable = unreadable
        self.blank_value = blank_value

    def read_image(self, filename: str) -> np.ndarray:
        """Bytes -> decoded image, or UnreadableImageError saying what went wrong."""
        try:
            img_bytes = fileio.get(filename, backend_args=self.backend_args)
        except Exception as error:  # missing file, permissions, storage backend errors
            raise UnreadableImageError(f'cannot read {filename}: {type(error).__name__}: {error}') from error
        if len(img_bytes) == 0:
            raise UnreadableImageError(f'cannot decode {filename}: the file is empty (0 bytes)')
        try:
            img = mmcv.imfrombytes(img_bytes, flag=self.color_type, backend=self.imdecode_backend)
        except Exception as error:
            raise UnreadableImageError(f'cannot decode {filename} ({len(img_bytes)} bytes): '
                                       f'{type(error).__name__}: {error}') from error
        if img is None or img.size == 0:
            raise UnreadableImageError(
                f'cannot decode {filename} ({len(img_bytes)} bytes): the {self.imdecode_backend} '
                f'decoder found no image in it (truncated, or not an image file?)')
        return img

    def blank_image(self, results: dict, reason: str) -> np.ndarray:
        height, width = results.get('height'), results.get('width')
        if not (isinstance(height, (int, np.integer)) and isinstance(width, (int, np.integer))
                and height > 0 and width > 0):
            raise UnreadableImageError(
                f"{reason}; a blank stand-in needs the image's annotated size, but the sample "
                f"has height={height!r}, width={width!r} (CocoDataset provides them)")
        shape = (height, width) if self.color_type in ('grayscale', 'unchanged_grayscale') \
            else (height, width, 3)
        return np.full(shape, self.blank_value, dtype=np.uint8)

    def transform(self, results: dict) -> Optional[dict]:
        filename = results['img_path']
        reason = None
        try:
            img = self.read_image(filename)
        except UnreadableImageError as error:
            reason = str(error)
            if self.unreadable == 'skip':
                print_log(f'LoadImageFromFileOrSkip: skipping an image: {reason}. The dataset '
                          f'draws another image in its place.', logger='current', level=logging.WARNING)
                return None
            img = self.blank_image(results, reason)
            print_log(f'LoadImageFromFileOrSkip: {reason}. Evaluating a blank '
                      f'{img.shape[1]}x{img.shape[0]} image in its place: its objects count as '
                      f'missed.', logger='current', level=logging.WARNING)
        if self.to_float32:
            img = img.astype(np.float32)
        results['img'] = img
        results['img_shape'] = img.shape[:2]
        results['ori_shape'] = img.shape[:2]
        results['img_unreadable'] = reason
        return results

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(unreadable={self.unreadable!r}, '
                f'blank_value={self.blank_value}, to_float32={self.to_float32}, '
                f"color_type='{self.color_type}', imdecode_backend='{self.imdecode_backend}', "
                f'backend_args={self.backend_args})')
