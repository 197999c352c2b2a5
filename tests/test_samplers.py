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


RCNN = dict(num=512, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True)


def _assignment(generator, num_priors, num_gts, positive_share, device='cpu'):
    """An assignment of num_priors boxes: positives (gt index > 0), negatives (0), ignored (-1)."""
    from mmdet.models.task_modules.assigners import AssignResult
    from mmengine.structures import InstanceData
    draw = torch.rand(num_priors, generator=generator)
    gt_inds = torch.where(draw < positive_share, torch.randint(1, max(num_gts, 1) + 1, (num_priors,), generator=generator),
                          torch.where(draw < 0.9, 0, -1))
    if num_gts == 0:
        gt_inds = torch.where(gt_inds > 0, 0, gt_inds)
    labels = torch.where(gt_inds > 0, torch.randint(0, 80, (num_priors,), generator=generator), -1)
    corners = torch.rand(num_priors + num_gts, 2, generator=generator) * 500
    boxes = torch.cat([corners, corners + 8 + torch.rand(num_priors + num_gts, 2, generator=generator) * 200], 1)
    assign = AssignResult(num_gts, gt_inds.to(device), torch.rand(num_priors, generator=generator).to(device),
                          labels=labels.to(device))
    gts = InstanceData(bboxes=boxes[num_priors:].to(device), labels=torch.randint(0, 80, (num_gts,), generator=generator).to(device))
    return assign, InstanceData(priors=boxes[:num_priors].to(device)), gts


def _copy(assign):
    from mmdet.models.task_modules.assigners import AssignResult
    return AssignResult(assign.num_gts, assign.gt_inds.clone(), assign.max_overlaps.clone(), labels=assign.labels.clone())


# RPN-like and RoI-head-like samplers; more positives than wanted (drawn) and fewer (all kept);
# an image without boxes; an upper bound on negatives per positive.
@pytest.mark.parametrize('settings, num_priors, num_gts, positive_share', [
    (RPN, 20_000, 9, 0.02), (RPN, 20_000, 3, 0.001), (RCNN, 2_000, 12, 0.3), (RCNN, 1_000, 0, 0.0),
    (dict(RCNN, neg_pos_ub=3), 2_000, 5, 0.01)])
def test_on_the_cpu_the_same_samples_as_mmdet(settings, num_priors, num_gts, positive_share):
    generator = torch.Generator().manual_seed(num_priors + num_gts)
    assign, priors, gts = _assignment(generator, num_priors, num_gts, positive_share)
    torch.manual_seed(7)
    expected = RandomSampler(**settings).sample(_copy(assign), priors, gts)
    torch.manual_seed(7)
    got = DeviceRandomSampler(**settings).sample(_copy(assign), priors, gts)
    for field in ('pos_inds', 'neg_inds', 'pos_priors', 'neg_priors', 'pos_is_gt', 'pos_assigned_gt_inds',
                  'pos_gt_bboxes', 'pos_gt_labels'):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field
    assert got.avg_factor == expected.avg_factor and got.num_gts == expected.num_gts
    assert got.pos_inds.numel() + got.neg_inds.numel() > 0


@pytest.mark.gpu
def test_on_the_gpu_a_sample_waits_for_the_gpu_once():
    from benchmarks.common import host_waits
    generator = torch.Generator().manual_seed(0)
    assign, priors, gts = _assignment(generator, 200_000, 9, 0.002, device='cuda')
    with host_waits() as waits:
        result = DeviceRandomSampler(**RPN).sample(_copy(assign), priors, gts)
    assert len(waits) == 1, [str(w.message) for w in waits]
    assert result.pos_inds.numel() > 0 and result.neg_inds.numel() == 256 - result.pos_inds.numel()
