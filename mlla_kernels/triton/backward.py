"""Backward kernels. Nothing of size N x C is saved by the forward: these recompute phi, RoPE and
the normalizer from the inputs and the per-head state.

With g = dout, per head (KV, kbar already scaled by 1/N):
    u_n = rope(q)_n KV,  dz_n = u_n . g_n,  w_n = -dz_n z_n^2
    dKV = sum_n z_n rope(q)_n^T g_n,  dkbar = sum_n w_n q_n          (grad_state_kernel)
    d rope(q)_n = z_n g_n KV^T,  dq_n = unrope(d rope(q)_n) + w_n kbar
    d rope(k)_m = v_m dKV^T / N,  dk_m = unrope(d rope(k)_m) + dkbar / N
    dv_m = rope(k)_m dKV / N,  and dq, dk pass through phi'(t) = 1 if t > 0 else exp(t)
                                                                     (input_grad_kernel)
"""
import triton
import triton.language as tl

from ._common import (apply_state, feature_map_grad, load_head_tile, load_mean_state, load_phi_pair_tiles,
                      load_query_block, matmul, program_head, rope_cos_sin, rotate, store_pair_tiles, store_state,
                      token_run, unrotate)


@triton.jit
def grad_state_kernel(
    qk_ptr, grad_ptr, state_ptr, grad_state_ptr,
    num_tokens, width, num_heads, quarter_c, tokens_per_split,
    stride_qk_b, stride_qk_n, stride_qk_c, stride_g_b, stride_g_n, stride_g_c,
    stride_partial_bh, stride_partial_split,
    HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    ATOMIC: tl.constexpr, DOT_MODE: tl.constexpr,
):
    """Program (bh, split) sums dKV and dkbar over its tokens; layout as the forward state."""
    HALF_DIM = HEAD_DIM // 2
    bh, split, batch, head = program_head(num_heads)
    pairs = tl.arange(0, HALF_PAD)
    channels = tl.arange(0, DIM_PAD)
    pair_ok = pairs < HALF_DIM
    chan_ok = channels < HEAD_DIM
    inv_n = 1.0 / (num_tokens * 1.0)

    kv_even, kv_odd, kbar_even, kbar_odd = load_mean_state(state_ptr, bh, pairs, channels, inv_n, HEAD_DIM, HALF_DIM)

    q_base = qk_ptr + batch.to(tl.int64) * stride_qk_b + head * HEAD_DIM * stride_qk_c
    g_base = grad_ptr + batch.to(tl.int64) * stride_g_b + head * HEAD_DIM * stride_g_c

    dkv_even = tl.zeros((HALF_PAD, DIM_PAD), dtype=tl.float32)
    dkv_odd = tl.zeros((HALF_PAD, DIM_PAD), dtype=tl.float32)
    dkbar_even = tl.zeros((HALF_PAD,), dtype=tl.float32)
    dkbar_odd = tl.zeros((HALF_PAD,), dtype=tl.float32)

    start, end = token_run(split, tokens_per_split, num_tokens)
    for block_start in range(start, end, BLOCK_N):
        tokens = block_start + tl.arange(0, BLOCK_N)
        tok_ok = tokens < end
        mask = tok_ok[:, None] & pair_ok[None, :]
        _, _, q_even, q_odd, z = load_query_block(q_base, tokens, pairs, mask, stride_qk_n, stride_qk_c,
                                                  kbar_even, kbar_odd)
        cos, sin = rope_cos_sin(tokens, pairs, head, width, HALF_DIM, quarter_c)
        rq_even, rq_odd = rotate(q_even, q_odd, cos, sin)
        grad = load_head_tile(g_base, tokens, channels, stride_g_n, stride_g_c, tok_ok[:, None] & chan_ok[None, :])

        unnormalized = apply_state(rq_even, rq_odd, kv_even, kv_odd, BLOCK_N, DIM_PAD, DOT_MODE)
        dz = tl.sum(unnormalized * grad, axis=1)
        w = -dz * z * z
        dkbar_even += tl.sum(w[:, None] * q_even, axis=0)
        dkbar_odd += tl.sum(w[:, None] * q_odd, axis=0)
        dkv_even = matmul(tl.trans(rq_even * z[:, None]), grad, dkv_even, DOT_MODE)
        dkv_odd = matmul(tl.trans(rq_odd * z[:, None]), grad, dkv_odd, DOT_MODE)

    out_ptr = grad_state_ptr + bh * stride_partial_bh + split * stride_partial_split
    store_state(out_ptr, pairs, channels, dkv_even, dkv_odd, dkbar_even, dkbar_odd, HEAD_DIM, HALF_DIM, ATOMIC)


