from .assigners import SyncFreeMaxIoUAssigner
from .backbones import MLLA

__all__ = ["MLLA", "SyncFreeMaxIoUAssigner"]
