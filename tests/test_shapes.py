"""The generated shapes dataset and the one-command quickstart (tools/shapes_quickstart.py).

The generator must be deterministic, write valid COCO whose masks match the drawn pixels and
respect occlusion; the quickstart's tiny variant must train (the loss falls), evaluate, and draw.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mlla_det.datasets import shapes
from mlla_det.datasets.shapes import CLASSES, ShapesSettings, ensure_dataset, generate_dataset, render_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES_CONFIG = os.path.join(ROOT, 'configs', 'mlla', 'mask-rcnn_mlla-t_fpn_shapes.py')
TINY_CONFIG = os.path.join(ROOT, 'configs', 'mlla', 'mask-rcnn_mlla-t_fpn_shapes-tiny.py')

SMALL = ShapesSettings(seed=3, num_train=10, num_val=4, image_size=64)


def read_tree(folder):
    """{relative path: bytes} of every file under folder."""
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, 'rb') as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    """A few dozen images: enough for every class to appear and for occlusions to happen."""
    out = str(tmp_path_factory.mktemp('shapes'))
    settings = ShapesSettings(seed=0, num_train=40, num_val=8, image_size=96)
    generate_dataset(out, settings, workers=1)
    return out, settings


# ---------------------------------------------------------------------------------- determinism

def test_same_seed_gives_identical_files(tmp_path):
    generate_dataset(str(tmp_path / 'a'), SMALL, workers=1)
    generate_dataset(str(tmp_path / 'b'), SMALL, workers=2)  # parallel drawing changes nothing
    first, second = read_tree(str(tmp_path / 'a')), read_tree(str(tmp_path / 'b'))
    assert len(first) == SMALL.num_train + SMALL.num_val + 3  # images, 2 annotation files, manifest
    assert first.keys() == second.keys()
    for path in first:
        assert first[path] == second[path], f'{path} differs between two runs with the same seed'


def test_different_seed_gives_different_files(tmp_path):
    generate_dataset(str(tmp_path / 'a'), SMALL, workers=1)
    generate_dataset(str(tmp_path / 'b'), ShapesSettings(**{**SMALL.__dict__, 'seed': 4}), workers=1)
    first, second = read_tree(str(tmp_path / 'a')), read_tree(str(tmp_path / 'b'))
    assert first.keys() == second.keys()
    for split in ('train', 'val'):
        annotations = os.path.join('annotations', f'instances_{split}.json')
        assert first[annotations] != second[annotations]
    images = [path for path in first if path.endswith('.png')]
    assert all(first[path] != second[path] for path in images)


# ---------------------------------------------------------------------------------- valid COCO

@pytest.mark.parametrize('split', ['train', 'val'])
def test_annotations_are_valid_coco(dataset, split):
    out, settings = dataset
    coco = COCO(os.path.join(out, 'annotations', f'instances_{split}.json'))
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    assert len(CLASSES) >= 3
    image_ids = coco.getImgIds()
    assert len(image_ids) == settings.count(split)
    for image_id in image_ids:
        info = coco.loadImgs(image_id)[0]
        with Image.open(os.path.join(out, split, info['file_name'])) as image:
            assert image.format == 'PNG'
            assert image.size == (info['width'], info['height']) == (settings.image_size,) * 2
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert annotations, f'image {info["file_name"]} has no annotation'
        for annotation in annotations:
            mask = coco.annToMask(annotation)
            assert mask.shape == (info['height'], info['width'])
            assert annotation['area'] == mask.sum() > 0
            x, y, w, h = annotation['bbox']
            assert 0 <= x and 0 <= y and w > 0 and h > 0
            assert x + w <= info['width'] and y + h <= info['height']
            rows, cols = np.nonzero(mask)
            assert [x, y, w, h] == [cols.min(), rows.min(), cols.max() - cols.min() + 1,
                                    rows.max() - rows.min() + 1]
            assert annotation['iscrowd'] == 0
            assert annotation['category_id'] in coco.getCatIds()
    annotation_ids = coco.getAnnIds()
    assert len(set(annotation_ids)) == len(annotation_ids)


def test_every_class_appears(dataset):
    out, _ = dataset
    coco = COCO(os.path.join(out, 'annotations', 'instances_train.json'))
    for category_id in coco.getCatIds():
        assert coco.getAnnIds(catIds=[category_id]), f'class {category_id} never drawn'


def test_masks_cover_the_drawn_shapes(dataset):
    """Pixels under a mask hold one shape's colour (plus noise), and the masks are disjoint."""
    out, _ = dataset
    coco = COCO(os.path.join(out, 'annotations', 'instances_val.json'))
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        pixels = np.asarray(Image.open(os.path.join(out, 'val', info['file_name'])), dtype=np.float64)
        covered = np.zeros(pixels.shape[:2], dtype=int)
        for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            mask = coco.annToMask(annotation).astype(bool)
            covered += mask
            # The drawing noise has sigma 6; any background or second shape would show up as more.
            assert pixels[mask].std(axis=0).max() < 10
        assert covered.max() == 1


