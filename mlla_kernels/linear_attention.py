"""The public linear-attention op: input checks and dispatch between implementations."""
import os

import torch

from .reference import linear_attention_reference

IMPLS = ("auto", "reference", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_inputs(qk: torch.Tensor, v: torch.Tensor, hw_shape, num_heads: int) -> None:
    """Raise a ValueError/TypeError that says what is wrong and what was expected."""
    if not isinstance(qk, torch.Tensor) or not isinstance(v, torch.Tensor):
        raise TypeError(f"qk and v must be tensors, got {type(qk).__name__} and {type(v).__name__}")
    if qk.dim() != 3 or v.dim() != 3:
        raise ValueError(f"expected qk of shape (B, N, 2C) and v of shape (B, N, C), "
                         f"got qk {tuple(qk.shape)} and v {tuple(v.shape)}")
    b, n, c = v.shape
    if qk.shape != (b, n, 2 * c):
        raise ValueError(f"qk must be (B, N, 2C) = ({b}, {n}, {2 * c}) to match v {tuple(v.shape)}, "
                         f"got {tuple(qk.shape)}")
    if b == 0 or n == 0 or c == 0:
        raise ValueError(f"linear attention needs at least one batch element, token and channel, "
                         f"got v of shape {tuple(v.shape)}")
    if qk.dtype not in _FLOAT_DTYPES or v.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"qk and v must be floating point (fp16, bf16, fp32, fp64), got {qk.dtype} and {v.dtype}")
    if qk.dtype != v.dtype:
        raise TypeError(f"qk and v must share a dtype, got {qk.dtype} and {v.dtype}")
    if qk.device != v.device:
        raise ValueError(f"qk and v must be on one device, got {qk.device} and {v.device}")
    if len(hw_shape) != 2:
        raise ValueError(f"hw_shape must be (H, W), got {hw_shape!r}")
    height, width = (int(s) for s in hw_shape)
    if height * width != n:
        raise ValueError(f"hw_shape {tuple(hw_shape)} gives H*W = {height * width} tokens, but the inputs have N = {n}")
    if not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if c % num_heads != 0:
        raise ValueError(f"C = {c} channels cannot be split into {num_heads} heads")
    if c % 4 != 0:
        raise ValueError(f"2-D RoPE needs C to be a multiple of 4, got C = {c}")


def resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if impl == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got {device}")
    return impl


def linear_attention(qk: torch.Tensor, v: torch.Tensor, hw_shape, num_heads: int, impl: str = "auto") -> torch.Tensor:
    """MLLA linear attention without LePE (DESIGN.md steps 2-4).

    Args:
        qk: (B, N, 2C) output of the qk projection; q is qk[..., :C], k is qk[..., C:].
        v: (B, N, C) values.
        hw_shape: (H, W) with H * W == N, tokens row-major.
        num_heads: heads; C must be divisible by it.
        impl: "reference" (eager PyTorch), "triton" (fused kernels) or "auto" (the kernels on
            CUDA, the reference elsewhere).
    Returns:
        (B, N, C) tensor in v's dtype.
    """
    check_inputs(qk, v, hw_shape, num_heads)
    impl = resolve_impl(impl, v.device)
    hw_shape = (int(hw_shape[0]), int(hw_shape[1]))
    if impl == "reference":
        return linear_attention_reference(qk, v, hw_shape, num_heads)
    from .triton import linear_attention_triton
    return linear_attention_triton(qk, v, hw_shape, num_heads)
