from .anchor_generators import CachedAnchorGenerator
from .assigners import SyncFreeMaxIoUAssigner
from .backbones import MLLA
from .samplers import DeviceRandomSampler

__all__ = ["CachedAnchorGenerator", "DeviceRandomSampler", "MLLA", "SyncFreeMaxIoUAssigner"]
