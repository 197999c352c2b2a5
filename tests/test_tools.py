"""tools/train.py and tools/test.py: `--help`, and a clear error (exit code 1, the path named)
before the runner starts for a missing config, dataset, checkpoint or pretrained backbone.
End-to-end runs of both tools are in tests/test_data_robustness.py and tests/test_resume.py."""
import importlib.util
import os
import os.path as osp
import subprocess
import sys

import pytest

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TRAIN = osp.join(REPO_ROOT, 'tools', 'train.py')
TEST = osp.join(REPO_ROOT, 'tools', 'test.py')
CONFIG_T = osp.join(REPO_ROOT, 'configs', 'mlla', 'mask-rcnn_mlla-t_fpn_1x_coco.py')


def run(tool, *args, cwd):
    """The tool in a fresh process, from `cwd` (the configs' data paths are relative to it)."""
    done = subprocess.run([sys.executable, tool, *map(str, args)], cwd=str(cwd), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=180)
    return done.returncode, done.stdout, done.stderr


def assert_fails_with(result, *fragments):
    code, out, err = result
    assert code == 1, f'exit code {code}\nstdout:\n{out}\nstderr:\n{err}'
    assert 'Traceback' not in err, err
    for fragment in fragments:
        assert fragment in err, f'{fragment!r} not in:\n{err}'


def missing_listing(stderr: str) -> str:
    """The list of missing paths in a dataset error, without the advice that follows it."""
    return stderr.split('The configs in configs/mlla/')[0]


def make_fake_coco(root):
    """The files and folders the COCO configs read (empty: only their existence is checked)."""
    coco = root / 'data' / 'coco'
    (coco / 'annotations').mkdir(parents=True)
    for split in ('train2017', 'val2017'):
        (coco / split).mkdir()
        (coco / 'annotations' / f'instances_{split}.json').write_text('{}')


@pytest.mark.parametrize('tool, expected', [
    (TRAIN, ['--work-dir', '--amp', '--resume', '--cfg-options', '--launcher', '--local_rank']),
    (TEST, ['checkpoint', '--work-dir', '--out', '--show-dir', '--cfg-options', '--launcher']),
], ids=['train', 'test'])
def test_help(tool, expected, tmp_path):
    code, out, err = run(tool, '--help', cwd=tmp_path)
    assert code == 0, err
    assert out.startswith('usage:')
    for option in expected:
        assert option in out


@pytest.mark.parametrize('tool, extra', [(TRAIN, []), (TEST, ['model.pth'])], ids=['train', 'test'])
def test_missing_config(tool, extra, tmp_path):
    missing = tmp_path / 'configs' / 'no-such-config.py'
    assert_fails_with(run(tool, missing, *extra, cwd=tmp_path),
                      f'config file not found: {missing}', 'mask-rcnn_mlla-t_fpn_1x_coco.py')


@pytest.mark.parametrize('script, args', [('dist_train.sh', ['{config}', '1']),
                                          ('dist_test.sh', ['{config}', 'model.pth', '1'])],
                         ids=['dist_train', 'dist_test'])
def test_dist_scripts_launch_the_tools(script, args, tmp_path):
    """torchrun starts one process of the tool, whose error comes back with a failing exit code."""
    missing = tmp_path / 'missing.py'
    args = [a.format(config=missing) for a in args]
    env = dict(os.environ, PORT='29537')
    done = subprocess.run(['bash', osp.join(REPO_ROOT, 'tools', script), *args], cwd=str(tmp_path), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180)
    assert done.returncode != 0
    assert f'config file not found: {missing}' in done.stdout, done.stdout
    # Too few arguments: the usage line, before torchrun is involved.
    usage = subprocess.run(['bash', osp.join(REPO_ROOT, 'tools', script), args[0]], cwd=str(tmp_path),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert usage.returncode == 2 and usage.stderr.startswith('usage:'), usage.stderr


def test_test_missing_checkpoint(tmp_path):
    assert_fails_with(run(TEST, CONFIG_T, 'work_dirs/epoch_12.pth', cwd=tmp_path),
                      'checkpoint not found: work_dirs/epoch_12.pth',
                      str(tmp_path / 'work_dirs' / 'epoch_12.pth'))


def test_train_missing_dataset(tmp_path):
    result = run(TRAIN, CONFIG_T, cwd=tmp_path)
    assert_fails_with(result, 'dataset not found', 'data/coco/annotations/instances_train2017.json',
                      'data/coco/train2017/', 'data/coco/annotations/instances_val2017.json',
                      str(tmp_path / 'data' / 'coco'), 'https://cocodataset.org')


def test_train_missing_dataset_follows_cfg_options(tmp_path):
    make_fake_coco(tmp_path)  # the default place is fine, the overridden one is not
    elsewhere = tmp_path / 'elsewhere'
    result = run(TRAIN, CONFIG_T, '--cfg-options', f'train_dataloader.dataset.data_root={elsewhere}/',
                 cwd=tmp_path)
    assert_fails_with(result, f'{elsewhere}/annotations/instances_train2017.json')
    assert 'instances_val2017.json' not in missing_listing(result[2])


def test_test_missing_dataset(tmp_path):
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'')  # only its existence is checked before the dataset
    result = run(TEST, CONFIG_T, checkpoint, cwd=tmp_path)
    assert_fails_with(result, 'dataset not found', 'data/coco/annotations/instances_val2017.json',
                      'data/coco/val2017/')
    assert 'train2017' not in missing_listing(result[2])  # testing needs no training data


