"""The five paper configs: they load, hold the paper's training recipe, and build detectors of the
published sizes. Also checks the local Mask R-CNN base against mmdet's own config."""
import logging
import os.path as osp

import pytest
import torch.nn as nn
from mmengine.config import Config

import mlla_det  # noqa: F401  (registers MLLA, provides mmcv's ops)
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG_DIR = osp.join(REPO_ROOT, 'configs', 'mlla')

# Architecture of each variant (DESIGN.md) and the published Mask R-CNN sizes (44M / 63M / 115M;
# 44.03M / 62.65M / 115.49M measured on the paper's model).
ARCHS = {
    't': dict(embed_dim=64, depths=[2, 4, 8, 4], num_heads=[2, 4, 8, 16], params=44.0e6),
    's': dict(embed_dim=64, depths=[3, 6, 21, 6], num_heads=[2, 4, 8, 16], params=62.7e6),
    'b': dict(embed_dim=96, depths=[3, 6, 21, 6], num_heads=[3, 6, 12, 24], params=115.5e6),
}
# (arch, schedule) -> drop_path_rate, epochs, LR steps
CONFIGS = {
    ('t', '1x'): dict(drop_path_rate=0.1, epochs=12, milestones=[8, 11]),
    ('t', '3x'): dict(drop_path_rate=0.3, epochs=36, milestones=[27, 33]),
    ('s', '1x'): dict(drop_path_rate=0.1, epochs=12, milestones=[8, 11]),
    ('s', '3x'): dict(drop_path_rate=0.3, epochs=36, milestones=[27, 33]),
    ('b', '1x'): dict(drop_path_rate=0.1, epochs=12, milestones=[8, 11]),
}
CONFIG_IDS = [f'{arch}-{schedule}' for arch, schedule in CONFIGS]


def config_path(arch: str, schedule: str) -> str:
    return osp.join(CONFIG_DIR, f'mask-rcnn_mlla-{arch}_fpn_{schedule}_coco.py')


@pytest.fixture(scope='module', autouse=True)
def mmdet_scope():
    register_all_modules(init_default_scope=True)


@pytest.fixture(scope='module')
def configs():
    return {key: Config.fromfile(config_path(*key)) for key in CONFIGS}


def build_detector(cfg: Config) -> nn.Module:
    model_cfg = cfg.model.copy()
    model_cfg.backbone = dict(model_cfg.backbone, init_cfg=None)  # no checkpoint needed
    return MODELS.build(model_cfg)


@pytest.mark.parametrize('key', CONFIGS, ids=CONFIG_IDS)
def test_backbone_and_neck(configs, key):
    arch, _ = key
    cfg = configs[key]
    assert cfg.custom_imports == dict(imports=['mlla_det'], allow_failed_imports=False)
    backbone = cfg.model.backbone
    expected = ARCHS[arch]
    assert backbone.type == 'MLLA'
    assert backbone.embed_dim == expected['embed_dim']
    assert list(backbone.depths) == expected['depths']
    assert list(backbone.num_heads) == expected['num_heads']
    assert backbone.mlp_ratio == 4
    assert backbone.qkv_bias is True
    assert backbone.drop_rate == 0.0
    assert backbone.drop_path_rate == CONFIGS[key]['drop_path_rate']
    assert tuple(backbone.out_indices) == (0, 1, 2, 3)
    assert backbone.use_checkpoint is False
    assert 'attn_impl' not in backbone  # the backbone's default: fused kernels on CUDA
    assert backbone.init_cfg == dict(type='Pretrained', checkpoint=f'data/MLLA_{arch.upper()}.pth')
    c = expected['embed_dim']
    assert list(cfg.model.neck.in_channels) == [c, 2 * c, 4 * c, 8 * c]


