"""Convolutions that show cuDNN a bounded set of input shapes, with unchanged results.

cuDNN sets every convolution up once per input shape (heuristics, execution plans, sometimes a
runtime-compiled kernel) and caches the result. The 1x pipeline gives almost every batch its own
padded size and the mask head a new RoI count every iteration, so that setup is paid nearly every
iteration, for every convolution, forward and backward (benchmarks/conv_setup_cost.py measures it).

A bucketed convolution extends its input with zeros at the bottom and right (and with zero
samples at the end of the batch) up to the next size on a coarse grid, runs the convolution at
that size and crops the output back. The result is the same convolution: a kept output position
reads only input positions that are either real or were zero padding already, and samples do not
mix. So cuDNN meets a bounded set of shapes, and after a warm-up every call finds its plan cached.
The cost is the extension: at most a quarter more rows, columns and samples (bucket_size).
"""
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .forward_overrides import override_forwards, restore_forwards

__all__ = ['bucket_size', 'bucket_convolutions', 'unbucket_convolutions', 'bucketed_convolution']

STEPS_PER_OCTAVE = 4
# Sizes up to this are left as they are: few distinct values, and extending them costs the most.
SMALLEST_BUCKETED = 8


def bucket_size(n: int, steps_per_octave: int = STEPS_PER_OCTAVE) -> int:
    """The smallest size >= n on a grid of `steps_per_octave` points per power of two
    (e.g. 200 -> 224, 800 -> 896, 1216 -> 1280): at most 1/steps_per_octave larger than n."""
    if n <= SMALLEST_BUCKETED:
        return n
    octave = 1 << (math.ceil(math.log2(n)) - 1)  # the power of two below n (n itself excluded)
    step = max(1, octave // steps_per_octave)
    return -(-n // step) * step


def bucketed_convolution(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """conv(x) computed on x extended to bucketed batch, height and width, output cropped back.

    Works for nn.Conv2d (numeric zero padding; others are bucketed in the batch only) and
    nn.ConvTranspose2d (batch only: a transposed convolution's kept outputs would read the
    extension). Empty batches and non-4D inputs go to
    conv unchanged."""
    if x.dim() != 4 or x.shape[0] == 0:
        return conv._unbucketed_forward(x)
    batch, _, height, width = x.shape
    target_batch = bucket_size(batch)
    # Numeric zero padding only ('same' / 'valid' and other padding modes: batch only).
    spatial = isinstance(conv, nn.Conv2d) and conv.padding_mode == 'zeros' and isinstance(conv.padding, tuple)
    target_height, target_width = (bucket_size(height), bucket_size(width)) if spatial else (height, width)
    if (target_batch, target_height, target_width) == (batch, height, width):
        return conv._unbucketed_forward(x)
    extended = F.pad(x, (0, target_width - width, 0, target_height - height, 0, 0, 0, target_batch - batch))
    out = conv._unbucketed_forward(extended)
    if spatial:
        out_height, out_width = (_conv_output_size(size, conv, dim) for dim, size in enumerate((height, width)))
        return out[:batch, :, :out_height, :out_width]
    return out[:batch]


def _conv_output_size(size: int, conv: nn.Conv2d, dim: int) -> int:
    span = conv.dilation[dim] * (conv.kernel_size[dim] - 1) + 1
    return (size + 2 * conv.padding[dim] - span) // conv.stride[dim] + 1


def bucket_convolutions(model: nn.Module, exclude=()) -> int:
    """Make every nn.Conv2d / nn.ConvTranspose2d under model (except those under the submodules
    named in exclude) a bucketed convolution; returns how many. Idempotent; parameters,
    state dict and outputs stay as they are. unbucket_convolutions undoes it."""
    excluded = [model.get_submodule(name) for name in exclude]
    skip = {id(m) for root in excluded for m in root.modules()}
    return override_forwards(
        model, lambda m: id(m) not in skip and isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)),
        lambda m: functools.partial(bucketed_convolution, m), '_unbucketed_forward')


def unbucket_convolutions(model: nn.Module) -> int:
    return restore_forwards(model, '_unbucketed_forward')
