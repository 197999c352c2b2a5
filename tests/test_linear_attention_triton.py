"""The fused Triton linear attention against the float64 reference and the paper's golden data.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py): shapes stay small and
launch_overrides forces small blocks and several splits, so multi-split reductions and partial
blocks are exercised anyway. Tests marked gpu cover the big shapes, opcheck and torch.compile.
Every check draws fresh random inputs (the seed is in the failure message) and the buffers the
kernels write are NaN-filled beforehand.
"""
import math
import os
import random

import pytest
import torch
import triton
import triton.language as tl

from mlla_kernels import linear_attention, linear_attention_reference
from mlla_kernels.reference import feature_map
from mlla_kernels.rope import apply_rope
from mlla_kernels.triton import launch_overrides, linear_attention_triton
from mlla_kernels.triton._common import (block_rows_cols, cos_sin_reduced, quadrants, rope_cos_sin, split_tf32,
                                          token_reduction)
from mlla_kernels.triton.launch import attention_backward, attention_forward, launch_config

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
# Under the interpreter: 16-token blocks and 3 splits, so a few dozen tokens give several
# programs per head and a partial last block.
SMALL_LAUNCH = dict(block_n=16, splits=3)


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture
def gen():
    """A generator with a fresh seed per test; the seed is printed when a test fails."""
    seed = random.SystemRandom().randrange(2 ** 31)
    print(f"seed {seed}")
    return torch.Generator().manual_seed(seed)


def make_inputs(gen, batch, height, width, channels, dtype, strided=False, scale=1.0):
    """qk (B, N, 2C) and v (B, N, C) on DEVICE. strided: qk is a slice of a wider projection
    output and v a transposed (channel-major) view, so neither is contiguous."""
    n = height * width
    if strided:
        wide = torch.randn(batch, n, 2 * channels + 24, generator=gen, dtype=torch.float64) * scale
        qk = wide.to(DEVICE, dtype)[..., 8:8 + 2 * channels]
        v = (torch.randn(batch, channels, n, generator=gen, dtype=torch.float64) * scale).to(DEVICE, dtype)
        v = v.transpose(1, 2)
        assert not qk.is_contiguous() and not v.is_contiguous()
    else:
        qk = (torch.randn(batch, n, 2 * channels, generator=gen, dtype=torch.float64) * scale).to(DEVICE, dtype)
        v = (torch.randn(batch, n, channels, generator=gen, dtype=torch.float64) * scale).to(DEVICE, dtype)
    return qk, v


def reference_with_grads(qk, v, hw, heads, grad_out):
    qk64 = qk.detach().double().requires_grad_()
    v64 = v.detach().double().requires_grad_()
    out = linear_attention_reference(qk64, v64, hw, heads)
    out.backward(grad_out.double())
    return out.detach(), qk64.grad, v64.grad


def fused_with_grads(qk, v, hw, heads, grad_out, deterministic=True):
    """Forward and backward through the kernels' entry points with NaN-poisoned output buffers."""
    nan_like = lambda t: torch.full(t.shape, float("nan"), dtype=t.dtype, device=t.device)  # noqa: E731
    out = nan_like(v)
    attention_forward(qk, v, hw[0], hw[1], heads, deterministic, out=out)
    _, state = attention_forward(qk, v, hw[0], hw[1], heads, deterministic)
    grad_qk, grad_v = nan_like(qk), nan_like(v)
    attention_backward(grad_out, qk, v, state, hw[0], hw[1], heads, deterministic, grad_qk=grad_qk, grad_v=grad_v)
    return out, grad_qk, grad_v


