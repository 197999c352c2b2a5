"""Device helpers shared by the forward and backward kernels.

Every kernel works on one (batch, head) pair and a run of tokens. A head's d channels form d/2
RoPE pairs; kernels hold the even and the odd channel of each pair as two (BLOCK_N, HALF_PAD)
tiles, so the rotation is elementwise. HALF_PAD is d/2 padded to a power of two >= 16 (tl.dot's
minimum); padded pairs are masked to zero on load and never stored.
"""
import math

import triton
import triton.language as tl

# log2(10000): theta_i = 10000^(-i/K) = 2^(-i * LOG2_ROPE_BASE / K)
LOG2_ROPE_BASE = tl.constexpr(math.log2(10000.0))
# 2*pi split in a part with few mantissa bits (k * TWO_PI_HI is exact for any angle we meet) and
# the rest, so the range reduction below keeps fp32 accuracy at angles of a few hundred radians.
TWO_PI_HI = tl.constexpr(6.28125)
TWO_PI_LO = tl.constexpr(2.0 * math.pi - 6.28125)
INV_TWO_PI = tl.constexpr(1.0 / (2.0 * math.pi))
NORMALIZER_EPS = tl.constexpr(1e-6)


@triton.jit
def feature_map(x):
    """phi(t) = ELU(t) + 1, written as exp(t) below zero (same value, no cancellation)."""
    return tl.where(x > 0, x + 1.0, tl.exp(x))


@triton.jit
def feature_map_grad(x):
    return tl.where(x > 0, 1.0, tl.exp(x))


@triton.jit
def rope_cos_sin(tokens, pairs, head, width, HALF_DIM: tl.constexpr, QUARTER_C):
    """cos and sin (BLOCK_N, HALF_PAD) of the RoPE angle of each (token, pair of this head).

    Pair j = head * d/2 + i of the whole C channels turns by row * theta_j when j < K = C/4 and by
    column * theta_(j-K) otherwise, with theta_i = 10000^(-i/K); token n sits at (n // W, n % W).
    """
    rows = tokens // width
    cols = tokens - rows * width
    pair = head * HALF_DIM + pairs
    by_row = pair < QUARTER_C
    freq_index = tl.where(by_row, pair, pair - QUARTER_C).to(tl.float32)
    theta = tl.exp2(freq_index * (-LOG2_ROPE_BASE) / (QUARTER_C * 1.0))
    position = tl.where(by_row[None, :], rows[:, None], cols[:, None]).to(tl.float32)
    angle = position * theta[None, :]
    # Reduce to [-pi, pi] ourselves: the hardware sin/cos may be approximations that are only
    # accurate near zero, and positions reach several hundred.
    turns = tl.floor(angle * INV_TWO_PI + 0.5)
    angle = (angle - turns * TWO_PI_HI) - turns * TWO_PI_LO
    return tl.cos(angle), tl.sin(angle)


