"""Input checks of the linear-attention op, shared by its dispatch (linear_attention.py) and the
kernels' host side (triton/launch.py). Both import from here and this module imports neither, so
the two stay one-way dependencies."""
import operator
import os

import torch

IMPLS = ("auto", "reference", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The kernels split tokens into rows in fp32 (triton/_common.py block_rows_cols): exact up to here.
TRITON_MAX_WIDTH = 2 ** 21


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
    height, width = normalize_hw_shape(hw_shape)
    if height * width != n:
        raise ValueError(f"hw_shape {tuple(hw_shape)} gives H*W = {height * width} tokens, but the inputs have N = {n}")
    if not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if c % num_heads != 0:
        raise ValueError(f"C = {c} channels cannot be split into {num_heads} heads")
    if c % 4 != 0:
        raise ValueError(f"2-D RoPE needs C to be a multiple of 4, got C = {c}")


def normalize_hw_shape(hw_shape):
    """(H, W) as two positive ints; SymInts (torch.compile with dynamic shapes) pass through
    unspecialized."""
    try:
        height, width = hw_shape
    except (TypeError, ValueError):
        raise ValueError(f"hw_shape must be (H, W), got {hw_shape!r}") from None
    try:
        sides = tuple(s if isinstance(s, (int, torch.SymInt)) else operator.index(s) for s in (height, width))
    except TypeError:
        raise TypeError(f"hw_shape must hold two ints, got {hw_shape!r}") from None
    # Two negative sides pass H * W == N and would fail deep inside (torch.arange) instead.
    if any(side <= 0 for side in sides):
        raise ValueError(f"hw_shape's sides must be positive integers, got {hw_shape!r}")
    return sides


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype = None, head_dim: int = None,
                 width: int = None) -> str:
    """The implementation to run. "auto" takes the kernels on CUDA when they support the inputs
    (fp32/fp16/bf16, even head dim, width up to TRITON_MAX_WIDTH) and the reference otherwise."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    kernels_fit = ((dtype is None or dtype in TRITON_DTYPES) and (head_dim is None or head_dim % 2 == 0)
                   and (width is None or width <= TRITON_MAX_WIDTH))
    if impl == "auto":
        return "triton" if device.type == "cuda" and kernels_fit else "reference"
    if impl == "triton":
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got {device}")
        if dtype is not None and dtype not in TRITON_DTYPES:
            raise TypeError(f"impl='triton' supports float32, float16 and bfloat16, got {dtype}; "
                            f"use impl='reference' (or 'auto') for it")
        if head_dim is not None and head_dim % 2 != 0:
            raise ValueError(f"impl='triton' needs an even head dim (RoPE pairs must not straddle heads), "
                             f"got {head_dim}; use impl='reference' (or 'auto')")
        if width is not None and width > TRITON_MAX_WIDTH:
            raise ValueError(f"impl='triton' takes widths up to {TRITON_MAX_WIDTH} tokens, got {width}; "
                             f"use impl='reference' (or 'auto')")
    return impl


def check_triton_inputs(qk: torch.Tensor, v: torch.Tensor, hw_shape, num_heads: int) -> None:
    """check_inputs plus what the kernels in particular need: the checks of resolve_impl("triton")
    (device, dtype, even head dim, width)."""
    check_inputs(qk, v, hw_shape, num_heads)
    resolve_impl("triton", v.device, v.dtype, v.shape[-1] // num_heads, hw_shape[1])