def assert_matches_reference(qk, v, hw, heads, gen, deterministic=True, grad_abs_tol=None):
    dtype = v.dtype
    grad_out = torch.randn(v.shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    ref_out, ref_gqk, ref_gv = reference_with_grads(qk, v, hw, heads, grad_out)
    out, grad_qk, grad_v = fused_with_grads(qk, v, hw, heads, grad_out, deterministic)
    for name, x in (("out", out), ("grad_qk", grad_qk), ("grad_v", grad_v)):
        assert x.dtype == dtype, f"{name} is {x.dtype}, expected {dtype}"
        assert torch.isfinite(x).all(), f"{name} has NaN/Inf (unwritten elements?)"
    tol = TOLERANCE[dtype]
    assert rel_err(out, ref_out) < tol, f"out: {rel_err(out, ref_out):.2e}"
    assert rel_err(grad_v, ref_gv) < tol, f"grad_v: {rel_err(grad_v, ref_gv):.2e}"
    if grad_abs_tol is None:
        assert rel_err(grad_qk, ref_gqk) < tol, f"grad_qk: {rel_err(grad_qk, ref_gqk):.2e}"
    else:  # the exact gradient is ~0 (N = 1): relative error means nothing, bound the absolute one
        assert (grad_qk.double() - ref_gqk).abs().max().item() < grad_abs_tol


# ---------------------------------------------------------------------------------------------
# Small shapes: run everywhere (interpreter on the CPU).

@pytest.mark.parametrize("batch, height, width, channels, heads", [
    (1, 5, 7, 32, 2),    # d = 16, odd H and W, H != W
    (2, 3, 11, 64, 2),   # d = 32, rows and columns on separate heads
    (3, 6, 5, 64, 1),    # d = 64, batch 3
    (2, 7, 3, 48, 3),    # d = 16 with C/4 = 12: a head's pairs mix row and column angles
    (1, 4, 4, 8, 2),     # d = 4 (golden data has it): half a head padded to 16 lanes
])
def test_fp32_matches_float64_reference(gen, batch, height, width, channels, heads):
    qk, v = make_inputs(gen, batch, height, width, channels, torch.float32)
    with launch_overrides(**SMALL_LAUNCH):
        assert_matches_reference(qk, v, (height, width), heads, gen)


def test_single_token(gen):
    qk, v = make_inputs(gen, 2, 1, 1, 32, torch.float32)
    assert_matches_reference(qk, v, (1, 1), 2, gen, grad_abs_tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_float64_reference(gen, dtype):
    qk, v = make_inputs(gen, 2, 5, 9, 64, dtype)
    with launch_overrides(**SMALL_LAUNCH):
        assert_matches_reference(qk, v, (5, 9), 2, gen)


def test_strided_inputs_are_read_in_place(gen):
    qk, v = make_inputs(gen, 2, 7, 5, 64, torch.float32, strided=True)
    with launch_overrides(**SMALL_LAUNCH):
        assert_matches_reference(qk, v, (7, 5), 2, gen)


def test_atomic_mode_matches_reference(gen):
    qk, v = make_inputs(gen, 1, 6, 9, 32, torch.float32)
    with launch_overrides(**SMALL_LAUNCH):
        assert_matches_reference(qk, v, (6, 9), 2, gen, deterministic=False)


@pytest.mark.parametrize("dot_mode, tol", [("ieee", 1e-5), ("tf32x3", 1e-5), ("tf32", 3e-3)])
def test_matrix_product_modes_compute_the_same_function(gen, dot_mode, tol):
    """Every product mode, forced for both directions (the interpreter runs every mode in fp32;
    on a GPU the tolerance is the mode's own rounding)."""
    qk, v = make_inputs(gen, 1, 5, 6, 32, torch.float32)
    with launch_overrides(dot_mode=dot_mode, block_n=16, splits=2):
        out, grad_qk, grad_v = fused_with_grads(qk, v, (5, 6), 2, torch.ones_like(v))
    ref_out, ref_gqk, ref_gv = reference_with_grads(qk, v, (5, 6), 2, torch.ones_like(v))
    assert rel_err(out, ref_out) < tol and rel_err(grad_qk, ref_gqk) < tol and rel_err(grad_v, ref_gv) < tol
    with pytest.raises(ValueError, match="dot_mode must be one of"):
        with launch_overrides(dot_mode="fp8"):
            pass


def test_default_product_mode_follows_the_input_dtype_and_pass(monkeypatch):
    from mlla_kernels.triton import launch
    assert [launch.dot_mode(torch.float32, name) for name in launch.PASSES] == ["ieee", "tf32x3", "tf32x3"]
    for dtype in (torch.bfloat16, torch.float16):
        assert {launch.dot_mode(dtype, name) for name in launch.PASSES} == {"tf32"}
    with launch_overrides(dot_mode="ieee"):
        assert {launch.dot_mode(torch.bfloat16, name) for name in launch.PASSES} == {"ieee"}
    with launch_overrides(dot_mode="tf32", dot_mode_backward="tf32x3"):  # the pass's own wins
        assert launch.dot_mode(torch.float32, "state") == launch.dot_mode(torch.float32, "output") == "tf32"
        assert launch.dot_mode(torch.float32, "backward") == "tf32x3"
    with launch_overrides(dot_mode_forward="tf32", dot_mode_output="ieee"):
        assert [launch.dot_mode(torch.float32, name) for name in launch.PASSES] == ["tf32", "ieee", "tf32x3"]
    with pytest.raises(ValueError, match="dot_mode_forward must be one of"):
        with launch_overrides(dot_mode_forward="fp16"):
            pass
    monkeypatch.setattr(launch, "_DOT_MODE_FORCED", "tf32x3")
    assert launch.dot_mode(torch.float32, "state") == "tf32x3"


def test_split_and_block_choices_agree(gen):
    """One split, many splits, one token block per split: the same function."""
    qk, v = make_inputs(gen, 1, 5, 10, 32, torch.float32)
    ref = linear_attention_reference(qk.double(), v.double(), (5, 10), 2)
    for overrides in (dict(block_n=16, splits=1), dict(block_n=16, splits=4), dict(block_n=32, splits=2)):
        with launch_overrides(**overrides):
            out = linear_attention_triton(qk, v, (5, 10), 2)
        assert rel_err(out, ref) < 1e-5, overrides


def nan_filled_empty(monkeypatch):
    """Make torch.empty return NaN-filled floating tensors for the rest of the test, so that any
    workspace or result a kernel leaves unwritten shows up."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", poisoned)


def reference_state(qk, v, hw, heads):
    """The per-head state in float64, as attention_forward returns it: sum_m rope(phi(k_m))^T v_m
    flattened, then sum_m phi(k_m)."""
    channels = v.shape[-1]
    k = feature_map(qk[..., channels:].double())
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731 (B, heads, N, d)
    k_rope = split(apply_rope(k, hw))
    kv = k_rope.transpose(-2, -1) @ split(v.double())
    return torch.cat([kv.flatten(-2), split(k).sum(-2)], dim=-1)


@pytest.mark.parametrize("reduce_splits", [1, 2, 6, 12])  # 12: more partials than one step of load_state loads
@pytest.mark.parametrize("fold_max_partials", [0, 16])
def test_partial_states_folded_or_summed_give_the_same_function(gen, monkeypatch, reduce_splits,
                                                                  fold_max_partials):
    """The reducing pass may split the tokens differently from the pass that uses its state, and
    its partial states are either added up where they are used (the forward then stores the
    total for the backward) or summed by sum_partials_kernel first: the state the forward returns,
    the output and the gradients agree with float64 either way, every workspace NaN-poisoned."""
    nan_filled_empty(monkeypatch)
    hw, heads = (12, 16), 2  # 12 blocks of 16 tokens
    qk, v = make_inputs(gen, 2, *hw, 32, torch.float32)
    with launch_overrides(block_n=16, splits=3, reduce_splits=reduce_splits, fold_max_partials=fold_max_partials):
        assert launch_config(hw[0] * hw[1], 2 * heads, 16, qk.device, "forward").reduce_splits == reduce_splits
        _, state = attention_forward(qk, v, *hw, heads)
        assert rel_err(state, reference_state(qk, v, hw, heads)) < 1e-6
        assert_matches_reference(qk, v, hw, heads, gen)


@pytest.fixture
def gpu_of_132_sms(monkeypatch):
    """A CUDA device as the launch rules see it (132 SMs, as on an H100 SXM or H200), so the
    rules that count SMs are checked without a GPU; the cache of launch configurations starts
    empty and is thrown away afterwards."""
    from mlla_kernels.triton import launch
    monkeypatch.setattr(launch, "_sm_count", lambda index: 132)
    monkeypatch.setattr(launch, "_launch_configs", {})
    return torch.device("cuda", 0)


def test_pipelining_depth_follows_the_blocks_per_program_and_rope_trig_the_device(gpu_of_132_sms):
    """Triton's default depth of 3, 2 where programs run few blocks (the rule counts SMs) except
    in the forward's reducing pass while its programs still run several blocks, and the overrides,
    the direction's own first. RoPE's cos/sin: the special function unit in compiled kernels in
    both directions, never in the interpreter."""
    from mlla_kernels.triton import launch
    cpu, gpu = torch.device("cpu"), gpu_of_132_sms
    assert launch_config(1000, 48, 32, cpu, "forward").num_stages == launch.NUM_STAGES
    assert not launch_config(64000, 4, 32, cpu, "forward").fast_trig
    with launch_overrides(fast_trig=True), pytest.raises(ValueError, match="fast_trig needs"):
        launch_config(64000, 4, 32, cpu, "forward")
    assert launch_config(1000, 48, 32, gpu, "backward").num_stages == launch.FEW_BLOCKS_NUM_STAGES
    assert launch_config(64000, 4, 32, gpu, "backward").num_stages == launch.NUM_STAGES
    assert launch_config(64000, 4, 32, gpu, "backward").fast_trig
    for num_tokens, batch_heads in ((1000, 32), (4000, 16), (1000, 48), (4000, 24)):  # MLLA-T/-B stages 4, 3
        cfg = launch_config(num_tokens, batch_heads, 32, gpu, "forward")
        deep = cfg.reduce_tokens_per_split >= launch.MIN_BLOCKS_PER_PROGRAM * cfg.block_n
        assert cfg.num_stages == launch.FEW_BLOCKS_NUM_STAGES
        assert cfg.reduce_num_stages == (launch.NUM_STAGES if deep else launch.FEW_BLOCKS_NUM_STAGES)
        backward = launch_config(num_tokens, batch_heads, 32, gpu, "backward")
        assert backward.reduce_num_stages == backward.num_stages == launch.FEW_BLOCKS_NUM_STAGES
        assert cfg.fast_trig and backward.fast_trig
    with launch_overrides(num_stages=4, num_stages_backward=1):
        cfg = launch_config(1000, 48, 32, gpu, "forward")
        assert cfg.num_stages == cfg.reduce_num_stages == 4
        assert launch_config(1000, 48, 32, gpu, "backward").num_stages == 1


# (tokens, batch x heads) of MLLA-T and MLLA-B at 1280x800, batch 2 -> forward (reduce splits,
# splits), backward (reduce splits, splits) on 132 SMs: 64-token blocks; where a head has few
# blocks the forward's reduction runs 3 programs per SM if its partials still fold (<= 16), else 2;
# the backward's reduction 2 per SM and its second pass 3.
FEW_BLOCKS_SPLITS = {
    (64000, 4): ((125, 125), (125, 125)),   # MLLA-T stage 1: not few blocks, 4 per SM (132 runs of 8 blocks -> 125)
    (4000, 16): ((16, 32), (16, 21)),       # MLLA-T stage 3: 3 per SM would leave 21 partials
    (1000, 32): ((8, 16), (8, 8)),          # MLLA-T stage 4
    (4000, 24): ((16, 21), (11, 16)),       # MLLA-B stage 3
    (1000, 48): ((8, 8), (6, 8)),           # MLLA-B stage 4
}


@pytest.mark.parametrize("shape", list(FEW_BLOCKS_SPLITS))
def test_split_counts_at_the_mlla_stage_shapes(gpu_of_132_sms, shape):
    forward, backward = (launch_config(*shape, 32, gpu_of_132_sms, direction) for direction in ("forward", "backward"))
    assert ((forward.reduce_splits, forward.splits), (backward.reduce_splits, backward.splits)) == \
        FEW_BLOCKS_SPLITS[shape]


def test_backward_applying_pass_runs_three_programs_per_sm_at_few_blocks(gpu_of_132_sms):
    """Where programs run few blocks, key_value_grad_kernel runs 3 programs per SM with its
    registers capped so that 3 fit at 4 warps, while query_grad_state_kernel keeps 2 uncapped;
    not at 8 warps (d = 64), where the cap would not let 3 fit. Register caps and programs per SM
    can be forced per direction and pass."""
    from mlla_kernels.triton import launch
    cpu, gpu = torch.device("cpu"), gpu_of_132_sms
    assert launch_config(1000, 48, 32, cpu, "backward").max_registers is None
    with launch_overrides(max_registers_backward=160, reduce_max_registers=128):
        forward, backward = (launch_config(1000, 48, 32, cpu, direction) for direction in ("forward", "backward"))
        assert (forward.max_registers, forward.reduce_max_registers) == (None, 128)
        assert (backward.max_registers, backward.reduce_max_registers) == (160, 128)
    backward = launch_config(1000, 48, 32, gpu, "backward")  # MLLA-B stage 4
    assert backward.max_registers == launch.FEW_BLOCKS_APPLY_MAX_REGISTERS_BACKWARD
    assert backward.reduce_max_registers is None
    assert launch_config(1000, 48, 32, gpu, "forward").max_registers is None
    assert launch_config(1000, 48, 64, gpu, "backward").max_registers is None
    assert launch_config(64000, 4, 32, gpu, "backward").max_registers is None
    forward = launch_config(1000, 48, 32, gpu, "forward")
    with launch_overrides(programs_per_sm_backward=1, reduce_programs_per_sm_backward=1):
        backward = launch_config(1000, 48, 32, gpu, "backward")
        assert backward.splits == backward.reduce_splits == 3  # 48 heads on 132 SMs: 3 programs of 6, 6, 4 blocks
        assert launch_config(1000, 48, 32, gpu, "forward") == forward


def test_forward_and_backward_may_use_different_blocks(gen):
    """The backward recomputes from the inputs and the state alone, so its token blocks need not
    be the forward's."""
    qk, v = make_inputs(gen, 2, 7, 9, 32, torch.float32)
    with launch_overrides(block_n_forward=32, block_n_backward=16, splits=2):
        assert launch_config(63, 4, 16, qk.device, "forward").block_n == 32
        assert launch_config(63, 4, 16, qk.device, "backward").block_n == 16
        assert_matches_reference(qk, v, (7, 9), 2, gen)


@pytest.mark.parametrize("num_tokens, batch_heads, head_dim", [(1, 1, 32), (40, 4, 16), (64000, 4, 32),
                                                                 (1000, 48, 64), (17, 3, 96)])
def test_launch_geometry_covers_every_token_once(num_tokens, batch_heads, head_dim):
    for device in (torch.device("cpu"), DEVICE):
        for direction in ("forward", "backward"):
            cfg = launch_config(num_tokens, batch_heads, head_dim, device, direction)
            for splits, tokens_per_split in ((cfg.splits, cfg.tokens_per_split),
                                             (cfg.reduce_splits, cfg.reduce_tokens_per_split)):
                assert cfg.block_n >= 16 and tokens_per_split % cfg.block_n == 0
                assert (splits - 1) * tokens_per_split < num_tokens <= splits * tokens_per_split


def test_golden_data(reference_dir):
    """The paper's float64 outputs and gradients, from fp32 inputs."""
    cases = torch.load(os.path.join(reference_dir, "linear_attention_core.pt"), weights_only=False)
    assert len(cases) >= 5
    for case in cases:
        qk = case["qk"].to(DEVICE, torch.float32).requires_grad_()
        v = case["v"].to(DEVICE, torch.float32).requires_grad_()
        hw = (case["h"], case["w"])
        out = linear_attention(qk, v, hw, case["heads"], impl="triton")
        out.backward(case["grad_out"].to(DEVICE, torch.float32))
        label = f"case b={case['b']} {hw} c={case['c']} heads={case['heads']}"
        assert rel_err(out, case["out"].to(DEVICE)) < 1e-5, label
        assert rel_err(qk.grad, case["grad_qk"].to(DEVICE)) < 1e-5, label
        assert rel_err(v.grad, case["grad_v"].to(DEVICE)) < 1e-5, label


def test_public_op_is_differentiable_and_keeps_dtype(gen):
    qk, v = make_inputs(gen, 2, 4, 6, 32, torch.bfloat16)
    qk.requires_grad_()
    v.requires_grad_()
    out = linear_attention(qk, v, (4, 6), 2, impl="triton")
    assert out.dtype == torch.bfloat16 and out.shape == v.shape and out.is_contiguous()
    out.float().square().sum().backward()
    assert qk.grad.dtype == torch.bfloat16 and v.grad.dtype == torch.bfloat16
    assert qk.grad.shape == qk.shape and torch.isfinite(qk.grad).all() and torch.isfinite(v.grad).all()


def test_nan_propagates_like_the_reference(gen):
    qk, v = make_inputs(gen, 1, 3, 4, 16, torch.float32)
    v[0, 5, 0] = float("nan")
    qk[0, 7, 1] = float("nan")  # a q channel: only token 7's outputs
    out = linear_attention(qk, v, (3, 4), 2, impl="triton")
    ref = linear_attention_reference(qk, v, (3, 4), 2)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out.isnan().any()
    finite = ~ref.isnan()
    assert rel_err(out[finite], ref[finite].double()) < 1e-5


def check_compiled_module_compiles_once(gen, backend):
    """fullgraph (no graph break) and dynamic H, W (no recompile for a new size)."""
    import torch._dynamo.testing

    module = _AttentionModule(32, 2).to(DEVICE)
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(module, backend=counter, fullgraph=True, dynamic=True)
    for hw in ((3, 5), (4, 7), (6, 2)):
        x = torch.randn(2, 32, *hw, generator=gen).to(DEVICE).requires_grad_()
        out = compiled(x)
        out.square().sum().backward()
        grad = x.grad.clone()
        x.grad = None
        expected = module(x, impl="reference")
        expected.square().sum().backward()
        assert rel_err(out, expected) < 1e-5 and rel_err(grad, x.grad) < 1e-5
    assert counter.frame_count == 1


def test_compiled_module_with_several_sizes_compiles_once(gen):
    check_compiled_module_compiles_once(gen, "aot_eager")


class _AttentionModule(torch.nn.Module):
    def __init__(self, channels, heads):
        super().__init__()
        self.qk = torch.nn.Linear(channels, 2 * channels)
        self.heads = heads

    def forward(self, x, impl="triton"):
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        return linear_attention(self.qk(tokens), tokens, (height, width), self.heads, impl=impl)


# ---------------------------------------------------------------------------------------------
# Errors.

def test_float64_is_refused_with_the_supported_dtypes_named():
    qk, v = torch.randn(1, 12, 16, dtype=torch.float64), torch.randn(1, 12, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        linear_attention(qk.to(DEVICE), v.to(DEVICE), (3, 4), 2, impl="triton")
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        linear_attention_triton(qk.to(DEVICE), v.to(DEVICE), (3, 4), 2)


def test_auto_falls_back_to_the_reference_where_the_kernels_do_not_fit():
    from mlla_kernels.linear_attention import resolve_impl
    cuda = torch.device("cuda")
    assert resolve_impl("auto", cuda, torch.float32, 32) == "triton"
    assert resolve_impl("auto", cuda, torch.float64, 32) == "reference"
    assert resolve_impl("auto", cuda, torch.float32, 3) == "reference"
    assert resolve_impl("auto", cuda, torch.float32, 32, 2 ** 21) == "triton"
    assert resolve_impl("auto", cuda, torch.float32, 32, 2 ** 21 + 1) == "reference"
    with pytest.raises(ValueError, match="widths up to"):
        resolve_impl("triton", cuda, torch.float32, 32, 2 ** 21 + 1)
    assert resolve_impl("auto", torch.device("cpu"), torch.float32, 32) == "reference"


@pytest.mark.parametrize("qk_shape, v_shape, hw, heads, error, match", [
    ((0, 12, 16), (0, 12, 8), (3, 4), 2, ValueError, "at least one"),
    ((2, 0, 16), (2, 0, 8), (0, 4), 2, ValueError, "at least one"),
    ((2, 12, 16), (2, 12, 8), (3, 5), 2, ValueError, "H\\*W = 15"),
    ((2, 12, 24), (2, 12, 12), (3, 4), 5, ValueError, "cannot be split"),
    ((2, 12, 24), (2, 12, 12), (3, 4), 4, ValueError, "even head dim"),
    ((2, 12, 16), (2, 12, 9), (3, 4), 1, ValueError, "qk must be"),
    ((2, 12, 16), (2, 12, 8), (3, 4, 1), 2, ValueError, "hw_shape must be"),
    ((1, 2 ** 21 + 1, 16), (1, 2 ** 21 + 1, 8), (1, 2 ** 21 + 1), 2, ValueError, "widths up to 2097152"),
])
def test_bad_inputs_raise_clear_errors(qk_shape, v_shape, hw, heads, error, match):
    # Broadcast views: the 2**21-token case needs no memory.
    qk, v = (torch.randn(1, 1, shape[-1], device=DEVICE).expand(shape) for shape in (qk_shape, v_shape))
    with pytest.raises(error, match=match):
        linear_attention_triton(qk, v, hw, heads)


def test_mixed_dtypes_and_devices_are_refused():
    qk, v = torch.randn(1, 12, 16, device=DEVICE), torch.randn(1, 12, 8, device=DEVICE)
    with pytest.raises(TypeError, match="share a dtype"):
        linear_attention_triton(qk, v.half(), (3, 4), 2)
    if ON_GPU:
        with pytest.raises(ValueError, match="one device"):
            linear_attention_triton(qk, v.cpu(), (3, 4), 2)


@pytest.mark.skipif(ON_GPU, reason="checks the CPU without the interpreter")
def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        linear_attention_triton(torch.randn(1, 12, 16), torch.randn(1, 12, 8), (3, 4), 2)
    with pytest.raises(ValueError, match="CUDA"):
        linear_attention(torch.randn(1, 12, 16), torch.randn(1, 12, 8), (3, 4), 2, impl="triton")


# ---------------------------------------------------------------------------------------------
# GPU: full shapes, big N, opcheck, inductor, determinism.

GPU_SHAPES = [
    # batch, H, W, C, heads
    (2, 200, 320, 64, 2),    # MLLA-T stage 1 at 1280x800: 64,000 tokens, 2 x 2 programs' worth of heads
    (1, 336, 200, 64, 2),    # 67,200 tokens (> 64k)
    (3, 25, 39, 512, 16),    # stage 4, odd W
    (2, 49, 81, 96, 3),      # MLLA-B stage 1 head count, odd sizes
    (1, 17, 23, 128, 8),     # d = 16
    (2, 31, 29, 256, 4),     # d = 64
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch, height, width, channels, heads", GPU_SHAPES)
def test_gpu_shape_matrix(gen, dtype, batch, height, width, channels, heads):
    qk, v = make_inputs(gen, batch, height, width, channels, dtype, strided=(height % 2 == 1))
    assert_matches_reference(qk, v, (height, width), heads, gen)


# Every product mode on tensor cores / FMA units at a full stage-1 shape, against float64: the
# defaults (tf32x3 for fp32, tf32 for 16-bit) must hold each dtype's bound; tf32 on fp32 inputs is
# offered with its own, looser bound (10-bit operands).
GPU_MODE_TOLERANCE = {(torch.float32, "ieee"): 1e-5, (torch.float32, "tf32x3"): 1e-5,
                      (torch.float32, "tf32"): 3e-3, (torch.bfloat16, "ieee"): 2e-2,
                      (torch.bfloat16, "tf32"): 2e-2, (torch.float16, "ieee"): 5e-3,
                      (torch.float16, "tf32"): 5e-3}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, dot_mode", list(GPU_MODE_TOLERANCE))
def test_gpu_every_product_mode_holds_its_bound(gen, dtype, dot_mode):
    qk, v = make_inputs(gen, 2, 200, 320, 64, dtype)
    grad_out = torch.randn(v.shape, generator=gen).to(DEVICE, dtype)
    ref = reference_with_grads(qk, v, (200, 320), 2, grad_out)
    with launch_overrides(dot_mode=dot_mode):
        fused = fused_with_grads(qk, v, (200, 320), 2, grad_out)
    tol = GPU_MODE_TOLERANCE[(dtype, dot_mode)]
    errs = [rel_err(a, b) for a, b in zip(fused, ref)]
    assert max(errs) < tol, f"{dot_mode} on {dtype}: out / grad_qk / grad_v errors {errs}"


@pytest.mark.gpu
@pytest.mark.parametrize("fast_trig", [False, True])
@pytest.mark.parametrize("height, width", [(200, 320), (25, 39)])
def test_gpu_both_rope_paths_hold_the_fp32_bound(gen, fast_trig, height, width):
    """Compiled kernels take sin.approx / cos.approx unless launch_overrides asks for the
    polynomials; each path must hold fp32's bound in both directions at a large and a small shape."""
    qk, v = make_inputs(gen, 2, height, width, 64, torch.float32)
    with launch_overrides(fast_trig=fast_trig):
        assert launch_config(height * width, 4, 32, DEVICE, "backward").fast_trig == fast_trig
        assert_matches_reference(qk, v, (height, width), 2, gen)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_register_caps_keep_the_bound(gen, dtype):
    """Capping every kernel's registers (Triton's maxnreg) below what it wants makes the compiler
    spill; the results must still hold the dtype's bound (MLLA-B stage 4 shape)."""
    qk, v = make_inputs(gen, 2, 25, 40, 768, dtype)
    with launch_overrides(max_registers=128, reduce_max_registers=128):
        assert launch_config(1000, 48, 32, DEVICE, "backward").max_registers == 128
        assert_matches_reference(qk, v, (25, 40), 24, gen)


@pytest.mark.gpu
def test_gpu_fp16_large_activations_do_not_overflow(gen):
    height, width, channels = 336, 200, 64
    qk = (torch.rand(1, height * width, 2 * channels, generator=gen) * 60 - 30).to(DEVICE, torch.float16)
    v = (torch.rand(1, height * width, channels, generator=gen) * 60 - 30).to(DEVICE, torch.float16)
    assert_matches_reference(qk, v, (height, width), 2, gen)


@pytest.mark.gpu
def test_gpu_inductor_module_with_several_sizes_compiles_once(gen):
    check_compiled_module_compiles_once(gen, "inductor")


@pytest.mark.gpu
def test_gpu_golden_data(reference_dir):
    test_golden_data(reference_dir)


@pytest.mark.gpu
def test_gpu_opcheck(gen):
    qk, v = make_inputs(gen, 2, 13, 21, 64, torch.float32)
    qk.requires_grad_()
    v.requires_grad_()
    torch.library.opcheck(torch.ops.mlla.linear_attention_fwd.default, (qk, v, 13, 21, 2, True))
    _, state = torch.ops.mlla.linear_attention_fwd(qk, v, 13, 21, 2, True)
    grad_out = torch.randn(v.shape, generator=gen).to(DEVICE)
    torch.library.opcheck(torch.ops.mlla.linear_attention_bwd.default,
                          (grad_out, qk.detach(), v.detach(), state.detach(), 13, 21, 2, True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_deterministic_mode_is_bitwise_reproducible(gen, dtype):
    qk, v = make_inputs(gen, 2, 200, 320, 64, dtype)
    grad_out = torch.randn(v.shape, generator=gen).to(DEVICE, dtype)
    first = fused_with_grads(qk, v, (200, 320), 2, grad_out)
    second = fused_with_grads(qk, v, (200, 320), 2, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_matches_eager_bits(gen):
    """Forward and backward captured in one CUDA graph and replayed on new inputs give the eager
    call's bits."""
    height, width, channels, heads = 25, 40, 512, 16
    qk, v = make_inputs(gen, 2, height, width, channels, torch.float32)
    grad_out = torch.randn(v.shape, generator=gen).to(DEVICE)
    static = [t.clone() for t in (qk, v, grad_out)]

    def run(qk_, v_, grad_out_):
        out, state = attention_forward(qk_, v_, height, width, heads)
        return (out, *attention_backward(grad_out_, qk_, v_, state, height, width, heads))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run(*static)  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run(*static)
    for target, fresh in zip(static, make_inputs(gen, 2, height, width, channels, torch.float32)
                             + (torch.randn(v.shape, generator=gen).to(DEVICE),)):
        target.copy_(fresh)
    for t in captured:
        t.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, run(*static)):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_autocast(gen):
    module = _AttentionModule(64, 2).to(DEVICE)
    x = torch.randn(2, 64, 20, 30, generator=gen).to(DEVICE).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        tokens = module.qk(x.flatten(2).transpose(1, 2))
        out = linear_attention(tokens, tokens[..., :64].contiguous(), (20, 30), 2, impl="triton")
    assert out.dtype == torch.bfloat16
    ref = linear_attention_reference(tokens.double(), tokens[..., :64].double(), (20, 30), 2)
    assert rel_err(out, ref) < 2e-2
    out.float().square().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_eager_function_and_custom_ops_run_the_same_kernels(gen):
    """Eager calls skip the torch.library ops' dispatch; both paths must give the same bits."""
    from mlla_kernels.triton import LinearAttentionFunction, linear_attention_fwd

    qk, v = make_inputs(gen, 2, 5, 7, 16, torch.float32, strided=True)
    grad_out = torch.randn(v.shape, generator=gen, dtype=torch.float64).to(DEVICE, torch.float32)
    results = []
    for path in ("function", "ops"):
        qk_, v_ = qk.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
        if path == "function":
            out = LinearAttentionFunction.apply(qk_, v_, 5, 7, 2, True)
        else:
            out, _ = linear_attention_fwd(qk_, v_, 5, 7, 2, True)
        out.backward(grad_out)
        results.append((out.detach(), qk_.grad, v_.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    ref = linear_attention_reference(qk.double(), v.double(), (5, 7), 2)
    assert rel_err(results[0][0], ref) < 1e-5


def test_autocast_mixed_inputs_reach_the_kernels_in_the_autocast_dtype(gen):
    qk, v = make_inputs(gen, 1, 4, 6, 16, torch.float32)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = linear_attention(qk.bfloat16(), v, (4, 6), 2, impl="triton")
    assert out.dtype == torch.bfloat16
    assert rel_err(out, linear_attention_reference(qk.double(), v.double(), (4, 6), 2)) < 2e-2


@pytest.mark.parametrize("splits", [1, 3, 64, 130])
@pytest.mark.parametrize("block_state", [16, 64])
def test_partial_states_sum_in_float64_agreement(gen, monkeypatch, splits, block_state):
    """The deterministic reduction's summing kernel: every entry of every head, more splits than
    one step takes (130 > 64) included, into a NaN-poisoned result."""
    from mlla_kernels.triton import launch
    state_size = 16 * 16 + 16 + 7  # not a multiple of the kernel's block of entries
    partials = torch.randn(3, splits, state_size, generator=gen, dtype=torch.float64).float().to(DEVICE)
    nan_filled_empty(monkeypatch)
    with launch_overrides(sum_block_state=block_state):
        result = launch._sum_partials(partials)
    assert result.shape == (3, state_size) and result.dtype == torch.float32
    assert torch.isfinite(result).all()
    expected = partials.float().double().sum(dim=1)
    assert (result.double() - expected).abs().max().item() < 1e-5 * max(1.0, splits ** 0.5)


def test_strides_beyond_int32_block_offsets_are_refused():
    from mlla_kernels.triton.launch import check_offsets_fit
    fine = torch.empty_strided((1, 64, 32), (64 * 32, 32, 1), device="meta")
    check_offsets_fit(32, 32, fine)
    huge = torch.empty_strided((1, 64, 32), (1, 2 ** 27, 1), device="meta")
    with pytest.raises(ValueError, match="spans more than 2\\*\\*31 elements"):
        check_offsets_fit(32, 32, fine, huge)


@triton.jit
def _pair_of_elementwise_kernel(x_ptr, first_ptr, second_ptr, FN: tl.constexpr, BLOCK: tl.constexpr):
    """(first, second) = FN(x) for a device helper that returns two tiles."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    first, second = FN(tl.load(x_ptr + offsets))
    tl.store(first_ptr + offsets, first)
    tl.store(second_ptr + offsets, second)


@triton.jit
def _token_reduction_kernel(a_ptr, b_ptr, c_ptr, d_ptr, out_ptr, BLOCK_N: tl.constexpr, DIM_PAD: tl.constexpr,
                            DOT_MODE: tl.constexpr):
    """The four (DIM_PAD, DIM_PAD) quadrants of token_reduction(a, b, c, d), stacked in out."""
    tile = tl.arange(0, BLOCK_N)[:, None] * DIM_PAD + tl.arange(0, DIM_PAD)[None, :]
    product = token_reduction(tl.load(a_ptr + tile), tl.load(b_ptr + tile), tl.load(c_ptr + tile),
                              tl.load(d_ptr + tile), BLOCK_N, DIM_PAD, DOT_MODE)
    square = tl.arange(0, DIM_PAD)[:, None] * DIM_PAD + tl.arange(0, DIM_PAD)[None, :]
    top_left, top_right, bottom_left, bottom_right = quadrants(product, DIM_PAD)
    tl.store(out_ptr + square, top_left)
    tl.store(out_ptr + DIM_PAD * DIM_PAD + square, top_right)
    tl.store(out_ptr + 2 * DIM_PAD * DIM_PAD + square, bottom_left)
    tl.store(out_ptr + 3 * DIM_PAD * DIM_PAD + square, bottom_right)


@pytest.mark.parametrize("mode", ["ieee", "tf32"])
def test_token_reduction_quadrants_are_the_four_products(gen, mode):
    """token_reduction(a, b, c, d) = [a | b]^T [c | d], and quadrants names its blocks: a^T c,
    a^T d, b^T c, b^T d (the backward's dKV and dkbar, and the tf32x3 hi/lo terms, are read from
    them by position)."""
    block_n, dim_pad = 64, 32
    a, b, c, d = (torch.randn(block_n, dim_pad, generator=gen) for _ in range(4))
    out = torch.full((4, dim_pad, dim_pad), float("nan"), device=DEVICE)
    _token_reduction_kernel[(1,)](*(t.to(DEVICE) for t in (a, b, c, d)), out, BLOCK_N=block_n, DIM_PAD=dim_pad,
                                  DOT_MODE=mode)
    a, b, c, d = (t.double() for t in (a, b, c, d))
    expected = torch.stack([a.T @ c, a.T @ d, b.T @ c, b.T @ d])
    error = (out.double().cpu() - expected).norm() / expected.norm()
    assert error < (1e-6 if mode == "ieee" or not ON_GPU else 3e-3), error


@triton.jit
def _rope_cos_sin_kernel(cos_ptr, sin_ptr, rows_ptr, cols_ptr, head, width, quarter_c, HEAD_DIM: tl.constexpr,
                         DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr, FAST_TRIG: tl.constexpr):
    block_start = tl.program_id(0) * BLOCK_N
    tokens = block_start + tl.arange(0, BLOCK_N)
    cos, sin = rope_cos_sin(block_start, head, width, HEAD_DIM, DIM_PAD, quarter_c, BLOCK_N, FAST_TRIG)
    offsets = tokens[:, None] * (DIM_PAD // 2) + tl.arange(0, DIM_PAD // 2)[None, :]
    tl.store(cos_ptr + offsets, cos)
    tl.store(sin_ptr + offsets, sin)
    rows, cols = block_rows_cols(block_start, width, BLOCK_N)
    tl.store(rows_ptr + tokens, rows)
    tl.store(cols_ptr + tokens, cols)


def test_rope_cos_sin_polynomials_match_the_library_in_float64():
    """cos_sin_reduced (half-angle Taylor polynomials) over [-pi, pi] against float64 cos/sin."""
    angles = torch.linspace(-math.pi, math.pi, 4096, dtype=torch.float32, device=DEVICE)
    cos, sin = torch.full_like(angles, float("nan")), torch.full_like(angles, float("nan"))
    _pair_of_elementwise_kernel[(4096 // 256,)](angles, cos, sin, FN=cos_sin_reduced, BLOCK=256)
    exact = angles.double()
    # Truncation < 6e-8; fp32 rounding in the polynomials and the double-angle step adds ~3 ulps.
    assert (cos.double() - exact.cos()).abs().max() < 5e-7 and (sin.double() - exact.sin()).abs().max() < 5e-7


@pytest.mark.parametrize("fast_trig", [False, pytest.param(True, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("height, width, head", [(400, 1, 0), (30, 37, 0), (30, 37, 1), (3, 3000, 1), (64, 7, 1)])
def test_rope_angles_follow_rows_and_columns(fast_trig, height, width, head):
    """The whole RoPE path (rows and columns from the block's first token, angle, reduction, cos
    and sin; the polynomials, or the special function unit on the GPU) against float64, with
    blocks that cross rows and angles up to 3000 rad. C = 64 (K = 16 pairs): head 0 turns by
    rows, head 1 by columns."""
    n, half, block_n = height * width, 16, 16
    padded = triton.cdiv(n, block_n) * block_n
    cos, sin = (torch.full((padded, half), float("nan"), device=DEVICE) for _ in range(2))
    rows, cols = (torch.full((padded,), -1, dtype=torch.int32, device=DEVICE) for _ in range(2))
    _rope_cos_sin_kernel[(padded // block_n,)](cos, sin, rows, cols, head, width, 16, HEAD_DIM=32, DIM_PAD=32,
                                               BLOCK_N=block_n, FAST_TRIG=fast_trig)
    tokens = torch.arange(padded)
    assert torch.equal(rows.cpu().long(), tokens // width) and torch.equal(cols.cpu().long(), tokens % width)
    theta = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    position = (tokens // width if head == 0 else tokens % width).double()
    exact = position[:, None] * theta[None, :]
    # The fp32 angle (position * theta, theta from exp2) is within ~1 ulp, 6e-8 of its size; the
    # range reduction adds none of its own, the polynomials or sin.approx / cos.approx < 1e-6.
    bound = 6e-8 * exact.max().item() + 1e-6
    assert (cos.double().cpu() - exact.cos()).abs().max() < bound
    assert (sin.double().cpu() - exact.sin()).abs().max() < bound


def test_tf32_split_is_exact_and_rounds_to_nearest(gen):
    """The tf32x3 products rest on x = hi + lo with hi on tf32's grid (low 13 bits clear) and the
    nearest such value (|lo| at most half of hi's last bit), over signs and many magnitudes."""
    x = torch.randn(4096, generator=gen) * torch.exp2(torch.randint(-60, 60, (4096,), generator=gen).float())
    x = x.to(DEVICE)
    hi, lo = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    _pair_of_elementwise_kernel[(4096 // 256,)](x, hi, lo, FN=split_tf32, BLOCK=256)
    assert torch.equal(hi + lo, x)
    assert (hi.view(torch.int32) & 0x1FFF).eq(0).all()
    half_ulp = torch.exp2(torch.floor(torch.log2(hi.abs())) - 11)
    assert (lo.abs() <= half_ulp).all()
