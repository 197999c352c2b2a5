"""Depthwise 3x3 token-layout conv (mlla_kernels.dwconv) against nn.Conv2d(groups=C) in float64.

Without a GPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1), so
the unmarked tests use small maps; the @pytest.mark.gpu ones run the MLLA-T stage shapes.
Every buffer the kernels write is NaN-filled first (kernels.POISON_OUTPUTS), so an element a
kernel forgets shows up as NaN instead of leftover memory.
"""
import zlib

import pytest
import torch
import torch.nn as nn

from mlla_kernels.dwconv import EPILOGUES, check_dwconv_inputs, dwconv3x3_tokens
from mlla_kernels.dwconv import kernels
from mlla_kernels.dwconv.op import resolve_impl

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
# MLLA-T at 1280x800: (H, W, C) of the four stages.
STAGE_SHAPES = [(200, 320, 64), (100, 160, 128), (50, 80, 256), (25, 40, 512)]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(kernels, "POISON_OUTPUTS", True)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def make_inputs(batch, height, width, channels, dtype, epilogue, device=DEVICE, seed=0,
                param_dtype=None, layout="contiguous"):
    """Random x, weight, bias, addend (leaf tensors needing grad) in the requested memory layout.

    layouts: "contiguous"; "sliced" (x and addend are the first C channels of wider rows, so
    token stride != C); "channels_strided" (x and addend come from (B, C, N) tensors, channel
    stride = N).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n_tokens = height * width
    param_dtype = param_dtype or dtype

    def tokens():
        if layout == "contiguous":
            t = torch.randn(batch, n_tokens, channels, generator=gen)
        elif layout == "sliced":
            t = torch.randn(batch, n_tokens, 2 * channels + 3, generator=gen)[:, :, 3:channels + 3]
        elif layout == "channels_strided":
            t = torch.randn(batch, channels, n_tokens, generator=gen).transpose(1, 2)
        else:
            raise AssertionError(layout)
        return _to_leaf(t, dtype, device)

    x = tokens()
    weight = _to_leaf(torch.randn(channels, 1, 3, 3, generator=gen) / 3, param_dtype, device)
    bias = _to_leaf(torch.randn(channels, generator=gen), param_dtype, device)
    addend = tokens() if epilogue == "add" else None
    return x, weight, bias, addend


def _to_leaf(t, dtype, device):
    # .to() keeps the strides of a non-contiguous view when it copies (preserve_format).
    return t.to(device=device, dtype=dtype).requires_grad_()


def conv2d_float64(x, weight, bias, hw_shape, epilogue, addend):
    """Ground truth: the paper's form with an actual nn.Conv2d(groups=C), all in float64."""
    batch, n_tokens, channels = x.shape
    height, width = hw_shape
    conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=bias is not None,
                     dtype=torch.float64, device=x.device)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    maps = x.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
    y = conv(maps).flatten(2).permute(0, 2, 1)
    if epilogue == "residual":
        y = x + y
    elif epilogue == "silu":
        y = torch.nn.functional.silu(y)
    elif epilogue == "add":
        y = addend + y
    return y, conv


def reference_outputs_and_grads(x, weight, bias, addend, hw_shape, epilogue, grad_out):
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _reference_outputs_and_grads(x, weight, bias, addend, hw_shape, epilogue, grad_out)


def _reference_outputs_and_grads(x, weight, bias, addend, hw_shape, epilogue, grad_out):
    x64 = x.detach().double().requires_grad_()
    a64 = addend.detach().double().requires_grad_() if addend is not None else None
    y, conv = conv2d_float64(x64, weight.detach().double(), None if bias is None else bias.detach().double(),
                             hw_shape, epilogue, a64)
    wrt = [x64, conv.weight] + ([conv.bias] if bias is not None else []) + ([a64] if a64 is not None else [])
    grads = torch.autograd.grad(y, wrt, grad_out.double())
    return y.detach(), grads