# ---------------------------------------------------------------------------------- occlusion

def rendered(settings, count=40):
    return [render_image(np.random.default_rng([99, i]), settings)[1] for i in range(count)]


def test_masks_are_the_visible_parts():
    settings = ShapesSettings(image_size=96)
    occluded = 0
    for instances in rendered(settings):
        for i, instance in enumerate(instances):
            assert not (instance.visible_mask & ~instance.full_mask).any()
            assert instance.visible_mask.sum() >= settings.min_visible_fraction * instance.full_mask.sum()
            occluded += instance.visible_mask.sum() < instance.full_mask.sum()
            for later in instances[i + 1:]:
                # Later shapes are on top: whatever they cover is not visible in this one.
                assert not (instance.visible_mask & later.visible_mask).any()
                assert not (instance.visible_mask & later.full_mask).any()
    assert occluded > 0, 'no occlusion in 40 images: the test would not see occlusion bugs'


def test_mostly_hidden_instances_are_dropped():
    lenient = ShapesSettings(image_size=96, min_visible_fraction=0.0, min_visible_pixels=1)
    strict = ShapesSettings(image_size=96, min_visible_fraction=1.0)
    lenient_images, strict_images = rendered(lenient), rendered(strict)
    for instances in strict_images:
        for instance in instances:
            assert (instance.visible_mask == instance.full_mask).all()
    # Same random streams, so the same shapes are drawn: only the strict rule drops occluded ones.
    assert sum(map(len, strict_images)) < sum(map(len, lenient_images))


def test_dropped_instances_leave_no_pixels():
    """What is left visible of a dropped shape is painted over with the background."""
    lenient = ShapesSettings(image_size=96, min_visible_fraction=0.0, min_visible_pixels=1)
    strict = ShapesSettings(image_size=96, min_visible_fraction=0.9)
    remnants_seen = 0
    for i in range(40):
        lenient_image, lenient_kept = render_image(np.random.default_rng([99, i]), lenient)
        strict_image, strict_kept = render_image(np.random.default_rng([99, i]), strict)
        lenient_image, strict_image = lenient_image.astype(float), strict_image.astype(float)
        annotated = np.zeros((96, 96), dtype=bool)
        for instance in strict_kept:
            annotated |= instance.visible_mask
        # Background and noise come from the same stream: away from shapes, the images agree.
        shapes_anywhere = np.zeros((96, 96), dtype=bool)
        for instance in lenient_kept:
            shapes_anywhere |= instance.visible_mask
        np.testing.assert_array_equal(strict_image[~shapes_anywhere], lenient_image[~shapes_anywhere])
        for instance in lenient_kept:
            remnant = instance.visible_mask & ~annotated
            if remnant.sum() < 5:
                continue
            remnants_seen += 1
            # The lenient image shows the shape's flat colour there; the strict one must not.
            assert np.abs(strict_image[remnant] - lenient_image[remnant]).mean() > 15
    assert remnants_seen > 0


# ---------------------------------------------------------------------------------- reuse, CLI

