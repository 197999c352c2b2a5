"""Forward kernels: reduce each head's tokens to its state, then write the output.

State of a (batch, head), fp32, flat (d*d + d,): sum_m rope(k)_m^T v_m (d x d, row = k channel)
followed by sum_m k_m (d). The output pass scales both by 1/N.
"""
import triton
import triton.language as tl

from ._common import (apply_state, load_head_tile, load_mean_state, load_phi_pair_tiles, load_query_block,
                      matmul, program_head, rope_cos_sin, rotate, store_state, token_run)


@triton.jit
def kv_state_kernel(
    qk_ptr, v_ptr, state_ptr,
    num_tokens, width, num_heads, quarter_c, tokens_per_split,
    stride_qk_b, stride_qk_n, stride_qk_c, stride_v_b, stride_v_n, stride_v_c,
    stride_partial_bh, stride_partial_split,
    HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    ATOMIC: tl.constexpr, DOT_MODE: tl.constexpr,
):
    """Program (bh, split) sums phi(k), RoPE'd, against v over its run of tokens.

    Deterministic mode writes one partial per split (summed afterwards in a fixed order);
    ATOMIC adds straight into a zeroed state.
    """
    HALF_DIM = HEAD_DIM // 2
    bh, split, batch, head = program_head(num_heads)
    pairs = tl.arange(0, HALF_PAD)
    channels = tl.arange(0, DIM_PAD)
    pair_ok = pairs < HALF_DIM
    chan_ok = channels < HEAD_DIM

    k_base = qk_ptr + batch.to(tl.int64) * stride_qk_b + (num_heads + head) * HEAD_DIM * stride_qk_c
    v_base = v_ptr + batch.to(tl.int64) * stride_v_b + head * HEAD_DIM * stride_v_c

    kv_even = tl.zeros((HALF_PAD, DIM_PAD), dtype=tl.float32)
    kv_odd = tl.zeros((HALF_PAD, DIM_PAD), dtype=tl.float32)
    ksum_even = tl.zeros((HALF_PAD,), dtype=tl.float32)
    ksum_odd = tl.zeros((HALF_PAD,), dtype=tl.float32)

    start, end = token_run(split, tokens_per_split, num_tokens)
    for block_start in range(start, end, BLOCK_N):
        tokens = block_start + tl.arange(0, BLOCK_N)
        tok_ok = tokens < end
        mask = tok_ok[:, None] & pair_ok[None, :]
        _, _, k_even, k_odd = load_phi_pair_tiles(k_base, tokens, pairs, stride_qk_n, stride_qk_c, mask)
        ksum_even += tl.sum(k_even, axis=0)
        ksum_odd += tl.sum(k_odd, axis=0)

        cos, sin = rope_cos_sin(tokens, pairs, head, width, HALF_DIM, quarter_c)
        rk_even, rk_odd = rotate(k_even, k_odd, cos, sin)
        values = load_head_tile(v_base, tokens, channels, stride_v_n, stride_v_c, tok_ok[:, None] & chan_ok[None, :])
        kv_even = matmul(tl.trans(rk_even), values, kv_even, DOT_MODE)
        kv_odd = matmul(tl.trans(rk_odd), values, kv_odd, DOT_MODE)

    out_ptr = state_ptr + bh * stride_partial_bh + split * stride_partial_split
    store_state(out_ptr, pairs, channels, kv_even, kv_odd, ksum_even, ksum_odd, HEAD_DIM, HALF_DIM, ATOMIC)


@triton.jit
def output_kernel(
    qk_ptr, state_ptr, out_ptr,
    num_tokens, width, num_heads, quarter_c, tokens_per_split,
    stride_qk_b, stride_qk_n, stride_qk_c, stride_out_b, stride_out_n, stride_out_c,
    HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    """out_n = (rope(q)_n . KV) / (q_n . kbar + eps) for program (bh, split)'s tokens."""
    HALF_DIM = HEAD_DIM // 2
    bh, split, batch, head = program_head(num_heads)
    pairs = tl.arange(0, HALF_PAD)
    channels = tl.arange(0, DIM_PAD)
    pair_ok = pairs < HALF_DIM
    chan_ok = channels < HEAD_DIM
    inv_n = 1.0 / (num_tokens * 1.0)

    kv_even, kv_odd, kbar_even, kbar_odd = load_mean_state(state_ptr, bh, pairs, channels, inv_n, HEAD_DIM, HALF_DIM)

    q_base = qk_ptr + batch.to(tl.int64) * stride_qk_b + head * HEAD_DIM * stride_qk_c
    o_base = out_ptr + batch.to(tl.int64) * stride_out_b + head * HEAD_DIM * stride_out_c

    start, end = token_run(split, tokens_per_split, num_tokens)
    for block_start in range(start, end, BLOCK_N):
        tokens = block_start + tl.arange(0, BLOCK_N)
        tok_ok = tokens < end
        mask = tok_ok[:, None] & pair_ok[None, :]
        _, _, q_even, q_odd, z = load_query_block(q_base, tokens, pairs, mask, stride_qk_n, stride_qk_c,
                                                  kbar_even, kbar_odd)

        cos, sin = rope_cos_sin(tokens, pairs, head, width, HALF_DIM, quarter_c)
        rq_even, rq_odd = rotate(q_even, q_odd, cos, sin)
        out = apply_state(rq_even, rq_odd, kv_even, kv_odd, BLOCK_N, DIM_PAD, DOT_MODE) * z[:, None]

        ptrs = o_base + tokens.to(tl.int64)[:, None] * stride_out_n + channels[None, :] * stride_out_c
        tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=tok_ok[:, None] & chan_ok[None, :])
