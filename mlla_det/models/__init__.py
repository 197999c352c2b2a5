from .anchor_generators import CachedAnchorGenerator
from .assigners import SyncFreeMaxIoUAssigner
from .backbones import MLLA

__all__ = ["CachedAnchorGenerator", "MLLA", "SyncFreeMaxIoUAssigner"]