@triton.jit
def input_grad_kernel(
    qk_ptr, v_ptr, grad_ptr, state_ptr, grad_state_ptr, grad_qk_ptr, grad_v_ptr,
    num_tokens, width, num_heads, quarter_c, tokens_per_split,
    stride_qk_b, stride_qk_n, stride_qk_c, stride_v_b, stride_v_n, stride_v_c,
    stride_g_b, stride_g_n, stride_g_c,
    stride_gqk_b, stride_gqk_n, stride_gqk_c, stride_gv_b, stride_gv_n, stride_gv_c,
    HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    """Program (bh, split) writes d(qk) (both halves) and dv for its tokens, in one pass."""
    HALF_DIM = HEAD_DIM // 2
    bh, split, batch, head = program_head(num_heads)
    pairs = tl.arange(0, HALF_PAD)
    channels = tl.arange(0, DIM_PAD)
    pair_ok = pairs < HALF_DIM
    chan_ok = channels < HEAD_DIM
    inv_n = 1.0 / (num_tokens * 1.0)

    kv_even, kv_odd, kbar_even, kbar_odd = load_mean_state(state_ptr, bh, pairs, channels, inv_n, HEAD_DIM, HALF_DIM)
    # v and k see dKV and dkbar through the 1/N of the mean.
    dkv_even, dkv_odd, dkbar_even, dkbar_odd = load_mean_state(grad_state_ptr, bh, pairs, channels, inv_n,
                                                               HEAD_DIM, HALF_DIM)

    batch64 = batch.to(tl.int64)
    q_base = qk_ptr + batch64 * stride_qk_b + head * HEAD_DIM * stride_qk_c
    k_base = q_base + num_heads * HEAD_DIM * stride_qk_c
    v_base = v_ptr + batch64 * stride_v_b + head * HEAD_DIM * stride_v_c
    g_base = grad_ptr + batch64 * stride_g_b + head * HEAD_DIM * stride_g_c
    gq_base = grad_qk_ptr + batch64 * stride_gqk_b + head * HEAD_DIM * stride_gqk_c
    gk_base = gq_base + num_heads * HEAD_DIM * stride_gqk_c
    gv_base = grad_v_ptr + batch64 * stride_gv_b + head * HEAD_DIM * stride_gv_c

    start, end = token_run(split, tokens_per_split, num_tokens)
    for block_start in range(start, end, BLOCK_N):
        tokens = block_start + tl.arange(0, BLOCK_N)
        tok_ok = tokens < end
        mask = tok_ok[:, None] & pair_ok[None, :]
        head_mask = tok_ok[:, None] & chan_ok[None, :]
        cos, sin = rope_cos_sin(tokens, pairs, head, width, HALF_DIM, quarter_c)

        # Query side.
        q_lin_even, q_lin_odd, q_even, q_odd, z = load_query_block(q_base, tokens, pairs, mask, stride_qk_n,
                                                                   stride_qk_c, kbar_even, kbar_odd)
        rq_even, rq_odd = rotate(q_even, q_odd, cos, sin)
        grad = load_head_tile(g_base, tokens, channels, stride_g_n, stride_g_c, head_mask)
        unnormalized = apply_state(rq_even, rq_odd, kv_even, kv_odd, BLOCK_N, DIM_PAD, DOT_MODE)
        w = -tl.sum(unnormalized * grad, axis=1) * z * z
        zero_half = tl.zeros((BLOCK_N, HALF_PAD), dtype=tl.float32)
        drq_even = matmul(grad, tl.trans(kv_even), zero_half, DOT_MODE) * z[:, None]
        drq_odd = matmul(grad, tl.trans(kv_odd), zero_half, DOT_MODE) * z[:, None]
        dq_even, dq_odd = unrotate(drq_even, drq_odd, cos, sin)
        dq_even = (dq_even + w[:, None] * kbar_even[None, :]) * feature_map_grad(q_lin_even)
        dq_odd = (dq_odd + w[:, None] * kbar_odd[None, :]) * feature_map_grad(q_lin_odd)
        store_pair_tiles(gq_base, tokens, pairs, stride_gqk_n, stride_gqk_c, mask, dq_even, dq_odd)

        # Key and value side.
        k_lin_even, k_lin_odd, k_even, k_odd = load_phi_pair_tiles(k_base, tokens, pairs, stride_qk_n, stride_qk_c,
                                                                   mask)
        rk_even, rk_odd = rotate(k_even, k_odd, cos, sin)
        values = load_head_tile(v_base, tokens, channels, stride_v_n, stride_v_c, head_mask)
        drk_even = matmul(values, tl.trans(dkv_even), zero_half, DOT_MODE)
        drk_odd = matmul(values, tl.trans(dkv_odd), zero_half, DOT_MODE)
        dk_even, dk_odd = unrotate(drk_even, drk_odd, cos, sin)
        dk_even = (dk_even + dkbar_even[None, :]) * feature_map_grad(k_lin_even)
        dk_odd = (dk_odd + dkbar_odd[None, :]) * feature_map_grad(k_lin_odd)
        store_pair_tiles(gk_base, tokens, pairs, stride_gqk_n, stride_gqk_c, mask, dk_even, dk_odd)

        dv = apply_state(rk_even, rk_odd, dkv_even, dkv_odd, BLOCK_N, DIM_PAD, DOT_MODE)
        ptrs = gv_base + tokens.to(tl.int64)[:, None] * stride_gv_n + channels[None, :] * stride_gv_c
        tl.store(ptrs, dv.to(grad_v_ptr.dtype.element_ty), mask=head_mask)
