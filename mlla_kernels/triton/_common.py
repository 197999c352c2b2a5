"""Device helpers shared by the forward and backward kernels.

Every kernel works on one (batch, head) pair and a run of tokens, a block of BLOCK_N tokens at a
time, each block held as one (BLOCK_N, DIM_PAD) tile of the head's d channels in their own order;
DIM_PAD is d padded to a power of two >= 16 (tl.dot's minimum), padded channels are masked to zero
on load and never stored. The d channels form d/2 RoPE pairs (2i, 2i+1): only the rotation splits a
tile into its even and odd channels, so every matrix product runs on whole-head tiles. The state
of a head is the (d, d) matrix sum_m rope(phi(k_m))^T v_m (row = k channel) and the vector
sum_m phi(k_m). Addresses: a scalar int64 pointer to the block's first token plus int32 tile
offsets that stay fixed for the program.
"""
import math

import triton
import triton.language as tl
from triton.language.extra import libdevice

# log2(10000): theta_i = 10000^(-i/K) = 2^(-i * LOG2_ROPE_BASE / K)
LOG2_ROPE_BASE = tl.constexpr(math.log2(10000.0))
# 2*pi split in a part with few mantissa bits (k * TWO_PI_HI is exact for any angle we meet) and
# the rest, so the range reduction below keeps fp32 accuracy at angles of a few hundred radians.
TWO_PI_HI = tl.constexpr(6.28125)
TWO_PI_LO = tl.constexpr(2.0 * math.pi - 6.28125)
INV_TWO_PI = tl.constexpr(1.0 / (2.0 * math.pi))
NORMALIZER_EPS = tl.constexpr(1e-6)
# Partial states whose loads load_state keeps in flight at once.
FOLD_LOADS_IN_FLIGHT = tl.constexpr(4)
# The size integers Triton does not specialise on (equal to 1, divisible by 16). They only bound
# masks and split token runs into rows and columns, never address contiguous memory, so the hint
# gains nothing, while over the 1x pipeline's sizes it would make about two thirds of the
# kernels' compiles (benchmarks/attention_specialisations.py: 149 compile keys, 55 without).
UNSPECIALISED_SIZES = ("num_tokens", "width")


@triton.jit
def feature_map(x):
    """phi(t) = ELU(t) + 1, written as exp(t) below zero (same value, no cancellation)."""
    return tl.where(x > 0, x + 1.0, tl.exp(x))


@triton.jit
def feature_map_grad(x):
    """phi'(t) from t: 1 above zero, exp(t) below. For key_value_grad, where phi(k) is not kept to
    the end of the block: recomputing exp was cheaper than keeping phi's tile live (tried, H200), and
    feature_map_grad_from_phi there made the loop longer (compiler report, NOTES.md v26)."""
    return tl.where(x > 0, 1.0, tl.exp(x))


@triton.jit
def feature_map_grad_from_phi(phi):
    """phi'(t) from phi(t): 1 above zero and exp(t) = phi(t) <= 1 below, i.e. min(phi, 1), no exp.
    For query_grad_state, which keeps phi(q) for the whole block anyway (NOTES.md v26)."""
    return tl.minimum(phi, 1.0)


@triton.jit
def cos_sin_reduced(angle):
    """cos and sin of angles in [-pi, pi], from Taylor polynomials of the half angle (|h| <= pi/2:
    truncation below 6e-8) and the double-angle formulas; with fp32 rounding within 4e-7 of the
    exact values (tests). Plain FMAs: ~20 instructions against ~80 for the library's accurate
    pair. The interpreter's path (compiled kernels take it only when launch_overrides sets
    fast_trig=False)."""
    half = angle * 0.5
    h2 = half * half
    s = half * (1.0 + h2 * (-1.0 / 6 + h2 * (1.0 / 120 + h2 * (-1.0 / 5040 + h2 * (1.0 / 362880
                                                                                 + h2 * (-1.0 / 39916800))))))
    c = 1.0 + h2 * (-0.5 + h2 * (1.0 / 24 + h2 * (-1.0 / 720 + h2 * (1.0 / 40320 + h2 * (-1.0 / 3628800
                                                                                     + h2 * (1.0 / 479001600))))))
    return (c - s) * (c + s), 2.0 * s * c


