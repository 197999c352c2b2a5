"""Eager PyTorch form of MLLA's depthwise 3x3 convolutions on token-layout maps: the ground truth.

The paper's block turns tokens (B, N, C), N = H*W row-major, into a (B, C, H, W) map, runs an
nn.Conv2d(C, C, 3, padding=1, groups=C) on it and turns the result back into tokens, then applies
one of the epilogues below. This module does exactly that with F.conv2d, so it differentiates
through autograd and computes in float64 when given float64.

Epilogues:
    "none"      conv(x)
    "residual"  x + conv(x)          (CPE1, CPE2)
    "silu"      SiLU(conv(x))        (DWC)
    "add"       addend + conv(x)     (LePE added into the attention output, x being v)
"""
import torch
import torch.nn.functional as F

EPILOGUES = ("none", "residual", "silu", "add")


def tokens_to_map(x: torch.Tensor, hw_shape) -> torch.Tensor:
    b, n, c = x.shape
    height, width = hw_shape
    return x.transpose(1, 2).reshape(b, c, height, width)


def map_to_tokens(y: torch.Tensor) -> torch.Tensor:
    return y.flatten(2).transpose(1, 2)


def dwconv3x3_tokens_reference(x: torch.Tensor, weight: torch.Tensor, bias, hw_shape,
                               epilogue: str = "none", addend=None) -> torch.Tensor:
    """(B, N, C) tokens -> (B, N, C) in x's dtype (weight and bias are cast to it).

    No copy beyond what the eager ops make: with "none" and "silu" the result is a (B, C, H, W)
    map seen as tokens (channel stride 1 is not guaranteed), as in the paper's block."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    channels = x.shape[2]
    weight = weight.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    y = map_to_tokens(F.conv2d(tokens_to_map(x, hw_shape), weight, bias, padding=1, groups=channels))
    if epilogue == "residual":
        y = x + y
    elif epilogue == "silu":
        y = F.silu(y)
    elif epilogue == "add":
        y = addend + y
    return y
