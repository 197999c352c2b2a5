"""mmdetection side of mlla-det. Importing it makes mmdet usable without a compiled mmcv,
lets mmengine's checkpoints load on torch >= 2.6, and registers the MLLA backbone."""
from .mmcv_ext import install_mmcv_ext
from .mmengine_compat import allow_mmengine_checkpoints

install_mmcv_ext()
allow_mmengine_checkpoints()

from . import engine  # noqa: E402,F401  (registers RNGStateHook)
from .datasets import transforms as _transforms  # noqa: E402,F401  (registers LoadImageFromFileOrSkip)
from .models import MLLA  # noqa: E402

__all__ = ["MLLA"]
