"""MLLA-T with the fused attention against the eager reference path, on the same weights (GPU)."""
import pytest
import torch

from mlla_det.models.backbones.mlla import MLLA


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.gpu
def test_mlla_t_fused_attention_matches_reference_outputs_and_gradients():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    image = torch.randn(2, 3, 250, 330, device="cuda")  # odd token grids at every stage
    results = {}
    for impl in ("reference", "triton"):
        torch.manual_seed(1)
        model = MLLA(embed_dim=64, depths=(2, 4, 8, 4), num_heads=(2, 4, 8, 16), drop_path_rate=0.0,
                     attn_impl=impl).cuda().train()
        outs = model(image)
        weights = [torch.randn_like(o) for o in outs] if impl == "reference" else results["weights"]
        sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        results[impl] = ([o.detach() for o in outs], {n: p.grad for n, p in model.named_parameters()})
        results["weights"] = weights
    ref_outs, ref_grads = results["reference"]
    outs, grads = results["triton"]
    for out, ref in zip(outs, ref_outs):
        assert rel_err(out, ref) < 1e-4
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all(), name
        assert rel_err(grad, ref_grads[name]) < 1e-3, name


@pytest.mark.gpu
def test_fused_kernels_are_the_default_on_cuda():
    from mlla_kernels.linear_attention import resolve_impl
    assert MLLA().layers[0].blocks[0].attn.attn_impl == "auto"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert resolve_impl("auto", torch.device("cuda"), dtype, 32) == "triton"
    assert resolve_impl("auto", torch.device("cpu"), torch.float32, 32) == "reference"