def rel_err(actual, expected):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values: an element was left unwritten (NaN poison) or overflowed"
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def check_against_conv2d(batch, height, width, channels, dtype, epilogue, impl="triton", seed=0,
                         layout="contiguous", param_dtype=None, grad_layout="contiguous", with_bias=True):
    x, weight, bias, addend = make_inputs(batch, height, width, channels, dtype, epilogue, seed=seed,
                                          layout=layout, param_dtype=param_dtype)
    if not with_bias:
        bias = None
    out = dwconv3x3_tokens(x, weight, bias, (height, width), epilogue, addend, impl=impl)
    assert out.dtype == dtype and out.shape == x.shape
    assert impl == "reference" or out.is_contiguous()

    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    grad_out = torch.randn(x.shape, generator=gen).to(device=x.device, dtype=dtype)
    if grad_layout == "channels_strided":
        grad_out = grad_out.transpose(1, 2).contiguous().transpose(1, 2)
    wrt = [x, weight] + ([bias] if bias is not None else []) + ([addend] if addend is not None else [])
    grads = torch.autograd.grad(out, wrt, grad_out)

    ref_out, ref_grads = reference_outputs_and_grads(x, weight, bias, addend, (height, width), epilogue, grad_out)
    tol = TOLERANCE[dtype]
    errors = {"out": rel_err(out, ref_out)}
    names = ["x", "weight"] + (["bias"] if bias is not None else []) + ["addend"]
    for name, got, want, leaf in zip(names, grads, ref_grads, wrt):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, name
        errors[name] = rel_err(got, want)
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"relative errors over {tol:g}: {bad} (all: {errors})"
    return errors


# --------------------------------------------------------------------------------------------
# Parity on small maps (interpreter on the CPU; the same tests run on a GPU when there is one)
# --------------------------------------------------------------------------------------------
SMALL_SHAPES = [  # (B, H, W, C): odd and unequal sides, tiny maps, C not a power of two
    (2, 5, 7, 32),
    (1, 1, 1, 48),
    (3, 1, 9, 32),
    (1, 6, 1, 64),
    (2, 4, 3, 96),
    (1, 13, 11, 40),   # 143 tokens: two token tiles under the interpreter too
]


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_conv2d(shape, epilogue):
    check_against_conv2d(*shape, torch.float32, epilogue, seed=zlib.crc32(repr((shape, epilogue)).encode()))


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_fp64_matches_conv2d_to_rounding(epilogue):
    check_against_conv2d(2, 5, 6, 40, torch.float64, epilogue, seed=7)


@pytest.mark.parametrize("dtype, epilogue", [(torch.bfloat16, e) for e in EPILOGUES]
                         + [(torch.float16, "residual"), (torch.float16, "silu")], ids=str)
def test_half_precision_matches_conv2d(dtype, epilogue):
    check_against_conv2d(2, 4, 5, 32, dtype, epilogue, seed=11)


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_without_bias(epilogue):
    check_against_conv2d(1, 4, 6, 32, torch.float32, epilogue, seed=5, with_bias=False)


@pytest.mark.parametrize("layout", ["sliced", "channels_strided"])
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_strided_inputs(layout, epilogue):
    check_against_conv2d(2, 5, 3, 48, torch.float32, epilogue, seed=3, layout=layout,
                         grad_layout="channels_strided")


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_reference_impl_matches_conv2d(epilogue):
    check_against_conv2d(2, 3, 5, 32, torch.float64, epilogue, impl="reference", seed=13)


@pytest.mark.parametrize("epilogue, block_n, tile_w, wgrad_stages", [("none", 8, 4, 1), ("residual", 8, 2, 2),
                                                                     ("silu", 16, 8, 3), ("add", 4, 1, 1)])
