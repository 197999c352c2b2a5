"""Convolutions as batched GEMMs (mlla_det/models/gemm_conv.py, the configs' GemmConvHook):
the function of F.conv2d / F.conv_transpose2d in float64, forward and backward; autocast as the
convolutions; the detector's training step unchanged; on the GPU, a launch count independent of
the batch."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlla_det  # noqa: F401,I001  (the mmcv stand-in: before anything imports mmdet's models)
from mlla_det.models import gemm_conv
from mlla_det.models.gemm_conv import conv2d_gemm, conv_transpose2d_gemm, gemm_convolutions, ungemm_convolutions

# (batch, in, out, height, width, kernel, stride, padding, bias): the detector's kinds (3x3 and
# 1x1, stride 1 and 2), RoI-like batches (the tensordot weight grad), odd and 1x1 maps,
# a rectangular kernel.
CONV_CASES = [
    (2, 3, 5, 9, 11, 3, 2, 1, True),
    (3, 4, 6, 7, 5, 1, 1, 0, True),
    (2, 4, 6, 7, 5, 1, 2, 0, False),
    (40, 8, 3, 4, 4, 3, 1, 1, True),
    (1, 2, 2, 1, 1, 3, 1, 1, True),
    (2, 3, 4, 10, 9, 3, 2, 0, True),
    (2, 3, 4, 6, 8, (3, 1), 1, (1, 0), True),
]


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, [t for t in inputs if t is not None], grad_out)


@pytest.mark.parametrize('case', CONV_CASES, ids=str)
def test_conv2d_gemm_is_conv2d_in_float64(case):
    batch, cin, cout, height, width, kernel, stride, padding, bias = case
    kernel = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    gen = torch.Generator().manual_seed(hash(case) % 2 ** 31)
    x = torch.randn(batch, cin, height, width, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(cout, cin, *kernel, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(cout, dtype=torch.float64, generator=gen, requires_grad=True) if bias else None
    expected = F.conv2d(x, w, b, stride, padding)
    got = conv2d_gemm(x, w, b, stride, padding)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn(expected.shape, dtype=torch.float64, generator=gen)
    for e, g in zip(_grads(expected, (x, w, b), grad_out), _grads(got, (x, w, b), grad_out)):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('shapes', [(2, 3, 5, 400), (64, 5, 3, 6)], ids=['few-long', 'many-short'])
def test_weight_grad_products_both_ways(shapes):
    """Both ways of summing the per-image products (one chosen by temporary memory)."""
    batch, rows, inner, positions = shapes
    a = torch.randn(batch, rows, positions, dtype=torch.float64)
    b = torch.randn(batch, inner, positions, dtype=torch.float64)
    torch.testing.assert_close(gemm_conv._sum_of_products(a, b), torch.einsum('bml,bkl->mk', a, b))


@pytest.mark.parametrize('case', [(3, 4, 5, 6, 7, 2, 2, 0, 0), (2, 3, 4, 5, 5, 3, 2, 1, 1), (2, 3, 4, 3, 4, 2, 1, 0, 0)],
                         ids=['mask-head-upsample', 'overlapping', 'stride-below-kernel'])
def test_conv_transpose2d_gemm_is_conv_transpose2d_in_float64(case):
    batch, cin, cout, height, width, kernel, stride, padding, output_padding = case
    gen = torch.Generator().manual_seed(sum(case))
    x = torch.randn(batch, cin, height, width, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(cin, cout, kernel, kernel, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(cout, dtype=torch.float64, generator=gen, requires_grad=True)
    expected = F.conv_transpose2d(x, w, b, stride, padding, output_padding)
    got = conv_transpose2d_gemm(x, w, b, stride, padding, output_padding)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn(expected.shape, dtype=torch.float64, generator=gen)
    for e, g in zip(_grads(expected, (x, w, b), grad_out), _grads(got, (x, w, b), grad_out)):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('geometry', [(3, 1, 1), (1, 0, 1), (3, 1, 2)], ids=['3x3', '1x1', '3x3-stride2'])
def test_an_empty_batch_gives_empty_outputs_and_zero_weight_grads(geometry):
    """No RoIs for the mask head (an iteration without positives): shapes as the convolution's,
    zero weight and bias gradients, forward and backward without error."""
    kernel, padding, stride = geometry
    x = torch.randn(0, 4, 14, 14, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, kernel, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    out = conv2d_gemm(x, w, b, stride, padding)
    assert out.shape == F.conv2d(x, w, b, stride, padding).shape
    grad_x, grad_w, grad_b = torch.autograd.grad(out.sum(), [x, w, b])
    assert grad_x.shape == x.shape and not grad_w.any() and not grad_b.any()
    wt = torch.randn(4, 6, 2, 2, dtype=torch.float64, requires_grad=True)
    up = conv_transpose2d_gemm(x, wt, None, 2)
    assert up.shape == (0, 6, 28, 28)
    assert not torch.autograd.grad(up.sum(), wt)[0].any()


def test_autocast_follows_the_convolution():
    """Under autocast: the convolution's output dtype and values to bf16 rounding; float64 inputs
    stay float64, as autocast leaves them."""
    x, w, b = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3), torch.randn(6)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        expected, got = F.conv2d(x, w, b, 1, 1), conv2d_gemm(x, w, b, 1, 1)
        x64, w64 = x.double(), w.double()
        assert conv2d_gemm(x64, w64, None, 1, 1).dtype == torch.float64
        wt = torch.randn(4, 3, 2, 2)
        assert conv_transpose2d_gemm(x, wt, None, 2).dtype == F.conv_transpose2d(x, wt, None, 2).dtype
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_an_inplace_activation_after_it_keeps_the_gradients():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    expected = torch.autograd.grad(F.relu(conv(x)).sum(), [x, conv.weight])
    gemm_convolutions(conv)
    got = torch.autograd.grad(F.relu(conv(x), inplace=True).sum(), [x, conv.weight])
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


def test_bad_input_says_what_was_expected():
    with pytest.raises(ValueError, match='input channels'):
        conv2d_gemm(torch.randn(1, 4, 5, 5), torch.randn(8, 2, 3, 3))
    with pytest.raises(ValueError, match=r'\(B, C, H, W\)'):
        conv2d_gemm(torch.randn(4, 5, 5), torch.randn(8, 4, 3, 3))
    with pytest.raises(ValueError, match='output_size'):
        deconv = nn.ConvTranspose2d(2, 2, 2, stride=2)
        gemm_convolutions(deconv)
        deconv(torch.randn(1, 2, 3, 3), output_size=(6, 6))


def test_which_modules_change_and_undo():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),                     # dense: GEMM
        nn.Conv2d(8, 8, 3, padding=1, groups=8),           # depthwise: left alone
        nn.Conv2d(8, 8, 3, padding=2, dilation=2),         # dilated: left alone
        nn.Conv2d(8, 8, 3, padding=1, padding_mode='reflect'),  # not zero padding: left alone
        nn.ConvTranspose2d(8, 4, 2, stride=2),             # dense transposed: GEMM
        nn.Conv2d(4, 2, 1))                                # 1x1: GEMM
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    model = model.double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(x)
    assert gemm_convolutions(model) == 3
    assert gemm_convolutions(model) == 3  # idempotent
    assert [('_plain_forward' in vars(m)) for m in model] == [True, False, False, False, True, True]
    torch.testing.assert_close(model(x), expected)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert ungemm_convolutions(model) == 3
    assert not any('_plain_forward' in vars(m) for m in model)
    assert torch.equal(model(x), expected)


def _double_detector(model):
    """The detector in float64, its preprocessed images too."""
    model = model.double()
    preprocess = model.data_preprocessor.forward

    def forward(data, training=False):
        out = preprocess(data, training)
        out['inputs'] = out['inputs'].double()
        return out

    model.data_preprocessor.forward = forward
    return model


def test_detector_training_step_is_unchanged_in_float64():
    """Losses and gradients of a whole Mask R-CNN MLLA training step (CPU, float64), with the
    dense convolutions as GEMMs and without: the same function. (In fp32 the whole step is not a
    fair yardstick: rounding moves the proposals a little, and the binarised mask targets and the
    samplers' choices can flip with them; the continuous part is checked in fp32 below.)"""
    from tests.test_conv_buckets import assert_same_step, detector_and_batch, training_step
    model, batch = detector_and_batch('cpu')
    model = _double_detector(model)
    plain = training_step(model, batch)
    count = gemm_convolutions(model)
    assert count > 20
    # The backbone's depthwise convolutions stay: only groups == 1 changed.
    assert all(m.groups == 1 for m in model.modules() if '_plain_forward' in vars(m))
    got = training_step(model, batch)
    ungemm_convolutions(model)
    # BatchNorm right after a convolution makes that convolution's bias gradient zero up to
    # rounding; relative to zero, any rounding is large. Those are compared absolutely.
    losses, grads = got
    plain_losses, plain_grads = plain
    cancelled = {name for name, grad in plain_grads.items()
                 if grad.norm() < 1e-9 * max(g.norm() for g in plain_grads.values())}
    for name in cancelled:
        assert (grads[name] - plain_grads[name]).abs().max() < 1e-12, name
    assert_same_step((plain_losses, {k: v for k, v in plain_grads.items() if k not in cancelled}),
                     (losses, {k: v for k, v in grads.items() if k not in cancelled}), rel=1e-9)


def test_backbone_and_neck_gradients_in_fp32():
    """fp32, the continuous part of the step (backbone and FPN under a fixed random projection of
    their outputs): GEMM convolutions within 1e-4 of the plain ones, parameter by parameter."""
    from tests.test_conv_buckets import detector_and_batch
    model, batch = detector_and_batch('cpu')
    images = model.data_preprocessor(batch, training=True)['inputs']
    with torch.no_grad():
        features = model.neck(model.backbone(images))
    gen = torch.Generator().manual_seed(5)
    projections = [torch.randn(f.shape, generator=gen) for f in features]

    def gradients():
        model.zero_grad(set_to_none=True)
        loss = sum((f * p).sum() for f, p in zip(model.neck(model.backbone(images)), projections))
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    gemm_convolutions(model)
    got = gradients()
    ungemm_convolutions(model)
    assert got.keys() == plain.keys()
    scale = max(g.norm() for g in plain.values())
    for name, grad in plain.items():
        if grad.norm() < 1e-4 * scale:  # a bias before BatchNorm: zero up to rounding
            assert (got[name] - grad).norm() < 1e-6 * scale, name
            continue
        error = (got[name] - grad).norm() / grad.norm()
        assert error < 1e-4, f'{name}: relative error {error:.2e}'


def test_hook_converts_for_the_run_and_restores():
    from mlla_det.engine import GemmConvHook

    class Runner:
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, groups=4))

    runner = Runner()
    GemmConvHook(enabled=False).before_run(runner)
    assert not any('_plain_forward' in vars(m) for m in runner.model.modules())
    hook = GemmConvHook()
    hook.before_run(runner)
    assert '_plain_forward' in vars(runner.model[0]) and '_plain_forward' not in vars(runner.model[1])
    hook.after_run(runner)
    assert not any('_plain_forward' in vars(m) for m in runner.model.modules())


