"""A torchvision-backed stand-in for mmcv's compiled extension module ``mmcv._ext``.

mmdet 3.3 needs mmcv >= 2.0, < 2.2. There are no mmcv wheels for today's torch and mmcv 2.1's
C++ sources no longer build against its headers, but ``mmcv-lite`` (the same ``mmcv`` package
without the compiled ops) installs anywhere. Its ``mmcv.ops`` then fails at import, because every
op module calls ``ext_loader.load_ext('_ext', [names])``, which imports ``mmcv._ext`` and asserts
that each name exists.

Mask R-CNN only runs three of those ops: ``nms`` (through ``mmcv.ops.nms``/``batched_nms``) and
``roi_align_forward``/``roi_align_backward`` (``mmcv.ops.RoIAlign`` in the RoI extractor and
``roi_align`` in mmdet's mask-target cropping). torchvision ships both ops for CPU and CUDA on
every torch, so this module provides them with the exact call signatures of mmcv 2.1's pybind
functions. Two more box ops that mmdet configs reach are written here in PyTorch: ``softnms``
(``nms=dict(type='soft_nms')`` in a test_cfg, through ``batched_nms``) and ``nms_match`` (mmdet's
ScoreHLRSampler). Every other name gets an attribute that raises a clear error when called.
When a full (compiled) mmcv is installed, nothing here is used.
"""
import importlib
import importlib.machinery
import sys
import types
import warnings

import torch

__all__ = ["install_mmcv_ext", "MissingCompiledOpError", "EXT_MODULE_NAME", "SUPPORTED_OPS"]

EXT_MODULE_NAME = "mmcv._ext"

# Marks the module object we put in sys.modules, so a second install recognises its own work.
_STAND_IN_FLAG = "__mlla_det_stand_in__"

SUPPORTED_OPS = ("nms", "softnms", "nms_match", "roi_align_forward", "roi_align_backward")

# Every name mmcv 2.1's op modules request from mmcv._ext at import, by the mmcv.ops module that
# asks for it (read from each module's ext_loader.load_ext call). The names this module does not
# implement become callables that raise MissingCompiledOpError. tests/test_mmcv_ext.py re-reads the installed
# mmcv's sources and fails if a name is missing here, so an mmcv upgrade cannot slip by.
_REQUESTED_BY_OP_MODULE = {
    "active_rotated_filter": ["active_rotated_filter_forward", "active_rotated_filter_backward"],
    "assign_score_withk": ["assign_score_withk_forward", "assign_score_withk_backward"],
    "ball_query": ["ball_query_forward", "stack_ball_query_forward"],
    "bbox": ["bbox_overlaps"],
    "bezier_align": ["bezier_align_forward", "bezier_align_backward"],
    "bias_act": ["bias_act"],
    "border_align": ["border_align_forward", "border_align_backward"],
    "box_iou_quadri": ["box_iou_quadri"],
    "box_iou_rotated": ["box_iou_rotated"],
    "carafe": ["carafe_naive_forward", "carafe_naive_backward", "carafe_forward", "carafe_backward"],
    "chamfer_distance": ["chamfer_distance_forward", "chamfer_distance_backward"],
    "contour_expand": ["contour_expand"],
    "convex_iou": ["convex_iou", "convex_giou"],
    "correlation": ["correlation_forward", "correlation_backward"],
    "deform_conv": ["deform_conv_forward", "deform_conv_backward_input",
                    "deform_conv_backward_parameters"],
    "deform_roi_pool": ["deform_roi_pool_forward", "deform_roi_pool_backward"],
    "diff_iou_rotated": ["diff_iou_rotated_sort_vertices_forward"],
    "filtered_lrelu": ["filtered_lrelu", "filtered_lrelu_act_"],
    "focal_loss": ["sigmoid_focal_loss_forward", "sigmoid_focal_loss_backward",
                   "softmax_focal_loss_forward", "softmax_focal_loss_backward"],
    "furthest_point_sample": ["furthest_point_sampling_forward",
                              "furthest_point_sampling_with_dist_forward"],
    "fused_bias_leakyrelu": ["fused_bias_leakyrelu"],
    "gather_points": ["gather_points_forward", "gather_points_backward"],
    "group_points": ["group_points_forward", "group_points_backward",
                     "stack_group_points_forward", "stack_group_points_backward"],
    "info": ["get_compiler_version", "get_compiling_cuda_version"],
    "iou3d": ["iou3d_boxes_overlap_bev_forward", "iou3d_nms3d_forward",
              "iou3d_nms3d_normal_forward"],
    "knn": ["knn_forward"],
    "masked_conv": ["masked_im2col_forward", "masked_col2im_forward"],
    "min_area_polygons": ["min_area_polygons"],
    "modulated_deform_conv": ["modulated_deform_conv_forward", "modulated_deform_conv_backward"],
    "multi_scale_deform_attn": ["ms_deform_attn_backward", "ms_deform_attn_forward"],
    "nms": ["nms", "softnms", "nms_match", "nms_rotated", "nms_quadri"],
    "pixel_group": ["pixel_group"],
    "points_in_boxes": ["points_in_boxes_part_forward", "points_in_boxes_cpu_forward",
                        "points_in_boxes_all_forward"],
    "points_in_polygons": ["points_in_polygons_forward"],
    "prroi_pool": ["prroi_pool_forward", "prroi_pool_backward", "prroi_pool_coor_backward"],
    "psa_mask": ["psamask_forward", "psamask_backward"],
    "riroi_align_rotated": ["riroi_align_rotated_forward", "riroi_align_rotated_backward"],
    "roi_align": ["roi_align_forward", "roi_align_backward"],
    "roi_align_rotated": ["roi_align_rotated_forward", "roi_align_rotated_backward"],
    "roi_pool": ["roi_pool_forward", "roi_pool_backward"],
    "roiaware_pool3d": ["roiaware_pool3d_forward", "roiaware_pool3d_backward"],
    "roipoint_pool3d": ["roipoint_pool3d_forward"],
    "rotated_feature_align": ["rotated_feature_align_forward", "rotated_feature_align_backward"],
    "scatter_points": ["dynamic_point_to_voxel_forward", "dynamic_point_to_voxel_backward"],
    "sparse_ops": ["get_indice_pairs_2d_forward", "get_indice_pairs_3d_forward",
                   "get_indice_pairs_4d_forward", "get_indice_pairs_2d_backward",
                   "get_indice_pairs_3d_backward", "indice_conv_forward", "indice_conv_backward",
                   "fused_indice_conv_forward", "indice_maxpool_forward",
                   "indice_maxpool_backward"],
    "sync_bn": ["sync_bn_forward_mean", "sync_bn_forward_var", "sync_bn_forward_output",
                "sync_bn_backward_param", "sync_bn_backward_data"],
    "three_interpolate": ["three_interpolate_forward", "three_interpolate_backward"],
    "three_nn": ["three_nn_forward"],
    "tin_shift": ["tin_shift_forward", "tin_shift_backward"],
    "upfirdn2d": ["upfirdn2d"],
    "voxelize": ["dynamic_voxelize_forward", "hard_voxelize_forward"],
}