@pytest.mark.parametrize('key', CONFIGS, ids=CONFIG_IDS)
def test_optimizer_and_schedule(configs, key):
    cfg = configs[key]
    optimizer = cfg.optim_wrapper.optimizer
    assert cfg.optim_wrapper.type == 'OptimWrapper'
    assert cfg.optim_wrapper.constructor == 'MergedGroupsOptimWrapperConstructor'
    assert optimizer.type == 'AdamW'
    assert optimizer.lr == 1e-4
    assert tuple(optimizer.betas) == (0.9, 0.999)
    assert optimizer.weight_decay == 0.05
    assert optimizer.fused is True
    assert set(optimizer) == {'type', 'lr', 'betas', 'weight_decay', 'fused'}  # nothing left from SGD
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys['norm'] == dict(decay_mult=0.0)

    assert cfg.train_dataloader.batch_size == 2
    assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=16)

    epochs = CONFIGS[key]['epochs']
    assert cfg.train_cfg.type == 'EpochBasedTrainLoop'
    assert cfg.train_cfg.max_epochs == epochs
    warmup, steps = cfg.param_scheduler
    assert warmup == dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500)
    assert steps == dict(type='MultiStepLR', begin=0, end=epochs, by_epoch=True,
                         milestones=CONFIGS[key]['milestones'], gamma=0.1)


@pytest.mark.parametrize('key', CONFIGS, ids=CONFIG_IDS)
def test_data_pipeline_and_evaluation(configs, key):
    cfg = configs[key]
    multi_scale = [(short, 1333) for short in range(480, 801, 32)]
    load, annotations, flip, choice, pack = cfg.train_dataloader.dataset.pipeline
    assert load.type == 'LoadImageFromFileOrSkip' and load.unreadable == 'skip'
    assert cfg.val_dataloader.dataset.pipeline[0].type == 'LoadImageFromFileOrSkip'
    assert cfg.val_dataloader.dataset.pipeline[0].unreadable == 'blank'
    assert annotations == dict(type='LoadAnnotations', with_bbox=True, with_mask=True)
    assert flip == dict(type='RandomFlip', prob=0.5)
    assert pack.type == 'PackDetInputs'
    assert choice.type == 'RandomChoice'
    resize_only, resize_crop_resize = choice.transforms
    assert resize_only == [dict(type='RandomChoiceResize', scales=multi_scale, keep_ratio=True)]
    assert resize_crop_resize == [
        dict(type='RandomChoiceResize', scales=[(400, 1333), (500, 1333), (600, 1333)], keep_ratio=True),
        dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600), allow_negative_crop=True),
        dict(type='RandomChoiceResize', scales=multi_scale, keep_ratio=True),
    ]
    assert cfg.model.data_preprocessor.pad_size_divisor == 32
    assert cfg.model.data_preprocessor.pad_mask is True

    assert cfg.train_dataloader.dataset.data_root == 'data/coco/'
    assert cfg.train_dataloader.dataset.ann_file == 'annotations/instances_train2017.json'
    for split in ('val', 'test'):
        assert cfg[f'{split}_dataloader'].dataset.ann_file == 'annotations/instances_val2017.json'
        evaluator = cfg[f'{split}_evaluator']
        assert evaluator.type == 'CocoMetric'
        assert list(evaluator.metric) == ['bbox', 'segm']
        assert evaluator.ann_file == 'data/coco/annotations/instances_val2017.json'


