"""mmdetection side of mlla-det. Importing it makes mmdet usable without a compiled mmcv,
lets mmengine's checkpoints load on torch >= 2.6, registers the MLLA backbone and this package's
hooks, transforms, assigner and anchor generator, and lets dataloader workers hand instance
masks over through shared memory (datasets/worker_transfer.py)."""
from .mmcv_ext import install_mmcv_ext
from .mmengine_compat import allow_mmengine_checkpoints

install_mmcv_ext()
allow_mmengine_checkpoints()

from . import engine  # noqa: E402,F401  (registers RNGStateHook)
from .datasets import transforms as _transforms  # noqa: E402,F401  (registers LoadImageFromFileOrSkip)
from .datasets.worker_transfer import share_bitmap_masks_between_processes  # noqa: E402
from .models import MLLA  # noqa: E402

share_bitmap_masks_between_processes()

__all__ = ["MLLA"]
