"""DeviceRandomSampler: mmdet's RandomSampler's draws on the CPU, its distribution on a GPU."""
import numpy as np
import pytest
import torch

import mlla_det  # noqa: F401,I001  (the mmcv stand-in: before anything imports mmdet's models)
from mmdet.models.task_modules.samplers import RandomSampler

from mlla_det.models.samplers import DeviceRandomSampler

RPN = dict(num=256, pos_fraction=0.5, neg_pos_ub=-1, add_gt_as_proposals=False)


def test_on_the_cpu_the_same_draws_as_mmdet():
    gallery = torch.randperm(5000)[:3000]
    for seed, num in ((0, 128), (1, 256), (2, 3000)):
        torch.manual_seed(seed)
        expected = RandomSampler(**RPN).random_choice(gallery, num)
        torch.manual_seed(seed)
        got = DeviceRandomSampler(**RPN).random_choice(gallery, num)
        assert torch.equal(got, expected)


def test_lists_and_arrays_go_to_mmdet():
    torch.manual_seed(3)
    expected = RandomSampler(**RPN).random_choice(list(range(50)), 7)
    torch.manual_seed(3)
    got = DeviceRandomSampler(**RPN).random_choice(list(range(50)), 7)
    assert isinstance(got, np.ndarray) and np.array_equal(got, expected)


def test_asking_for_more_than_the_gallery_says_so():
    with pytest.raises(ValueError, match='cannot sample 11 of a gallery of 10'):
        DeviceRandomSampler(**RPN).random_choice(torch.arange(10), 11)


def _check_uniform_subsets(device):
    """Distinct members of the gallery, and each member drawn about num/n of the time."""
    sampler = DeviceRandomSampler(**RPN)
    gallery = torch.arange(100, 300, device=device) * 3
    counts = torch.zeros(gallery.numel(), dtype=torch.float64)
    draws, num = 2000, 20
    for _ in range(draws):
        picked = sampler.random_choice(gallery, num)
        assert picked.device == gallery.device and picked.dtype == gallery.dtype and picked.numel() == num
        assert picked.unique().numel() == num
        positions = picked // 3 - 100
        assert bool(((picked % 3 == 0) & (positions >= 0) & (positions < gallery.numel())).all())
        counts[positions.cpu()] += 1
    expected = draws * num / gallery.numel()  # 200 each
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    # 199 degrees of freedom (a bit fewer without replacement): mean 199, sd 20; 320 is 6 sd away.
    assert chi_square < 320, chi_square


def test_uniform_subsets_on_the_cpu():
    torch.manual_seed(4)
    _check_uniform_subsets('cpu')


@pytest.mark.gpu
def test_on_the_gpu_uniform_subsets_drawn_on_the_device():
    """On a GPU: uniform subsets from the CUDA generator, and no host-to-device copy per draw."""
    torch.manual_seed(5)
    _check_uniform_subsets('cuda')
    gallery = torch.arange(200_000, device='cuda')
    sampler = DeviceRandomSampler(**RPN)
    sampler.random_choice(gallery, 128)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        sampler.random_choice(gallery, 128)
    names = [e.name for e in prof.events()]
    assert 'aten::randperm' in names
    assert not any('Memcpy' in name or name == 'aten::_to_copy' for name in names), names
