"""The public linear-attention op: dispatch between implementations (input checks: checks.py)."""
import torch

from .checks import IMPLS, check_inputs, normalize_hw_shape, resolve_impl
from .reference import linear_attention_reference

__all__ = ["IMPLS", "check_inputs", "linear_attention"]


def _autocast_inputs(qk, v):
    if (isinstance(qk, torch.Tensor) and isinstance(v, torch.Tensor) and qk.dtype != v.dtype
            and qk.is_floating_point() and v.is_floating_point()
            and torch.is_autocast_enabled(v.device.type)):
        dtype = torch.get_autocast_dtype(v.device.type)
        return qk.to(dtype), v.to(dtype)
    return qk, v


def linear_attention(qk: torch.Tensor, v: torch.Tensor, hw_shape, num_heads: int, impl: str = "auto") -> torch.Tensor:
    """MLLA linear attention without LePE (DESIGN.md steps 2-4).

    Args:
        qk: (B, N, 2C) output of the qk projection; q is qk[..., :C], k is qk[..., C:].
        v: (B, N, C) values.
        hw_shape: (H, W) with H * W == N, tokens row-major.
        num_heads: heads; C must be divisible by it.
        impl: "reference" (eager PyTorch), "triton" (fused kernels, fp32/fp16/bf16, even head dim,
            W up to TRITON_MAX_WIDTH = 2**21) or "auto" (the kernels on CUDA where they support the
            inputs, the reference elsewhere).
    Returns:
        (B, N, C) tensor in v's dtype.

    Under torch.autocast, qk and v of different floating dtypes (an autocast Linear's bf16 qk
    beside an fp32 v, say) are both taken in the autocast dtype, as autocast's own matmuls would;
    outside it they must share a dtype.
    """
    qk, v = _autocast_inputs(qk, v)
    check_inputs(qk, v, hw_shape, num_heads)
    hw_shape = normalize_hw_shape(hw_shape)
    impl = resolve_impl(impl, v.device, v.dtype, v.shape[-1] // num_heads, hw_shape[1])
    if impl == "reference":
        return linear_attention_reference(qk, v, hw_shape, num_heads)
    from .triton import linear_attention_triton
    return linear_attention_triton(qk, v, hw_shape, num_heads)