def test_small_tiles_cover_edges_and_channel_blocks(epilogue, block_n, tile_w, wgrad_stages):
    """Patches that end inside the 4 x 7 map (right edge of 7 columns, bottom edge), 16-channel
    blocks splitting C = 24 (the last one half masked), and several patches per persistent
    weight-grad program, whose loop may be software-pipelined (wgrad_stages > 1; the interpreter
    runs it as a plain loop)."""
    batch, height, width, channels = 2, 4, 7, 24
    x, weight, bias, addend = make_inputs(batch, height, width, channels, torch.float32, epilogue, seed=17)
    tiles = dict(fwd_block_n=block_n, fwd_tile_w=tile_w, block_n=block_n, tile_w=tile_w, block_c=16,
                 wgrad_block_n=block_n, wgrad_tile_w=tile_w, wgrad_programs_per_sm=3, wgrad_stages=wgrad_stages)
    out = kernels.dwconv3x3_forward(x.detach(), weight.detach(), bias.detach(),
                                    None if addend is None else addend.detach(), height, width, epilogue, **tiles)
    grad_out = torch.randn_like(out)
    grad_x, grad_w, grad_b = kernels.dwconv3x3_backward(grad_out, x.detach(), weight.detach(), bias.detach(),
                                                        height, width, epilogue, **tiles)
    ref_out, ref_grads = reference_outputs_and_grads(x, weight, bias, addend, (height, width), epilogue, grad_out)
    for got, want in zip([out, grad_x, grad_w, grad_b], [ref_out, *ref_grads[:3]]):
        assert rel_err(got, want) < 1e-5


def test_autocast_bf16_with_fp32_parameters():
    """Under autocast the op gets bf16 activations and fp32 parameters: output and x-grad in
    bf16, weight/bias grads in fp32, nothing else downcast."""
    with torch.autocast(device_type=DEVICE, dtype=torch.bfloat16):
        errors = check_against_conv2d(2, 6, 5, 32, torch.bfloat16, "silu", seed=19, param_dtype=torch.float32)
    assert errors["weight"] < 2e-2
    with torch.autocast(device_type=DEVICE, dtype=torch.bfloat16):
        x, weight, bias, _ = make_inputs(1, 3, 4, 32, torch.float32, "residual", seed=23)
        assert dwconv3x3_tokens(x, weight, bias, (3, 4), "residual", impl="triton").dtype == torch.float32


