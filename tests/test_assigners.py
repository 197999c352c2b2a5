"""SyncFreeMaxIoUAssigner gives mmdet's MaxIoUAssigner results exactly, ties included."""
import pytest
import torch

import mlla_det  # noqa: F401,I001  (the mmcv stand-in: before anything imports mmdet's models)
from mmdet.models.task_modules.assigners import MaxIoUAssigner
from mmengine.structures import InstanceData

from mlla_det.models.assigners import SyncFreeMaxIoUAssigner

SETTINGS = [
    dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True),  # the RPN's
    dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=True),  # the RoI head's
    dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0, match_low_quality=False),
    dict(pos_iou_thr=0.5, neg_iou_thr=(0.1, 0.4), min_pos_iou=0.2, match_low_quality=True, gt_max_assign_all=False),
    dict(pos_iou_thr=0.6, neg_iou_thr=0.3, min_pos_iou=0.1, match_low_quality=True, gt_max_assign_all=False),
]


def assert_same(expected, got):
    assert got.num_gts == expected.num_gts
    for name in ("gt_inds", "max_overlaps", "labels"):
        a, b = getattr(expected, name), getattr(got, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("num_gts", [0, 1, 3, 17])
def test_same_assignment_as_mmdet_on_overlaps_with_ties(settings, num_gts):
    torch.manual_seed(num_gts * 31 + len(str(settings)))
    for num_boxes in (0, 1, 40, 500):
        # IoUs on a coarse grid, so that maxima are shared between boxes and between ground truths;
        # -1 marks ignored boxes as mmdet's assign() does.
        overlaps = torch.randint(-1, 11, (num_gts, num_boxes)).float() / 10
        overlaps = overlaps.clamp(min=-1).where(overlaps >= 0, torch.tensor(-1.0))
        labels = torch.randint(0, 80, (num_gts,))
        expected = MaxIoUAssigner(**settings).assign_wrt_overlaps(overlaps.clone(), labels)
        got = SyncFreeMaxIoUAssigner(**settings).assign_wrt_overlaps(overlaps.clone(), labels)
        assert_same(expected, got)
        if num_gts and num_boxes > 1 and settings["match_low_quality"]:
            # The case the loop exists for: some box at a ground truth's maximum below pos_iou_thr.
            assert (got.gt_inds > 0).any()


@pytest.mark.parametrize("settings", SETTINGS[:2])
def test_same_assignment_as_mmdet_on_boxes(settings):
    torch.manual_seed(0)
    for num_gts in (1, 5, 30):
        xy = torch.rand(num_gts, 2) * 200
        gts = torch.cat([xy, xy + 8 + torch.rand(num_gts, 2) * 100], dim=1)
        xy = torch.rand(3000, 2) * 250
        priors = torch.cat([xy, xy + 4 + torch.rand(3000, 2) * 120], dim=1)
        priors[:50] = gts[torch.randint(0, num_gts, (50,))]  # exact matches: IoU 1, shared maxima
        gt = InstanceData(bboxes=gts, labels=torch.randint(0, 80, (num_gts,)))
        pred = InstanceData(priors=priors)
        assert_same(MaxIoUAssigner(**settings).assign(pred, gt), SyncFreeMaxIoUAssigner(**settings).assign(pred, gt))


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("num_gts", [0, 1, 5, 30])
def test_assigning_the_valid_priors_in_place_is_assigning_them_cut_out(settings, num_gts):
    """assign_valid(priors, valid) = mmdet's assign(priors[valid]) scattered back, the others -1:
    the best matches of each box among the valid priors only (the invalid include better ones)."""
    generator = torch.Generator().manual_seed(num_gts)
    xy = torch.rand(num_gts, 2, generator=generator) * 200
    gts = torch.cat([xy, xy + 8 + torch.rand(num_gts, 2, generator=generator) * 100], dim=1)
    xy = torch.rand(3000, 2, generator=generator) * 250
    priors = torch.cat([xy, xy + 4 + torch.rand(3000, 2, generator=generator) * 120], dim=1)
    valid = torch.rand(3000, generator=generator) < 0.7
    if num_gts:
        priors[:60] = gts[torch.randint(0, num_gts, (60,), generator=generator)]  # IoU 1, shared maxima
        valid[:30] = False  # some of the best matches are invalid
    gt = InstanceData(bboxes=gts, labels=torch.randint(0, 80, (num_gts,), generator=generator))
    cut = MaxIoUAssigner(**settings).assign(InstanceData(priors=priors[valid]), gt)
    got = SyncFreeMaxIoUAssigner(**settings).assign_valid(InstanceData(priors=priors), gt, valid)
    expected_inds = torch.full((3000,), -1, dtype=cut.gt_inds.dtype)
    expected_inds[valid] = cut.gt_inds
    expected_labels = torch.full((3000,), -1, dtype=cut.labels.dtype)
    expected_labels[valid] = cut.labels
    assert torch.equal(got.gt_inds, expected_inds) and torch.equal(got.labels, expected_labels)
    assert torch.equal(got.max_overlaps[valid], cut.max_overlaps) and got.num_gts == num_gts
    assert (got.gt_inds[valid] >= 0).any() and (got.gt_inds[~valid] == -1).all()
    if num_gts:
        assert (got.gt_inds > 0).any()


def test_control_a_changed_rule_is_seen():
    """The comparison can fail: a box at two ground truths' maxima goes to the last of them; the
    first-claim rule, otherwise the same, is caught."""
    overlaps = torch.tensor([[0.4, 0.2], [0.4, 0.1]])
    labels = torch.tensor([3, 7])
    settings = SETTINGS[0]
    expected = MaxIoUAssigner(**settings).assign_wrt_overlaps(overlaps, labels)
    assert expected.gt_inds.tolist() == [2, 0] and expected.labels.tolist() == [7, -1]
    got = SyncFreeMaxIoUAssigner(**settings).assign_wrt_overlaps(overlaps, labels)
    assert_same(expected, got)
    first_claim = SyncFreeMaxIoUAssigner(**settings).assign_wrt_overlaps(overlaps, labels)
    first_claim.gt_inds[0], first_claim.labels[0] = 1, 3
    with pytest.raises(AssertionError):
        assert_same(expected, first_claim)


def test_bad_negative_threshold():
    with pytest.raises(ValueError, match="neg_iou_thr must be a float"):
        SyncFreeMaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=[0.1, 0.2, 0.3]).assign_wrt_overlaps(
            torch.rand(2, 3), torch.tensor([1, 2]))


