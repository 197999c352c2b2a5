"""Convolutions as batched matrix products, for the convolutions cuDNN would set up per shape.

With cuDNN off (CudnnHook: the 1x pipeline brings a new input size nearly every iteration, and
cuDNN sets each convolution up anew for every shape it has not seen), PyTorch runs a dense
convolution through `_slow_conv2d`, which loops over the batch in C++: per image an im2col kernel
and a GEMM, forward and backward. The mask head's convolutions run over a batch of 100-250 RoIs,
so that loop launches thousands of kernels an iteration (a host profile of MLLA-T on the 1x
pipeline, H100: 2,100 launches in the RoI heads' forward, 4,500 in the backward; 58 ms of host
time in `_slow_conv2d` alone). The transposed convolution of the mask head loops the same way.

Here the whole batch is one product: the input unfolded into columns (one strided copy; none for
1x1 convolutions), times the weight as a matrix, in one batched GEMM; backward likewise, with the
columns recomputed rather than kept (same memory as the convolution it replaces) and folded back
by col2im, which PyTorch runs for the whole batch at once. A transposed convolution is the fold of
the weight's transpose times the input (a permutation when its patches do not overlap). Same function,
summed in a different order: tests/test_gemm_conv.py compares it with F.conv2d in float64.

Depthwise and other grouped convolutions are left alone: PyTorch runs them in one kernel already.
"""
import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .forward_overrides import overridden_count, override_forwards, restore_forwards

__all__ = ['conv2d_gemm', 'conv_transpose2d_gemm', 'gemm_convolution_count', 'gemm_convolutions',
           'ungemm_convolutions']

Pair = Tuple[int, int]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.conv2d would compute in: autocast's for floating inputs other than float64."""
    device_type = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _columns(x: torch.Tensor, kernel: Pair, padding: Pair, stride: Pair) -> torch.Tensor:
    """(B, C*kh*kw, L) im2col of x, in the weight's (C, kh, kw) order: a view of x for 1x1 kernels
    at stride 1 without padding, else one strided copy of the (zero-padded) input. Not F.unfold:
    PyTorch's CUDA im2col launches one kernel per image."""
    if kernel == (1, 1) and padding == (0, 0) and stride == (1, 1):
        return x.flatten(2)
    if padding != (0, 0):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    patches = x.unfold(2, kernel[0], stride[0]).unfold(3, kernel[1], stride[1])  # (B, C, Ho, Wo, kh, kw)
    batch, channels, out_h, out_w = patches.shape[:4]
    return patches.permute(0, 1, 4, 5, 2, 3).reshape(batch, channels * kernel[0] * kernel[1], out_h * out_w)


class _Conv2dGemm(torch.autograd.Function):
    """Dense conv2d (groups 1, dilation 1) as one batched GEMM over im2col columns; the backward
    recomputes the columns instead of saving them."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding: Pair, stride: Pair):
        batch, _, height, width = x.shape
        out_channels, _, kernel_h, kernel_w = weight.shape
        out_h = (height + 2 * padding[0] - kernel_h) // stride[0] + 1
        out_w = (width + 2 * padding[1] - kernel_w) // stride[1] + 1
        columns = _columns(x, (kernel_h, kernel_w), padding, stride)
        weight_matrix = weight.reshape(out_channels, -1)
        # The product is written into the output's own storage: returning a view made here would
        # forbid the in-place activations (ReLU(inplace=True)) that follow convolutions in mmdet.
        out = x.new_empty((batch, out_channels, out_h, out_w))
        products = out.view(batch, out_channels, out_h * out_w)
        torch.bmm(weight_matrix.expand(batch, -1, -1), columns, out=products)
        if bias is not None:
            products += bias[:, None]
        ctx.save_for_backward(x, weight)
        ctx.geometry = (padding, stride, (height, width), out_h * out_w, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        padding, stride, size, positions, has_bias = ctx.geometry
        batch = x.shape[0]
        out_channels, _, kernel_h, kernel_w = weight.shape
        kernel = (kernel_h, kernel_w)
        grad_out = grad_out.reshape(batch, out_channels, positions)
        grad_x = grad_weight = grad_bias = None
        weight_matrix = weight.reshape(out_channels, -1)
        if ctx.needs_input_grad[0]:
            grad_columns = torch.bmm(weight_matrix.t().expand(batch, -1, -1), grad_out)
            if kernel == (1, 1) and padding == (0, 0) and stride == (1, 1):
                grad_x = grad_columns.view_as(x)
            else:
                grad_x = F.fold(grad_columns, size, kernel, padding=padding, stride=stride)
            del grad_columns  # before the columns are made again: one of the two at a time
        if ctx.needs_input_grad[1]:
            columns = _columns(x, kernel, padding, stride)
            grad_weight = _sum_of_products(grad_out, columns).view_as(weight)
        if has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2))
        return grad_x, grad_weight, grad_bias, None, None


def _sum_of_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over batch b and position l of a[b, :, l] b[b, :, l]^T, for a (B, M, L), b (B, K, L).

    Either per-image products summed (a (B, M, K) temporary: few large images) or one product
    over the batch folded into the positions (temporaries the size of a and b: many small RoIs),
    whichever needs less memory."""
    batch, rows, positions = a.shape
    inner = b.shape[1]
    if batch * rows * inner <= (rows + inner) * batch * positions:
        return torch.bmm(a, b.transpose(1, 2)).sum(0)
    return torch.tensordot(a, b, dims=([0, 2], [0, 2]))


