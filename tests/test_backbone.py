"""The MLLA backbone against the paper's float64 golden outputs, checkpoint loading, odd sizes."""
import os

import pytest
import torch

from mlla_det.models.backbones.mlla import MLLA, checkpoint_filter_fn


def rel_err(x, ref):
    return ((x - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def golden(reference_dir):
    return torch.load(os.path.join(reference_dir, "mlla_tiny_backbone.pt"), weights_only=False)


def build_golden_model(golden, **kwargs):
    model = MLLA(**golden["arch"], drop_path_rate=0.0, **kwargs).double().eval()
    model.load_state_dict(golden["state_dict"], strict=True)
    return model


def test_golden_backbone_outputs(golden):
    model = build_golden_model(golden, attn_impl="reference")
    assert len(golden["inputs"]) == 3
    with torch.no_grad():
        for image, expected in zip(golden["inputs"], golden["outputs"]):
            outputs = model(image)
            assert len(outputs) == len(expected) == 4
            for out, ref in zip(outputs, expected):
                assert out.shape == ref.shape
                assert rel_err(out, ref) < 1e-10


def test_state_dict_layout_matches_published_checkpoints(golden):
    model = MLLA(**golden["arch"])
    published = {k for k in golden["state_dict"] if not k.endswith("attn.rope.rotations")}
    assert set(model.state_dict()) == published
    for key, value in model.state_dict().items():
        assert value.shape == golden["state_dict"][key].shape, key


@pytest.mark.parametrize("hw", [(33, 47), (64, 64), (17, 90), (5, 7)])
def test_any_input_size_follows_the_padding_rules(hw):
    torch.manual_seed(0)
    model = MLLA(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), drop_path_rate=0.0).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *hw))
    h, w = -(-hw[0] // 4), -(-hw[1] // 4)
    for i, out in enumerate(outs):
        assert out.shape == (1, 16 * 2 ** i, h, w)
        assert torch.isfinite(out).all()
        h, w = -(-h // 2), -(-w // 2)


def test_out_indices_select_stages_and_norms():
    model = MLLA(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), out_indices=(1, 3))
    assert not hasattr(model, "norm0") and hasattr(model, "norm1") and hasattr(model, "norm3")
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [32, 128]


def test_drop_path_grows_linearly():
    model = MLLA(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), drop_path_rate=0.3)
    rates = [block.drop_prob for stage in model.layers for block in stage.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 8))


def test_stochastic_depth_is_mmcv_drop_path_drawn_once_for_all_branches():
    """draw_residual_scales + add_residual give the paper's DropPath (mmcv's, as timm's) on the same
    uniform draws; each branch keeps its samples with its own probability, rescaled by 1/p."""
    from mmcv.cnn.bricks import DropPath

    from mlla_det.models.backbones.mlla import add_residual, draw_residual_scales
    shortcut, branch = torch.randn(64, 10, 8), torch.randn(64, 10, 8)
    for drop_prob in (0.1, 0.5):
        torch.manual_seed(3)
        [scale] = draw_residual_scales(torch.tensor([1.0 - drop_prob]), 64)
        ours = add_residual(shortcut, branch, scale)
        torch.manual_seed(3)
        theirs = shortcut + DropPath(drop_prob).train()(branch)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        assert 0 < int((scale == 0).sum()) < 64  # both kept and dropped samples compared
    keep = torch.tensor([1.0, 0.9, 0.5])
    scales = torch.stack(draw_residual_scales(keep, 40000)).flatten(1)
    for p, drawn in zip(keep.tolist(), scales):
        assert set(drawn.unique().tolist()) <= {0.0, torch.tensor(1 / p).item()}
        kept = (drawn > 0).double().mean().item()
        assert abs(kept - p) <= 5 * (p * (1 - p) / 40000) ** 0.5 + 1e-12, (p, kept)


