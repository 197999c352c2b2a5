"""The torchvision-backed mmcv._ext stand-in (mlla_det/mmcv_ext.py) against plain-PyTorch
references: greedy IoU NMS, Soft-NMS, nms_match and mmcv-semantics bilinear RoIAlign, forward,
input gradient, fp16/bf16 autocast; plus the install logic and the errors of the ops it does not
provide."""
import ast
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import math
import os
import sys
import types

import numpy as np
import pytest
import torch

from mlla_det.mmcv_ext import (EXT_MODULE_NAME, MissingCompiledOpError, SUPPORTED_OPS,
                               build_stand_in_module, install_mmcv_ext, is_stand_in)

install_mmcv_ext()  # no-op when mlla_det's __init__ already did it

import mmcv  # noqa: E402
import mmcv.ops  # noqa: E402

# Whether this environment uses the stand-in (no compiled mmcv): the op tests target it.
USING_STAND_IN = is_stand_in(sys.modules[EXT_MODULE_NAME])
needs_stand_in = pytest.mark.skipif(not USING_STAND_IN, reason="a compiled mmcv is installed")


# ----------------------------------------------------------------------------- references

def reference_box_iou(a, b, offset):
    """IoU of every box in a with every box in b, boxes x2 - x1 + offset wide (float64)."""
    area_a = (a[:, 2] - a[:, 0] + offset) * (a[:, 3] - a[:, 1] + offset)
    area_b = (b[:, 2] - b[:, 0] + offset) * (b[:, 3] - b[:, 1] + offset)
    width = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0]) + offset).clamp(min=0)
    height = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1]) + offset).clamp(min=0)
    inter = width * height
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def reference_nms(boxes, scores, iou_threshold, offset=0):
    """Greedy NMS: visit boxes by decreasing score, keep one unless its IoU with an already kept
    box exceeds the threshold. Returns kept indices, highest score first."""
    boxes = boxes.double()
    iou = reference_box_iou(boxes, boxes, offset)
    kept = []
    for index in torch.argsort(scores.double(), descending=True).tolist():
        if all(iou[index, other] <= iou_threshold for other in kept):
            kept.append(index)
    return torch.tensor(kept, dtype=torch.long)


def reference_box_overlap(a, b, offset, real):
    """IoU of two boxes (x1, y1, x2, y2 as `real` numbers) in mmcv's arithmetic, every operation
    rounded to `real` (np.float32 as mmcv's kernels compute, or np.float64). Two boxes of zero
    area have IoU 0 (the stand-in's choice where mmcv divides 0 by 0)."""
    offset, zero = real(offset), real(0)
    width = max(zero, min(a[2], b[2]) - max(a[0], b[0]) + offset)
    height = max(zero, min(a[3], b[3]) - max(a[1], b[1]) + offset)
    intersection = width * height
    union = (a[2] - a[0] + offset) * (a[3] - a[1] + offset) + (b[2] - b[0] + offset) * (b[3] - b[1] + offset) - intersection
    return intersection / union if union > 0 else zero


def reference_soft_nms(boxes, scores, iou_threshold, sigma, min_score, method, offset, real=np.float32):
    """Soft-NMS as mmcv defines it, one pair at a time: take the remaining box with the highest
    score (the lowest index among equals) and weight every other remaining box's score by its IoU
    with it -- naive: 0 if IoU >= threshold; linear: 1 - IoU if IoU >= threshold; gaussian:
    exp(-IoU^2 / sigma) -- dropping boxes whose score falls below min_score. Arithmetic in `real`.
    Returns the taken indices and their scores when taken (float64), in the order taken."""
    boxes = [[real(value) for value in box] for box in boxes.tolist()]
    current = {index: real(score) for index, score in enumerate(scores.tolist())}
    threshold, sigma, min_score, one = real(iou_threshold), real(sigma), real(min_score), real(1)
    taken, taken_scores = [], []
    while current:
        best = max(current, key=lambda index: (current[index], -index))
        taken.append(best)
        taken_scores.append(float(current.pop(best)))
        for index in list(current):
            overlap = reference_box_overlap(boxes[best], boxes[index], offset, real)
            if method == "naive":
                weight = real(0) if overlap >= threshold else one
            elif method == "linear":
                weight = one - overlap if overlap >= threshold else one
            else:
                weight = real(math.exp(-(overlap * overlap) / sigma))
            current[index] = current[index] * weight
            if current[index] < min_score:
                del current[index]
    return torch.tensor(taken, dtype=torch.long), torch.tensor(taken_scores, dtype=torch.float64)


def reference_nms_match(dets, iou_threshold, real=np.float32):
    """Greedy NMS by decreasing score (the lowest index first among equals) that groups each kept
    box with the boxes it suppresses: those not yet grouped with IoU >= threshold, boxes x2 - x1
    wide. Arithmetic in `real`. Returns the groups, each as [kept, suppressed...] by score."""
    rows = [[real(value) for value in row] for row in dets.tolist()]
    order = sorted(range(len(rows)), key=lambda index: (-rows[index][4], index))
    threshold = real(iou_threshold)
    grouped, groups = set(), []
    for position, kept in enumerate(order):
        if kept in grouped:
            continue
        group = [kept] + [other for other in order[position + 1:] if other not in grouped
                          and reference_box_overlap(rows[kept], rows[other], 0, real) >= threshold]
        grouped.update(group)
        groups.append(group)
    return groups


