from .mlla import MLLA, checkpoint_filter_fn

__all__ = ["MLLA", "checkpoint_filter_fn"]
