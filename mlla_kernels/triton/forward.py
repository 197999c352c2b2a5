"""Forward kernels: reduce each head's tokens to its state, then write the output.

State of a (batch, head), fp32, flat (d*d + d,): sum_m rope(phi(k_m))^T v_m (d x d, row = k
channel) followed by sum_m phi(k_m) (d). The output pass scales both by 1/N.
"""
import triton
import triton.language as tl

from ._common import (UNSPECIALISED_SIZES, block_mask, block_pointer, dot_operand, feature_map, head_pointer,
                      load_state, load_query_block, load_tile, matmul, matmul_parts, program_head, quadrants, rope,
                      rope_cos_sin, split_tf32, store_state, store_tile, tile_offsets, token_reduction, token_run)


@triton.jit(do_not_specialize=UNSPECIALISED_SIZES)
def kv_state_kernel(
    qk_ptr, v_ptr, state_ptr,
    num_tokens, width, num_heads, quarter_c, tokens_per_split,
    stride_qk_b, stride_qk_n, stride_qk_c, stride_v_b, stride_v_n, stride_v_c,
    stride_partial_bh, stride_partial_split,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    ATOMIC: tl.constexpr, DOT_MODE: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    """Program (bh, split) sums rope(phi(k))^T v and phi(k) over its run of tokens.

    Deterministic mode writes one partial per split (summed afterwards in a fixed order);
    ATOMIC adds straight into a zeroed state.
    """
    bh, split, batch, head = program_head(num_heads)
    k_offsets = tile_offsets(stride_qk_n, stride_qk_c, BLOCK_N, DIM_PAD)
    v_offsets = tile_offsets(stride_v_n, stride_v_c, BLOCK_N, DIM_PAD)
    k_base = head_pointer(qk_ptr, batch, (num_heads + head) * HEAD_DIM, stride_qk_b, stride_qk_c)
    v_base = head_pointer(v_ptr, batch, head * HEAD_DIM, stride_v_b, stride_v_c)

    kv = tl.zeros((DIM_PAD, DIM_PAD), dtype=tl.float32)
    # tf32x3: the block's KV as one 64-row product of the hi/lo parts side by side (see
    # query_grad_state_kernel), kv unused.
    kv_parts = tl.zeros((2 * DIM_PAD, 2 * DIM_PAD), dtype=tl.float32)
    # phi(k) summed elementwise over the blocks and across the tile's rows once at the end: no
    # cross-warp reduction per block.
    k_blocks = tl.zeros((BLOCK_N, DIM_PAD), dtype=tl.float32)
    start, end = token_run(split, tokens_per_split, num_tokens)
    for block_start in range(start, end, BLOCK_N):
        tokens = block_start + tl.arange(0, BLOCK_N)
        mask = block_mask(tokens, end, HEAD_DIM, DIM_PAD)
        k = tl.where(mask, feature_map(load_tile(block_pointer(k_base, block_start, stride_qk_n), k_offsets, mask)),
                     0.0)
        k_blocks += k
        cos, sin = rope_cos_sin(block_start, head, width, HEAD_DIM, DIM_PAD, quarter_c, BLOCK_N, FAST_TRIG)
        values = load_tile(block_pointer(v_base, block_start, stride_v_n), v_offsets, mask)
        if DOT_MODE == "tf32x3":
            rk_hi, rk_lo = split_tf32(rope(k, cos, sin, BLOCK_N, DIM_PAD))
            values_hi, values_lo = split_tf32(values)
            kv_parts += token_reduction(rk_hi, rk_lo, values_hi, values_lo, BLOCK_N, DIM_PAD, DOT_MODE)
        else:
            kv = matmul(tl.trans(rope(k, cos, sin, BLOCK_N, DIM_PAD)), values, kv, DOT_MODE)

    if DOT_MODE == "tf32x3":
        hi_hi, hi_lo, lo_hi, _ = quadrants(kv_parts, DIM_PAD)
        kv = hi_hi + (hi_lo + lo_hi)
    out_ptr = state_ptr + bh * stride_partial_bh + split * stride_partial_split
    store_state(out_ptr, kv, tl.sum(k_blocks, axis=0), HEAD_DIM, DIM_PAD, ATOMIC)


@triton.jit(do_not_specialize=UNSPECIALISED_SIZES)
def output_kernel(
    qk_ptr, partials_ptr, state_ptr, out_ptr,
    num_tokens, width, num_heads, quarter_c, tokens_per_split,
    stride_qk_b, stride_qk_n, stride_qk_c, stride_out_b, stride_out_n, stride_out_c,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr, NUM_PARTIALS: tl.constexpr,
    DOT_MODE: tl.constexpr, WRITE_STATE: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    """out_n = (rope(phi(q_n)) KV) / (phi(q_n) . kbar + eps) for program (bh, split)'s tokens.

    The state comes as NUM_PARTIALS partial sums that every program adds up itself (few partials:
    cheaper than a kernel launch to sum them); with WRITE_STATE, split 0 stores the total in
    state_ptr for the backward.
    """
    bh, split, batch, head = program_head(num_heads)
    q_offsets = tile_offsets(stride_qk_n, stride_qk_c, BLOCK_N, DIM_PAD)
    o_offsets = tile_offsets(stride_out_n, stride_out_c, BLOCK_N, DIM_PAD)
    q_base = head_pointer(qk_ptr, batch, head * HEAD_DIM, stride_qk_b, stride_qk_c)
    o_base = head_pointer(out_ptr, batch, head * HEAD_DIM, stride_out_b, stride_out_c)
    kv, kbar = load_state(partials_ptr, bh, NUM_PARTIALS, HEAD_DIM, DIM_PAD)
    if WRITE_STATE:
        if split == 0:
            store_state(state_ptr + bh * (HEAD_DIM * HEAD_DIM + HEAD_DIM), kv, kbar, HEAD_DIM, DIM_PAD, False)
    inv_n = 1.0 / (num_tokens * 1.0)
    kv = kv * inv_n
    kbar = kbar * inv_n
    kv_hi, kv_lo = dot_operand(kv, DOT_MODE)

    start, end = token_run(split, tokens_per_split, num_tokens)
    for block_start in range(start, end, BLOCK_N):
        tokens = block_start + tl.arange(0, BLOCK_N)
        mask = block_mask(tokens, end, HEAD_DIM, DIM_PAD)
        _, q, z = load_query_block(block_pointer(q_base, block_start, stride_qk_n), q_offsets, mask, kbar)
        cos, sin = rope_cos_sin(block_start, head, width, HEAD_DIM, DIM_PAD, quarter_c, BLOCK_N, FAST_TRIG)
        rq_hi, rq_lo = dot_operand(rope(q, cos, sin, BLOCK_N, DIM_PAD), DOT_MODE)
        unnormalized = matmul_parts(rq_hi, rq_lo, kv_hi, kv_lo, tl.zeros((BLOCK_N, DIM_PAD), dtype=tl.float32),
                                    DOT_MODE)
        store_tile(block_pointer(o_base, block_start, stride_out_n), o_offsets, mask, unnormalized * z[:, None])


@triton.jit
def sum_partials_kernel(
    partials_ptr, state_ptr, num_splits, state_size,
    BLOCK_SPLITS: tl.constexpr, BLOCK_STATE: tl.constexpr,
):
    """state[bh, i] = sum over s of partials[bh, s, i] (both contiguous), for program (bh, chunk)'s
    BLOCK_STATE entries: BLOCK_SPLITS partials at a time, always in the same order and grouping,
    so the sums are bitwise the same on every run."""
    bh = tl.program_id(0)
    entries = tl.program_id(1) * BLOCK_STATE + tl.arange(0, BLOCK_STATE)
    rows = tl.arange(0, BLOCK_SPLITS)
    base = partials_ptr + bh.to(tl.int64) * num_splits * state_size
    total = tl.zeros((BLOCK_STATE,), dtype=tl.float32)
    for first in range(0, num_splits, BLOCK_SPLITS):
        splits = first + rows
        mask = (splits < num_splits)[:, None] & (entries < state_size)[None, :]
        total += tl.sum(tl.load(base + splits[:, None] * state_size + entries[None, :], mask=mask, other=0.0), axis=0)
    tl.store(state_ptr + bh.to(tl.int64) * state_size + entries, total, mask=entries < state_size)