def bilinear_weight_matrix(coords, size):
    """Rows: sample coordinates; columns: pixels. mmcv's bilinear rule: a sample below -1 or
    beyond size contributes nothing, one in [-1, 0] clamps to 0, one past the last pixel centre
    uses the last pixel alone."""
    weights = torch.zeros(len(coords), size, dtype=torch.float64)
    for row, coord in enumerate(coords):
        if coord < -1.0 or coord > size:
            continue
        coord = max(coord, 0.0)
        low = int(coord)
        if low >= size - 1:
            weights[row, size - 1] = 1.0
            continue
        frac = coord - low
        weights[row, low] += 1.0 - frac
        weights[row, low + 1] += frac
    return weights


def reference_roi_align(features, rois, out_h, out_w, spatial_scale, sampling_ratio, aligned):
    """mmcv's RoIAlign ('avg') written out: each output bin averages a grid of bilinear samples;
    the grid is sampling_ratio per side, or ceil(roi_size / out_size) when sampling_ratio <= 0.
    aligned=True shifts the RoI by -0.5 pixel; aligned=False makes it at least 1x1.
    Differentiable in `features` (float64)."""
    outputs = []
    height, width = features.shape[-2:]
    shift = 0.5 if aligned else 0.0
    for roi in rois.double().tolist():
        batch_index = int(roi[0])
        x1, y1, x2, y2 = (value * spatial_scale - shift for value in roi[1:])
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / out_h, roi_w / out_w
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / out_h)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / out_w)
        channels = features.shape[1]
        if grid_h == 0 or grid_w == 0:  # empty RoI: no samples, output stays zero
            outputs.append(features.new_zeros(channels, out_h, out_w))
            continue
        ys = [y1 + ph * bin_h + (iy + 0.5) * bin_h / grid_h for ph in range(out_h) for iy in range(grid_h)]
        xs = [x1 + pw * bin_w + (ix + 0.5) * bin_w / grid_w for pw in range(out_w) for ix in range(grid_w)]
        weights_y = bilinear_weight_matrix(ys, height)
        weights_x = bilinear_weight_matrix(xs, width)
        samples = weights_y @ features[batch_index].double() @ weights_x.T  # (C, out_h*gh, out_w*gw)
        outputs.append(samples.reshape(channels, out_h, grid_h, out_w, grid_w).mean(dim=(2, 4)))
    return torch.stack(outputs)


def random_rois(num_rois, batch, height, width, spatial_scale, generator):
    """RoIs in image coordinates, some reaching past the feature map, one of zero width."""
    scale = 1.0 / spatial_scale
    x1 = (torch.rand(num_rois, generator=generator, dtype=torch.float64) * (width + 4) - 3) * scale
    y1 = (torch.rand(num_rois, generator=generator, dtype=torch.float64) * (height + 4) - 3) * scale
    w = torch.rand(num_rois, generator=generator, dtype=torch.float64) * width * 0.8 * scale
    h = torch.rand(num_rois, generator=generator, dtype=torch.float64) * height * 0.8 * scale
    w[0] = 0.0
    index = torch.randint(0, batch, (num_rois,), generator=generator).double()
    return torch.stack([index, x1, y1, x1 + w, y1 + h], dim=1)


def random_boxes(num_boxes, generator, dtype=torch.float32):
    """Boxes clustered on a few centres so that many pairs overlap; the last quarter are near
    copies (2% jitter, IoU > 0.9) of the first, so every threshold suppresses something."""
    centres = torch.rand(4, 2, generator=generator, dtype=torch.float64) * 40
    pick = torch.randint(0, 4, (num_boxes,), generator=generator)
    centre = centres[pick] + torch.randn(num_boxes, 2, generator=generator, dtype=torch.float64) * 3
    size = torch.rand(num_boxes, 2, generator=generator, dtype=torch.float64) * 12 + 1
    copies = num_boxes // 4
    size[-copies:] = size[:copies]
    centre[-copies:] = centre[:copies] + (torch.rand(copies, 2, generator=generator, dtype=torch.float64) - 0.5) * 0.04 * size[:copies]
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1).to(dtype)
    scores = (torch.randperm(num_boxes, generator=generator).double() / num_boxes + 0.01).to(dtype)
    return boxes, scores


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


# ----------------------------------------------------------------------------- install logic

def test_importing_mmcv_ops_and_mmdet_models_works():
    import mmdet  # its import asserts mmcv >= 2.0.0rc4, < 2.2.0 against mmcv's version
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    assert MODELS.get("MaskRCNN") is not None
    assert mmcv.ops.RoIAlign is not None and mmcv.ops.batched_nms is not None
    assert mmdet.__version__ == "3.3.0"


@needs_stand_in
def test_install_is_idempotent_and_reports_stand_in():
    module = sys.modules[EXT_MODULE_NAME]
    assert install_mmcv_ext() == "stand-in"
    assert install_mmcv_ext() == "stand-in"
    assert sys.modules[EXT_MODULE_NAME] is module
    assert mmcv._ext is module


