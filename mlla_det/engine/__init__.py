"""Training-loop additions for mmengine's Runner; importing this package registers them."""
from .hooks import RNGStateHook, capture_rng_state, restore_rng_state

__all__ = ['RNGStateHook', 'capture_rng_state', 'restore_rng_state']