def test_backward_is_bitwise_repeatable():
    x, weight, bias, _ = make_inputs(3, 9, 7, 32, torch.float32, "silu", seed=29)
    grad_out = torch.randn_like(x)
    runs = [torch.autograd.grad(dwconv3x3_tokens(x, weight, bias, (9, 7), "silu", impl="triton"),
                                [x, weight, bias], grad_out) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_matches_eager():
    """The custom op traces without graph breaks (fake + autograd registrations)."""
    x, weight, bias, addend = make_inputs(2, 4, 5, 32, torch.float32, "add", seed=31)

    def block_like(x, weight, bias, addend):
        y = dwconv3x3_tokens(x, weight, bias, (4, 5), "residual", impl="triton")
        y = dwconv3x3_tokens(y, weight, bias, (4, 5), "silu", impl="triton")
        return dwconv3x3_tokens(y, weight, bias, (4, 5), "add", addend, impl="triton")

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(block_like, fullgraph=True, backend=backend)
    grad_out = torch.randn_like(x)
    results = []
    for fn in (block_like, compiled):
        out = fn(x, weight, bias, addend)
        results.append([out] + list(torch.autograd.grad(out, [x, weight, bias, addend], grad_out)))
    for eager, comp in zip(*results):
        assert rel_err(comp, eager.double()) < 1e-6


def test_opcheck():
    x, weight, bias, addend = make_inputs(2, 3, 4, 32, torch.float32, "add", seed=37)
    torch.library.opcheck(torch.ops.mlla_kernels.dwconv3x3_tokens.default, (x, weight, bias, addend, 3, 4, "add"))
    x, weight, bias, _ = make_inputs(1, 4, 3, 32, torch.float32, "silu", seed=41)
    torch.library.opcheck(torch.ops.mlla_kernels.dwconv3x3_tokens.default, (x, weight, None, None, 4, 3, "silu"))
    grad = torch.randn(x.shape, device=x.device)
    torch.library.opcheck(torch.ops.mlla_kernels.dwconv3x3_tokens_backward.default,
                          (grad, x.detach(), weight.detach(), bias.detach(), 4, 3, "silu"),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def _valid_args():
    x = torch.randn(2, 12, 8)
    return dict(x=x, weight=torch.randn(8, 1, 3, 3), bias=torch.randn(8), hw_shape=(3, 4), epilogue="none",
                addend=None)


@pytest.mark.parametrize("change, error, message", [
    (dict(x=torch.randn(12, 8)), ValueError, "shape \\(B, N, C\\)"),
    (dict(x=torch.randn(2, 12, 8).long()), TypeError, "floating point"),
    (dict(x=torch.randn(2, 0, 8), hw_shape=(0, 4)), ValueError, "at least one"),
    (dict(hw_shape=(4, 4)), ValueError, "H\\*W = 16 tokens, but x has N = 12"),
    (dict(hw_shape=(12,)), ValueError, "must be \\(H, W\\)"),
    (dict(weight=torch.randn(8, 3, 3)), ValueError, "\\(C, 1, 3, 3\\) = \\(8, 1, 3, 3\\)"),
    (dict(weight=torch.randn(8, 1, 5, 5)), ValueError, "\\(C, 1, 3, 3\\)"),
    (dict(bias=torch.randn(7)), ValueError, "bias must have shape \\(C,\\) = \\(8,\\)"),
    (dict(epilogue="gelu"), ValueError, "epilogue must be one of"),
    (dict(epilogue="add"), ValueError, "needs addend"),
    (dict(epilogue="add", addend=torch.randn(2, 12, 4)), ValueError, "addend must have x's shape"),
    (dict(epilogue="add", addend=torch.randn(2, 12, 8).double()), TypeError, "addend must have x's dtype"),
    (dict(addend=torch.randn(2, 12, 8)), ValueError, "only used with epilogue='add'"),
])
def test_bad_inputs_raise_clear_errors(change, error, message):
    args = {**_valid_args(), **change}
    with pytest.raises(error, match=message):
        check_dwconv_inputs(**args)
    with pytest.raises(error, match=message):
        dwconv3x3_tokens(args["x"], args["weight"], args["bias"], args["hw_shape"], args["epilogue"], args["addend"])


def test_impl_selection(monkeypatch):
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("cuda", torch.device("cpu"))
    assert resolve_impl("auto", torch.device("cpu")) == "reference"
    assert resolve_impl("auto", torch.device("cuda", 0)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_impl("triton", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_mismatch_raises():
    args = _valid_args()
    with pytest.raises(ValueError, match="weight must be on x's device"):
        check_dwconv_inputs(args["x"].cuda(), args["weight"], None, (3, 4), "none", None)


# --------------------------------------------------------------------------------------------
# Full size, GPU only
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("stage", STAGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_stage_shapes(stage, epilogue, dtype):
    height, width, channels = stage
    check_against_conv2d(2, height, width, channels, dtype, epilogue, seed=height + channels)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3, 13, 21, 768), (1, 1, 37, 320), (2, 31, 1, 96), (1, 1, 1, 768),
                                   (3, 33, 65, 160)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_gpu_large_channels_and_odd_maps(shape, epilogue):
    check_against_conv2d(*shape, torch.float32, epilogue, seed=shape[-1])


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["sliced", "channels_strided"])
def test_gpu_strided_stage_shape(layout):
    check_against_conv2d(2, 100, 160, 128, torch.float32, "add", seed=43, layout=layout,
                         grad_layout="channels_strided")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_backward_bitwise_repeatable(dtype):
    x, weight, bias, _ = make_inputs(2, 200, 320, 64, dtype, "silu", seed=47)
    grad_out = torch.randn_like(x)
    runs = [torch.autograd.grad(dwconv3x3_tokens(x, weight, bias, (200, 320), "silu"), [x, weight, bias], grad_out)
            for _ in range(3)]
    for first, other in zip(runs[0], runs[1]):
        assert torch.equal(first, other)
    for first, other in zip(runs[0], runs[2]):
        assert torch.equal(first, other)


@pytest.mark.gpu
def test_gpu_opcheck_stage_shape():
    x, weight, bias, addend = make_inputs(2, 50, 80, 256, torch.float32, "add", seed=53)
    torch.library.opcheck(torch.ops.mlla_kernels.dwconv3x3_tokens.default,
                          (x, weight, bias, addend, 50, 80, "add"))
