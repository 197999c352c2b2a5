"""Fused Triton kernels for MLLA's linear attention (forward and backward).

Importing this module registers the torch.library ops mlla::linear_attention_fwd/_bwd.
"""
import torch

from .launch import SUPPORTED_DTYPES, check_triton_inputs, launch_overrides
from .op import LinearAttentionFunction, linear_attention_bwd, linear_attention_fwd


def linear_attention_triton(qk: torch.Tensor, v: torch.Tensor, hw_shape, num_heads: int,
                            deterministic: bool = True) -> torch.Tensor:
    """MLLA linear attention (DESIGN.md steps 2-4) with fused kernels: (B, N, 2C), (B, N, C) -> (B, N, C).

    qk and v are read where they lie (any strides); the output is a new contiguous (B, N, C)
    tensor of the inputs' dtype (fp32, fp16 or bf16; all arithmetic in fp32). Differentiable.

    The small matrix products keep fp32-level error for fp32 inputs (~5e-7 relative against
    float64 at MLLA-T stage 1 on an H200): exact fp32 products in the pass that reduces the state,
    three tf32 tensor-core products per fp32 one in the output pass and the backward; fp16/bf16
    inputs, whose own rounding is coarser, get one tf32 product; MLLA_DOT_MODE=ieee|tf32|tf32x3
    forces one mode (launch.dot_mode).

    deterministic (default True): the reductions over tokens, split across many programs, write
    one partial per program and a summing kernel adds them in a fixed order, so results are bitwise
    identical run to run (checked on an H200). False adds the partials with fp32 atomics
    instead (summation order varies between runs). Measured on an H200 (NOTES.md, v1 and v6):
    atomics save one launch of host time at the host-bound shapes but were slower where the GPU
    dominates (MLLA-T stage 1 fp32 fwd+bwd 2.20 vs 1.50 ms in v1, bf16 1.12 vs 0.96 ms in v6), so
    the default stays deterministic.

    Under torch.compile the call goes through the torch.library ops (one opaque node, SymInt
    H and W); in eager mode through an autograd.Function on the same kernels, which skips the
    ops' per-call dispatch cost.
    """
    check_triton_inputs(qk, v, hw_shape, num_heads)
    height, width = hw_shape
    if torch.compiler.is_compiling():
        out, _ = linear_attention_fwd(qk, v, height, width, num_heads, deterministic)
        return out
    return LinearAttentionFunction.apply(qk, v, height, width, num_heads, deterministic)


__all__ = ["LinearAttentionFunction", "SUPPORTED_DTYPES", "check_triton_inputs", "launch_overrides",
           "linear_attention_bwd", "linear_attention_fwd", "linear_attention_triton"]
