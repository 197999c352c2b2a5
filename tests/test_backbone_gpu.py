"""MLLA-T with the fused kernels against the eager reference path, on the same weights (GPU).

Every path is measured against a float64 run of the reference: a fused fp32 path must be as
close to it as the eager fp32 path is (BatchNorm's backward in the stem cancels large terms, so
some parameter gradients carry ~1e-3 relative rounding error in any fp32 implementation), and the
fused path under bf16 autocast as close as the eager one under the same autocast.
"""
import contextlib
import copy

import pytest
import torch

from mlla_det.models.backbones.mlla import MLLA

# name -> (attn_impl, conv_impl)
PATHS = {"reference": ("reference", "reference"), "fused-attn": ("triton", "reference"),
         "fused": ("triton", "triton")}


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def set_path(model, path):
    attn_impl, conv_impl = PATHS[path]
    for module in model.modules():
        if hasattr(module, "attn_impl"):
            module.attn_impl = attn_impl
        if hasattr(module, "conv_impl"):
            module.conv_impl = conv_impl
    return model


def run(model, image, weights, autocast=False):
    context = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        outs = model(image.to(next(model.parameters()).dtype))
    sum((o.float() * w.to(torch.float32)).sum() for o, w in zip(outs, weights)).backward()
    return [o.detach() for o in outs], {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def base_and_exact():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    image = torch.randn(2, 3, 250, 330, device="cuda")  # odd token grids at every stage
    base = set_path(MLLA(embed_dim=64, depths=(2, 4, 8, 4), num_heads=(2, 4, 8, 16), drop_path_rate=0.0),
                    "reference").cuda().train()
    with torch.no_grad():
        weights = [torch.randn_like(o) for o in base(image)]
    exact = run(copy.deepcopy(base).double(), image, weights)
    return base, image, weights, exact


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["fused-attn", "fused"])
def test_mlla_t_fused_matches_reference_outputs_and_gradients_fp32(base_and_exact, path):
    base, image, weights, (exact_outs, exact_grads) = base_and_exact
    eager_outs, eager_grads = run(copy.deepcopy(base), image, weights)
    fused_outs, fused_grads = run(set_path(copy.deepcopy(base), path), image, weights)
    assert set(fused_grads) == set(exact_grads)
    for fused, eager, exact in zip(fused_outs, eager_outs, exact_outs):
        assert rel_err(fused, exact) < max(4 * rel_err(eager, exact), 1e-5)
        assert rel_err(fused, eager) < 1e-4
    # Per parameter: 4x the eager error, at least 1e-3 (the cancellation floor named above: a bias
    # gradient summed over a stage's positions came out 1.4e-4 off with the eager one at 9e-6, the
    # summation order being all that differs); the whole gradient vector: 2x the eager error.
    assert_gradients_as_close_as_eager(fused_grads, eager_grads, exact_grads, per_param=(4, 1e-3), whole=(2, 1e-5))


def assert_gradients_as_close_as_eager(fused_grads, eager_grads, exact_grads, per_param, whole):
    """Every fused parameter gradient finite and within factor x the eager one's error against
    float64 (at least floor), per parameter and over the whole gradient vector; (factor, floor)."""
    for param, exact in exact_grads.items():
        fused, eager = fused_grads[param], eager_grads[param]
        assert fused is not None and torch.isfinite(fused).all(), param
        assert rel_err(fused, exact) < max(per_param[0] * rel_err(eager, exact), per_param[1]), param

    def flat(grads):
        return torch.cat([grads[name].double().flatten() for name in exact_grads])
    exact_all = flat(exact_grads)
    assert rel_err(flat(fused_grads), exact_all) < max(whole[0] * rel_err(flat(eager_grads), exact_all), whole[1])


@pytest.mark.gpu
def test_mlla_t_fused_under_bf16_autocast_is_as_close_as_eager(base_and_exact):
    """bf16 rounding makes single gradients noisy in any implementation (0.05-0.25 relative error
    for the eager model itself, and a fused op that rounds at other points draws other noise), so
    each parameter gets 3x the eager error as room, and the whole gradient vector 1.5x."""
    base, image, weights, (exact_outs, exact_grads) = base_and_exact
    eager_outs, eager_grads = run(copy.deepcopy(base), image, weights, autocast=True)
    fused_outs, fused_grads = run(set_path(copy.deepcopy(base), "fused"), image, weights, autocast=True)
    for fused, eager, exact in zip(fused_outs, eager_outs, exact_outs):
        assert rel_err(fused, exact) < max(1.5 * rel_err(eager, exact), 2e-2)
    assert_gradients_as_close_as_eager(fused_grads, eager_grads, exact_grads, per_param=(3, 5e-2), whole=(1.5, 2e-2))


@pytest.mark.gpu
def test_fused_kernels_are_the_default_on_cuda():
    from mlla_kernels.dwconv.op import resolve_impl as resolve_conv_impl
    from mlla_kernels.linear_attention import resolve_impl
    block = MLLA().layers[0].blocks[0]
    assert block.attn.attn_impl == "auto"
    assert block.conv_impl == "auto" and block.attn.conv_impl == "auto"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert resolve_impl("auto", torch.device("cuda"), dtype, 32) == "triton"
    assert resolve_impl("auto", torch.device("cpu"), torch.float32, 32) == "reference"
    assert resolve_conv_impl("auto", torch.device("cuda")) == "triton"
    assert resolve_conv_impl("auto", torch.device("cpu")) == "reference"


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_fused_backbone_replays_from_cuda_graphs(base_and_exact, autocast):
    """Fixed-size inputs can skip the host's launch cost: the fully fused backbone captured with
    torch.cuda.make_graphed_callables (forward and backward graphs) gives what the same backbone
    gives launched normally, on inputs other than the one it was captured with."""
    base, image, weights, _ = base_and_exact
    graphed = set_path(copy.deepcopy(base), "fused")
    plain = copy.deepcopy(graphed)
    context = (lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)) if autocast \
        else contextlib.nullcontext
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), context():  # Triton compiles and cuDNN warms up before capture
        sum(o.float().sum() for o in graphed(image)).backward()
    torch.cuda.current_stream().wait_stream(side)
    graphed.zero_grad(set_to_none=True)
    with context():
        graphed = torch.cuda.make_graphed_callables(graphed, (torch.randn_like(image),), num_warmup_iters=1)
    for scale in (1.0, 0.5):  # two replays on fresh inputs: nothing stale carries over
        fresh = scale * torch.randn_like(image)
        for model in (graphed, plain):
            model.zero_grad(set_to_none=True)
        graph_outs, graph_grads = run(graphed, fresh, weights, autocast=autocast)
        plain_outs, plain_grads = run(plain, fresh, weights, autocast=autocast)
        # Same kernels on the same inputs: only cuDNN's choice of algorithms may differ, which
        # moves the cancellation-prone stem gradients (see the module docstring) the most.
        out_tolerance, grad_tolerance = (1e-2, 5e-2) if autocast else (1e-5, 1e-3)
        for g, p in zip(graph_outs, plain_outs):
            assert rel_err(g, p) < out_tolerance
        for name, grad in plain_grads.items():
            assert graph_grads[name] is not None and rel_err(graph_grads[name], grad) < grad_tolerance, name
