"""Depthwise 3x3 convolutions of the MLLA block (CPE1, DWC, LePE, CPE2) on token layout.

    from mlla_kernels.dwconv import dwconv3x3_tokens
    x = dwconv3x3_tokens(x, cpe1.weight, cpe1.bias, (H, W), epilogue="residual")   # x + CPE1(x)
"""
from .op import IMPLS, check_dwconv_inputs, dwconv3x3_tokens
from .reference import EPILOGUES, dwconv3x3_tokens_reference

__all__ = ["EPILOGUES", "IMPLS", "check_dwconv_inputs", "dwconv3x3_tokens", "dwconv3x3_tokens_reference"]