def test_fresh_install_puts_stand_in_module_in_place(monkeypatch):
    # A clean slate as mmcv-lite has it: no mmcv._ext anywhere.
    monkeypatch.delitem(sys.modules, EXT_MODULE_NAME, raising=False)
    monkeypatch.delattr(mmcv, "_ext", raising=False)
    if importlib.util.find_spec(EXT_MODULE_NAME) is not None:
        pytest.skip("a compiled mmcv._ext is importable here")
    assert install_mmcv_ext() == "stand-in"
    module = sys.modules[EXT_MODULE_NAME]
    assert is_stand_in(module) and mmcv._ext is module
    assert install_mmcv_ext() == "stand-in" and sys.modules[EXT_MODULE_NAME] is module
    # mmcv/mmengine ask "is a full mmcv here?" through pkgutil: the honest answer stays no.
    from mmcv.utils.ext_loader import check_ops_exist
    from mmengine.utils.dl_utils import mmcv_full_available
    assert not check_ops_exist() and not mmcv_full_available()


def test_full_mmcv_in_sys_modules_is_left_untouched(monkeypatch):
    compiled = types.ModuleType(EXT_MODULE_NAME)
    compiled.nms = object()
    monkeypatch.setitem(sys.modules, EXT_MODULE_NAME, compiled)
    monkeypatch.setattr(mmcv, "_ext", compiled, raising=False)
    assert install_mmcv_ext() == "compiled"
    assert sys.modules[EXT_MODULE_NAME] is compiled and mmcv._ext is compiled
    assert compiled.nms is not None and not is_stand_in(compiled)