def conv2d_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                stride=1, padding=0) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding) for groups 1 and dilation 1, as batched GEMMs.

    Follows autocast as F.conv2d does (inputs, weight and bias cast to autocast's dtype unless
    float64; products accumulate in fp32, the output is in the compute dtype)."""
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"conv2d_gemm expects x (B, C, H, W) and weight (O, C, kh, kw), got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} expects {weight.shape[1]} input channels, "
                         f"x {tuple(x.shape)} has {x.shape[1]} (grouped convolutions are not handled here)")
    stride, padding = nn.modules.utils._pair(stride), nn.modules.utils._pair(padding)
    dtype = _compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return _Conv2dGemm.apply(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                                 padding, stride)


def conv_transpose2d_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                          stride=1, padding=0, output_padding=0) -> torch.Tensor:
    """F.conv_transpose2d(x, weight, bias, stride, padding, output_padding) for groups 1 and
    dilation 1: the fold (col2im) of weight^T @ x, autocast as F.conv_transpose2d. Plain
    differentiable ops: what autograd keeps is x and the weight, as the convolution keeps."""
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"conv_transpose2d_gemm expects x (B, C, H, W) and weight (C, O, kh, kw), got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    stride, padding = nn.modules.utils._pair(stride), nn.modules.utils._pair(padding)
    output_padding = nn.modules.utils._pair(output_padding)
    batch, in_channels, height, width = x.shape
    _, out_channels, kernel_h, kernel_w = weight.shape
    out_size = tuple((size - 1) * s - 2 * p + k + op for size, s, p, k, op in zip(
        (height, width), stride, padding, (kernel_h, kernel_w), output_padding))
    dtype = _compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        x, weight = x.to(dtype), weight.to(dtype)
        columns = torch.bmm(weight.reshape(in_channels, -1).t().expand(batch, -1, -1), x.flatten(2))
        if (kernel_h, kernel_w) == stride and padding == (0, 0) and output_padding == (0, 0):
            # Non-overlapping patches (the mask head's 2x upsampling): the fold is a permutation,
            # whose backward is one too. F.fold's backward is an im2col, one kernel per image.
            out = columns.view(batch, out_channels, kernel_h, kernel_w, height, width).permute(
                0, 1, 4, 2, 5, 3).reshape(batch, out_channels, *out_size)
        else:
            out = F.fold(columns, out_size, (kernel_h, kernel_w), padding=padding, stride=stride)
        if bias is not None:
            out = out + bias.to(dtype)[:, None, None]
        return out


def _eligible(module: nn.Module) -> bool:
    """Dense, undilated, numerically zero-padded 2-D (transposed) convolutions."""
    if not isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        return False
    return (module.groups == 1 and module.dilation == (1, 1) and module.padding_mode == 'zeros'
            and isinstance(module.padding, tuple))


def _conv2d_forward(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return conv2d_gemm(x, module.weight, module.bias, module.stride, module.padding)


def _conv_transpose2d_forward(module: nn.ConvTranspose2d, x: torch.Tensor, output_size=None) -> torch.Tensor:
    if output_size is not None:
        raise ValueError("a GEMM transposed convolution takes no output_size; "
                         "set output_padding on the module instead")
    return conv_transpose2d_gemm(x, module.weight, module.bias, module.stride, module.padding,
                                 module.output_padding)


def gemm_convolutions(model: nn.Module) -> int:
    """Make every dense nn.Conv2d / nn.ConvTranspose2d under model run as batched GEMMs; returns
    how many. Grouped (depthwise), dilated and non-zero-padded ones are left as they are.
    Idempotent; parameters and state dict are unchanged. ungemm_convolutions undoes it."""
    return override_forwards(model, _eligible, _gemm_forward, '_plain_forward')


def _gemm_forward(module: nn.Module):
    forward = _conv_transpose2d_forward if isinstance(module, nn.ConvTranspose2d) else _conv2d_forward
    return functools.partial(forward, module)


def ungemm_convolutions(model: nn.Module) -> int:
    return restore_forwards(model, '_plain_forward')


def gemm_convolution_count(model: nn.Module) -> int:
    """How many convolutions under model run as GEMMs now."""
    return overridden_count(model, '_plain_forward')
