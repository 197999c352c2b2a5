"""The public depthwise 3x3 token-layout conv: input checks, the torch.library ops, dispatch."""
import os
from typing import Optional

import torch

from .reference import EPILOGUES, dwconv3x3_tokens_reference

IMPLS = ("auto", "reference", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_dwconv_inputs(x, weight, bias, hw_shape, epilogue, addend) -> None:
    """Raise a ValueError/TypeError that says what is wrong and what was expected."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"x and weight must be tensors, got {type(x).__name__} and {type(weight).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must be tokens of shape (B, N, C), got shape {tuple(x.shape)}")
    batch, n_tokens, channels = x.shape
    if batch == 0 or n_tokens == 0 or channels == 0:
        raise ValueError(f"x needs at least one batch element, token and channel, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be floating point (fp16, bf16, fp32, fp64), got {x.dtype}")
    if not isinstance(hw_shape, (tuple, list)) or len(hw_shape) != 2:
        raise ValueError(f"hw_shape must be (H, W), got {hw_shape!r}")
    height, width = hw_shape
    if height <= 0 or width <= 0:
        raise ValueError(f"hw_shape must be positive, got {tuple(hw_shape)}")
    if height * width != n_tokens:
        raise ValueError(f"hw_shape {tuple(hw_shape)} gives H*W = {height * width} tokens, "
                         f"but x has N = {n_tokens} (x is {tuple(x.shape)})")
    if tuple(weight.shape) != (channels, 1, 3, 3):
        raise ValueError(f"weight must be the depthwise nn.Conv2d weight of shape (C, 1, 3, 3) = "
                         f"({channels}, 1, 3, 3) for x with C = {channels}, got {tuple(weight.shape)}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}, got {weight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (channels,):
            raise ValueError(f"bias must have shape (C,) = ({channels},), got {tuple(bias.shape)}")
        if bias.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"bias must be floating point, got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias must be on x's device {x.device}, got {bias.device}")
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if epilogue == "add":
        if not isinstance(addend, torch.Tensor):
            raise ValueError("epilogue='add' needs addend, a (B, N, C) tensor to add the conv into")
        if addend.shape != x.shape:
            raise ValueError(f"addend must have x's shape {tuple(x.shape)}, got {tuple(addend.shape)}")
        if addend.dtype != x.dtype:
            raise TypeError(f"addend must have x's dtype {x.dtype}, got {addend.dtype}")
        if addend.device != x.device:
            raise ValueError(f"addend must be on x's device {x.device}, got {addend.device}")
    elif addend is not None:
        raise ValueError(f"addend is only used with epilogue='add', got it with epilogue={epilogue!r}")


_KERNELS = None


def _kernels():
    """The Triton module, imported on first use: importing this package needs no triton, and
    TRITON_INTERPRET (read when kernels are defined) can still be set after importing it."""
    global _KERNELS
    if _KERNELS is None:
        from . import kernels
        _KERNELS = kernels
    return _KERNELS


def resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if impl == "triton" and device.type != "cuda" and not _triton_interpreting():
        raise ValueError(f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got {device}")
    return impl


# --------------------------------------------------------------------------------------------
# torch.library ops: opaque to torch.compile (no graph break), with fake and autograd formulas.
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("mlla_kernels::dwconv3x3_tokens", mutates_args=())
def _dwconv3x3_tokens_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         addend: Optional[torch.Tensor], height: int, width: int,
                         epilogue: str) -> torch.Tensor:
    return _kernels().dwconv3x3_forward(x, weight, bias, addend, height, width, epilogue)


@_dwconv3x3_tokens_op.register_fake
def _(x, weight, bias, addend, height, width, epilogue):
    return x.new_empty(x.shape)


@torch.library.custom_op("mlla_kernels::dwconv3x3_tokens_backward", mutates_args=())
def _dwconv3x3_tokens_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                  bias: Optional[torch.Tensor], height: int, width: int,
                                  epilogue: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().dwconv3x3_backward(grad_out, x, weight, bias, height, width, epilogue)


@_dwconv3x3_tokens_backward_op.register_fake
def _(grad_out, x, weight, bias, height, width, epilogue):
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            weight.new_empty((x.shape[2],), dtype=bias_dtype))


def _setup_context(ctx, inputs, output):
    x, weight, bias, addend, height, width, epilogue = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.hw = (height, width)
    ctx.epilogue = epilogue
    ctx.has_bias = bias is not None
    ctx.has_addend = addend is not None


def _backward(ctx, grad_out):
    x, weight, bias = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = _dwconv3x3_tokens_backward_op(
        grad_out, x, weight, bias, ctx.hw[0], ctx.hw[1], ctx.epilogue)
    return (grad_x, grad_weight, grad_bias if ctx.has_bias else None,
            grad_out if ctx.has_addend else None, None, None, None)


_dwconv3x3_tokens_op.register_autograd(_backward, setup_context=_setup_context)


class _DwconvTokensFunction(torch.autograd.Function):
    """The same kernels for eager mode, without the custom op's dispatcher round trips.

    torch.library.custom_op costs tens of microseconds of host time per call; at the small
    stage shapes the whole fused fwd+bwd runs on the GPU in about that, so eager calls take this
    lighter path and torch.compile (which needs the opaque op) takes the custom op.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, addend, height, width, epilogue):
        ctx.save_for_backward(x, weight, bias)
        ctx.hw = (height, width)
        ctx.epilogue = epilogue
        ctx.has_bias = bias is not None
        ctx.has_addend = addend is not None
        return _kernels().dwconv3x3_forward(x, weight, bias, addend, height, width, epilogue)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = _kernels().dwconv3x3_backward(grad_out, x, weight, bias, ctx.hw[0],
                                                                       ctx.hw[1], ctx.epilogue)
        return (grad_x, grad_weight, grad_bias if ctx.has_bias else None,
                grad_out if ctx.has_addend else None, None, None, None)