@triton.jit
def block_rows_cols(block_start, width, BLOCK_N: tl.constexpr):
    """(row, column) of each of the BLOCK_N tokens from block_start on; token n sits at
    (n // W, n % W). One integer division per block: the tokens' columns counted from the first
    token's row, c < W + BLOCK_N, are split into whole rows in fp32, which is exact while
    W + BLOCK_N < 2**22 (check_triton_inputs): (c + 0.5) / W lies at least 0.5 / W from an
    integer, and the product's rounding errs by at most (c / W) * 2**-23."""
    first_row = block_start // width
    cols = block_start - first_row * width + tl.arange(0, BLOCK_N)
    wrapped = tl.floor((cols.to(tl.float32) + 0.5) * (1.0 / width)).to(tl.int32)
    return first_row + wrapped, cols - wrapped * width


@triton.jit
def rope_cos_sin(block_start, head, width, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, QUARTER_C,
                 BLOCK_N: tl.constexpr, FAST_TRIG: tl.constexpr):
    """cos and sin (BLOCK_N, DIM_PAD // 2) of the RoPE angle of each (token, pair of this head) of
    the block starting at token block_start.

    Pair j = head * d/2 + i of the whole C channels turns by row * theta_j when j < K = C/4 and by
    column * theta_(j-K) otherwise, with theta_i = 10000^(-i/K); token n sits at (n // W, n % W).
    FAST_TRIG (compiled kernels only; the launch's default on the GPU): the reduced angle goes to
    the GPU's special function unit (sin.approx / cos.approx, absolute error <= 2**-20.5 on
    [-pi, pi] by the PTX manual), two instructions where cos_sin_reduced takes ~25; otherwise the
    polynomials, which the interpreter can run.
    """
    pairs = tl.arange(0, DIM_PAD // 2)
    rows, cols = block_rows_cols(block_start, width, BLOCK_N)
    pair = head * (HEAD_DIM // 2) + pairs
    by_row = pair < QUARTER_C
    freq_index = tl.where(by_row, pair, pair - QUARTER_C).to(tl.float32)
    theta = tl.exp2(freq_index * (-LOG2_ROPE_BASE) / (QUARTER_C * 1.0))
    # row * theta + column * 0 or row * 0 + column * theta: the same bits as position * theta, with
    # the choice made once per pair and the conversions once per token, not per (token, pair).
    row_theta = tl.where(by_row, theta, 0.0)
    angle = (rows.to(tl.float32)[:, None] * row_theta[None, :]
             + cols.to(tl.float32)[:, None] * (theta - row_theta)[None, :])
    # Positions reach several hundred radians: reduce to [-pi, pi] with a two-part 2*pi.
    turns = tl.floor(angle * INV_TWO_PI + 0.5)
    angle = (angle - turns * TWO_PI_HI) - turns * TWO_PI_LO
    if FAST_TRIG:
        return libdevice.fast_cosf(angle), libdevice.fast_sinf(angle)
    return cos_sin_reduced(angle)


@triton.jit
def rope(x, cos, sin, BLOCK_N: tl.constexpr, DIM_PAD: tl.constexpr):
    """Turn each channel pair (2i, 2i+1) of a (BLOCK_N, DIM_PAD) tile: (a, b) -> (a cos - b sin,
    b cos + a sin)."""
    even, odd = tl.split(tl.reshape(x, (BLOCK_N, DIM_PAD // 2, 2)))
    return tl.reshape(tl.join(even * cos - odd * sin, odd * cos + even * sin), (BLOCK_N, DIM_PAD))


@triton.jit
def unrope(x, cos, sin, BLOCK_N: tl.constexpr, DIM_PAD: tl.constexpr):
    """The transpose of rope: what a gradient goes through on its way back."""
    even, odd = tl.split(tl.reshape(x, (BLOCK_N, DIM_PAD // 2, 2)))
    return tl.reshape(tl.join(even * cos + odd * sin, odd * cos - even * sin), (BLOCK_N, DIM_PAD))


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
def tile_offsets(stride_n, stride_c, BLOCK_N: tl.constexpr, DIM_PAD: tl.constexpr):
    """int32 element offsets of a (BLOCK_N, DIM_PAD) tile from its first token's row (the launch
    checks they fit); fixed for a program, so only a scalar base pointer moves along the tokens."""
    return tl.arange(0, BLOCK_N)[:, None] * stride_n + tl.arange(0, DIM_PAD)[None, :] * stride_c


@triton.jit
def block_mask(tokens, end, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr):
    """(BLOCK_N, DIM_PAD) mask of a block's real tokens and channels."""
    return (tokens < end)[:, None] & (tl.arange(0, DIM_PAD) < HEAD_DIM)[None, :]


@triton.jit
def head_pointer(ptr, batch, first_channel, stride_b, stride_c):
    """Pointer to token 0, channel first_channel of the batch's (N, C) plane; the batch offset in
    int64, as B x N x C may pass 2**31 elements."""
    return ptr + batch.to(tl.int64) * stride_b + first_channel * stride_c


@triton.jit
def block_pointer(base_ptr, block_start, stride_n):
    return base_ptr + tl.cast(block_start, tl.int64) * stride_n


@triton.jit
def load_tile(block_ptr, offsets, mask):
    return tl.load(block_ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_tile(block_ptr, offsets, mask, tile):
    tl.store(block_ptr + offsets, tile.to(block_ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_query_block(block_ptr, offsets, mask, kbar):
    """Raw q (phi' needs it), phi(q) (zero where masked) and its normalizer
    z = 1 / (phi(q) . kbar + eps), for a block of tokens."""
    q_lin = load_tile(block_ptr, offsets, mask)
    q = tl.where(mask, feature_map(q_lin), 0.0)
    z = 1.0 / (tl.sum(q * kbar[None, :], axis=1) + NORMALIZER_EPS)
    return q_lin, q, z


@triton.jit
def state_offsets(HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr):
    """Offsets and mask of a head's (d, d) matrix in its flat state block, as (DIM_PAD, DIM_PAD)."""
    channels = tl.arange(0, DIM_PAD)
    mask = (channels < HEAD_DIM)[:, None] & (channels < HEAD_DIM)[None, :]
    return channels[:, None] * HEAD_DIM + channels[None, :], mask


@triton.jit
def load_state(partials_ptr, bh, NUM_PARTIALS: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr):
    """Head bh's state, KV (DIM_PAD, DIM_PAD) and the key sum (DIM_PAD,), from its NUM_PARTIALS
    consecutive flat (d*d + d) blocks, added in their order (the same bits in every program).
    FOLD_LOADS_IN_FLIGHT partials are loaded at a time: one load and add after another made every
    program wait out a chain of L2 round trips (~20% of the output and key_value_grad kernels at
    MLLA stage 4, 8 partials; Nsight Compute on an H100, NOTES.md v20), and unrolling all 16 doubled
    the bf16 output kernel's registers."""
    state_size = HEAD_DIM * HEAD_DIM + HEAD_DIM
    base = partials_ptr + bh.to(tl.int64) * NUM_PARTIALS * state_size
    offsets, mask = state_offsets(HEAD_DIM, DIM_PAD)
    channels = tl.arange(0, DIM_PAD)
    kv = tl.zeros((DIM_PAD, DIM_PAD), dtype=tl.float32)
    ksum = tl.zeros((DIM_PAD,), dtype=tl.float32)
    for first in range(0, NUM_PARTIALS, FOLD_LOADS_IN_FLIGHT):
        for partial in tl.static_range(FOLD_LOADS_IN_FLIGHT):
            present = first + partial < NUM_PARTIALS
            block = base + (first + partial) * state_size
            kv += tl.load(block + offsets, mask=mask & present, other=0.0)
            ksum += tl.load(block + HEAD_DIM * HEAD_DIM + channels, mask=(channels < HEAD_DIM) & present, other=0.0)
    return kv, ksum


@triton.jit
def store_state(state_ptr, kv, ksum, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, ATOMIC: tl.constexpr):
    """Write (or atomically add) a head's partial state, laid out as load_state reads it."""
    offsets, mask = state_offsets(HEAD_DIM, DIM_PAD)
    channels = tl.arange(0, DIM_PAD)
    ksum_ptr = state_ptr + HEAD_DIM * HEAD_DIM + channels
    if ATOMIC:
        tl.atomic_add(state_ptr + offsets, kv, mask=mask, sem="relaxed")
        tl.atomic_add(ksum_ptr, ksum, mask=channels < HEAD_DIM, sem="relaxed")
    else:
        tl.store(state_ptr + offsets, kv, mask=mask)
        tl.store(ksum_ptr, ksum, mask=channels < HEAD_DIM)


@triton.jit
def split_tf32(x):
    """x = hi + lo exactly, hi rounded to the nearest tf32 value (10 mantissa bits): adding half of
    the lowest kept bit to the bit pattern then clearing the 13 dropped bits rounds the magnitude."""
    hi = ((x.to(tl.int32, bitcast=True) + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def dot_operand(x, DOT_MODE: tl.constexpr):
    """What matmul_parts takes for x: its tf32 (hi, lo) split in "tf32x3" mode, else (x, x) with the
    second unused. Kernels split an operand once where it is used twice or does not change in
    their loop."""
    if DOT_MODE == "tf32x3":
        return split_tf32(x)
    return x, x


@triton.jit
def matmul_parts(a_hi, a_lo, b_hi, b_lo, acc, DOT_MODE: tl.constexpr):
    """acc + a @ b from dot_operand's parts, with fp32 accumulation.

    DOT_MODE "ieee": exact fp32 products on the FMA units; "tf32": tensor cores on operands cut to
    tf32's 10 mantissa bits; "tf32x3": lo*hi + hi*lo + hi*hi on tensor cores (fp32-level error).
    The split is written here rather than left to tl.dot's own tf32x3, whose conversion costs ~6
    instructions per element and is redone for every product, loop-invariant operands included.
    launch.dot_mode picks the mode per dtype; the interpreter multiplies in fp32 in every mode.
    """
    if DOT_MODE == "tf32x3":
        # The three products are summed from zero and only then added to acc: tensor cores add into
        # their accumulator with truncation, which, repeated onto a large running sum (a state
        # reduced over many blocks), biased fp32 gradients to ~3e-6 relative error on an H200.
        small = tl.dot(a_lo, b_hi, tl.zeros(acc.shape, tl.float32), input_precision="tf32")
        small = tl.dot(a_hi, b_lo, small, input_precision="tf32")
        return acc + tl.dot(a_hi, b_hi, small, input_precision="tf32")
    return tl.dot(a_hi, b_hi, acc, input_precision=DOT_MODE)


@triton.jit
def matmul(a, b, acc, DOT_MODE: tl.constexpr):
    """acc + a @ b for operands used once (see matmul_parts)."""
    a_hi, a_lo = dot_operand(a, DOT_MODE)
    b_hi, b_lo = dot_operand(b, DOT_MODE)
    return matmul_parts(a_hi, a_lo, b_hi, b_lo, acc, DOT_MODE)


@triton.jit
def side_by_side(left, right, BLOCK_N: tl.constexpr, DIM_PAD: tl.constexpr):
    """(BLOCK_N, 2 * DIM_PAD): the two (BLOCK_N, DIM_PAD) tiles' columns, left's first."""
    return tl.reshape(tl.permute(tl.join(left, right), (0, 2, 1)), (BLOCK_N, 2 * DIM_PAD))


@triton.jit
def quadrants(x, DIM_PAD: tl.constexpr):
    """The four (DIM_PAD, DIM_PAD) blocks of a (2 * DIM_PAD, 2 * DIM_PAD) matrix: top-left,
    top-right, bottom-left, bottom-right."""
    # (row half, row, column half, column) -> (row, column, row half, column half); tl.split takes
    # the last axis apart.
    left, right = tl.split(tl.permute(tl.reshape(x, (2, DIM_PAD, 2, DIM_PAD)), (1, 3, 0, 2)))
    top_left, bottom_left = tl.split(left)
    top_right, bottom_right = tl.split(right)
    return top_left, top_right, bottom_left, bottom_right


@triton.jit
def token_reduction(a_left, a_right, b_left, b_right, BLOCK_N: tl.constexpr, DIM_PAD: tl.constexpr,
                    DOT_MODE: tl.constexpr):
    """[a_left | a_right]^T [b_left | b_right], (2 * DIM_PAD, 2 * DIM_PAD), as one product from zero:
    a reduction over a block's tokens of two pairs of tiles. Its M is 2 * DIM_PAD = 64 at d = 32,
    which Hopper's warpgroup MMA needs (a (32 x tokens) x (tokens x 32) product alone kept every
    product of the kernel on the older MMA, whose operands held ~130 registers a thread and spilled;
    compiler report, NOTES v15). The caller adds the result to its running sum in fp32 (see
    matmul_parts on why not inside the tensor cores)."""
    a = side_by_side(a_left, a_right, BLOCK_N, DIM_PAD)
    b = side_by_side(b_left, b_right, BLOCK_N, DIM_PAD)
    precision: tl.constexpr = "ieee" if DOT_MODE == "ieee" else "tf32"
    return tl.dot(tl.trans(a), b, tl.zeros((2 * DIM_PAD, 2 * DIM_PAD), dtype=tl.float32), input_precision=precision)
