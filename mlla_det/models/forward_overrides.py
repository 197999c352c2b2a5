"""Reversible in-place replacement of chosen submodules' forward methods.

The model keeps its classes, parameters and state dict; each chosen module gets an instance
attribute `forward` (the replacement) and keeps its previous forward under another attribute, so
that the replacement can call it and `restore_forwards` can undo it. Used by the convolution
rewrites (conv_buckets.py, gemm_conv.py), which the engine's hooks apply for a run.
"""
from typing import Callable

from torch import nn

__all__ = ['overridden_count', 'override_forwards', 'restore_forwards']


def override_forwards(model: nn.Module, select: Callable[[nn.Module], bool],
                      make_forward: Callable[[nn.Module], Callable], saved_as: str) -> int:
    """Give every module under model for which select(module) holds the forward
    make_forward(module), keeping its previous forward as module.<saved_as>. Idempotent; returns
    how many modules are selected."""
    count = 0
    for module in model.modules():
        if not select(module):
            continue
        if saved_as not in vars(module):
            setattr(module, saved_as, module.forward)
            module.forward = make_forward(module)
        count += 1
    return count


def restore_forwards(model: nn.Module, saved_as: str) -> int:
    """Undo override_forwards(..., saved_as); returns how many modules got their forward back."""
    count = 0
    for module in model.modules():
        if saved_as in vars(module):
            del module.forward
            delattr(module, saved_as)
            count += 1
    return count


def overridden_count(model: nn.Module, saved_as: str) -> int:
    """How many modules under model carry an override_forwards(..., saved_as) forward now."""
    return sum(saved_as in vars(module) for module in model.modules())
