"""Triton kernels: depthwise 3x3 convolution (stride 1, zero padding 1) straight on token layout.

Layout: x is (B, N, C) with N = H*W row-major, channels innermost. A program owns a 2-D patch of
TILE_H x TILE_W pixels (BLOCK_N tokens) x BLOCK_C channels; each pixel's channels are contiguous,
so loads along C are coalesced. Each of the 9 taps is one masked load of the patch shifted by
(dr * W + ds) tokens; the shifted patches overlap, so all but the first touch come from L1/L2 and
HBM sees x about once. 2-D patches (rather than runs of tokens along a row) cut the halo rows
that come through L2: a 4x8 patch reads 6 rows for 4, a 1x32 run 3 rows for 1.

Kernels:
    _dwconv3x3_fwd_kernel      conv + bias + epilogue (none / residual / silu / add), one pass.
    _silu_grad_kernel          (SiLU only) grad of the pre-activation, recomputing it from x
                               instead of keeping it alive from the forward.
    _dwconv3x3_bwd_kernel      grad input (the flipped-tap conv of the pre-activation grad, plus
                               the residual's own grad) and, in the same pass over x, per-program
                               partial sums of the weight and bias grads, in fp32.
    _reduce_partials_kernel    sums those partials in a fixed order -> weight and bias grads.
The weight/bias reduction is deterministic (no atomics): each program walks a fixed set of
tiles in a fixed order, and the partials are summed in a fixed order, so a rerun on the same
device and shapes reproduces the gradients bit for bit.
"""

import torch
import triton
import triton.language as tl

from ..cached_launch import launch
from ..device import on_device

EPILOGUE_CODES = {"none": 0, "residual": 1, "silu": 2, "add": 3}
_RESIDUAL = tl.constexpr(1)
_SILU = tl.constexpr(2)
_ADD = tl.constexpr(3)

# Rows of the partial-sum buffer per program: the 9 taps of the weight grad, then the bias grad.
_PARTIAL_ROWS = 10

# Tests set this to fill every buffer the kernels must write with NaN first, so an element a
# kernel forgets to write shows up instead of passing as leftover memory.
POISON_OUTPUTS = False


