"""Mask R-CNN with the MLLA backbone, built from the paper configs, on small synthetic images:
a training step (finite losses, a gradient for every backbone parameter), a prediction with
consistent shapes, and the S / B backbones feeding the FPN."""
import logging
import math
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.structures import InstanceData

import mlla_det  # noqa: F401  (registers MLLA, provides mmcv's ops)
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.structures.mask import BitmapMasks
from mmdet.utils import register_all_modules

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
NUM_CLASSES = 80


def config_path(name: str) -> str:
    return osp.join(REPO_ROOT, 'configs', 'mlla', f'mask-rcnn_mlla-{name}_coco.py')


@pytest.fixture(scope='module', autouse=True)
def mmdet_scope():
    register_all_modules(init_default_scope=True)
    # init_weights logs a paragraph per parameter at INFO
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


def build_detector(name: str, light_heads: bool = False, **backbone_overrides):
    cfg = Config.fromfile(config_path(name))
    cfg.model.backbone.update(init_cfg=None, **backbone_overrides)
    if light_heads:
        # Fewer RoIs keep the 1024-wide box head cheap on a CPU; the backbone is what is tested.
        cfg.model.train_cfg.rpn_proposal.max_per_img = 200
        cfg.model.train_cfg.rcnn.sampler.num = 64
        cfg.model.test_cfg.rpn.max_per_img = 200
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