def test_training_forward_draws_every_branch_once(monkeypatch):
    """A training forward draws all blocks' factors in one call; a block called alone draws its own;
    evaluation draws none and gives the same outputs as without stochastic depth."""
    import mlla_det.models.backbones.mlla as mlla
    draws = []
    real_draw = mlla.draw_residual_scales

    def counting_draw(keep_probs, batch):
        draws.append(tuple(keep_probs.tolist()))
        return real_draw(keep_probs, batch)

    monkeypatch.setattr(mlla, "draw_residual_scales", counting_draw)
    torch.manual_seed(0)
    model = MLLA(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), drop_path_rate=0.4,
                 attn_impl="reference", conv_impl="reference")
    image = torch.randn(2, 3, 64, 64)
    model.train()(image)
    assert len(draws) == 1 and len(draws[0]) == 2 * 5
    torch.testing.assert_close(torch.tensor(draws[0][::2]), 1 - torch.linspace(0, 0.4, 5))
    block = model.layers[1].blocks[1]
    block(torch.randn(2, 64, 32), (8, 8))
    assert len(draws) == 2 and len(draws[1]) == 2
    model.eval()
    with torch.no_grad():
        dropped = model(image)
        for stage in model.layers:
            for block in stage.blocks:
                block.drop_prob = 0.0
        model.stochastic_depth = False
        plain = model(image)
    assert len(draws) == 2
    for a, b in zip(dropped, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpointing_gives_the_same_gradients(golden):
    torch.manual_seed(0)
    image = torch.randn(1, 3, 40, 56, dtype=torch.float64)
    grads = []
    for use_checkpoint in (False, True):
        model = build_golden_model(golden, use_checkpoint=use_checkpoint).train()
        sum(o.sum() for o in model(image)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def classification_checkpoint(model):
    """A state dict in the layout of the paper's ImageNet checkpoints (MLLA_T.pth)."""
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("norm")}
    last = model.num_features[-1]
    state.update({"head.weight": torch.randn(1000, last), "head.bias": torch.randn(1000),
                  "norm.weight": torch.randn(last), "norm.bias": torch.randn(last),
                  "layers.0.blocks.0.attn.rope.rotations": torch.randn(56, 56, 8, 2)})
    return {"model": state}


def test_pretrained_classification_checkpoint_loads(tmp_path):
    source = MLLA(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))
    path = tmp_path / "MLLA_tiny.pth"
    torch.save(classification_checkpoint(source), path)
    model = MLLA(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                 init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    model.init_weights()
    own = model.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("norm"):
            torch.testing.assert_close(own[key], value, msg=key)
    _, skipped = checkpoint_filter_fn(classification_checkpoint(source)["model"], model)
    assert {"head.weight", "head.bias", "norm.weight", "norm.bias",
            "layers.0.blocks.0.attn.rope.rotations"} <= set(skipped)


def test_detection_checkpoint_with_rope_tables_loads_strictly(golden):
    """A published Mask R-CNN checkpoint holds `backbone.*.attn.rope.rotations`: nothing is unexpected."""
    model = MLLA(**golden["arch"])
    result = model.load_state_dict(golden["state_dict"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    prefixed = {"backbone." + k: v for k, v in golden["state_dict"].items()}
    kept, skipped = checkpoint_filter_fn(prefixed, model)
    assert set(kept) == set(model.state_dict())
    assert all(k.endswith("rope.rotations") for k in skipped)


def test_missing_pretrained_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "data" / "MLLA_T.pth"
    model = MLLA(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                 init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    with pytest.raises(FileNotFoundError, match="MLLA_T.pth"):
        model.init_weights()


def test_registered_in_mmdet_models():
    from mmdet.registry import MODELS
    backbone = MODELS.build(dict(type="MLLA", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                                 img_size=224, patch_size=4, in_chans=3, num_classes=80, qk_scale=None))
    assert isinstance(backbone, MLLA)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="one entry per stage"):
        MLLA(depths=(1, 1), num_heads=(1, 2, 4))
    with pytest.raises(ValueError, match="out_indices"):
        MLLA(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), out_indices=(4,))
    with pytest.raises(ValueError, match="not divisible"):
        MLLA(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(3, 2, 2, 4))
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        MLLA(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), attn_impl="fused")
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        MLLA(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), conv_impl="cudnn")
    model = MLLA(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))
    with pytest.raises(ValueError, match="B, C, H, W"):
        model(torch.randn(3, 32, 32))


@pytest.mark.parametrize("attn_impl, conv_impl", [("reference", "triton"), ("triton", "triton")])
def test_fused_block_matches_reference_in_the_interpreter(golden, attn_impl, conv_impl):
    """The block wired to the kernels (Triton interpreter on the CPU, a small odd-sized image):
    outputs and every parameter gradient against the float64 reference path, as close as the fp32
    reference path is (gradients of a conv bias feeding a train-mode BatchNorm are ~0 exactly, so
    their relative error is rounding noise in any fp32 run)."""
    torch.manual_seed(0)
    image = torch.randn(1, 3, 36, 52, dtype=torch.float64)
    exact = build_golden_model(golden, attn_impl="reference", conv_impl="reference").train()
    eager = build_golden_model(golden, attn_impl="reference", conv_impl="reference").float().train()
    fused = build_golden_model(golden, attn_impl=attn_impl, conv_impl=conv_impl).float().train()
    weights = [torch.randn_like(o) for o in exact(image)]
    outputs = {}
    for name, model, dtype in (("exact", exact, torch.float64), ("eager", eager, torch.float32),
                               ("fused", fused, torch.float32)):
        outs = model(image.to(dtype))
        sum((o * w.to(dtype)).sum() for o, w in zip(outs, weights)).backward()
        outputs[name] = [o.detach().double() for o in outs]
    for out, eager_out, ref in zip(outputs["fused"], outputs["eager"], outputs["exact"]):
        assert rel_err(out, ref) < max(4 * rel_err(eager_out, ref), 1e-5)
    exact_params, eager_params = dict(exact.named_parameters()), dict(eager.named_parameters())
    for name, param in fused.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        ref = exact_params[name].grad
        eager_error = rel_err(eager_params[name].grad.double(), ref)
        assert rel_err(param.grad.double(), ref) < max(4 * eager_error, 1e-4), name
