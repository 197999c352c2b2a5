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


@triton.jit
def _tap_product_sum(g, x_base, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc,
                     DR: tl.constexpr, DS: tl.constexpr, ACC: tl.constexpr):
    """sum over the tile's tokens of g * x[shifted]: this tile's share of one weight-grad tap."""
    xv = _load_tap(x_base, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, DR, DS).to(ACC)
    return tl.sum(g * xv, axis=0)


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


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _dwconv3x3_bwd_kernel(
        gp_ptr, x_ptr, w_ptr, gx_ptr, part_ptr,
        N, C, H, W, tiles_w, tiles_per_batch, num_tiles,
        sgb, sgn, sgc, sxb, sxn, sxc, swc, swh, sww,
        RESIDUAL: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_N: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Persistent over token tiles: program p takes tiles p, p + P, p + 2P, ... of one channel block.

    gp is the grad of the pre-activation conv(x) + bias (the output grad itself unless SiLU).
        grad_x[m]      = sum_taps w[tap] * gp[m - shift(tap)]   (+ grad_out[m] for the residual)
        grad_w[tap]    = sum_{b, n} gp[n] * x[n + shift(tap)]
        grad_bias      = sum_{b, n} gp[n]
    The two sums are written per program to part_ptr[p, 0..9, c] (fp32, fp64 for fp64 inputs).
    """
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    dw00 = tl.zeros((BLOCK_C,), dtype=ACC)
    dw01 = tl.zeros((BLOCK_C,), dtype=ACC)
    dw02 = tl.zeros((BLOCK_C,), dtype=ACC)
    dw10 = tl.zeros((BLOCK_C,), dtype=ACC)
    dw11 = tl.zeros((BLOCK_C,), dtype=ACC)
    dw12 = tl.zeros((BLOCK_C,), dtype=ACC)
    dw20 = tl.zeros((BLOCK_C,), dtype=ACC)
    dw21 = tl.zeros((BLOCK_C,), dtype=ACC)
    dw22 = tl.zeros((BLOCK_C,), dtype=ACC)
    db = tl.zeros((BLOCK_C,), dtype=ACC)
    for t in range(pid, num_tiles, num_programs):
        b, n, r, s, n_ok = _tile_coords(t, tiles_w, tiles_per_batch, H, W, BLOCK_N, TILE_W, IDX64)
        g_base = gp_ptr + b * sgb
        x_base = x_ptr + b * sxb
        g = _load_tap(g_base, n, r, s, n_ok, c, c_ok, H, W, sgn, sgc, 0, 0).to(ACC)
        db += tl.sum(g, axis=0)
        dw00 += _tap_product_sum(g, x_base, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, -1, -1, ACC)
        dw01 += _tap_product_sum(g, x_base, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, -1, 0, ACC)
        dw02 += _tap_product_sum(g, x_base, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, -1, 1, ACC)
        dw10 += _tap_product_sum(g, x_base, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, 0, -1, ACC)
        dw11 += _tap_product_sum(g, x_base, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, 0, 0, ACC)
        dw12 += _tap_product_sum(g, x_base, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, 0, 1, ACC)
        dw20 += _tap_product_sum(g, x_base, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, 1, -1, ACC)
        dw21 += _tap_product_sum(g, x_base, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, 1, 0, ACC)
        dw22 += _tap_product_sum(g, x_base, n, r, s, n_ok, c, c_ok, H, W, sxn, sxc, 1, 1, ACC)

        # Input grad: the transposed conv, i.e. taps flipped (tap (i, j) reads gp at -shift).
        gx = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC)
        for i in tl.static_range(3):
            for j in tl.static_range(3):
                gv = _load_tap(g_base, n, r, s, n_ok, c, c_ok, H, W, sgn, sgc, 1 - i, 1 - j).to(ACC)
                gx += gv * _load_weight_tap(w_ptr, c, c_ok, swc, swh, sww, i, j, ACC)[None, :]
        if RESIDUAL:
            gx += g
        tl.store(gx_ptr + b * N * C + n[:, None] * C + c[None, :], gx.to(gx_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & c_ok[None, :])

    row = part_ptr + pid.to(tl.int64) * (10 * C) + c
    tl.store(row + 0 * C, dw00.to(part_ptr.dtype.element_ty), mask=c_ok)
    tl.store(row + 1 * C, dw01.to(part_ptr.dtype.element_ty), mask=c_ok)
    tl.store(row + 2 * C, dw02.to(part_ptr.dtype.element_ty), mask=c_ok)
    tl.store(row + 3 * C, dw10.to(part_ptr.dtype.element_ty), mask=c_ok)
    tl.store(row + 4 * C, dw11.to(part_ptr.dtype.element_ty), mask=c_ok)
    tl.store(row + 5 * C, dw12.to(part_ptr.dtype.element_ty), mask=c_ok)
    tl.store(row + 6 * C, dw20.to(part_ptr.dtype.element_ty), mask=c_ok)
    tl.store(row + 7 * C, dw21.to(part_ptr.dtype.element_ty), mask=c_ok)
    tl.store(row + 8 * C, dw22.to(part_ptr.dtype.element_ty), mask=c_ok)
    tl.store(row + 9 * C, db.to(part_ptr.dtype.element_ty), mask=c_ok)


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
# Launch configuration
# --------------------------------------------------------------------------------------------
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


def _tile_config(height: int, width: int, channels: int, device: torch.device, block_n=None, tile_w=None,
                 block_c=None, num_warps=None):
    """(BLOCK_N, TILE_W, BLOCK_C, num_warps), each overridable; patches are (BLOCK_N / TILE_W) x TILE_W.

    On the GPU: 4x8-pixel patches x 64 channels, 4 warps (16 elements a thread per tap). The
    compiler hoists the 9 (backward: 19) tap loads, so 64-token patches push the forward past
    190 registers and the backward spills (ptxas for sm_90, triton 3.6 and 3.8). The interpreter
    pays per program, so it gets big tiles.
    """
    if _interpreting(device):
        defaults = (128, 128, 128, 4)
    else:
        defaults = (32, 8, 64, 4)
    block_n = block_n or defaults[0]
    tile_w = min(tile_w or defaults[1], triton.next_power_of_2(width), block_n)
    # No rows of the patch beyond the map's height (1 x W maps would waste most lanes).
    block_n = tile_w * min(block_n // tile_w, triton.next_power_of_2(height))
    block_c = min(block_c or defaults[2], triton.next_power_of_2(channels))
    return block_n, tile_w, block_c, num_warps or defaults[3]


def _tile_counts(height: int, width: int, block_n: int, tile_w: int):
    """(tiles along W, tiles per image)."""
    tiles_w = triton.cdiv(width, tile_w)
    return tiles_w, tiles_w * triton.cdiv(height, block_n // tile_w)


def _bwd_program_count(num_tiles: int, channel_blocks: int, device: torch.device,
                       programs_per_sm: int = 4) -> int:
    """Programs along tokens for the persistent backward: enough to fill the GPU, few partials."""
    if _interpreting(device):
        return min(num_tiles, 2)
    target = max(1, programs_per_sm * _sm_count(device) // channel_blocks)
    return max(1, min(num_tiles, target))


def _needs_int64(n_tokens: int, width: int, *tensors) -> bool:
    """Whether in-batch offsets (token * stride_n + channel * stride_c) can pass 2**31."""
    reach = 0
    for t in tensors:
        reach = max(reach, (n_tokens + width + 1) * abs(t.stride(1)) + t.shape[2] * abs(t.stride(2)))
    return reach >= 2 ** 31 - 1


# --------------------------------------------------------------------------------------------
# Launchers (no input checks here: op.py checks before calling)
# --------------------------------------------------------------------------------------------
def dwconv3x3_forward(x, weight, bias, addend, height: int, width: int, epilogue: str,
                      block_n=None, tile_w=None, block_c=None, num_warps=None) -> torch.Tensor:
    """(B, N, C) tokens -> epilogue(conv3x3_depthwise(x) + bias), (B, N, C) contiguous in x.dtype."""
    batch, n_tokens, channels = x.shape
    out = _new_buffer((batch, n_tokens, channels), x.dtype, x.device)
    block_n, tile_w, block_c, num_warps = _tile_config(height, width, channels, x.device, block_n, tile_w,
                                                       block_c, num_warps)
    tiles_w, tiles_per_batch = _tile_counts(height, width, block_n, tile_w)
    add = addend if addend is not None else x
    grid = (batch * tiles_per_batch, triton.cdiv(channels, block_c))
    _dwconv3x3_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, add, out,
        n_tokens, channels, height, width, tiles_w, tiles_per_batch,
        x.stride(0), x.stride(1), x.stride(2),
        weight.stride(0), weight.stride(2), weight.stride(3),
        add.stride(0), add.stride(1), add.stride(2),
        EPILOGUE=EPILOGUE_CODES[epilogue], HAS_BIAS=bias is not None,
        IDX64=_needs_int64(n_tokens, width, x, add, out),
        BLOCK_N=block_n, TILE_W=tile_w, BLOCK_C=block_c, ACC=_acc_dtype(x.dtype), num_warps=num_warps)
    return out


def dwconv3x3_backward(grad_out, x, weight, bias, height: int, width: int, epilogue: str,
                       block_n=None, tile_w=None, block_c=None, num_warps=None, programs_per_sm: int = 4):
    """Grads of dwconv3x3_forward w.r.t. x, weight and bias (bias grad returned even without a bias).

    The addend's grad (epilogue "add") is grad_out itself and is not computed here.
    Returns (grad_x (B, N, C) contiguous in x.dtype, grad_weight like weight (contiguous),
    grad_bias (C,) in bias.dtype, or weight.dtype without a bias).
    """
    batch, n_tokens, channels = x.shape
    device = x.device
    acc = _acc_dtype(x.dtype)
    block_n, tile_w, block_c, num_warps = _tile_config(height, width, channels, device, block_n, tile_w,
                                                       block_c, num_warps)
    tiles_w, tiles_per_batch = _tile_counts(height, width, block_n, tile_w)
    num_tiles = batch * tiles_per_batch
    channel_blocks = triton.cdiv(channels, block_c)
    idx64 = _needs_int64(n_tokens, width, x, grad_out)
    tiling = dict(BLOCK_N=block_n, TILE_W=tile_w, BLOCK_C=block_c, ACC=acc, num_warps=num_warps)

    if epilogue == "silu":
        gp = _new_buffer((batch, n_tokens, channels), x.dtype, device)
        _silu_grad_kernel[(num_tiles, channel_blocks)](
            grad_out, x, weight, bias if bias is not None else weight, gp,
            n_tokens, channels, height, width, tiles_w, tiles_per_batch,
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            x.stride(0), x.stride(1), x.stride(2),
            weight.stride(0), weight.stride(2), weight.stride(3),
            HAS_BIAS=bias is not None, IDX64=idx64, **tiling)
    else:
        gp = grad_out

    programs = _bwd_program_count(num_tiles, channel_blocks, device, programs_per_sm)
    grad_x = _new_buffer((batch, n_tokens, channels), x.dtype, device)
    partial_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    partials = _new_buffer((programs, _PARTIAL_ROWS, channels), partial_dtype, device)
    _dwconv3x3_bwd_kernel[(programs, channel_blocks)](
        gp, x, weight, grad_x, partials,
        n_tokens, channels, height, width, tiles_w, tiles_per_batch, num_tiles,
        gp.stride(0), gp.stride(1), gp.stride(2),
        x.stride(0), x.stride(1), x.stride(2),
        weight.stride(0), weight.stride(2), weight.stride(3),
        RESIDUAL=epilogue == "residual", IDX64=idx64, **tiling)

    grad_weight = _new_buffer(tuple(weight.shape), weight.dtype, device)
    grad_bias = _new_buffer((channels,), bias.dtype if bias is not None else weight.dtype, device)
    reduce_c = min(triton.next_power_of_2(channels), 64)
    reduce_p = min(triton.next_power_of_2(programs), 64)
    _reduce_partials_kernel[(triton.cdiv(channels, reduce_c), _PARTIAL_ROWS)](
        partials, grad_weight, grad_bias, programs, channels,
        BLOCK_P=reduce_p, BLOCK_C=reduce_c, ACC=acc, num_warps=4)
    return grad_x, grad_weight, grad_bias
