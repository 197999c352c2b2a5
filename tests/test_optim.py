"""MergedGroupsOptimWrapperConstructor: mmengine's per-parameter rules, fewer parameter groups,
the same updates."""
import copy

import pytest
import torch
import torch.nn as nn

import mlla_det  # noqa: F401  registers the constructor
from mlla_det.engine import merge_param_groups


class NormAndConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.BatchNorm2d(8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        x = self.norm(self.conv(x)).mean(dim=(2, 3))
        return self.frozen(self.block(x))


def build(model, constructor, foreach=None, fused=None, wrapper=None):
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    cfg = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-2, betas=(0.9, 0.999), weight_decay=0.05,
                                                   foreach=foreach, fused=fused),
               paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}))
    if wrapper is not None:
        cfg.update(wrapper)
    if constructor is not None:
        cfg['constructor'] = constructor
    return build_optim_wrapper(model, cfg)


def test_merge_keeps_order_and_options():
    a, b, c, d = (nn.Parameter(torch.zeros(1)) for _ in range(4))
    groups = [dict(params=[a], lr=1.0), dict(params=[b], lr=2.0, betas=[0.9, 0.99]), dict(params=[c], lr=1.0),
              dict(params=[d], lr=2.0, betas=[0.9, 0.99])]
    merged = merge_param_groups(groups)
    assert [g['lr'] for g in merged] == [1.0, 2.0]
    assert [p is q for p, q in zip(merged[0]['params'], [a, c])] == [True, True]
    assert [p is q for p, q in zip(merged[1]['params'], [b, d])] == [True, True]
    assert merged[1]['betas'] == [0.9, 0.99]
    assert all(len(g['params']) == 1 for g in groups)  # the input is left alone


@pytest.mark.parametrize('foreach, fused', [(False, None), (True, None), (None, True)],
                         ids=['for-loop', 'foreach', 'fused'])
def test_same_groups_options_and_updates_as_the_default_constructor(foreach, fused):
    torch.manual_seed(0)
    model = NormAndConv()
    other = copy.deepcopy(model)
    merged = build(model, 'MergedGroupsOptimWrapperConstructor', foreach, fused)
    per_parameter = build(other, None, foreach, fused)

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(per_parameter.optimizer.param_groups) == len(trainable) == 10
    assert len(merged.optimizer.param_groups) == 2
    decay = {id(p): g['weight_decay'] for g in merged.optimizer.param_groups for p in g['params']}
    assert len(decay) == len(trainable)  # each trainable parameter in exactly one group
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i]: wd for i, wd in decay.items()} == {
        n: 0.0 if 'norm' in n else 0.05 for n, p in model.named_parameters() if p.requires_grad}

    for step in range(3):
        x = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(step))
        for net, wrapper in ((model, merged), (other, per_parameter)):
            wrapper.update_params(net(x).square().sum())
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(model.block[0].weight, copy.deepcopy(NormAndConv()).block[0].weight)


@pytest.mark.gpu
def test_fused_adamw_under_bf16_amp_with_clipping_on_gpu():
    """The quick start's optimizer (configs/mlla/mask-rcnn_mlla-t_fpn_shapes.py): merged groups and
    fused AdamW under AmpOptimWrapper(bfloat16) with gradient clipping, whose GradScaler hands the
    fused step its found-inf flag; against the paper's construction (per-parameter groups,
    multi-tensor AdamW) on the same gradients."""
    torch.manual_seed(0)
    model = NormAndConv().cuda()
    other = copy.deepcopy(model)
    amp = dict(type='AmpOptimWrapper', dtype='bfloat16', clip_grad=dict(max_norm=0.5, norm_type=2))
    merged = build(model, 'MergedGroupsOptimWrapperConstructor', fused=True, wrapper=amp)
    per_parameter = build(other, None, wrapper=amp)
    assert merged.optimizer.defaults['fused'] and len(merged.optimizer.param_groups) == 2
    start = copy.deepcopy(model)
    for step in range(3):
        x = torch.randn(2, 3, 9, 7, device='cuda', generator=torch.Generator('cuda').manual_seed(step))
        for net, wrapper in ((model, merged), (other, per_parameter)):
            with wrapper.optim_context(net):
                loss = net(x).float().square().sum()
            wrapper.update_params(loss)
    for (name, p), q, p0 in zip(model.named_parameters(), other.parameters(), start.parameters()):
        if p.requires_grad:
            assert not torch.equal(p, p0), name
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