def test_train_missing_pretrained_backbone(tmp_path):
    make_fake_coco(tmp_path)
    assert_fails_with(run(TRAIN, CONFIG_T, cwd=tmp_path),
                      'pretrained weights not found: data/MLLA_T.pth',
                      'model.backbone.init_cfg.checkpoint',
                      '--cfg-options model.backbone.init_cfg=None')


def test_train_missing_resume_checkpoint(tmp_path):
    assert_fails_with(run(TRAIN, CONFIG_T, '--resume', 'old/epoch_3.pth', cwd=tmp_path),
                      'checkpoint to resume from not found: old/epoch_3.pth')


def test_test_out_must_be_a_pickle(tmp_path):
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'')
    assert_fails_with(run(TEST, CONFIG_T, checkpoint, '--out', 'results.json', cwd=tmp_path),
                      '--out must name a pickle file', 'results.json')


@pytest.fixture(scope='module')
def train_tool():
    spec = importlib.util.spec_from_file_location('mlla_train_tool', TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dataset_paths_look_inside_dataset_wrappers(train_tool):
    inner = dict(type='CocoDataset', data_root='root/', ann_file='a.json', data_prefix=dict(img='imgs/'))
    wrapped = dict(type='ConcatDataset', datasets=[dict(type='RepeatDataset', times=2, dataset=inner),
                                                    dict(type='CocoDataset', ann_file='/abs/b.json')])
    paths = dict(train_tool.dataset_paths(wrapped, 'train'))
    assert paths == {
        'train.datasets[0].dataset.data_root': 'root/',
        'train.datasets[0].dataset.ann_file': os.path.join('root/', 'a.json'),
        'train.datasets[0].dataset.data_prefix.img': os.path.join('root/', 'imgs/'),
        'train.datasets[1].ann_file': '/abs/b.json',
    }
    # Files on a storage backend can't be checked locally and are left to the runner.
    assert train_tool.dataset_paths(dict(inner, backend_args=dict(backend='petrel')), 'x') == []


def test_polygons_the_evaluation_cannot_rasterise_are_named_up_front(tmp_path):
    import json

    make_fake_coco(tmp_path)
    val = tmp_path / 'data' / 'coco' / 'annotations' / 'instances_val2017.json'
    segmentations = [[[1, 1, 9, 1, 9, 9]], [[2, 2, 8, 8]], {'counts': 'x', 'size': [4, 4]}, [[1, 1, 5, 1, 5]]]
    val.write_text(json.dumps({'images': [{'id': 7}], 'annotations': [
        {'id': 100 + i, 'image_id': 7, 'segmentation': seg} for i, seg in enumerate(segmentations)]}))
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'')
    for result in (run(TEST, CONFIG_T, checkpoint, cwd=tmp_path),
                   run(TRAIN, CONFIG_T, '--cfg-options', 'model.backbone.init_cfg=None', cwd=tmp_path)):
        assert_fails_with(result, 'fewer than 3 points', 'annotation 101 (image 7): 4 numbers',
                          'annotation 103 (image 7): 5 numbers')
        assert 'annotation 100 ' not in result[2] and 'annotation 102 ' not in result[2]


def test_amp_modes_set_the_optimizer_wrapper():
    """--amp (fp16, dynamic loss scale, as before) and --amp bf16 (no loss scaler)."""
    import importlib.util

    from mmengine.config import Config
    spec = importlib.util.spec_from_file_location('train_tool', osp.join(REPO_ROOT, 'tools', 'train.py'))
    train_tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_tool)
    assert train_tool.parse_args(['c.py', '--amp']).amp == 'fp16'
    assert train_tool.parse_args(['c.py', '--amp', 'bf16']).amp == 'bf16'
    assert train_tool.parse_args(['c.py']).amp is None
    for amp, dtype, loss_scale in (('fp16', 'float16', 'dynamic'), ('bf16', 'bfloat16', dict(enabled=False))):
        cfg = Config(dict(optim_wrapper=dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-4))))
        train_tool.apply_amp(cfg, amp)
        assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
        assert cfg.optim_wrapper.dtype == dtype and cfg.optim_wrapper.loss_scale == loss_scale
    with pytest.raises(ValueError, match='fp16 or bf16'):
        train_tool.apply_amp(cfg, 'fp8')
