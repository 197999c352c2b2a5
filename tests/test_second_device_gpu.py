"""Both fused ops on a GPU other than the current one (DDP rank 1 runs on cuda:1; a user may
call on any device): results and gradients must match the reference computed on that device.
Needs two GPUs; skipped otherwise."""
import pytest
import torch

from mlla_kernels import linear_attention
from mlla_kernels.dwconv import dwconv3x3_tokens

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def outputs_and_grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return [out.detach(), *grads]


@pytest.mark.parametrize("current", [0, 1])
def test_attention_and_dwconv_on_cuda1(current):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.cuda.set_device(current)
    device = torch.device("cuda", 1)
    gen = torch.Generator(device="cpu").manual_seed(current)
    height, width, channels, heads = 23, 37, 64, 2
    x = torch.randn(2, height * width, channels, generator=gen).to(device)
    qk = torch.randn(2, height * width, 2 * channels, generator=gen).to(device)
    weight = torch.randn(channels, 1, 3, 3, generator=gen).to(device)
    bias = torch.randn(channels, generator=gen).to(device)
    grad_out = torch.randn(2, height * width, channels, generator=gen).to(device)
    try:
        for impl_outputs, ref_outputs in [
            (outputs_and_grads(lambda a, b: linear_attention(a, b, (height, width), heads, impl="triton"),
                               [qk, x], grad_out),
             outputs_and_grads(lambda a, b: linear_attention(a, b, (height, width), heads, impl="reference"),
                               [qk.double(), x.double()], grad_out.double())),
            (outputs_and_grads(lambda a, w, b: dwconv3x3_tokens(a, w, b, (height, width), "silu", impl="triton"),
                               [x, weight, bias], grad_out),
             outputs_and_grads(lambda a, w, b: dwconv3x3_tokens(a, w, b, (height, width), "silu",
                                                                impl="reference"),
                               [x.double(), weight.double(), bias.double()], grad_out.double())),
        ]:
            for got, want in zip(impl_outputs, ref_outputs):
                assert got.device == device
                assert rel_err(got, want) < 1e-5
        torch.cuda.synchronize(device)
    finally:
        torch.cuda.set_device(0)