_STAND_IN_DESCRIPTION = "n/a (no compiled mmcv: mlla_det's torchvision-backed stand-in for mmcv._ext)"


class MissingCompiledOpError(NotImplementedError):
    """An mmcv op that only a compiled mmcv provides was called without one."""


def _missing_op(name, op_module):
    def missing_compiled_op(*args, **kwargs):
        raise MissingCompiledOpError(
            f"mmcv op '{name}' (used by mmcv.ops.{op_module}) needs a full mmcv build with compiled "
            f"ops (mmcv._ext), which this environment does not have: mlla_det's torchvision-backed "
            f"stand-in only provides {', '.join(SUPPORTED_OPS)}. Install a compiled mmcv "
            f"(>= 2.0, < 2.2, built against this torch) to use '{name}'.")

    missing_compiled_op.__name__ = name
    missing_compiled_op.__qualname__ = name
    return missing_compiled_op


def _compute_dtype(*tensors):
    """torchvision has no bf16 kernels for nms/roi_align on the CPU (nor fp16 nms there), mmcv's
    own box kernels compute in fp32, and autocast can hand us reduced-precision tensors: run those
    in fp32, keep fp32/fp64 as is."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def _torchvision_ops():
    # Importing torchvision is what registers its C++ ops under torch.ops.torchvision; done
    # lazily so that `import mlla_det` does not pay for it until an op runs.
    import torchvision  # noqa: F401

    return torch.ops.torchvision


def _check_boxes_and_scores(op_name, boxes, scores, offset):
    if boxes.dim() != 2 or boxes.size(1) != 4:
        raise ValueError(f"{op_name} expects boxes of shape (N, 4) as (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    if scores.dim() != 1 or scores.size(0) != boxes.size(0):
        raise ValueError(f"{op_name} expects scores of shape ({boxes.size(0)},) matching the boxes, "
                         f"got {tuple(scores.shape)}")
    if offset not in (0, 1):
        raise ValueError(f"{op_name} offset must be 0 or 1 (boxes are x2 - x1 + offset wide), got {offset!r}")


def nms(boxes, scores, iou_threshold, offset):
    """mmcv's ``nms(boxes, scores, iou_threshold, offset)``: indices of the kept boxes, highest
    score first. A box is suppressed when its IoU with a kept, higher-scoring box is > threshold.

    With ``offset=1`` mmcv measures a box as ``x2 - x1 + 1`` wide (legacy pixel convention), both
    for areas and intersections; that is exactly torchvision's NMS on boxes whose far corner is
    moved by +1, so both conventions run on torchvision.
    """
    _check_boxes_and_scores("nms", boxes, scores, offset)
    dtype = _compute_dtype(boxes, scores)
    boxes = boxes.to(dtype)
    if offset == 1:
        boxes = torch.cat([boxes[:, :2], boxes[:, 2:] + 1], dim=1)
    return _torchvision_ops().nms(boxes, scores.to(dtype), float(iou_threshold))


def _box_areas(boxes, offset):
    return (boxes[:, 2] - boxes[:, 0] + offset) * (boxes[:, 3] - boxes[:, 1] + offset)


def _overlaps_with_one(box, box_area, boxes, areas, offset):
    """IoU of one box (shape (1, 4), area (1,)) with each of boxes (K, 4), in mmcv's arithmetic:
    boxes are x2 - x1 + offset wide and the union is (area + area) - intersection.

    Two boxes of zero area have IoU 0 here where mmcv divides 0 by 0: its NaN IoU counts as no
    overlap in naive/linear Soft-NMS and nms_match anyway, but gives NaN scores in gaussian."""
    width = (torch.minimum(box[:, 2], boxes[:, 2]) - torch.maximum(box[:, 0], boxes[:, 0]) + offset).clamp(min=0)
    height = (torch.minimum(box[:, 3], boxes[:, 3]) - torch.maximum(box[:, 1], boxes[:, 1]) + offset).clamp(min=0)
    intersection = width * height
    union = box_area + areas - intersection
    return torch.where(union > 0, intersection / union, 0)


SOFT_NMS_METHODS = {0: "naive", 1: "linear", 2: "gaussian"}


@torch.no_grad()
def softnms(boxes, scores, dets, iou_threshold, sigma, min_score, method, offset):
    """mmcv's ``softnms(boxes, scores, dets, iou_threshold, sigma, min_score, method, offset)``:
    Soft-NMS (Bodla et al., 2017) as mmcv defines it. Repeatedly take the remaining box with the
    highest current score and multiply the score of every other remaining box by a weight of its
    IoU with the taken one: naive (method 0) 0 if IoU >= iou_threshold, linear (1) 1 - IoU if
    IoU >= iou_threshold, gaussian (2) exp(-IoU^2 / sigma) always; a box whose score falls below
    min_score is dropped. The first box taken is kept whatever its score, as in mmcv.

    Returns the indices of the kept boxes in the order taken (long, on the boxes' device) and
    writes their (x1, y1, x2, y2, score when taken) into ``dets[:K]`` in place (mmcv.ops.soft_nms
    slices dets by K). Among equal scores the lowest index is taken first (mmcv's loop takes the
    first in an internal order that its swaps reshuffle).
    """
    _check_boxes_and_scores("softnms", boxes, scores, offset)
    if method not in SOFT_NMS_METHODS:
        raise ValueError(f"softnms method must be one of {SOFT_NMS_METHODS} (number: name), got {method!r}")
    if tuple(dets.shape) != (boxes.size(0), 5) or dets.device != boxes.device:
        raise ValueError(f"softnms writes into dets of shape ({boxes.size(0)}, 5) on {boxes.device}, "
                         f"got {tuple(dets.shape)} on {dets.device}")
    method_name = SOFT_NMS_METHODS[method]
    dtype = _compute_dtype(boxes, scores)
    boxes = boxes.to(dtype)
    areas = _box_areas(boxes, offset)
    # A device tensor, not a Python float: CUDA divides by a host scalar as a multiplication by
    # its reciprocal, one rounding away from mmcv's division.
    sigma = boxes.new_tensor(sigma)
    kept = torch.empty(boxes.size(0), dtype=torch.long, device=boxes.device)
    kept_scores = boxes.new_empty(boxes.size(0))
    remaining = torch.arange(boxes.size(0), device=boxes.device)
    remaining_boxes, remaining_areas, remaining_scores = boxes, areas, scores.to(dtype)
    num_kept = 0
    while remaining.numel() > 0:
        best = remaining_scores.argmax(dim=0, keepdim=True)  # the first of equal maxima
        kept[num_kept:num_kept + 1] = remaining[best]
        kept_scores[num_kept:num_kept + 1] = remaining_scores[best]
        num_kept += 1
        overlaps = _overlaps_with_one(remaining_boxes[best], remaining_areas[best], remaining_boxes,
                                      remaining_areas, offset)
        if method_name == "gaussian":
            weights = torch.exp(-(overlaps * overlaps) / sigma)
        else:
            decayed_weight = torch.zeros_like(overlaps) if method_name == "naive" else 1 - overlaps
            weights = torch.where(overlaps >= iou_threshold, decayed_weight, torch.ones_like(overlaps))
        decayed_scores = remaining_scores * weights
        # "not below" rather than ">=": a NaN score stays, as in mmcv's loop.
        survivors = ~(decayed_scores < min_score)
        survivors.index_fill_(0, best, False)
        survivors = survivors.nonzero().squeeze(1)
        remaining, remaining_boxes, remaining_areas, remaining_scores = (
            values.index_select(0, survivors)
            for values in (remaining, remaining_boxes, remaining_areas, decayed_scores))
    kept = kept[:num_kept]
    dets[:num_kept, :4] = boxes[kept]
    dets[:num_kept, 4] = kept_scores[:num_kept]
    return kept


@torch.no_grad()
def nms_match(dets, iou_threshold):
    """mmcv's ``nms_match(dets, iou_threshold)``: greedy NMS that records what each kept box
    suppresses. dets is (N, 5) as (x1, y1, x2, y2, score); boxes are x2 - x1 wide (no offset).
    Returns one list of indices per kept box, highest score first: the kept box, then the boxes
    it suppressed (IoU >= iou_threshold, not already in a group) by decreasing score. Equal
    scores go by index (mmcv's unstable sort leaves their order open)."""
    if dets.dim() != 2 or dets.size(1) != 5:
        raise ValueError(f"nms_match expects dets of shape (N, 5) as (x1, y1, x2, y2, score), "
                         f"got {tuple(dets.shape)}")
    dets = dets.to(_compute_dtype(dets))
    remaining = torch.argsort(dets[:, 4], descending=True, stable=True)
    remaining_boxes = dets[remaining, :4]
    remaining_areas = _box_areas(remaining_boxes, 0)
    groups = []
    while remaining.numel() > 0:
        overlaps = _overlaps_with_one(remaining_boxes[:1], remaining_areas[:1], remaining_boxes,
                                      remaining_areas, 0)
        in_group = overlaps >= iou_threshold
        in_group[0] = True  # the kept box heads its group even at zero area (IoU 0 with itself)
        groups.append(remaining[in_group].tolist())
        outside = (~in_group).nonzero().squeeze(1)
        remaining, remaining_boxes, remaining_areas = (
            values.index_select(0, outside) for values in (remaining, remaining_boxes, remaining_areas))
    return groups


def _check_roi_align_args(rois, pool_mode):
    if pool_mode == 0:
        raise NotImplementedError(
            "roi_align with pool_mode='max' needs a full mmcv build with compiled ops (mmcv._ext); "
            "mlla_det's torchvision-backed stand-in supports only pool_mode='avg'.")
    if pool_mode != 1:
        raise ValueError(f"roi_align pool_mode must be 0 ('max') or 1 ('avg'), got {pool_mode!r}")
    if rois.dim() != 2 or rois.size(1) != 5:
        raise ValueError(f"roi_align expects rois of shape (K, 5) as (batch_index, x1, y1, x2, y2), "
                         f"got {tuple(rois.shape)}")


def roi_align_forward(input, rois, output, argmax_y, argmax_x, aligned_height, aligned_width,
                      spatial_scale, sampling_ratio, pool_mode, aligned):
    """mmcv's ``roi_align_forward``: writes the (K, C, aligned_height, aligned_width) pooled
    features into ``output`` in place. mmcv and torchvision share the same RoIAlign definition
    (aligned shifts by -0.5 pixel; sampling_ratio <= 0 samples ceil(roi_size / out_size) points
    per bin; bilinear samples averaged; zero outside the map).

    argmax_y/argmax_x only matter for pool_mode 'max', which is not supported here."""
    _check_roi_align_args(rois, pool_mode)
    expected = (rois.size(0), input.size(1), aligned_height, aligned_width)
    if tuple(output.shape) != expected:
        raise ValueError(f"roi_align output must have shape {expected} (rois, channels, out_h, out_w), "
                         f"got {tuple(output.shape)}")
    dtype = _compute_dtype(input, rois)
    pooled = _torchvision_ops().roi_align(
        input.to(dtype), rois.to(dtype), float(spatial_scale), int(aligned_height),
        int(aligned_width), int(sampling_ratio), bool(aligned))
    output.copy_(pooled)


def roi_align_backward(grad_output, rois, argmax_y, argmax_x, grad_input, aligned_height,
                       aligned_width, spatial_scale, sampling_ratio, pool_mode, aligned):
    """mmcv's ``roi_align_backward``: adds d(loss)/d(input) into ``grad_input`` in place (mmcv's
    kernels accumulate into the zero tensor the wrapper allocates). RoIAlign is linear in its
    input, so the gradient does not need the forward's input values."""
    _check_roi_align_args(rois, pool_mode)
    expected = (rois.size(0), grad_input.size(1), aligned_height, aligned_width)
    if tuple(grad_output.shape) != expected:
        raise ValueError(f"roi_align grad_output must have shape {expected}, got {tuple(grad_output.shape)}")
    batch_size, channels, height, width = grad_input.shape
    dtype = _compute_dtype(grad_output, rois)
    grad = _torchvision_ops()._roi_align_backward(
        grad_output.to(dtype), rois.to(dtype), float(spatial_scale), int(aligned_height),
        int(aligned_width), batch_size, channels, height, width, int(sampling_ratio),
        bool(aligned))
    grad_input.add_(grad.to(grad_input.dtype))


def get_compiler_version():
    # Informational only (mmcv.utils.collect_env reports it), so answer instead of raising.
    return _STAND_IN_DESCRIPTION


def get_compiling_cuda_version():
    return _STAND_IN_DESCRIPTION


_IMPLEMENTED = {
    "nms": nms,
    "softnms": softnms,
    "nms_match": nms_match,
    "roi_align_forward": roi_align_forward,
    "roi_align_backward": roi_align_backward,
    "get_compiler_version": get_compiler_version,
    "get_compiling_cuda_version": get_compiling_cuda_version,
}


def build_stand_in_module():
    """A fresh module object that looks like mmcv 2.1's ``mmcv._ext`` to ``ext_loader.load_ext``."""
    module = types.ModuleType(EXT_MODULE_NAME, __doc__)
    # A spec without a loader: importlib treats the module as present, while mmcv's
    # check_ops_exist()/mmengine's mmcv_full_available() (pkgutil.find_loader) still answer False,
    # which is the truth: no compiled mmcv ops (DCN, mmcv's SyncBatchNorm) are available.
    module.__spec__ = importlib.machinery.ModuleSpec(EXT_MODULE_NAME, None)
    module.__loader__ = None
    module.__package__ = "mmcv"
    for op_module, names in _REQUESTED_BY_OP_MODULE.items():
        for name in names:
            setattr(module, name, _IMPLEMENTED.get(name) or _missing_op(name, op_module))
    setattr(module, _STAND_IN_FLAG, True)
    return module


def is_stand_in(module):
    return bool(getattr(module, _STAND_IN_FLAG, False))


def install_mmcv_ext():
    """Make ``import mmcv.ops`` work. Idempotent; call it before anything imports mmcv.ops.

    Returns "compiled" when a full mmcv build provides ``mmcv._ext`` (left untouched) and
    "stand-in" when the torchvision-backed module was installed (now or by an earlier call).
    """
    try:
        import mmcv
    except ImportError as error:
        raise ImportError("mlla_det needs mmcv >= 2.0, < 2.2 (`pip install mmcv-lite==2.1.0` is "
                          "enough; a compiled mmcv also works)") from error

    existing = sys.modules.get(EXT_MODULE_NAME)
    if existing is not None:
        return "stand-in" if is_stand_in(existing) else "compiled"
    try:
        importlib.import_module(EXT_MODULE_NAME)
        return "compiled"
    except ModuleNotFoundError as error:
        if error.name != EXT_MODULE_NAME:
            raise
    except ImportError as error:
        # A compiled mmcv that cannot load (built for another torch/CUDA) would break mmcv.ops
        # anyway; fall back, but say so loudly since its extra ops are now unavailable.
        warnings.warn(f"mmcv's compiled ops (mmcv._ext) failed to load ({error}); using mlla_det's "
                      f"torchvision-backed stand-in, which provides only {', '.join(SUPPORTED_OPS)}.",
                      RuntimeWarning, stacklevel=2)
    module = build_stand_in_module()
    sys.modules[EXT_MODULE_NAME] = module
    mmcv._ext = module
    return "stand-in"
