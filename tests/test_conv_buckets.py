"""Bucketed convolutions (mlla_det/models/conv_buckets.py) compute the same convolution, and so
does the configs' cuDNN switch (CudnnHook; on the GPU only, where cuDNN exists).

Against the plain module in float64 on fresh random inputs (outputs and every gradient), for the
kinds of convolution Mask R-CNN MLLA has (strided 3x3, 1x1, depthwise, no bias, transposed), and
for a whole detector's training step in fp32 (the issue's bar: losses and gradients within 1e-4)."""
import numpy as np
import pytest
import torch
from torch import nn

from mlla_det.models.conv_buckets import (SMALLEST_BUCKETED, bucket_convolutions, bucket_size,
                                          unbucket_convolutions)

CONVS = {
    'stem 3x3/2': lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False),
    'pointwise': lambda: nn.Conv2d(4, 6, 1),
    'depthwise 3x3/2': lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4),
    '5x5/3 dilated': lambda: nn.Conv2d(3, 5, 5, stride=3, padding=3, dilation=2),
    'transposed 2x2/2': lambda: nn.ConvTranspose2d(4, 3, 2, stride=2),
}
SHAPES = [(2, 37, 51), (11, 14, 14), (1, 9, 300), (19, 10, 10)]


def test_bucket_size_bounds():
    for n in range(1, 5000):
        size = bucket_size(n)
        assert size >= n
        if n <= SMALLEST_BUCKETED:
            assert size == n
        else:
            assert size <= n * 1.25, (n, size)
            assert bucket_size(size) == size, n  # a bucket is its own bucket


def test_bucket_size_has_few_values_per_octave():
    assert len({bucket_size(n) for n in range(513, 1025)}) == 4
    assert [bucket_size(n) for n in (25, 200, 800, 1216)] == [28, 224, 896, 1280]


@pytest.mark.parametrize('name', list(CONVS))
@pytest.mark.parametrize('shape', SHAPES)
def test_same_outputs_and_gradients_as_the_plain_convolution(name, shape):
    torch.manual_seed(hash((name, shape)) % 2 ** 31)
    conv = CONVS[name]().double()
    batch, height, width = shape
    x = torch.randn(batch, conv.in_channels, height, width, dtype=torch.float64, requires_grad=True)
    params = [p for p in conv.parameters()]
    expected = conv(x)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, [x] + params, grad_out)

    holder = nn.Sequential(conv)
    assert bucket_convolutions(holder) == 1
    got = conv(x)
    got_grads = torch.autograd.grad(got, [x] + params, grad_out)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert unbucket_convolutions(holder) == 1 and 'forward' not in vars(conv)


def test_the_extension_is_what_cudnn_sees():
    seen = []
    conv = nn.Conv2d(2, 3, 3, padding=1)
    convolve = conv._conv_forward
    conv._conv_forward = lambda x, weight, bias: seen.append(tuple(x.shape)) or convolve(x, weight, bias)
    bucket_convolutions(nn.Sequential(conv))
    out = conv(torch.randn(11, 2, 37, 51))
    assert out.shape == (11, 3, 37, 51)
    assert seen == [(12, 2, 40, 56)]


def test_empty_batches_and_exclusions():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Sequential(nn.Conv2d(3, 3, 1)))
    assert bucket_convolutions(model, exclude=('1',)) == 1
    assert bucket_convolutions(model, exclude=('1',)) == 1  # idempotent
    assert '_unbucketed_forward' not in vars(model[1][0])
    assert model(torch.zeros(0, 2, 9, 9)).shape == (0, 3, 9, 9)


def detector_and_batch(device):
    """A light-headed MLLA-T Mask R-CNN (no stochastic depth) and two images of odd sizes."""
    from mmdet.utils import register_all_modules

    from tests.test_detector import build_detector, synthetic_sample
    register_all_modules(init_default_scope=True)
    torch.manual_seed(0)
    model = build_detector('t_fpn_1x', light_heads=True, drop_path_rate=0.0).to(device)
    model.train()
    rng = np.random.default_rng(3)
    samples = [synthetic_sample(rng, 90, 122, 3), synthetic_sample(rng, 77, 109, 2)]
    return model, dict(inputs=[image for image, _ in samples], data_samples=[s for _, s in samples])


def training_step(model, batch):
    """Losses and parameter gradients of one training step, the RoI samplers seeded alike."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    data = model.data_preprocessor(batch, training=True)
    losses = model.loss(data['inputs'], data['data_samples'])
    loss, log_vars = model.parse_losses(losses)
    loss.backward()
    return ({k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in log_vars.items()},
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def assert_same_step(expected, got, rel=1e-4):
    (expected_losses, expected_grads), (losses, grads) = expected, got
    assert expected_losses.keys() == losses.keys()
    for key, value in expected_losses.items():
        assert losses[key] == pytest.approx(value, rel=rel, abs=1e-6), key
    assert expected_grads.keys() == grads.keys()
    for name, grad in expected_grads.items():
        error = (grads[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert error < rel, f'{name}: relative error {error:.2e}'


def test_detector_training_step_is_unchanged():
    """Losses and gradients of a whole Mask R-CNN MLLA training step, fp32, with and without."""
    model, batch = detector_and_batch('cpu')
    plain = training_step(model, batch)
    assert bucket_convolutions(model) > 20
    bucketed = training_step(model, batch)
    unbucket_convolutions(model)
    assert_same_step(plain, bucketed)


@pytest.mark.gpu
@pytest.mark.parametrize('mode', ['cudnn off', 'buckets'])
def test_detector_training_step_on_the_gpu_with_cudnn_off_or_buckets(mode):
    """On CUDA, fp32: cuDNN off (the configs' CudnnHook) and bucketed convolutions give the
    losses and gradients of the plain cuDNN step. TF32 is off on both sides: cuDNN uses it for
    fp32 convolutions by default, ATen's own convolutions do not."""
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model, batch = detector_and_batch('cuda')
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            plain = training_step(model, batch)
        if mode == 'buckets':
            assert bucket_convolutions(model) > 20
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                got = training_step(model, batch)
        else:
            with torch.backends.cudnn.flags(enabled=False, allow_tf32=False):
                got = training_step(model, batch)
        assert_same_step(plain, got)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
