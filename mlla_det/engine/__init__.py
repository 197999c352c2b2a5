"""Training-loop additions for mmengine's Runner; importing this package registers them."""
from .hooks import BlockGraphsHook, ConvShapeBucketsHook, CudnnHook, GemmConvHook, RNGStateHook, capture_rng_state, restore_rng_state
from .optim import MergedGroupsOptimWrapperConstructor, merge_param_groups

__all__ = ['BlockGraphsHook', 'ConvShapeBucketsHook', 'CudnnHook', 'GemmConvHook', 'MergedGroupsOptimWrapperConstructor', 'RNGStateHook', 'capture_rng_state', 'merge_param_groups',
           'restore_rng_state']