def dwconv3x3_tokens(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], hw_shape,
                     epilogue: str = "none", addend: Optional[torch.Tensor] = None,
                     impl: str = "auto") -> torch.Tensor:
    """Depthwise 3x3 conv (stride 1, zero padding 1, bias) on token-layout maps, epilogue fused.

    Same function as nn.Conv2d(C, C, 3, padding=1, groups=C) applied to x seen as (B, C, H, W),
    without the reshapes/permutes.

    Args:
        x: (B, N, C) tokens, N = H*W row-major; any strides (fastest with channels contiguous).
        weight: (C, 1, 3, 3), the depthwise nn.Conv2d weight (same state-dict layout).
        bias: (C,) or None.
        hw_shape: (H, W) with H * W == N. Any size, 1x1 and 1xW included.
        epilogue: "none" -> conv(x); "residual" -> x + conv(x) (CPE); "silu" -> SiLU(conv(x))
            (DWC); "add" -> addend + conv(x) (LePE added into the attention output).
        addend: (B, N, C) in x's dtype, any strides; only with epilogue="add".
        impl: "triton" (fused kernels; on the CPU only under TRITON_INTERPRET=1), "reference"
            (eager F.conv2d with the reshapes) or "auto" (triton on CUDA, reference elsewhere).
    Returns:
        (B, N, C) in x's dtype, contiguous from the kernels (the reference leaves the layout its
        eager ops give). The kernels accumulate in fp32 (fp64 for fp64 x)
        whatever the weight's dtype, so under torch.autocast an fp32 weight with bf16 x gives a
        bf16 output and an fp32 weight grad; nothing is downcast.

    Backward (triton): grad x, weight and bias in two kernels (three with SiLU, whose
    pre-activation is recomputed from x, not saved). The weight/bias reduction is deterministic
    (per-program fp32 partials summed in a fixed order; no atomics): reruns on one device give
    bitwise equal gradients. With "add", the addend's grad is the output grad itself.
    """
    check_dwconv_inputs(x, weight, bias, hw_shape, epilogue, addend)
    impl = resolve_impl(impl, x.device)
    height, width = int(hw_shape[0]), int(hw_shape[1])
    if impl == "reference":
        return dwconv3x3_tokens_reference(x, weight, bias, (height, width), epilogue, addend)
    if torch.compiler.is_compiling():
        return _dwconv3x3_tokens_op(x, weight, bias, addend, height, width, epilogue)
    return _DwconvTokensFunction.apply(x, weight, bias, addend, height, width, epilogue)
