from .anchor_generators import CachedAnchorGenerator
from .assigners import SyncFreeMaxIoUAssigner
from .backbones import MLLA
from .bbox_coders import PairedDeltaXYWHBBoxCoder
from .samplers import DeviceRandomSampler

__all__ = ["CachedAnchorGenerator", "DeviceRandomSampler", "MLLA", "PairedDeltaXYWHBBoxCoder",
           "SyncFreeMaxIoUAssigner"]