def _cuda_kernels(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _relative_errors(got, exact) -> list:
    return [((g.double() - e).abs().max() / e.abs().max()).item() for g, e in zip(got, exact)]


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
def test_on_the_gpu_same_function_and_launches_independent_of_the_batch(dtype):
    """CUDA, cuDNN off for the forward and the backward (as CudnnHook runs training): the mask
    head's 3x3 convolution and 2x upsampling at 2 and at 96 RoIs, output and gradients, against
    float64; as close as F.conv2d / F.conv_transpose2d get (fp32: TF32 off; bf16 autocast), and
    about as many kernels launched at 96 RoIs as at 2."""
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        exact = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.ConvTranspose2d(256, 256, 2, stride=2))
        exact = exact.cuda().double()
        reference = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.ConvTranspose2d(256, 256, 2, stride=2)).cuda()
        model = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.ConvTranspose2d(256, 256, 2, stride=2)).cuda()
        reference.load_state_dict(exact.state_dict())
        model.load_state_dict(exact.state_dict())
        gemm_convolutions(model)
        autocast = dict(device_type='cuda', dtype=dtype, enabled=dtype != torch.float32)
        launches = []
        for batch in (2, 96):
            x = torch.randn(batch, 256, 14, 14, device='cuda', dtype=torch.float64)
            grad_out = torch.randn(batch, 256, 28, 28, device='cuda', dtype=torch.float64)
            with torch.backends.cudnn.flags(enabled=False):
                results = {}
                for name, net in (('exact', exact), ('reference', reference), ('gemm', model)):
                    inputs = (x if net is exact else x.float()).detach().clone().requires_grad_()
                    with torch.autocast(**autocast):
                        out = net(inputs)
                    grads = torch.autograd.grad(out, [inputs, net[0].weight, net[1].weight], grad_out.to(out.dtype))
                    results[name] = (out, *grads)
            assert results['gemm'][0].dtype == results['reference'][0].dtype
            gemm_errors = _relative_errors(results['gemm'], results['exact'])
            reference_errors = _relative_errors(results['reference'], results['exact'])
            # fp32 sums of 2304 products: ~1e-7 each way; bf16: the inputs' own rounding (~4e-3).
            bound = 1e-5 if dtype == torch.float32 else 3e-2
            assert all(g <= max(bound, 2 * r) for g, r in zip(gemm_errors, reference_errors)), \
                dict(batch=batch, gemm=gemm_errors, reference=reference_errors)

            x_run = x.float().requires_grad_()
            grad_run = grad_out.to(results['gemm'][0].dtype)

            def step():
                with torch.backends.cudnn.flags(enabled=False):
                    with torch.autocast(**autocast):
                        out = model(x_run)
                    torch.autograd.grad(out, [x_run, model[0].weight, model[1].weight], grad_run)
            step()
            launches.append(_cuda_kernels(step))
        # Independent of the batch, up to cuBLAS picking another kernel (a split-K reduction) for
        # another shape; the per-RoI path would launch at least one kernel per RoI (96).
        assert launches[1] <= launches[0] + 8 and launches[1] < 96, launches
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
