"""Resume determinism: N iterations straight == N/2 iterations, interruption, `--resume`, N/2 more.

Runs tools/train.py in subprocesses (each run a fresh process, as after a real interruption) on
a tiny generated COCO dataset with a drastically reduced MLLA Mask R-CNN (embed_dim 16, depths
1-1-1-1, 64 px images, batch 2) and drop path 0.5, so the random streams matter. Seeded and
deterministic (randomness=dict(seed=0, deterministic=True)), one data worker (num_workers=0).

mmengine 0.10 restores weights, optimizer, schedulers, iteration and seed on resume, but not the
RNG states: mlla_det.engine.RNGStateHook adds them. The negative control shows that without it
the resumed run does part ways with the uninterrupted one, i.e. that the comparison can fail.
"""
import os
import os.path as osp
import random
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers_coco import REPO_ROOT, clean_cases, write_config, write_split

TRAIN_TOOL = osp.join(REPO_ROOT, 'tools', 'train.py')
N = 4  # iterations (iteration-based run) or 2 epochs of N/2 iterations (epoch-based run)
RNG_HOOK = [dict(type='RNGStateHook')]


# ------------------------------------------------------------------------------------ helpers

def train(config, work_dir, *args):
    """tools/train.py in a fresh process; returns its output (stdout + stderr)."""
    command = [sys.executable, TRAIN_TOOL, config, '--work-dir', work_dir, *args]
    # One thread: the tiny model gains nothing from more (2 threads cost ~3x the CPU time here),
    # and runs compared bitwise must share the thread count (reductions split differently).
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    done = subprocess.run(command, cwd=osp.dirname(config), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert done.returncode == 0, (f'{" ".join(command)} failed (exit {done.returncode}):\n'
                                  f'{done.stdout[-6000:]}')
    return done.stdout


def load(path):
    # weights_only=True, as torch >= 2.6 loads by default: the RNG state must not break that.
    return torch.load(path, map_location='cpu', weights_only=True)


def differing_tensors(a, b, prefix=''):
    """Names of the tensors that are not bitwise equal between two nested state dicts."""
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b) else [prefix]
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f'{prefix}: keys differ'
        return [d for key in a for d in differing_tensors(a[key], b[key], f'{prefix}.{key}')]
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f'{prefix}: lengths differ'
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differing_tensors(x, y, f'{prefix}[{i}]')]
    return [] if a == b else [prefix]


def assert_same_training_state(straight, resumed):
    a, b = load(straight), load(resumed)
    assert a['meta']['iter'] == b['meta']['iter'] and a['meta']['epoch'] == b['meta']['epoch']
    weights = differing_tensors(a['state_dict'], b['state_dict'])
    assert not weights, f'{len(weights)} of {len(a["state_dict"])} weights differ, e.g. {weights[:5]}'
    optimizer = differing_tensors(a['optimizer'], b['optimizer'])
    assert not optimizer, f'optimizer state differs: {optimizer[:5]}'
    schedulers = differing_tensors(a['param_schedulers'], b['param_schedulers'])
    assert not schedulers, f'scheduler state differs: {schedulers[:5]}'


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('resume') / 'data')
    # 8 training images of 64 px: an epoch is 4 iterations, so the iteration-based run also
    # crosses an epoch boundary of the dataloader.
    write_split(root, 'train', clean_cases('train', 8, seed=1), seed=1)
    write_split(root, 'val', clean_cases('val', 2, seed=2), seed=2)
    return root


# ------------------------------------------------------------------------ in-process pieces

def draw_all():
    return (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    from mlla_det.engine import capture_rng_state, restore_rng_state

    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    path = tmp_path / 'state.pth'
    torch.save({'meta': {'rng_state': capture_rng_state()}}, path)
    expected = draw_all()
    assert draw_all() != expected  # the generators moved on
    restore_rng_state(load(path)['meta']['rng_state'])
    assert draw_all() == expected


def test_rng_state_restore_names_what_is_missing():
    from mlla_det.engine import restore_rng_state

    with pytest.raises(KeyError, match=r"lacks \['numpy'\]"):
        restore_rng_state({'python': random.getstate(), 'torch': torch.get_rng_state()})


def test_hook_ignores_rng_state_of_a_load_from_checkpoint():
    """`load_from` (a new run starting from weights) must keep its fresh seeds."""
    from mlla_det.engine import RNGStateHook, capture_rng_state

    hook = RNGStateHook()
    hook.after_load_checkpoint(None, {'meta': {'iter': 8, 'rng_state': capture_rng_state()}})
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    hook.before_train(SimpleNamespace(iter=0, train_loop=None))
    hook.before_train_epoch(None)
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------------- whole runs

@pytest.mark.slow
def test_iteration_based_resume_continues_the_uninterrupted_run(data_root, tmp_path):
    config = write_config(str(tmp_path / 'iter_cfg.py'), data_root, loop='iter', length=N,
                          val_interval=N // 2, checkpoint_interval=N // 2,
                          custom_hooks=RNG_HOOK, extra_imports=['mlla_det.engine'])
    straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
    train(config, straight)
    # The interruption: a run that stops after the checkpoint at N/2 (and the validation there).
    train(config, interrupted, '--cfg-options', f'train_cfg.max_iters={N // 2}')
    assert not osp.exists(osp.join(interrupted, f'iter_{N}.pth'))
    log = train(config, interrupted, '--resume')
    assert f'resumed epoch: 0, iter: {N // 2}' in log
    assert f'restored to their state at iteration {N // 2}' in log
    assert_same_training_state(osp.join(straight, f'iter_{N}.pth'),
                               osp.join(interrupted, f'iter_{N}.pth'))

    # Negative control: the same resume without the hook, from the same checkpoint, is plain
    # mmengine. It must differ, or the comparison above could not have failed.
    plain = str(tmp_path / 'plain')
    log = train(config, plain, '--resume', osp.join(interrupted, f'iter_{N // 2}.pth'),
                '--cfg-options', 'custom_hooks=[]')
    assert 'restored to their state' not in log
    a, b = load(osp.join(straight, f'iter_{N}.pth')), load(osp.join(plain, f'iter_{N}.pth'))
    assert b['meta']['iter'] == N
    assert differing_tensors(a['state_dict'], b['state_dict']), \
        'resuming without the RNG state gave the same weights: the test cannot tell the difference'


@pytest.mark.slow
def test_epoch_based_resume_continues_the_uninterrupted_run(tmp_path):
    # 4 training images -> 2 iterations per epoch; validation after every epoch.
    small_root = str(tmp_path / 'data')
    write_split(small_root, 'train', clean_cases('train', 4, seed=3), seed=3)
    write_split(small_root, 'val', clean_cases('val', 1, seed=4), seed=4)
    config = write_config(str(tmp_path / 'epoch_cfg.py'), small_root, loop='epoch', length=2,
                          val_interval=1, checkpoint_interval=1, warmup_iters=4,
                          custom_hooks=RNG_HOOK, extra_imports=['mlla_det.engine'])
    straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
    train(config, straight)
    train(config, interrupted, '--cfg-options', 'train_cfg.max_epochs=1')
    log = train(config, interrupted, '--resume')
    assert 'resumed epoch: 1, iter: 2' in log
    assert 'restored to their state at iteration 2' in log
    assert_same_training_state(osp.join(straight, 'epoch_2.pth'),
                               osp.join(interrupted, 'epoch_2.pth'))