class _FakeCompiledExtFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes `import mmcv._ext` find a module, as a compiled mmcv would."""

    def __init__(self):
        self.created = None

    def find_spec(self, fullname, path=None, target=None):
        if fullname == EXT_MODULE_NAME:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        self.created = types.ModuleType(spec.name)
        return self.created

    def exec_module(self, module):
        module.compiled_marker = True


def test_importable_full_mmcv_is_used_not_replaced(monkeypatch):
    finder = _FakeCompiledExtFinder()
    monkeypatch.delitem(sys.modules, EXT_MODULE_NAME, raising=False)
    monkeypatch.delattr(mmcv, "_ext", raising=False)
    monkeypatch.setattr(sys, "meta_path", [finder] + sys.meta_path)
    try:
        assert install_mmcv_ext() == "compiled"
        assert sys.modules[EXT_MODULE_NAME] is finder.created
        assert getattr(sys.modules[EXT_MODULE_NAME], "compiled_marker", False)
    finally:
        sys.modules.pop(EXT_MODULE_NAME, None)  # monkeypatch then restores the original


def _names_requested_by_mmcv_op_modules():
    """(op module, name) for every name mmcv's installed op modules pass to ext_loader.load_ext."""
    ops_dir = os.path.dirname(mmcv.ops.__file__)
    requested = []
    for filename in sorted(os.listdir(ops_dir)):
        if not filename.endswith(".py"):
            continue
        with open(os.path.join(ops_dir, filename)) as source:
            tree = ast.parse(source.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load_ext":
                requested += [(filename[:-3], element.value) for element in node.args[1].elts]
    return requested


def test_stand_in_has_every_name_mmcv_op_modules_request():
    requested = _names_requested_by_mmcv_op_modules()
    assert len(requested) > 100  # the scan really read mmcv's op modules
    module = build_stand_in_module()
    missing = [name for _, name in requested if not callable(getattr(module, name, None))]
    assert not missing, f"stand-in lacks {missing}"


@pytest.mark.parametrize("op_module, name", _names_requested_by_mmcv_op_modules())
def test_every_op_the_stand_in_lacks_raises_naming_it(op_module, name):
    if name in SUPPORTED_OPS or name.startswith("get_compil"):
        return  # implemented (tested below) or informational
    function = getattr(build_stand_in_module(), name)
    with pytest.raises(MissingCompiledOpError) as error:
        function(torch.zeros(1), torch.zeros(1))
    message = str(error.value)
    assert f"'{name}'" in message and f"mmcv.ops.{op_module}" in message
    assert "compiled" in message and "full mmcv build" in message


@needs_stand_in
def test_unsupported_mmcv_ops_raise_clear_error():
    features = torch.randn(1, 4, 6, 6)
    offset = torch.zeros(1, 18, 6, 6)
    weight = torch.randn(4, 4, 3, 3)
    with pytest.raises(MissingCompiledOpError, match="deform_conv_forward.*full mmcv build"):
        mmcv.ops.deform_conv2d(features, offset, weight, 1, 1)
    logits, labels = torch.randn(5, 3), torch.randint(0, 3, (5,))
    with pytest.raises(MissingCompiledOpError, match="sigmoid_focal_loss_forward"):
        mmcv.ops.sigmoid_focal_loss(logits, labels, 2.0, 0.25)
    rois = torch.tensor([[0.0, 1.0, 1.0, 4.0, 4.0]])
    with pytest.raises(NotImplementedError, match="pool_mode='max'.*full mmcv build"):
        mmcv.ops.roi_align(features, rois, 2, 1.0, 0, "max", True)


def test_compiler_version_queries_answer_instead_of_raising():
    from mmcv.utils import collect_env
    env = collect_env()
    assert isinstance(env["MMCV Compiler"], str) and isinstance(env["MMCV CUDA Compiler"], str)


# ----------------------------------------------------------------------------- nms

@needs_stand_in
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
def test_ext_nms_matches_greedy_reference(generator, offset, iou_threshold):
    boxes, scores = random_boxes(120, generator, dtype=torch.float64)
    expected = reference_nms(boxes, scores, iou_threshold, offset)
    kept = mmcv._ext.nms(boxes, scores, iou_threshold=iou_threshold, offset=offset)
    assert kept.dtype == torch.long
    assert 0 < len(expected) < len(boxes)  # suppression happened and not everything went
    assert torch.equal(kept, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mmcv_nms_wrapper_matches_reference(generator, dtype):
    boxes, scores = random_boxes(80, generator, dtype=dtype)
    expected = reference_nms(boxes, scores, 0.5)
    dets, kept = mmcv.ops.nms(boxes, scores, 0.5)
    assert torch.equal(kept, expected)
    assert torch.equal(dets[:, :4], boxes[expected]) and torch.equal(dets[:, 4], scores[expected])
    score_threshold = float(scores.float().median())
    _, kept = mmcv.ops.nms(boxes, scores, 0.5, score_threshold=score_threshold, max_num=5)
    valid = torch.nonzero(scores > score_threshold).squeeze(1)
    assert torch.equal(kept, valid[reference_nms(boxes[valid], scores[valid], 0.5)][:5])


def test_mmcv_batched_nms_matches_per_class_reference(generator):
    boxes, scores = random_boxes(150, generator)
    classes = torch.randint(0, 3, (150,), generator=generator)
    per_class = [torch.nonzero(classes == c).squeeze(1) for c in range(3)]
    kept = torch.cat([members[reference_nms(boxes[members], scores[members], 0.6)] for members in per_class])
    expected = kept[torch.argsort(scores[kept], descending=True)]
    dets, keep = mmcv.ops.batched_nms(boxes, scores, classes, dict(type="nms", iou_threshold=0.6))
    assert torch.equal(keep, expected)
    assert torch.equal(dets[:, :4], boxes[expected])


def test_nms_empty_and_bad_input():
    kept = mmcv._ext.nms(torch.zeros(0, 4), torch.zeros(0), iou_threshold=0.5, offset=0)
    assert kept.shape == (0,) and kept.dtype == torch.long
    if USING_STAND_IN:
        with pytest.raises(ValueError, match=r"boxes of shape \(N, 4\)"):
            mmcv._ext.nms(torch.zeros(3, 5), torch.zeros(3), iou_threshold=0.5, offset=0)
        with pytest.raises(ValueError, match="offset must be 0 or 1"):
            mmcv._ext.nms(torch.zeros(3, 4), torch.zeros(3), iou_threshold=0.5, offset=2)


# ----------------------------------------------------------------------------- soft-NMS and nms_match

SOFT_NMS_METHODS = {"naive": 0, "linear": 1, "gaussian": 2}  # mmcv.ops.soft_nms's numbering
SOFT_NMS_SETTINGS = dict(iou_threshold=0.4, sigma=0.5, min_score=0.05)


def check_ext_softnms(boxes, scores, method, offset, device):
    """mmcv._ext.softnms on `device` against the reference in the arithmetic the stand-in uses."""
    real = np.float64 if boxes.dtype == torch.float64 else np.float32
    expected, expected_scores = reference_soft_nms(boxes, scores, method=method, offset=offset, real=real,
                                                   **SOFT_NMS_SETTINGS)
    assert 0 < len(expected) < len(boxes)  # min_score dropped some boxes
    if method != "naive":
        assert not torch.equal(expected_scores, scores[expected].double())  # and scores decayed
    dets = torch.full((len(boxes), 5), float("nan"), dtype=boxes.dtype, device=device)
    kept = mmcv._ext.softnms(boxes.to(device), scores.to(device), dets, method=SOFT_NMS_METHODS[method],
                             offset=offset, **SOFT_NMS_SETTINGS)
    assert kept.dtype == torch.long and kept.device == dets.device
    assert torch.equal(kept.cpu(), expected)
    assert torch.equal(dets[:len(expected), :4].cpu(), boxes[expected])
    torch.testing.assert_close(dets[:len(expected), 4].cpu(), expected_scores.to(boxes.dtype))


@needs_stand_in
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("method", list(SOFT_NMS_METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ext_softnms_matches_reference(generator, dtype, method, offset):
    boxes, scores = random_boxes(100, generator, dtype=dtype)
    check_ext_softnms(boxes, scores, method, offset, "cpu")


@pytest.mark.parametrize("method", list(SOFT_NMS_METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mmcv_soft_nms_wrapper_matches_reference(generator, dtype, method):
    boxes, scores = random_boxes(80, generator, dtype=dtype)
    # fp16/bf16 values, fp32 arithmetic: what the stand-in does with them
    expected, expected_scores = reference_soft_nms(boxes, scores, method=method, offset=0, **SOFT_NMS_SETTINGS)
    dets, kept = mmcv.ops.soft_nms(boxes, scores, method=method, **SOFT_NMS_SETTINGS)
    assert dets.dtype == dtype and torch.equal(kept, expected)
    assert torch.equal(dets[:, :4], boxes[expected])
    torch.testing.assert_close(dets[:, 4], expected_scores.to(dtype))
    if dtype == torch.float32:
        dets_array, kept_array = mmcv.ops.soft_nms(boxes.numpy(), scores.numpy(), method=method,
                                                   **SOFT_NMS_SETTINGS)
        assert isinstance(dets_array, np.ndarray) and np.array_equal(kept_array, expected.numpy())
        assert np.array_equal(dets_array, dets.numpy())


def expected_batched_soft_nms(boxes, scores, classes, method):
    """Soft-NMS class by class, merged by decreasing score (the lowest index first among equals):
    a joint run over classes that never overlap takes the boxes in that order."""
    taken = []
    for label in classes.unique().tolist():
        members = torch.nonzero(classes == label).squeeze(1)
        kept, kept_scores = reference_soft_nms(boxes[members], scores[members], method=method, offset=0,
                                               **SOFT_NMS_SETTINGS)
        taken += zip(kept_scores.tolist(), members[kept].tolist())
    taken.sort(key=lambda score_and_index: (-score_and_index[0], score_and_index[1]))
    return (torch.tensor([index for _, index in taken], dtype=torch.long),
            torch.tensor([score for score, _ in taken], dtype=torch.float64))


def random_classed_boxes(num_boxes, generator):
    """Boxes on a 1/16 grid with non-negative coordinates, and a class for each. batched_nms
    shifts each class by class * (max coordinate + 1): on the grid that shift is exact in fp32, so
    the per-class reference on unshifted boxes sees the very IoUs of the joint run, and with
    coordinates >= 0 the shift really keeps classes apart."""
    boxes, scores = random_boxes(num_boxes, generator)
    boxes = ((boxes - boxes.min()) * 16).round() / 16
    classes = torch.randint(0, 3, (num_boxes,), generator=generator)
    return boxes, scores, classes


@pytest.mark.parametrize("split_thr", [None, 16])  # 16: batched_nms runs soft_nms class by class
@pytest.mark.parametrize("method", list(SOFT_NMS_METHODS))
def test_mmcv_batched_nms_with_soft_nms_matches_per_class_reference(generator, method, split_thr):
    boxes, scores, classes = random_classed_boxes(150, generator)
    expected, expected_scores = expected_batched_soft_nms(boxes, scores, classes, method)
    nms_cfg = dict(type="soft_nms", method=method, **SOFT_NMS_SETTINGS)
    if split_thr is not None:
        nms_cfg["split_thr"] = split_thr
    dets, keep = mmcv.ops.batched_nms(boxes, scores, classes, nms_cfg)
    assert torch.equal(keep, expected)
    assert torch.equal(dets[:, :4], boxes[expected])
    torch.testing.assert_close(dets[:, 4], expected_scores.float())


def test_soft_nms_on_mmcv_docstring_example_with_zero_area_boxes():
    # mmcv.ops.soft_nms's docstring example: the first box and the last four have zero area.
    boxes = torch.tensor([[4.0, 3.0, 5.0, 3.0], [4.0, 3.0, 5.0, 4.0], [3.0, 1.0, 3.0, 1.0],
                          [3.0, 1.0, 3.0, 1.0], [3.0, 1.0, 3.0, 1.0], [3.0, 1.0, 3.0, 1.0]])
    scores = torch.tensor([0.9, 0.9, 0.5, 0.5, 0.4, 0.0])
    dets, kept = mmcv.ops.soft_nms(boxes, scores, 0.6, sigma=0.5)
    assert len(kept) == len(dets) == 5  # the docstring's claim
    if USING_STAND_IN:
        # Zero-area pairs do not overlap, for every method: nothing decays, no NaN scores (mmcv's
        # gaussian divides 0 by 0 there).
        for method in SOFT_NMS_METHODS:
            dets, kept = mmcv.ops.soft_nms(boxes, scores, 0.6, sigma=0.5, method=method)
            assert kept.tolist() == [0, 1, 2, 3, 4] and torch.equal(dets[:, 4], scores[:5])


@pytest.mark.parametrize("iou_threshold", [0.3, 0.6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mmcv_nms_match_matches_reference(generator, dtype, iou_threshold):
    boxes, scores = random_boxes(100, generator, dtype=dtype)
    dets = torch.cat([boxes, scores[:, None]], dim=1)
    expected = reference_nms_match(dets, iou_threshold)
    assert 1 < len(expected) < len(dets)  # several groups, some of more than one box
    groups = mmcv.ops.nms_match(dets, iou_threshold)
    assert all(group.dtype == torch.long for group in groups)
    assert [group.tolist() for group in groups] == expected
    if dtype == torch.float32:
        arrays = mmcv.ops.nms_match(dets.numpy(), iou_threshold)
        assert [array.tolist() for array in arrays] == expected


@needs_stand_in
def test_softnms_and_nms_match_empty_and_bad_input():
    settings = dict(SOFT_NMS_SETTINGS, method=1, offset=0)
    kept = mmcv._ext.softnms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 5), **settings)
    assert kept.shape == (0,) and kept.dtype == torch.long
    dets, kept = mmcv.ops.soft_nms(torch.zeros(0, 4), torch.zeros(0))
    assert dets.shape == (0, 5) and kept.shape == (0,)
    assert mmcv._ext.nms_match(torch.zeros(0, 5), iou_threshold=0.5) == []
    assert mmcv.ops.nms_match(torch.zeros(0, 5), 0.5) == []

    boxes, scores, dets = torch.rand(3, 4), torch.rand(3), torch.zeros(3, 5)
    with pytest.raises(ValueError, match="method must be one of"):
        mmcv._ext.softnms(boxes, scores, dets, **dict(settings, method=3))
    with pytest.raises(ValueError, match="offset must be 0 or 1"):
        mmcv._ext.softnms(boxes, scores, dets, **dict(settings, offset=2))
    with pytest.raises(ValueError, match=r"dets of shape \(3, 5\)"):
        mmcv._ext.softnms(boxes, scores, torch.zeros(3, 4), **settings)
    with pytest.raises(ValueError, match=r"boxes of shape \(N, 4\)"):
        mmcv._ext.softnms(torch.zeros(3, 5), scores, dets, **settings)
    with pytest.raises(ValueError, match=r"dets of shape \(N, 5\)"):
        mmcv._ext.nms_match(torch.zeros(3, 4), iou_threshold=0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_soft_nms_and_nms_match_on_cuda_match_references(generator, dtype):
    """Soft-NMS and nms_match on CUDA tensors (skipped without a GPU): the ext ops directly
    (mmcv's wrappers move everything to the CPU), then the wrappers' results coming back."""
    for method in SOFT_NMS_METHODS:
        for offset in (0, 1):
            boxes, scores = random_boxes(100, generator, dtype=dtype)
            check_ext_softnms(boxes, scores, method, offset, "cuda")
        expected, _ = reference_soft_nms(boxes, scores, method=method, offset=0, **SOFT_NMS_SETTINGS)
        dets, kept = mmcv.ops.soft_nms(boxes.cuda(), scores.cuda(), method=method, **SOFT_NMS_SETTINGS)
        assert dets.is_cuda and kept.is_cuda and torch.equal(kept.cpu(), expected)

        boxes, scores, classes = random_classed_boxes(150, generator)
        expected, _ = expected_batched_soft_nms(boxes, scores, classes, method)
        dets, keep = mmcv.ops.batched_nms(boxes.cuda(), scores.cuda(), classes.cuda(),
                                          dict(type="soft_nms", method=method, **SOFT_NMS_SETTINGS))
        assert dets.is_cuda and torch.equal(keep.cpu(), expected)

    boxes, scores = random_boxes(100, generator, dtype=dtype)
    dets = torch.cat([boxes, scores[:, None]], dim=1)
    expected = reference_nms_match(dets, 0.5)
    assert mmcv._ext.nms_match(dets.cuda(), iou_threshold=0.5) == expected
    assert [group.tolist() for group in mmcv.ops.nms_match(dets.cuda(), 0.5)] == expected


# ----------------------------------------------------------------------------- roi_align

ROI_ALIGN_CASES = [
    # out_h, out_w, spatial_scale, sampling_ratio, aligned
    (7, 7, 0.25, 0, True),    # Mask R-CNN's box branch: adaptive sampling
    (4, 3, 0.5, 2, True),     # fixed samples per bin, non-square output
    (5, 5, 1.0, 0, False),    # legacy alignment (RoIs made at least 1x1)
    (3, 2, 0.125, 3, False),
]


@needs_stand_in
@pytest.mark.parametrize("out_h, out_w, spatial_scale, sampling_ratio, aligned", ROI_ALIGN_CASES)
def test_ext_roi_align_forward_and_backward_match_reference(generator, out_h, out_w, spatial_scale,
                                                           sampling_ratio, aligned):
    features = torch.randn(2, 3, 11, 13, generator=generator, dtype=torch.float64)
    rois = random_rois(9, 2, 11, 13, spatial_scale, generator)
    expected = reference_roi_align(features, rois, out_h, out_w, spatial_scale, sampling_ratio, aligned)

    output = torch.full((9, 3, out_h, out_w), float("nan"), dtype=torch.float64)
    empty = features.new_zeros(0)
    mmcv._ext.roi_align_forward(features, rois, output, empty, empty, aligned_height=out_h,
                                aligned_width=out_w, spatial_scale=spatial_scale,
                                sampling_ratio=sampling_ratio, pool_mode=1, aligned=aligned)
    torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)
    assert expected.abs().sum() > 0

    grad_output = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    leaf = features.clone().requires_grad_(True)
    reference_roi_align(leaf, rois, out_h, out_w, spatial_scale, sampling_ratio, aligned).backward(grad_output)
    # mmcv's kernels accumulate into grad_input: start from something non-zero to see that.
    already_there = torch.randn(features.shape, generator=generator, dtype=torch.float64)
    grad_input = already_there.clone()
    mmcv._ext.roi_align_backward(grad_output, rois, empty, empty, grad_input, aligned_height=out_h,
                                 aligned_width=out_w, spatial_scale=spatial_scale,
                                 sampling_ratio=sampling_ratio, pool_mode=1, aligned=aligned)
    torch.testing.assert_close(grad_input - already_there, leaf.grad, rtol=1e-10, atol=1e-12)
    assert leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("out_h, out_w, spatial_scale, sampling_ratio, aligned", ROI_ALIGN_CASES[:2])
def test_mmcv_roi_align_function_and_module_match_reference(generator, out_h, out_w, spatial_scale,
                                                            sampling_ratio, aligned):
    features = torch.randn(2, 4, 10, 9, generator=generator, dtype=torch.float64)
    rois = random_rois(6, 2, 10, 9, spatial_scale, generator)
    grad_output = torch.randn(6, 4, out_h, out_w, generator=generator, dtype=torch.float64)

    leaf = features.clone().requires_grad_(True)
    expected = reference_roi_align(leaf, rois, out_h, out_w, spatial_scale, sampling_ratio, aligned)
    expected.backward(grad_output)

    layer = mmcv.ops.RoIAlign((out_h, out_w), spatial_scale, sampling_ratio, "avg", aligned)
    for dtype, tolerance in [(torch.float64, 1e-10), (torch.float32, 1e-5)]:
        inputs = features.detach().to(dtype).clone().requires_grad_(True)
        output = layer(inputs, rois.to(dtype))
        output.backward(grad_output.to(dtype))
        assert output.dtype == dtype and inputs.grad.dtype == dtype
        torch.testing.assert_close(output.double(), expected, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(inputs.grad.double(), leaf.grad, rtol=tolerance, atol=tolerance)


def test_roi_align_backward_passes_gradcheck(generator):
    features = torch.randn(1, 2, 6, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    rois = random_rois(3, 1, 6, 7, 0.5, generator)
    assert torch.autograd.gradcheck(lambda x: mmcv.ops.roi_align(x, rois, (2, 3), 0.5, 2, "avg", True),
                                    (features,))


def check_roi_align_under_autocast(device, dtype, features_in_low_precision, generator):
    """A conv feeding RoIAlign, as in Mask R-CNN: under autocast the conv emits `dtype`, and mmdet
    casts the RoIs to the features' dtype (rois.type_as(feats)). Both paths must run, forward
    and backward, and roughly agree with fp32."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    conv = torch.nn.Conv2d(3, 8, 3, padding=1).to(device)
    images = torch.randn(2, 3, 24, 20, generator=generator).to(device)
    # RoIs already rounded to `dtype`, so that only the features' precision differs from fp32.
    rois = random_rois(10, 2, 24, 20, 1.0, generator).to(dtype).float().to(device)
    layer = mmcv.ops.RoIAlign(7, 1.0, 0)
    weights = torch.linspace(-1, 1, 10 * 8 * 7 * 7, device=device).reshape(10, 8, 7, 7)

    def run(autocast):
        conv.zero_grad()
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            features = conv(images)
            if not features_in_low_precision:
                features = features.float()
            pooled = layer(features, rois.type_as(features))
            loss = (pooled.float() * weights).sum()
        loss.backward()
        return pooled, conv.weight.grad.clone()

    pooled_fp32, grad_fp32 = run(autocast=False)
    pooled, grad = run(autocast=True)
    assert pooled.dtype == (dtype if features_in_low_precision else torch.float32)
    assert torch.isfinite(pooled.float()).all() and torch.isfinite(grad).all()
    assert (pooled.float() - pooled_fp32).abs().max() < 0.03 * pooled_fp32.abs().max()
    assert (grad - grad_fp32).abs().max() < 0.03 * grad_fp32.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("features_in_low_precision", [False, True])
def test_roi_align_under_cpu_autocast_runs_and_matches_fp32(generator, dtype, features_in_low_precision):
    check_roi_align_under_autocast("cpu", dtype, features_in_low_precision, generator)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ops_on_cuda_match_references(generator, dtype):
    """The same torchvision ops on the GPU (skipped without one): nms and roi_align forward and
    backward against the float64 references, then a conv + RoIAlign under CUDA autocast."""
    boxes, scores = random_boxes(300, generator)
    _, kept = mmcv.ops.nms(boxes.cuda(), scores.cuda(), 0.5)
    assert kept.is_cuda and torch.equal(kept.cpu(), reference_nms(boxes, scores, 0.5))

    features = torch.randn(2, 4, 30, 26, generator=generator, dtype=torch.float64)
    rois = random_rois(12, 2, 30, 26, 0.25, generator)
    grad_output = torch.randn(12, 4, 7, 7, generator=generator, dtype=torch.float64)
    leaf = features.clone().requires_grad_(True)
    expected = reference_roi_align(leaf, rois, 7, 7, 0.25, 0, True)
    expected.backward(grad_output)
    for precision, tolerance in [(torch.float64, 1e-10), (torch.float32, 1e-4)]:
        inputs = features.to("cuda", precision).requires_grad_(True)
        output = mmcv.ops.roi_align(inputs, rois.to("cuda", precision), 7, 0.25, 0, "avg", True)
        output.backward(grad_output.to("cuda", precision))
        torch.testing.assert_close(output.double().cpu(), expected, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(inputs.grad.double().cpu(), leaf.grad, rtol=tolerance, atol=tolerance)

    for features_in_low_precision in (False, True):
        check_roi_align_under_autocast("cuda", dtype, features_in_low_precision, generator)


def test_roi_align_with_no_rois():
    features = torch.randn(1, 3, 5, 5, requires_grad=True)
    output = mmcv.ops.roi_align(features, torch.zeros(0, 5), 7, 1.0, 0, "avg", True)
    assert output.shape == (0, 3, 7, 7)
    output.sum().backward()
    assert torch.equal(features.grad, torch.zeros_like(features))


@needs_stand_in
def test_roi_align_bad_input():
    features, empty = torch.randn(1, 3, 5, 5), torch.zeros(0)
    with pytest.raises(ValueError, match=r"rois of shape \(K, 5\)"):
        mmcv._ext.roi_align_forward(features, torch.zeros(2, 4), torch.zeros(2, 3, 2, 2), empty, empty,
                                    aligned_height=2, aligned_width=2, spatial_scale=1.0,
                                    sampling_ratio=0, pool_mode=1, aligned=True)
    with pytest.raises(ValueError, match="output must have shape"):
        mmcv._ext.roi_align_forward(features, torch.zeros(2, 5), torch.zeros(2, 3, 3, 2), empty, empty,
                                    aligned_height=2, aligned_width=2, spatial_scale=1.0,
                                    sampling_ratio=0, pool_mode=1, aligned=True)


# ----------------------------------------------------------------------------- Mask R-CNN end to end

def count_ext_calls(monkeypatch, names):
    """Counts calls of mmcv._ext functions; mmcv.ops looks them up on the module at call time."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        function = getattr(mmcv._ext, name)

        def counted(*args, _name=name, _function=function, **kwargs):
            calls[_name] += 1
            return _function(*args, **kwargs)

        monkeypatch.setattr(mmcv._ext, name, counted)
    return calls


def _tiny_mask_rcnn():
    import mmdet
    from mmengine.config import Config
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    base = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "_base_", "models",
                        "mask-rcnn_r50_fpn.py")
    model = Config.fromfile(base).model
    channels = 16
    model.backbone.update(depth=18, init_cfg=None, frozen_stages=-1)
    model.neck.update(in_channels=[64, 128, 256, 512], out_channels=channels)
    model.rpn_head.update(in_channels=channels, feat_channels=channels)
    roi_head = model.roi_head
    roi_head.bbox_roi_extractor.out_channels = channels
    roi_head.mask_roi_extractor.out_channels = channels
    roi_head.bbox_head.update(in_channels=channels, fc_out_channels=32, num_classes=3)
    roi_head.mask_head.update(in_channels=channels, conv_out_channels=channels, num_convs=1, num_classes=3)
    model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
    model.train_cfg.rcnn.sampler.num = 64
    model.test_cfg.rpn.update(nms_pre=200, max_per_img=100)
    return MODELS.build(model)


def _toy_batch(generator, size=(64, 80)):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    height, width = size
    images = [torch.rand(3, height, width, generator=generator) * 255 for _ in range(2)]
    samples = []
    for _ in range(2):
        sample = DetDataSample(metainfo=dict(img_shape=size, ori_shape=size, scale_factor=(1.0, 1.0),
                                             pad_shape=size, batch_input_shape=size))
        boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 70.0, 40.0]])
        masks = torch.zeros(2, height, width, dtype=torch.uint8)
        for index, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[index, y1:y2, x1:x2] = 1
        sample.gt_instances = InstanceData(bboxes=boxes, labels=torch.tensor([0, 2]),
                                           masks=BitmapMasks(masks.numpy(), height, width))
        samples.append(sample)
    return dict(inputs=images, data_samples=samples)


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_tiny_mask_rcnn_trains_and_predicts_on_the_stand_in(generator, autocast_dtype, monkeypatch):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    calls = count_ext_calls(monkeypatch, ["nms", "roi_align_forward", "roi_align_backward"])
    model = _tiny_mask_rcnn()
    data = model.data_preprocessor(_toy_batch(generator), training=True)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        losses = model(**data, mode="loss")
    assert {"loss_rpn_cls", "loss_cls", "loss_mask"} <= set(losses)
    total, _ = model.parse_losses(losses)
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(model.neck.fpn_convs[0].conv.weight.grad).all()
    assert model.neck.fpn_convs[0].conv.weight.grad.abs().sum() > 0

    model.eval()
    data = model.data_preprocessor(_toy_batch(generator), training=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype or torch.float32,
                                         enabled=autocast_dtype is not None):
        results = model(**data, mode="predict")
    assert len(results) == 2 and hasattr(results[0].pred_instances, "masks")
    assert all(calls.values()), f"Mask R-CNN did not reach every mmcv._ext op: {calls}"


def test_tiny_mask_rcnn_predicts_with_soft_nms(generator, monkeypatch):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    calls = count_ext_calls(monkeypatch, ["softnms"])
    model = _tiny_mask_rcnn().eval()
    # What a config's test_cfg.rcnn.nms=dict(type='soft_nms', ...) becomes; multiclass_nms reads it per call.
    model.roi_head.test_cfg.nms = dict(type="soft_nms", iou_threshold=0.5, min_score=0.05)
    data = model.data_preprocessor(_toy_batch(generator), training=False)
    with torch.no_grad():
        results = model(**data, mode="predict")
    assert calls["softnms"] > 0
    instances = results[0].pred_instances
    assert len(instances) > 0 and hasattr(instances, "masks")
    assert torch.all(instances.scores[:-1] >= instances.scores[1:])
