"""MLLA-T with the fused attention against the eager reference path, on the same weights (GPU).

Both fp32 paths are measured against a float64 run of the reference: the fused path must be as
close to it as the eager fp32 path is (BatchNorm's backward in the stem cancels large terms, so
some parameter gradients carry ~1e-3 relative rounding error in any fp32 implementation).
"""
import copy

import pytest
import torch

from mlla_det.models.backbones.mlla import MLLA


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def run(model, image, weights):
    outs = model(image.to(next(model.parameters()).dtype))
    sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, weights)).backward()
    return [o.detach() for o in outs], {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.gpu
def test_mlla_t_fused_attention_matches_reference_outputs_and_gradients():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    image = torch.randn(2, 3, 250, 330, device="cuda")  # odd token grids at every stage
    base = MLLA(embed_dim=64, depths=(2, 4, 8, 4), num_heads=(2, 4, 8, 16), drop_path_rate=0.0,
                attn_impl="reference").cuda().train()
    with torch.no_grad():
        weights = [torch.randn_like(o) for o in base(image)]
    results = {}
    for name, dtype, impl in (("exact", torch.float64, "reference"), ("eager", torch.float32, "reference"),
                              ("fused", torch.float32, "triton")):
        model = copy.deepcopy(base).to(dtype)
        for module in model.modules():
            if hasattr(module, "attn_impl"):
                module.attn_impl = impl
        results[name] = run(model, image, weights)
    exact_outs, exact_grads = results["exact"]
    for name in ("eager", "fused"):
        assert set(results[name][1]) == set(exact_grads)
    for fused, eager, exact in zip(results["fused"][0], results["eager"][0], exact_outs):
        assert rel_err(fused, exact) < max(4 * rel_err(eager, exact), 1e-5)
        assert rel_err(fused, eager) < 1e-4
    for param, exact in exact_grads.items():
        fused, eager = results["fused"][1][param], results["eager"][1][param]
        assert fused is not None and torch.isfinite(fused).all(), param
        assert rel_err(fused, exact) < max(4 * rel_err(eager, exact), 1e-4), param


@pytest.mark.gpu
def test_fused_kernels_are_the_default_on_cuda():
    from mlla_kernels.linear_attention import resolve_impl
    assert MLLA().layers[0].blocks[0].attn.attn_impl == "auto"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert resolve_impl("auto", torch.device("cuda"), dtype, 32) == "triton"
    assert resolve_impl("auto", torch.device("cpu"), torch.float32, 32) == "reference"