def test_ensure_dataset_reuses_and_regenerates(tmp_path):
    out = str(tmp_path / 'shapes')
    assert ensure_dataset(out, SMALL, verbose=False)
    assert not ensure_dataset(out, SMALL, verbose=False)
    fewer = ShapesSettings(**{**SMALL.__dict__, 'num_train': 6})
    assert ensure_dataset(out, fewer, verbose=False)
    assert sorted(os.listdir(os.path.join(out, 'train'))) == [f'{i:06d}.png' for i in range(6)]
    with open(os.path.join(out, 'annotations', 'instances_train.json')) as f:
        assert len(json.load(f)['images']) == 6
    os.remove(os.path.join(out, 'val', '000001.png'))
    assert ensure_dataset(out, fewer, verbose=False)
    assert os.path.isfile(os.path.join(out, 'val', '000001.png'))


def test_cli(tmp_path, capsys):
    out = str(tmp_path / 'cli')
    args = ['--out', out, '--seed', '7', '--num-train', '3', '--num-val', '2', '--image-size', '64']
    assert shapes.main(args) == 0
    with open(os.path.join(out, 'manifest.json')) as f:
        manifest = json.load(f)
    assert manifest['settings']['seed'] == 7 and manifest['settings']['num_train'] == 3
    assert shapes.main(args) == 0
    assert 'reusing' in capsys.readouterr().out
    assert shapes.main(['--out', out, '--num-train', '0']) == 2
    assert 'num_train must be a positive integer' in capsys.readouterr().err


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match='image_size must be an integer >= 48'):
        ShapesSettings(image_size=20)
    with pytest.raises(ValueError, match='min_size <= max_size'):
        ShapesSettings(min_size=0.3, max_size=0.2)


# ---------------------------------------------------------------------------------- configs, mmdet

@pytest.mark.parametrize('config', [SHAPES_CONFIG, TINY_CONFIG])
def test_configs_match_the_generator(config):
    from mmengine.config import Config
    cfg = Config.fromfile(config)
    assert tuple(cfg.train_dataloader.dataset.metainfo['classes']) == CLASSES
    assert tuple(cfg.val_dataloader.dataset.metainfo['classes']) == CLASSES
    assert cfg.model.roi_head.bbox_head.num_classes == len(CLASSES)
    assert cfg.model.roi_head.mask_head.num_classes == len(CLASSES)
    assert cfg.model.backbone.type == 'MLLA' and cfg.model.backbone.init_cfg is None
    settings = ShapesSettings(**cfg.shapes_dataset)
    resize = [t for t in cfg.train_dataloader.dataset.pipeline if t['type'] == 'Resize'][0]
    assert tuple(resize['scale']) == (settings.image_size,) * 2
    assert cfg.val_evaluator.ann_file == cfg.val_dataloader.dataset.data_root + 'annotations/instances_val.json'


def test_mmdet_reads_the_dataset(dataset):
    import mlla_det  # noqa: F401
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmdet.registry import DATASETS

    out, _ = dataset
    init_default_scope('mmdet')
    cfg = Config.fromfile(TINY_CONFIG)
    dataset_cfg = cfg.train_dataloader.dataset
    dataset_cfg.data_root = os.path.join(out, '')
    dataset_cfg.pipeline = [t for t in dataset_cfg.pipeline if t['type'] != 'RandomFlip']
    coco_dataset = DATASETS.build(dataset_cfg)
    assert coco_dataset.metainfo['classes'] == CLASSES
    coco = COCO(os.path.join(out, 'annotations', 'instances_train.json'))
    sample = coco_dataset[0]['data_samples']
    image_id = sample.img_id
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
    gt = sample.gt_instances
    assert len(gt) == len(annotations)
    assert gt.labels.tolist() == [a['category_id'] - 1 for a in annotations]
    for mask, box, annotation in zip(gt.masks.masks, gt.bboxes.tensor.numpy(), annotations):
        np.testing.assert_array_equal(mask, coco.annToMask(annotation))
        x, y, w, h = annotation['bbox']
        np.testing.assert_allclose(box, [x, y, x + w, y + h])


# ---------------------------------------------------------------------------------- quickstart

