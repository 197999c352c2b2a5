from .anchor_generators import CachedAnchorGenerator
from .assigners import SyncFreeMaxIoUAssigner
from .backbones import MLLA
from .bbox_coders import PairedDeltaXYWHBBoxCoder
from .mask_head import DeviceTargetsFCNMaskHead
from .rpn_head import LevelMergedRPNHead
from .samplers import DeviceRandomSampler

__all__ = ["CachedAnchorGenerator", "DeviceRandomSampler", "DeviceTargetsFCNMaskHead", "LevelMergedRPNHead", "MLLA",
           "PairedDeltaXYWHBBoxCoder", "SyncFreeMaxIoUAssigner"]