def test_local_base_matches_mmdet_mask_rcnn_config():
    """configs/_base_/mask-rcnn_fpn_coco.py restates mmdet 3.3's Mask R-CNN R50-FPN 1x COCO config
    without its backbone and optimizer; a typo there would silently change the detector."""
    import mmdet
    mmdet_config = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', 'mask_rcnn',
                            'mask-rcnn_r50_fpn_1x_coco.py')
    assert osp.isfile(mmdet_config), f'mmdet 3.3 ships its configs under {mmdet_config}'
    reference = Config.fromfile(mmdet_config).to_dict()
    del reference['model']['backbone']
    del reference['model']['neck']['in_channels']
    del reference['optim_wrapper']
    ours = Config.fromfile(osp.join(REPO_ROOT, 'configs', '_base_', 'mask-rcnn_fpn_coco.py')).to_dict()
    # Its eight substitutions, each giving mmdet's results bit for bit (tests/test_assigners.py,
    # tests/test_anchor_generators.py, tests/test_bbox_coders.py, tests/test_mask_head.py,
    # tests/test_device_masks.py, tests/test_roi_extractors.py), or the
    # same up to the order of a sum (the RPN loss, tests/test_rpn_head.py), or on a GPU the same
    # distribution (the sampler, tests/test_samplers.py), and nothing else.
    substituted = {'SyncFreeMaxIoUAssigner': 'MaxIoUAssigner', 'CachedAnchorGenerator': 'AnchorGenerator',
                   'DeviceRandomSampler': 'RandomSampler', 'PairedDeltaXYWHBBoxCoder': 'DeltaXYWHBBoxCoder',
                   'LevelMergedRPNHead': 'RPNHead', 'DeviceTargetsFCNMaskHead': 'FCNMaskHead',
                   'DeviceMasksDetDataPreprocessor': 'DetDataPreprocessor', 'LevelSortedRoIExtractor': 'SingleRoIExtractor'}
    model, train_cfg = ours['model'], ours['model']['train_cfg']
    for part in (model['data_preprocessor'], model['rpn_head'], model['roi_head']['mask_head'],
                 model['roi_head']['bbox_roi_extractor'], model['roi_head']['mask_roi_extractor'],
                 train_cfg['rpn']['assigner'], train_cfg['rcnn']['assigner'], train_cfg['rpn']['sampler'],
                 train_cfg['rcnn']['sampler'], model['rpn_head']['anchor_generator'], model['rpn_head']['bbox_coder'],
                 model['roi_head']['bbox_head']['bbox_coder']):
        part['type'] = substituted[part['type']]
    assert ours == reference


@pytest.fixture(scope='module')
def detectors(configs):
    """One detector per architecture, from its 1x config (a 3x config only changes the schedule)."""
    return {arch: build_detector(configs[(arch, '1x')]) for arch in ARCHS}


@pytest.mark.parametrize('arch', ['t', 's'])
def test_3x_model_differs_from_1x_only_in_drop_path(configs, arch):
    model_1x = configs[(arch, '1x')].model.to_dict()
    model_3x = configs[(arch, '3x')].model.to_dict()
    model_1x['backbone'].pop('drop_path_rate')
    model_3x['backbone'].pop('drop_path_rate')
    assert model_3x == model_1x


@pytest.mark.parametrize('arch', ARCHS)
def test_parameter_count_matches_paper(detectors, arch):
    count = sum(p.numel() for p in detectors[arch].parameters())
    expected = ARCHS[arch]['params']
    assert abs(count - expected) / expected < 0.005, f'{count / 1e6:.2f}M parameters, paper {expected / 1e6}M'


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm))


def test_weight_decay_spares_exactly_the_norm_layers(configs, detectors):
    """mmengine's custom_keys match by substring of the parameter name: 'norm' must catch every
    norm layer of the detector (and nothing else). All variants share module names, so T will do."""
    from mmengine.logging import MMLogger
    from mmengine.optim import build_optim_wrapper

    model = detectors['t']
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs a line per parameter option otherwise
    try:
        optim_wrapper = build_optim_wrapper(model, configs[('t', '1x')].optim_wrapper)
    finally:
        logger.setLevel(level)
    assert len(optim_wrapper.optimizer.param_groups) == 2  # merged: with and without weight decay
    decay_of = {}
    for group in optim_wrapper.optimizer.param_groups:
        for param in group['params']:
            decay_of[id(param)] = group['weight_decay']

    norm_params = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    assert len(norm_params) > 0
    wrong = []
    for name, param in model.named_parameters():
        expected = 0.0 if id(param) in norm_params else 0.05
        if decay_of.get(id(param)) != expected:
            wrong.append(f'{name}: weight_decay {decay_of.get(id(param))}, expected {expected}')
    assert not wrong, '\n'.join(wrong[:20])
    # The backbone has LayerNorms in every block and on every output, BatchNorms in its convs.
    backbone_norms = {type(m) for m in model.backbone.modules() if _is_norm(m)}
    assert backbone_norms == {nn.LayerNorm, nn.BatchNorm2d}


def test_rope_tables_are_not_parameters(detectors):
    model = detectors['t']
    assert not [name for name, _ in model.named_parameters() if 'rope' in name or 'rotation' in name]