def _new_buffer(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _tile_coords(t, tiles_w, tiles_per_batch, H, W, BLOCK_N: tl.constexpr, TILE_W: tl.constexpr,
                 IDX64: tl.constexpr):
    """Tile index -> (batch, token indices, row, column, token mask) of a TILE_H x TILE_W patch."""
    TILE_H: tl.constexpr = BLOCK_N // TILE_W
    b = t // tiles_per_batch
    in_batch = t - b * tiles_per_batch
    tile_r = in_batch // tiles_w
    tile_s = in_batch - tile_r * tiles_w
    i = tl.arange(0, BLOCK_N)
    r = tile_r * TILE_H + i // TILE_W
    s = tile_s * TILE_W + i % TILE_W
    if IDX64:
        r = r.to(tl.int64)
        s = s.to(tl.int64)
    n_ok = (r < H) & (s < W)
    n = r * W + s
    return b.to(tl.int64), n, r, s, n_ok


@triton.jit
def _load_tap(base, n, r, s, n_ok, c, c_ok, H, W, stride_n, stride_c,
              DR: tl.constexpr, DS: tl.constexpr):
    """The tile shifted by (DR rows, DS columns), zero outside the H x W map."""
    ok = n_ok
    if DR < 0:
        ok = ok & (r >= -DR)
    if DR > 0:
        ok = ok & (r < H - DR)
    if DS < 0:
        ok = ok & (s >= -DS)
    if DS > 0:
        ok = ok & (s < W - DS)
    ptrs = base + (n + (DR * W + DS))[:, None] * stride_n + c[None, :] * stride_c
    return tl.load(ptrs, mask=ok[:, None] & c_ok[None, :], other=0.0)


@triton.jit
def _load_weight_tap(w_ptr, c, c_ok, swc, swh, sww, I: tl.constexpr, J: tl.constexpr, ACC: tl.constexpr):
    return tl.load(w_ptr + c * swc + I * swh + J * sww, mask=c_ok, other=0.0).to(ACC)


@triton.jit
def _conv_tile(x_base, w_ptr, b_ptr, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, swc, swh, sww,
               HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """bias + sum over the 9 taps of w[tap] * x[shifted], accumulated in ACC."""
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC)
    for i in tl.static_range(3):
        for j in tl.static_range(3):
            xv = _load_tap(x_base, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, i - 1, j - 1).to(ACC)
            acc += xv * _load_weight_tap(w_ptr, c, c_ok, swc, swh, sww, i, j, ACC)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(ACC)[None, :]
    return acc


@triton.jit
def _sigmoid(z):
    # exp(-z) overflows to inf for very negative z, which correctly gives 0.
    return 1.0 / (1.0 + tl.exp(-z))


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
# Sizes never need Triton's divisibility-by-16 / equals-1 specialisation (channel counts and
# strides do, for vector loads): leaving them out saves a compile per map shape.
_SIZE_ARGS = ["N", "H", "W", "tiles_w", "tiles_per_batch", "num_tiles"]


@triton.jit(do_not_specialize=_SIZE_ARGS[:5])
def _dwconv3x3_fwd_kernel(
        x_ptr, w_ptr, b_ptr, add_ptr, out_ptr,
        N, C, H, W, tiles_w, tiles_per_batch,
        sxb, sxn, sxc, swc, swh, sww, sab, san, sac,
        EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_N: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    b, n, r, s, n_ok = _tile_coords(tl.program_id(0), tiles_w, tiles_per_batch, H, W, BLOCK_N, TILE_W, IDX64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mask = n_ok[:, None] & c_ok[None, :]
    x_base = x_ptr + b * sxb
    acc = _conv_tile(x_base, w_ptr, b_ptr, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, swc, swh, sww,
                     HAS_BIAS, BLOCK_N, BLOCK_C, ACC)
    if EPILOGUE == _RESIDUAL:
        acc += tl.load(x_base + n[:, None] * sxn + c[None, :] * sxc, mask=mask, other=0.0).to(ACC)
    elif EPILOGUE == _SILU:
        acc = acc * _sigmoid(acc)
    elif EPILOGUE == _ADD:
        add_base = add_ptr + b * sab
        acc += tl.load(add_base + n[:, None] * san + c[None, :] * sac, mask=mask, other=0.0).to(ACC)
    out_base = out_ptr + b * N * C
    tl.store(out_base + n[:, None] * C + c[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_SIZE_ARGS[:5])
def _silu_grad_kernel(
        g_ptr, x_ptr, w_ptr, b_ptr, gp_ptr,
        N, C, H, W, tiles_w, tiles_per_batch,
        sgb, sgn, sgc, sxb, sxn, sxc, swc, swh, sww,
        HAS_BIAS: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_N: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """gp = g * SiLU'(z), z = conv(x) + bias recomputed (9 cached loads instead of N*C saved)."""
    b, n, r, s, n_ok = _tile_coords(tl.program_id(0), tiles_w, tiles_per_batch, H, W, BLOCK_N, TILE_W, IDX64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mask = n_ok[:, None] & c_ok[None, :]
    z = _conv_tile(x_ptr + b * sxb, w_ptr, b_ptr, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, swc, swh, sww,
                   HAS_BIAS, BLOCK_N, BLOCK_C, ACC)
    sig = _sigmoid(z)
    g = tl.load(g_ptr + b * sgb + n[:, None] * sgn + c[None, :] * sgc, mask=mask, other=0.0).to(ACC)
    gp = g * sig * (1.0 + z * (1.0 - sig))
    tl.store(gp_ptr + b * N * C + n[:, None] * C + c[None, :], gp.to(gp_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_SIZE_ARGS + ["wg_tiles_w", "wg_tiles_per_batch", "wg_num_tiles", "wg_programs"])
def _dwconv3x3_bwd_kernel(
        gp_ptr, x_ptr, w_ptr, gx_ptr, part_ptr,
        N, C, H, W, tiles_w, tiles_per_batch, wg_tiles_w, wg_tiles_per_batch, wg_num_tiles, wg_programs,
        sgb, sgn, sgc, sxb, sxn, sxc, swc, swh, sww,
        RESIDUAL: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_N: tl.constexpr, TILE_W: tl.constexpr, WG_BLOCK_N: tl.constexpr, WG_TILE_W: tl.constexpr,
        BLOCK_C: tl.constexpr, ACC: tl.constexpr, WG_STAGES: tl.constexpr):
    """Two kinds of programs in one launch (one launch less of host time), by program id:

    gp is the grad of the pre-activation conv(x) + bias (the output grad itself unless SiLU).
    - ids < wg_programs: weight/bias grad. Persistent over WG_BLOCK_N-token patches (program p
      takes patches p, p + wg_programs, ...): grad_w[tap] = sum_{b,n} gp[n] * x[n + shift(tap)]
      and grad_bias = sum gp, accumulated elementwise in registers (no reduction per patch) and
      summed over tokens once at the end into part_ptr[p, 0..9, c]. These ids come first so
      the long-lived programs start first and the short ones below fill in around them.
    - the other ids: one BLOCK_N-token patch each of grad_x[m] = sum_taps w[tap] * gp[m -
      shift(tap)] (the taps flipped), plus grad_out[m] (= gp) for the residual.
    """
    pid = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    if pid < wg_programs:
        dw00 = tl.zeros((WG_BLOCK_N, BLOCK_C), dtype=ACC)
        dw01 = tl.zeros((WG_BLOCK_N, BLOCK_C), dtype=ACC)
        dw02 = tl.zeros((WG_BLOCK_N, BLOCK_C), dtype=ACC)
        dw10 = tl.zeros((WG_BLOCK_N, BLOCK_C), dtype=ACC)
        dw11 = tl.zeros((WG_BLOCK_N, BLOCK_C), dtype=ACC)
        dw12 = tl.zeros((WG_BLOCK_N, BLOCK_C), dtype=ACC)
        dw20 = tl.zeros((WG_BLOCK_N, BLOCK_C), dtype=ACC)
        dw21 = tl.zeros((WG_BLOCK_N, BLOCK_C), dtype=ACC)
        dw22 = tl.zeros((WG_BLOCK_N, BLOCK_C), dtype=ACC)
        db = tl.zeros((WG_BLOCK_N, BLOCK_C), dtype=ACC)
        # WG_STAGES > 1: Triton's software pipeline issues the loads of later patches while this
        # one's products run (the trip otherwise waits on its ten loads).
        for t in tl.range(pid, wg_num_tiles, wg_programs, num_stages=WG_STAGES):
            b, n, r, s, n_ok = _tile_coords(t, wg_tiles_w, wg_tiles_per_batch, H, W, WG_BLOCK_N, WG_TILE_W, IDX64)
            g_base = gp_ptr + b * sgb
            x_base = x_ptr + b * sxb
            g = _load_tap(g_base, n, r, s, n_ok, c, c_ok, H, W, sgn, sgc, 0, 0).to(ACC)
            db += g
            dw00 += g * _load_tap(x_base, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, -1, -1).to(ACC)
            dw01 += g * _load_tap(x_base, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, -1, 0).to(ACC)
            dw02 += g * _load_tap(x_base, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, -1, 1).to(ACC)
            dw10 += g * _load_tap(x_base, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, 0, -1).to(ACC)
            dw11 += g * _load_tap(x_base, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, 0, 0).to(ACC)
            dw12 += g * _load_tap(x_base, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, 0, 1).to(ACC)
            dw20 += g * _load_tap(x_base, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, 1, -1).to(ACC)
            dw21 += g * _load_tap(x_base, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, 1, 0).to(ACC)
            dw22 += g * _load_tap(x_base, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, 1, 1).to(ACC)
        row = part_ptr + pid.to(tl.int64) * (10 * C) + c
        out_ty = part_ptr.dtype.element_ty
        tl.store(row + 0 * C, tl.sum(dw00, axis=0).to(out_ty), mask=c_ok)
        tl.store(row + 1 * C, tl.sum(dw01, axis=0).to(out_ty), mask=c_ok)
        tl.store(row + 2 * C, tl.sum(dw02, axis=0).to(out_ty), mask=c_ok)
        tl.store(row + 3 * C, tl.sum(dw10, axis=0).to(out_ty), mask=c_ok)
        tl.store(row + 4 * C, tl.sum(dw11, axis=0).to(out_ty), mask=c_ok)
        tl.store(row + 5 * C, tl.sum(dw12, axis=0).to(out_ty), mask=c_ok)
        tl.store(row + 6 * C, tl.sum(dw20, axis=0).to(out_ty), mask=c_ok)
        tl.store(row + 7 * C, tl.sum(dw21, axis=0).to(out_ty), mask=c_ok)
        tl.store(row + 8 * C, tl.sum(dw22, axis=0).to(out_ty), mask=c_ok)
        tl.store(row + 9 * C, tl.sum(db, axis=0).to(out_ty), mask=c_ok)
    else:
        b, n, r, s, n_ok = _tile_coords(pid - wg_programs, tiles_w, tiles_per_batch, H, W, BLOCK_N, TILE_W, IDX64)
        g_base = gp_ptr + b * sgb
        gx = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC)
        for i in tl.static_range(3):
            for j in tl.static_range(3):
                gv = _load_tap(g_base, n, r, s, n_ok, c, c_ok, H, W, sgn, sgc, 1 - i, 1 - j).to(ACC)
                gx += gv * _load_weight_tap(w_ptr, c, c_ok, swc, swh, sww, i, j, ACC)[None, :]
        if RESIDUAL:
            gx += _load_tap(g_base, n, r, s, n_ok, c, c_ok, H, W, sgn, sgc, 0, 0).to(ACC)
        tl.store(gx_ptr + b * N * C + n[:, None] * C + c[None, :], gx.to(gx_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & c_ok[None, :])


@triton.jit(do_not_specialize=["P"])
def _reduce_partials_kernel(part_ptr, dw_ptr, db_ptr, P, C,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Row k (0..8: weight tap, 9: bias) of the partials, summed over programs in a fixed order."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    k = tl.program_id(1)
    c_ok = c < C
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ptrs = part_ptr + p[:, None].to(tl.int64) * (10 * C) + k * C + c[None, :]
        acc += tl.load(ptrs, mask=(p < P)[:, None] & c_ok[None, :], other=0.0).to(ACC)
    total = tl.sum(acc, axis=0)
    # grad weight is a contiguous (C, 1, 3, 3): tap k of channel c sits at c * 9 + k.
    tl.store(dw_ptr + c * 9 + k, total.to(dw_ptr.dtype.element_ty), mask=c_ok & (k < 9))
    tl.store(db_ptr + c, total.to(db_ptr.dtype.element_ty), mask=c_ok & (k == 9))


# --------------------------------------------------------------------------------------------
# Launch configuration. Plain integer math (triton.cdiv / next_power_of_2 go through Triton's
# jit-function call path: several microseconds each), cached per shape.
# --------------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


_SM_COUNTS = {}


def _interpreting(device: torch.device) -> bool:
    return device.type != "cuda"


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _patch(height: int, width: int, block_n: int, tile_w: int):
    """(BLOCK_N, TILE_W, tiles along W, tiles per image) of (BLOCK_N / TILE_W) x TILE_W patches,
    shrunk to the map: no patch rows beyond its height (1 x W maps would waste most lanes)."""
    tile_w = min(tile_w, _pow2_at_least(width), block_n)
    block_n = tile_w * min(block_n // tile_w, _pow2_at_least(height))
    tiles_w = _cdiv(width, tile_w)
    return block_n, tile_w, tiles_w, tiles_w * _cdiv(height, block_n // tile_w)


# GPU defaults. Forward patches: 2 x 8 pixels x 64 channels, 2 warps: in two H200 sweeps
# (CUDA-graph timed, NOTES.md dwconv v5) 7-38% faster than 4 x 8 pixels at 4 warps at every MLLA-T
# stage, fp32 and bf16. Grad-input patches (and the SiLU-grad kernel's): 4 x 8 pixels, 4 warps
# (16 tokens were faster at some stages and slower at others). Weight-grad patches: 2 x 8 pixels,
# 10 register accumulators (9 taps + bias). Backward at 4 warps with 2 weight-grad programs per
# SM: in the H200 sweeps (NOTES.md dwconv v3/v4) 10-45% faster than 8 warps (and than 4 or more
# programs per SM) at the MLLA-T stages, fp32 and bf16.
GPU_DEFAULTS = dict(fwd_block_n=16, fwd_tile_w=8, fwd_num_warps=2, block_n=32, tile_w=8, block_c=64, num_warps=4,
                    bwd_num_warps=4, wgrad_block_n=16, wgrad_tile_w=8, wgrad_programs_per_sm=2, wgrad_stages=1)
# The interpreter pays per program and per loop trip, so it gets the biggest patches.
_INTERPRETER_DEFAULTS = dict(fwd_block_n=128, fwd_tile_w=128, fwd_num_warps=4, block_n=128, tile_w=128,
                             block_c=128, num_warps=4, bwd_num_warps=4, wgrad_block_n=128, wgrad_tile_w=128,
                             wgrad_programs_per_sm=2, wgrad_stages=1)


def _config(height: int, width: int, channels: int, batch: int, device: torch.device, overrides) -> dict:
    key = (height, width, channels, batch, device.type, device.index, tuple(sorted(overrides.items())))
    cfg = _CONFIGS.get(key)
    if cfg is None:
        cfg = dict(_INTERPRETER_DEFAULTS if _interpreting(device) else GPU_DEFAULTS)
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        cfg["block_c"] = min(cfg["block_c"], _pow2_at_least(channels))
        cfg["channel_blocks"] = _cdiv(channels, cfg["block_c"])
        cfg["fwd_block_n"], cfg["fwd_tile_w"], cfg["fwd_tiles_w"], cfg["fwd_tiles_per_batch"] = _patch(
            height, width, cfg["fwd_block_n"], cfg["fwd_tile_w"])
        cfg["block_n"], cfg["tile_w"], cfg["tiles_w"], cfg["tiles_per_batch"] = _patch(
            height, width, cfg["block_n"], cfg["tile_w"])
        cfg["wgrad_block_n"], cfg["wgrad_tile_w"], cfg["wg_tiles_w"], cfg["wg_tiles_per_batch"] = _patch(
            height, width, cfg["wgrad_block_n"], cfg["wgrad_tile_w"])
        wg_num_tiles = batch * cfg["wg_tiles_per_batch"]
        if _interpreting(device):
            wg_programs = min(wg_num_tiles, cfg["wgrad_programs_per_sm"])
        else:
            wg_programs = min(wg_num_tiles, max(1, cfg["wgrad_programs_per_sm"] * _sm_count(device)
                                                // cfg["channel_blocks"]))
        cfg["wg_num_tiles"], cfg["wg_programs"] = wg_num_tiles, wg_programs
        _CONFIGS[key] = cfg
    return cfg


_CONFIGS = {}


def _needs_int64(n_tokens: int, width: int, *tensors) -> bool:
    """Whether in-batch offsets (token * stride_n + channel * stride_c) can pass 2**31."""
    reach = 0
    for t in tensors:
        reach = max(reach, (n_tokens + width + 1) * abs(t.stride(1)) + t.shape[2] * abs(t.stride(2)))
    return reach >= 2 ** 31 - 1


# --------------------------------------------------------------------------------------------
# Launchers (no input checks here: op.py checks before calling)
# --------------------------------------------------------------------------------------------
def dwconv3x3_forward(x, weight, bias, addend, height: int, width: int, epilogue: str, **overrides) -> torch.Tensor:
    """(B, N, C) tokens -> epilogue(conv3x3_depthwise(x) + bias), (B, N, C) contiguous in x.dtype.

    overrides (tests, benchmarks): fwd_block_n, fwd_tile_w, block_c, fwd_num_warps.
    """
    with on_device(x.device):
        batch, n_tokens, channels = x.shape
        cfg = _config(height, width, channels, batch, x.device, overrides)
        out = _new_buffer((batch, n_tokens, channels), x.dtype, x.device)
        add = addend if addend is not None else x
        launch(_dwconv3x3_fwd_kernel, (batch * cfg["fwd_tiles_per_batch"], cfg["channel_blocks"]), (
            x, weight, bias if bias is not None else weight, add, out,
            n_tokens, channels, height, width, cfg["fwd_tiles_w"], cfg["fwd_tiles_per_batch"],
            x.stride(0), x.stride(1), x.stride(2),
            weight.stride(0), weight.stride(2), weight.stride(3),
            add.stride(0), add.stride(1), add.stride(2)),
            cfg["fwd_num_warps"], EPILOGUE=EPILOGUE_CODES[epilogue], HAS_BIAS=bias is not None,
            IDX64=_needs_int64(n_tokens, width, x, add, out),
            BLOCK_N=cfg["fwd_block_n"], TILE_W=cfg["fwd_tile_w"], BLOCK_C=cfg["block_c"], ACC=_acc_dtype(x.dtype))
        return out


def dwconv3x3_backward(grad_out, x, weight, bias, height: int, width: int, epilogue: str, **overrides):
    """Grads of dwconv3x3_forward w.r.t. x, weight and bias (bias grad returned even without a bias).

    The addend's grad (epilogue "add") is grad_out itself and is not computed here.
    Returns (grad_x (B, N, C) contiguous in x.dtype, grad_weight like weight (contiguous),
    grad_bias (C,) in bias.dtype, or weight.dtype without a bias).
    overrides (tests, benchmarks): block_n, tile_w, block_c, num_warps (SiLU kernel),
    bwd_num_warps, wgrad_block_n, wgrad_tile_w, wgrad_programs_per_sm, wgrad_stages.
    """
    with on_device(x.device):
        batch, n_tokens, channels = x.shape
        device = x.device
        cfg = _config(height, width, channels, batch, device, overrides)
        acc = _acc_dtype(x.dtype)
        idx64 = _needs_int64(n_tokens, width, x, grad_out)
        num_tiles = batch * cfg["tiles_per_batch"]

        if epilogue == "silu":
            gp = _new_buffer((batch, n_tokens, channels), x.dtype, device)
            launch(_silu_grad_kernel, (num_tiles, cfg["channel_blocks"]), (
                grad_out, x, weight, bias if bias is not None else weight, gp,
                n_tokens, channels, height, width, cfg["tiles_w"], cfg["tiles_per_batch"],
                grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
                x.stride(0), x.stride(1), x.stride(2),
                weight.stride(0), weight.stride(2), weight.stride(3)),
                cfg["num_warps"], HAS_BIAS=bias is not None, IDX64=idx64, BLOCK_N=cfg["block_n"],
                TILE_W=cfg["tile_w"], BLOCK_C=cfg["block_c"], ACC=acc)
        else:
            gp = grad_out

        wg_programs = cfg["wg_programs"]
        grad_x = _new_buffer((batch, n_tokens, channels), x.dtype, device)
        partial_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        partials = _new_buffer((wg_programs, _PARTIAL_ROWS, channels), partial_dtype, device)
        launch(_dwconv3x3_bwd_kernel, (wg_programs + num_tiles, cfg["channel_blocks"]), (
            gp, x, weight, grad_x, partials,
            n_tokens, channels, height, width, cfg["tiles_w"], cfg["tiles_per_batch"],
            cfg["wg_tiles_w"], cfg["wg_tiles_per_batch"], cfg["wg_num_tiles"], wg_programs,
            gp.stride(0), gp.stride(1), gp.stride(2),
            x.stride(0), x.stride(1), x.stride(2),
            weight.stride(0), weight.stride(2), weight.stride(3)),
            cfg["bwd_num_warps"], RESIDUAL=epilogue == "residual", IDX64=idx64,
            BLOCK_N=cfg["block_n"], TILE_W=cfg["tile_w"], WG_BLOCK_N=cfg["wgrad_block_n"],
            WG_TILE_W=cfg["wgrad_tile_w"], BLOCK_C=cfg["block_c"], ACC=acc, WG_STAGES=cfg["wgrad_stages"])

        grad_weight = _new_buffer(tuple(weight.shape), weight.dtype, device)
        grad_bias = _new_buffer((channels,), bias.dtype if bias is not None else weight.dtype, device)
        reduce_c = min(_pow2_at_least(channels), 64)
        launch(_reduce_partials_kernel, (_cdiv(channels, reduce_c), _PARTIAL_ROWS), (
            partials, grad_weight, grad_bias, wg_programs, channels),
            4, BLOCK_P=min(_pow2_at_least(wg_programs), 64), BLOCK_C=reduce_c, ACC=acc)
        return grad_x, grad_weight, grad_bias