@pytest.mark.gpu
def test_same_assignment_on_the_gpu():
    torch.manual_seed(1)
    for settings in SETTINGS:
        overlaps = (torch.randint(-1, 11, (23, 20000)).float() / 10).cuda()
        labels = torch.randint(0, 80, (23,)).cuda()
        assert_same(MaxIoUAssigner(**settings).assign_wrt_overlaps(overlaps.clone(), labels),
                    SyncFreeMaxIoUAssigner(**settings).assign_wrt_overlaps(overlaps.clone(), labels))


def test_detector_training_step_is_bitwise_the_same_with_mmdet_head_utils():
    """A whole Mask R-CNN training step with the configs' assigners, samplers, box coders and anchor
    generator, and with mmdet's (the paper's model): the same losses and gradients, bit for bit
    (on the CPU, where the sampler draws what mmdet's does). The heads are mmdet's on both sides."""
    from mmdet.models.task_modules.coders import DeltaXYWHBBoxCoder
    from mmdet.models.task_modules.samplers import RandomSampler

    from benchmarks.common import use_head_utils, use_heads
    from mlla_det.models.anchor_generators import CachedAnchorGenerator
    from mlla_det.models.bbox_coders import PairedDeltaXYWHBBoxCoder
    from mlla_det.models.samplers import DeviceRandomSampler
    from tests.test_conv_buckets import detector_and_batch, training_step

    model, batch = detector_and_batch("cpu")
    model_cfg = _model_cfg()
    # The level-merged RPN loss sums in another order (tests/test_rpn_head.py): mmdet's heads on
    # both sides, the bit-for-bit claim is about the rest (the mask head's targets are bitwise
    # mmdet's too, tests/test_mask_head.py).
    use_heads(model, "paper")
    assert type(model.rpn_head.assigner) is SyncFreeMaxIoUAssigner
    assert type(model.rpn_head.prior_generator) is CachedAnchorGenerator
    assert type(model.rpn_head.bbox_coder) is type(model.roi_head.bbox_head.bbox_coder) is PairedDeltaXYWHBBoxCoder
    assert type(model.rpn_head.sampler) is type(model.roi_head.bbox_sampler) is DeviceRandomSampler
    repo_losses, repo_grads = training_step(model, batch)
    use_head_utils(model, "paper", model_cfg)
    assert type(model.roi_head.bbox_assigner) is MaxIoUAssigner
    assert type(model.rpn_head.bbox_coder) is type(model.roi_head.bbox_head.bbox_coder) is DeltaXYWHBBoxCoder
    assert type(model.rpn_head.sampler) is type(model.roi_head.bbox_sampler) is RandomSampler
    paper_losses, paper_grads = training_step(model, batch)
    assert repo_losses == paper_losses
    assert repo_grads.keys() == paper_grads.keys()
    for name, grad in repo_grads.items():
        assert torch.equal(grad, paper_grads[name]), name


def _model_cfg():
    from benchmarks.common import detector_config
    return detector_config("t").model
