from .anchor_generators import CachedAnchorGenerator
from .assigners import SyncFreeMaxIoUAssigner
from .backbones import MLLA
from .bbox_coders import PairedDeltaXYWHBBoxCoder
from .device_masks import DeviceBitmapMasks, DeviceMasksDetDataPreprocessor
from .mask_head import DeviceTargetsFCNMaskHead
from .roi_extractors import LevelSortedRoIExtractor
from .rpn_head import LevelMergedRPNHead
from .samplers import DeviceRandomSampler

__all__ = ["CachedAnchorGenerator", "DeviceBitmapMasks", "DeviceMasksDetDataPreprocessor", "DeviceRandomSampler",
           "DeviceTargetsFCNMaskHead", "LevelMergedRPNHead", "LevelSortedRoIExtractor", "MLLA", "PairedDeltaXYWHBBoxCoder",
           "SyncFreeMaxIoUAssigner"]