def load_quickstart():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        'shapes_quickstart', os.path.join(ROOT, 'tools', 'shapes_quickstart.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_adapts_the_config():
    quickstart = load_quickstart()
    gpu = quickstart.load_config(quickstart.parse_args([]), 'cuda')
    assert gpu.optim_wrapper.type == 'AmpOptimWrapper' and gpu.train_dataloader.dataset.data_root == 'data/shapes/'

    # Without a GPU: no AMP (mmengine's needs CUDA), and a shorter schedule scaled as a whole.
    cpu = quickstart.load_config(quickstart.parse_args(['--data-root', '/x/shapes']), 'cpu')
    assert cpu.optim_wrapper.type == 'OptimWrapper' and 'dtype' not in cpu.optim_wrapper
    assert cpu.train_cfg.max_iters == quickstart.CPU_MAX_ITERS
    warmup, cosine = cpu.param_scheduler
    fraction = gpu.param_scheduler[0]['end'] / gpu.train_cfg.max_iters
    assert warmup['end'] == cosine['begin'] == round(fraction * quickstart.CPU_MAX_ITERS)
    assert cosine['end'] == quickstart.CPU_MAX_ITERS
    assert cosine['T_max'] == cosine['end'] - cosine['begin']
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        assert cpu[loader].dataset.data_root == '/x/shapes/'
    assert cpu.test_evaluator.ann_file == '/x/shapes/annotations/instances_val.json'

    # An explicit length is honoured, on any device, and stretches the schedule with it.
    doubled = 2 * gpu.train_cfg.max_iters
    longer = quickstart.load_config(
        quickstart.parse_args(['--cfg-options', f'train_cfg.max_iters={doubled}']), 'cpu')
    assert longer.train_cfg.max_iters == doubled and longer.param_scheduler[1]['end'] == doubled
    assert longer.train_cfg.val_interval == 2 * gpu.train_cfg.val_interval


def load_demo():
    import importlib.util
    spec = importlib.util.spec_from_file_location('demo', os.path.join(ROOT, 'tools', 'demo.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_says_which_file_is_missing(dataset, tmp_path, capsys):
    demo = load_demo()
    out, _ = dataset
    image = os.path.join(out, 'val', '000000.png')
    missing = str(tmp_path / 'nothing.pth')
    cases = [([str(tmp_path / 'no.png'), TINY_CONFIG, missing], 'image not found'),
             ([image, str(tmp_path / 'no.py'), missing], 'config not found'),
             ([image, TINY_CONFIG, missing], 'checkpoint not found')]
    for args, message in cases:
        assert demo.main(args + ['--out', str(tmp_path / 'out.png')]) == 2
        assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 'out.png')


# ---------------------------------------------------------------------------------- end to end

def logged_losses(scalars_file):
    with open(scalars_file) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [record['loss'] for record in records if 'loss' in record]


@pytest.mark.slow
def test_quickstart_tiny_trains_evaluates_and_draws(tmp_path):
    work_dir = tmp_path / 'work'
    data_root = tmp_path / 'data'
    command = [sys.executable, os.path.join(ROOT, 'tools', 'shapes_quickstart.py'), '--tiny',
               '--device', 'cpu', '--work-dir', str(work_dir), '--data-root', str(data_root)]
    # One thread: on a busy 2-core machine, two OpenMP threads per process ran 5x slower here.
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    result = subprocess.run(command, cwd=str(tmp_path), env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    with open(work_dir / 'metrics.json') as f:
        report = json.load(f)
    for name in ('bbox_mAP', 'bbox_mAP_50', 'segm_mAP', 'segm_mAP_50'):
        assert 0.0 <= report['metrics'][name] <= 1.0, (name, report['metrics'][name])
    assert str(work_dir / 'metrics.json') in result.stdout

    losses = logged_losses(report['scalars'])
    assert len(losses) >= 6, losses
    assert all(np.isfinite(losses))
    first, last = np.mean(losses[:2]), np.mean(losses[-2:])
    assert last < 0.8 * first, f'the loss did not fall: {losses}'

    assert os.path.isfile(report['checkpoint'])
    picture = report['prediction']['picture']
    with Image.open(picture) as image:
        assert image.format == 'PNG'
        image.verify()
    with Image.open(picture) as image, Image.open(report['prediction']['image']) as source:
        assert image.size == source.size == (96, 96)
        assert image.mode == 'RGB'