def synthetic_sample(rng: np.random.Generator, height: int, width: int, num_objects: int):
    """An image with `num_objects` bright ellipses on noise, and their boxes and masks."""
    image = rng.integers(0, 60, size=(3, height, width), dtype=np.uint8)
    rows, cols = np.mgrid[0:height, 0:width]
    masks, boxes = [], []
    for _ in range(num_objects):
        h = int(rng.integers(height // 5, height // 2))
        w = int(rng.integers(width // 5, width // 2))
        top = int(rng.integers(0, height - h))
        left = int(rng.integers(0, width - w))
        cy, cx = top + (h - 1) / 2, left + (w - 1) / 2
        mask = ((rows - cy) / (h / 2)) ** 2 + ((cols - cx) / (w / 2)) ** 2 <= 1
        image[:, mask] = rng.integers(150, 255, size=(3, 1), dtype=np.uint8)
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        masks.append(mask.astype(np.uint8))
    sample = DetDataSample(metainfo=dict(img_shape=(height, width), ori_shape=(height, width),
                                         scale_factor=(1.0, 1.0), img_id=0))
    sample.gt_instances = InstanceData(
        bboxes=torch.tensor(boxes, dtype=torch.float32),
        labels=torch.from_numpy(rng.integers(0, NUM_CLASSES, size=num_objects)).long(),
        masks=BitmapMasks(np.stack(masks), height, width))
    return torch.from_numpy(image), sample


@pytest.fixture(scope='module')
def batch():
    """Two images of different sizes (the preprocessor pads both to 96 x 128)."""
    rng = np.random.default_rng(0)
    samples = [synthetic_sample(rng, 96, 128, 3), synthetic_sample(rng, 80, 112, 2)]
    return dict(inputs=[image for image, _ in samples], data_samples=[s for _, s in samples])


@pytest.fixture(scope='module')
def tiny_detector():
    torch.manual_seed(0)
    # No stochastic depth here so that every backbone parameter must get a nonzero gradient.
    return build_detector('t_fpn_1x', light_heads=True, drop_path_rate=0.0)


def test_training_step_gives_finite_losses_and_backbone_gradients(tiny_detector, batch):
    from mmengine.optim import build_optim_wrapper

    model = tiny_detector
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    data = model.data_preprocessor(batch, training=True)
    assert tuple(data['inputs'].shape) == (2, 3, 96, 128)
    losses = model.loss(data['inputs'], data['data_samples'])
    for name in ('loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox', 'loss_mask'):
        assert name in losses, f'{name} missing from {sorted(losses)}'
    for name, value in losses.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            assert torch.isfinite(v).all(), f'{name} = {v}'
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()

    problems = []
    for name, param in model.backbone.named_parameters():
        if param.grad is None:
            problems.append(f'{name}: no gradient')
        elif not torch.isfinite(param.grad).all():
            problems.append(f'{name}: non-finite gradient')
        elif not param.grad.abs().sum() > 0:
            problems.append(f'{name}: gradient is all zero')
    assert not problems, '\n'.join(problems)

    # One AdamW step of the config's optimizer moves the weights and keeps them finite.
    cfg = Config.fromfile(config_path('t_fpn_1x'))
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    before = {name: p.detach().clone() for name, p in model.backbone.named_parameters()}
    optim_wrapper.step()
    moved = 0
    for name, param in model.backbone.named_parameters():
        assert torch.isfinite(param).all(), name
        moved += int(not torch.equal(param, before[name]))
    assert moved == len(before)


def test_training_with_the_configs_stochastic_depth(batch):
    """The config as it is (drop_path_rate 0.1) through the runner's entry point, train_step."""
    from mmengine.optim import build_optim_wrapper

    torch.manual_seed(2)
    model = build_detector('t_fpn_1x', light_heads=True)
    model.train()
    cfg = Config.fromfile(config_path('t_fpn_1x'))
    log_vars = model.train_step(batch, build_optim_wrapper(model, cfg.optim_wrapper))
    assert {'loss', 'loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox', 'loss_mask'} <= set(log_vars)
    for name, value in log_vars.items():
        assert math.isfinite(float(torch.as_tensor(value).detach())), f'{name} = {value}'


def test_prediction_shapes(tiny_detector, batch):
    model = tiny_detector
    model.eval()
    # Untrained heads score every class near 1/81: keep all detections to have some to check.
    model.roi_head.test_cfg.score_thr = 0.0
    try:
        with torch.no_grad():
            results = model.test_step(batch)
    finally:
        model.roi_head.test_cfg.score_thr = 0.05
    assert len(results) == 2
    max_per_img = model.roi_head.test_cfg.max_per_img
    for result, sample in zip(results, batch['data_samples']):
        height, width = sample.ori_shape
        pred = result.pred_instances
        n = len(pred)
        assert 0 < n <= max_per_img
        assert tuple(pred.bboxes.shape) == (n, 4)
        assert tuple(pred.labels.shape) == (n,)
        assert tuple(pred.scores.shape) == (n,)
        assert tuple(pred.masks.shape) == (n, height, width)
        assert pred.masks.dtype == torch.bool
        assert torch.isfinite(pred.bboxes).all()
        assert (pred.bboxes[:, 0] >= 0).all() and (pred.bboxes[:, 2] <= width).all()
        assert (pred.bboxes[:, 1] >= 0).all() and (pred.bboxes[:, 3] <= height).all()
        assert (pred.bboxes[:, 2] >= pred.bboxes[:, 0]).all() and (pred.bboxes[:, 3] >= pred.bboxes[:, 1]).all()
        assert ((pred.scores >= 0) & (pred.scores <= 1)).all()
        assert ((pred.labels >= 0) & (pred.labels < NUM_CLASSES)).all()


@pytest.mark.parametrize('name, embed_dim', [('s_fpn_1x', 64), ('b_fpn_1x', 96)])
def test_backbone_and_neck_forward(name, embed_dim):
    torch.manual_seed(3)
    model = build_detector(name).eval()
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        stages = model.backbone(image)
        levels = model.neck(stages)
    assert [tuple(x.shape) for x in stages] == [
        (1, embed_dim * 2 ** i, 64 // 4 // 2 ** i, 96 // 4 // 2 ** i) for i in range(4)]
    # FPN: the four stages at 256 channels plus a max-pooled fifth level.
    assert [tuple(x.shape) for x in levels] == [
        (1, 256, 16, 24), (1, 256, 8, 12), (1, 256, 4, 6), (1, 256, 2, 3), (1, 256, 1, 2)]
    for x in stages + levels:
        assert torch.isfinite(x).all()


def published_layout(reference_dir: str, arch: str = 'MLLA-T') -> dict:
    """{key: shape} of the detection backbone as listed in state_dict_keys.md."""
    text = open(osp.join(reference_dir, 'state_dict_keys.md')).read()
    section = text.split(f'Full detection-backbone layout of {arch}')[1].split('```')[1]
    layout = {}
    for line in section.strip().splitlines():
        key, shape = line.split(' ', 1)
        layout[key] = tuple(int(s) for s in shape.strip('()').split(',') if s.strip())
    return layout


def test_published_mask_rcnn_checkpoint_loads_with_nothing_missing_or_unexpected(reference_dir, tmp_path):
    """A checkpoint in the layout of the paper's Mask R-CNN release (rope tables included) loads
    into the T config's detector strictly, and every tensor lands where it belongs."""
    from mmengine.runner import load_checkpoint

    layout = published_layout(reference_dir)
    assert len(layout) == 521
    source = build_detector('t_fpn_1x')
    own_backbone = {k: tuple(v.shape) for k, v in source.backbone.state_dict().items()}
    assert own_backbone == {k: s for k, s in layout.items() if not k.endswith('attn.rope.rotations')}

    state = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
             for k, v in source.state_dict().items()}
    for key, shape in layout.items():
        if key.endswith('attn.rope.rotations'):
            state['backbone.' + key] = torch.randn(shape)
    path = tmp_path / 'mask_rcnn_mlla_t_1x.pth'
    torch.save({'meta': {}, 'state_dict': state}, path)

    target = build_detector('t_fpn_1x')
    load_checkpoint(target, str(path), map_location='cpu', strict=True)
    loaded = target.state_dict()
    assert set(loaded) == {k for k in state if not k.endswith('attn.rope.rotations')}
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