@triton.jit
def program_head(num_heads):
    """(bh, split, batch, head) of this program: grid axis 0 runs over the (batch, head) pairs,
    axis 1 over the runs of tokens that split one head's N tokens."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    batch = bh // num_heads
    head = bh - batch * num_heads
    return bh, split, batch, head


@triton.jit
def token_run(split, tokens_per_split, num_tokens):
    """[start, end) of the tokens of split `split`."""
    start = split * tokens_per_split
    return start, tl.minimum(start + tokens_per_split, num_tokens)


@triton.jit
def load_pair_tiles(base_ptr, tokens, pairs, stride_n, stride_c, mask):
    """Even and odd channels (2i, 2i+1) of a head as two fp32 tiles (BLOCK_N, HALF_PAD)."""
    ptrs = base_ptr + tokens.to(tl.int64)[:, None] * stride_n + (2 * pairs)[None, :] * stride_c
    even = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    odd = tl.load(ptrs + stride_c, mask=mask, other=0.0).to(tl.float32)
    return even, odd


@triton.jit
def load_phi_pair_tiles(base_ptr, tokens, pairs, stride_n, stride_c, mask):
    """The raw even/odd tiles (phi' needs them) and phi of them, zero where masked."""
    lin_even, lin_odd = load_pair_tiles(base_ptr, tokens, pairs, stride_n, stride_c, mask)
    return lin_even, lin_odd, tl.where(mask, feature_map(lin_even), 0.0), tl.where(mask, feature_map(lin_odd), 0.0)


@triton.jit
def load_query_block(q_base, tokens, pairs, mask, stride_n, stride_c, kbar_even, kbar_odd):
    """Raw q (for phi'), phi(q) and its normalizer z = 1 / (phi(q) . kbar + eps) for a block."""
    q_lin_even, q_lin_odd, q_even, q_odd = load_phi_pair_tiles(q_base, tokens, pairs, stride_n, stride_c, mask)
    z = 1.0 / (tl.sum(q_even * kbar_even[None, :], axis=1) + tl.sum(q_odd * kbar_odd[None, :], axis=1)
               + NORMALIZER_EPS)
    return q_lin_even, q_lin_odd, q_even, q_odd, z


@triton.jit
def store_pair_tiles(base_ptr, tokens, pairs, stride_n, stride_c, mask, even, odd):
    ptrs = base_ptr + tokens.to(tl.int64)[:, None] * stride_n + (2 * pairs)[None, :] * stride_c
    tl.store(ptrs, even.to(base_ptr.dtype.element_ty), mask=mask)
    tl.store(ptrs + stride_c, odd.to(base_ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_head_tile(base_ptr, tokens, channels, stride_n, stride_c, mask):
    """All d channels of a head as one fp32 tile (BLOCK_N, DIM_PAD)."""
    ptrs = base_ptr + tokens.to(tl.int64)[:, None] * stride_n + channels[None, :] * stride_c
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def rotate(even, odd, cos, sin):
    """(a, b) -> (a cos - b sin, b cos + a sin)."""
    return even * cos - odd * sin, odd * cos + even * sin


@triton.jit
def unrotate(even, odd, cos, sin):
    """The transpose of rotate: what a gradient goes through on its way back."""
    return even * cos + odd * sin, odd * cos - even * sin


@triton.jit
def load_state(state_ptr, pairs, channels, HEAD_DIM: tl.constexpr, HALF_DIM: tl.constexpr):
    """A head's reduced state: sum_m rope(k)_m^T v_m split into its even and odd rows
    (HALF_PAD, DIM_PAD) each, and sum_m k_m split the same way (HALF_PAD,)."""
    pair_ok = pairs < HALF_DIM
    mask = pair_ok[:, None] & (channels < HEAD_DIM)[None, :]
    rows = (2 * pairs)[:, None] * HEAD_DIM + channels[None, :]
    kv_even = tl.load(state_ptr + rows, mask=mask, other=0.0)
    kv_odd = tl.load(state_ptr + rows + HEAD_DIM, mask=mask, other=0.0)
    ksum_ptr = state_ptr + HEAD_DIM * HEAD_DIM + 2 * pairs
    k_even = tl.load(ksum_ptr, mask=pair_ok, other=0.0)
    k_odd = tl.load(ksum_ptr + 1, mask=pair_ok, other=0.0)
    return kv_even, kv_odd, k_even, k_odd


@triton.jit
def load_mean_state(state_ptr, bh, pairs, channels, inv_n, HEAD_DIM: tl.constexpr, HALF_DIM: tl.constexpr):
    """Head bh's state (flat, one (d*d + d) block per head) scaled by 1/N: KV and kbar."""
    kv_even, kv_odd, ksum_even, ksum_odd = load_state(state_ptr + bh * (HEAD_DIM * HEAD_DIM + HEAD_DIM),
                                                      pairs, channels, HEAD_DIM, HALF_DIM)
    return kv_even * inv_n, kv_odd * inv_n, ksum_even * inv_n, ksum_odd * inv_n


@triton.jit
def store_state(state_ptr, pairs, channels, kv_even, kv_odd, k_even, k_odd,
                HEAD_DIM: tl.constexpr, HALF_DIM: tl.constexpr, ATOMIC: tl.constexpr):
    """Write (or atomically add) a head's partial state, laid out as load_state reads it."""
    pair_ok = pairs < HALF_DIM
    mask = pair_ok[:, None] & (channels < HEAD_DIM)[None, :]
    rows = (2 * pairs)[:, None] * HEAD_DIM + channels[None, :]
    ksum_ptr = state_ptr + HEAD_DIM * HEAD_DIM + 2 * pairs
    if ATOMIC:
        tl.atomic_add(state_ptr + rows, kv_even, mask=mask, sem="relaxed")
        tl.atomic_add(state_ptr + rows + HEAD_DIM, kv_odd, mask=mask, sem="relaxed")
        tl.atomic_add(ksum_ptr, k_even, mask=pair_ok, sem="relaxed")
        tl.atomic_add(ksum_ptr + 1, k_odd, mask=pair_ok, sem="relaxed")
    else:
        tl.store(state_ptr + rows, kv_even, mask=mask)
        tl.store(state_ptr + rows + HEAD_DIM, kv_odd, mask=mask)
        tl.store(ksum_ptr, k_even, mask=pair_ok)
        tl.store(ksum_ptr + 1, k_odd, mask=pair_ok)


@triton.jit
def matmul(a, b, acc, DOT_MODE: tl.constexpr):
    """acc + a @ b with fp32 accumulation on fp32 operands.

    DOT_MODE "ieee": exact fp32 products on the FMA units; "tf32" / "tf32x3": tensor cores on
    tf32-rounded operands, one or three products (launch.dot_mode picks per dtype; the
    interpreter ignores the mode and multiplies in fp32).
    """
    return tl.dot(a, b, acc, input_precision=DOT_MODE)


@triton.jit
def apply_state(r_even, r_odd, kv_even, kv_odd, BLOCK_N: tl.constexpr, DIM_PAD: tl.constexpr,
                DOT_MODE: tl.constexpr):
    """rope(x) @ KV for a block of tokens, (BLOCK_N, DIM_PAD), from its even and odd halves."""
    out = matmul(r_even, kv_even, tl.zeros((BLOCK_N, DIM_PAD), dtype=tl.float32), DOT_MODE)
    return matmul(r_odd, kv_odd, out, DOT_MODE)