@pytest.mark.parametrize('key', CONFIGS, ids=CONFIG_IDS)
def test_coco_configs_switch_cudnn_off_and_the_documented_switch_turns_it_back_on(configs, key):
    cfg = configs[key]
    hooks = [h['type'] for h in cfg.custom_hooks]
    assert hooks == ['RNGStateHook', 'CudnnHook', 'BlockGraphsHook', 'GemmConvHook']
    assert cfg.custom_hooks[1]['enabled'] is False
    switched = Config.fromfile(config_path(*key))
    switched.merge_from_dict({'custom_hooks.1.enabled': True})  # what --cfg-options does
    assert switched.custom_hooks[1] == dict(type='CudnnHook', enabled=True)


@pytest.mark.parametrize('index, hook_type, on', [(2, 'BlockGraphsHook', True), (3, 'GemmConvHook', True)])
@pytest.mark.parametrize('key', CONFIGS, ids=CONFIG_IDS)
def test_coco_configs_carry_hooks_with_a_documented_switch(configs, key, index, hook_type, on):
    """The block graphs and the GEMM convolutions (both measured faster: on) are in the configs,
    and --cfg-options custom_hooks.N.enabled=... builds the hook switched the other way."""
    import mlla_det.engine as engine

    def build(hook_cfg):
        return getattr(engine, hook_type)(**{k: v for k, v in hook_cfg.items() if k != 'type'})

    cfg = configs[key]
    assert cfg.custom_hooks[index]['type'] == hook_type
    assert build(cfg.custom_hooks[index]).enabled is on
    switched = Config.fromfile(config_path(*key))
    switched.merge_from_dict({f'custom_hooks.{index}.enabled': not on})
    hook = build(switched.custom_hooks[index])
    assert hook.enabled is (not on)
    if hook_type == 'BlockGraphsHook':
        assert hook.backend == 'cudagraphs' and hook.canvas_multiple == 128
        assert hook.evaluation is False and hook.distributed is False


def test_cudnn_hook_sets_cudnn_for_the_run_and_restores_it():
    import torch
    from mlla_det.engine import CudnnHook

    before = torch.backends.cudnn.enabled
    try:
        torch.backends.cudnn.enabled = True
        hook = CudnnHook(enabled=False)
        hook.before_run(runner=None)
        assert torch.backends.cudnn.enabled is False
        hook.after_run(runner=None)
        assert torch.backends.cudnn.enabled is True
        hook.after_run(runner=None)  # a second after_run leaves it alone
        assert torch.backends.cudnn.enabled is True
    finally:
        torch.backends.cudnn.enabled = before


def test_shapes_quickstart_keeps_cudnn_as_measured():
    cfg = Config.fromfile(osp.join(CONFIG_DIR, 'mask-rcnn_mlla-t_fpn_shapes.py'))
    assert cfg.custom_hooks[-1] == dict(type='CudnnHook', enabled=True)


def test_the_quickstart_candidate_is_the_shapes_config_with_the_coco_hooks():
    """benchmarks/configs/shapes_fast_hooks.py, timed against the shipped quick start on a GPU
    (gpu_session.sh shapes): only its hooks and its loss scaler differ."""
    shipped = Config.fromfile(osp.join(CONFIG_DIR, 'mask-rcnn_mlla-t_fpn_shapes.py'))
    candidate = Config.fromfile(osp.join(REPO_ROOT, 'benchmarks', 'configs', 'shapes_fast_hooks.py'))
    coco = Config.fromfile(config_path('t', '1x'))
    assert candidate.custom_hooks == coco.custom_hooks
    assert candidate.optim_wrapper.loss_scale == dict(enabled=False)
    assert candidate.optim_wrapper.dtype == 'bfloat16'
    differing = {key for key in set(shipped) | set(candidate)
                 if key not in ('custom_hooks', 'optim_wrapper', 'filename') and shipped.get(key) != candidate.get(key)}
    assert len(set(shipped)) > 30 and not differing
    shipped.optim_wrapper.pop('loss_scale', None)
    candidate.optim_wrapper.pop('loss_scale')
    assert candidate.optim_wrapper == shipped.optim_wrapper
