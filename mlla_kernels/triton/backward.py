"""Backward kernels. Nothing of size N x C is saved by the forward: these recompute phi, RoPE and
the normalizer from the inputs and the per-head state.

With g = dout, per head (KV, kbar already scaled by 1/N), rq = rope(phi(q)), rk = rope(phi(k)):
    dz_n = (rq_n KV) . g_n = rq_n . (g_n KV^T),  w_n = -dz_n z_n^2
    dKV = sum_n z_n rq_n^T g_n,  dkbar = sum_n w_n phi(q_n)
    d rq_n = z_n g_n KV^T,  d phi(q_n) = unrope(d rq_n) + w_n kbar       (query_grad_state_kernel)
    d rk_m = v_m dKV^T / N,  d phi(k_m) = unrope(d rk_m) + dkbar / N
    dv_m = rk_m dKV / N                                                  (key_value_grad_kernel)
and dq, dk pass through phi'(t) = 1 if t > 0 else exp(t). The query side needs only the forward's
state, so it is written by the pass that reduces dKV: q and dout are read once.
"""
import triton
import triton.language as tl

from ._common import (UNSPECIALISED_SIZES, block_mask, block_pointer, dot_operand, feature_map, feature_map_grad,
                      feature_map_grad_from_phi, head_pointer, load_state, load_query_block, load_tile, matmul_parts,
                      program_head, quadrants, rope, rope_cos_sin, split_tf32, store_state, store_tile, tile_offsets,
                      token_reduction, token_run, unrope)


@triton.jit(do_not_specialize=UNSPECIALISED_SIZES)
def query_grad_state_kernel(
    qk_ptr, grad_ptr, state_ptr, grad_qk_ptr, grad_state_ptr,
    num_tokens, width, num_heads, quarter_c, tokens_per_split,
    stride_qk_b, stride_qk_n, stride_qk_c, stride_g_b, stride_g_n, stride_g_c,
    stride_gqk_b, stride_gqk_n, stride_gqk_c,
    stride_partial_bh, stride_partial_split,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    ATOMIC: tl.constexpr, DOT_MODE: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    """Program (bh, split) writes d(q) for its tokens and sums their dKV and dkbar (layout as the
    forward state)."""
    bh, split, batch, head = program_head(num_heads)
    q_offsets = tile_offsets(stride_qk_n, stride_qk_c, BLOCK_N, DIM_PAD)
    g_offsets = tile_offsets(stride_g_n, stride_g_c, BLOCK_N, DIM_PAD)
    gq_offsets = tile_offsets(stride_gqk_n, stride_gqk_c, BLOCK_N, DIM_PAD)
    q_base = head_pointer(qk_ptr, batch, head * HEAD_DIM, stride_qk_b, stride_qk_c)
    g_base = head_pointer(grad_ptr, batch, head * HEAD_DIM, stride_g_b, stride_g_c)
    gq_base = head_pointer(grad_qk_ptr, batch, head * HEAD_DIM, stride_gqk_b, stride_gqk_c)
    inv_n = 1.0 / (num_tokens * 1.0)
    kv, kbar = load_state(state_ptr, bh, 1, HEAD_DIM, DIM_PAD)
    kv = kv * inv_n
    kbar = kbar * inv_n
    kv_hi, kv_lo = dot_operand(kv, DOT_MODE)

    # dKV and dkbar are reduced over the tokens as one (2 DIM_PAD, 2 DIM_PAD) running sum (see
    # token_reduction). tf32x3: [rqz_hi | rqz_lo]^T [g_hi | g_lo], whose blocks are the four
    # hi/lo products of rqz^T g (dKV = all but lo*lo), dkbar summed apart in fp32 (elementwise over
    # the blocks, across the rows once at the end: no cross-warp reduction per block). Other modes:
    # [rqz | phi(q)]^T [g | w e_0]: dKV top left, dkbar the first column of the bottom right.
    sums = tl.zeros((2 * DIM_PAD, 2 * DIM_PAD), dtype=tl.float32)
    dkbar_tile = tl.zeros((BLOCK_N, DIM_PAD), dtype=tl.float32)
    first_column = (tl.arange(0, DIM_PAD) == 0)[None, :]
    start, end = token_run(split, tokens_per_split, num_tokens)
    for block_start in range(start, end, BLOCK_N):
        tokens = block_start + tl.arange(0, BLOCK_N)
        mask = block_mask(tokens, end, HEAD_DIM, DIM_PAD)
        zeros = tl.zeros((BLOCK_N, DIM_PAD), dtype=tl.float32)
        _, q, z = load_query_block(block_pointer(q_base, block_start, stride_qk_n), q_offsets, mask, kbar)
        cos, sin = rope_cos_sin(block_start, head, width, HEAD_DIM, DIM_PAD, quarter_c, BLOCK_N, FAST_TRIG)
        rq = rope(q, cos, sin, BLOCK_N, DIM_PAD)
        grad = load_tile(block_pointer(g_base, block_start, stride_g_n), g_offsets, mask)
        grad_hi, grad_lo = dot_operand(grad, DOT_MODE)
        # g KV^T serves both dz = (rq KV) . g = rq . (g KV^T) and d rq = z g KV^T: one product
        # where u = rq KV took a second. And as unrope is rope's transpose, rq . (g KV^T) =
        # phi(q) . unrope(g KV^T): one unrope serves dz and d phi(q) = z unrope(g KV^T) + w kbar.
        grad_kv = matmul_parts(grad_hi, grad_lo, tl.trans(kv_hi), tl.trans(kv_lo), zeros, DOT_MODE)
        unroped = unrope(grad_kv, cos, sin, BLOCK_N, DIM_PAD)
        w = -tl.sum(q * unroped, axis=1) * z * z
        # z scales rq's rows, not dout's: one split of z * dout serving both products has fewer
        # instructions but ran slower on an H200 (this kernel 75 -> 82 us, bf16, MLLA-T stage 1).
        rqz = rq * z[:, None]
        if DOT_MODE == "tf32x3":
            dkbar_tile += w[:, None] * q
            rqz_hi, rqz_lo = split_tf32(rqz)
            sums += token_reduction(rqz_hi, rqz_lo, grad_hi, grad_lo, BLOCK_N, DIM_PAD, DOT_MODE)
        else:
            sums += token_reduction(rqz, q, grad, tl.where(first_column, w[:, None], 0.0), BLOCK_N, DIM_PAD,
                                    DOT_MODE)
        dq = (unroped * z[:, None] + w[:, None] * kbar[None, :]) * feature_map_grad_from_phi(q)
        store_tile(block_pointer(gq_base, block_start, stride_gqk_n), gq_offsets, mask, dq)

    hi_hi, hi_lo, lo_hi, bottom_right = quadrants(sums, DIM_PAD)
    if DOT_MODE == "tf32x3":
        dkv = hi_hi + (hi_lo + lo_hi)
        dkbar = tl.sum(dkbar_tile, axis=0)
    else:
        dkv = hi_hi
        dkbar = tl.sum(bottom_right, axis=1)
    out_ptr = grad_state_ptr + bh * stride_partial_bh + split * stride_partial_split
    store_state(out_ptr, dkv, dkbar, HEAD_DIM, DIM_PAD, ATOMIC)


@triton.jit(do_not_specialize=UNSPECIALISED_SIZES)
def key_value_grad_kernel(
    qk_ptr, v_ptr, grad_partials_ptr, grad_qk_ptr, grad_v_ptr,
    num_tokens, width, num_heads, quarter_c, tokens_per_split,
    stride_qk_b, stride_qk_n, stride_qk_c, stride_v_b, stride_v_n, stride_v_c,
    stride_gqk_b, stride_gqk_n, stride_gqk_c, stride_gv_b, stride_gv_n, stride_gv_c,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr, NUM_PARTIALS: tl.constexpr,
    DOT_MODE: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    """Program (bh, split) writes d(k) and dv for its tokens; dKV and dkbar come as NUM_PARTIALS
    partial sums that it adds up itself (see output_kernel)."""
    bh, split, batch, head = program_head(num_heads)
    k_offsets = tile_offsets(stride_qk_n, stride_qk_c, BLOCK_N, DIM_PAD)
    gk_offsets = tile_offsets(stride_gqk_n, stride_gqk_c, BLOCK_N, DIM_PAD)
    v_offsets = tile_offsets(stride_v_n, stride_v_c, BLOCK_N, DIM_PAD)
    gv_offsets = tile_offsets(stride_gv_n, stride_gv_c, BLOCK_N, DIM_PAD)
    key_column = (num_heads + head) * HEAD_DIM
    k_base = head_pointer(qk_ptr, batch, key_column, stride_qk_b, stride_qk_c)
    gk_base = head_pointer(grad_qk_ptr, batch, key_column, stride_gqk_b, stride_gqk_c)
    v_base = head_pointer(v_ptr, batch, head * HEAD_DIM, stride_v_b, stride_v_c)
    gv_base = head_pointer(grad_v_ptr, batch, head * HEAD_DIM, stride_gv_b, stride_gv_c)
    # v and k see dKV and dkbar through the 1/N of the mean.
    inv_n = 1.0 / (num_tokens * 1.0)
    dkv, dkbar = load_state(grad_partials_ptr, bh, NUM_PARTIALS, HEAD_DIM, DIM_PAD)
    dkv = dkv * inv_n
    dkbar = dkbar * inv_n
    dkv_hi, dkv_lo = dot_operand(dkv, DOT_MODE)

    start, end = token_run(split, tokens_per_split, num_tokens)
    for block_start in range(start, end, BLOCK_N):
        tokens = block_start + tl.arange(0, BLOCK_N)
        mask = block_mask(tokens, end, HEAD_DIM, DIM_PAD)
        cos, sin = rope_cos_sin(block_start, head, width, HEAD_DIM, DIM_PAD, quarter_c, BLOCK_N, FAST_TRIG)
        zeros = tl.zeros((BLOCK_N, DIM_PAD), dtype=tl.float32)
        k_lin = load_tile(block_pointer(k_base, block_start, stride_qk_n), k_offsets, mask)
        rk = rope(tl.where(mask, feature_map(k_lin), 0.0), cos, sin, BLOCK_N, DIM_PAD)
        values = load_tile(block_pointer(v_base, block_start, stride_v_n), v_offsets, mask)
        values_hi, values_lo = dot_operand(values, DOT_MODE)
        drk = matmul_parts(values_hi, values_lo, tl.trans(dkv_hi), tl.trans(dkv_lo), zeros, DOT_MODE)
        dk = (unrope(drk, cos, sin, BLOCK_N, DIM_PAD) + dkbar[None, :]) * feature_map_grad(k_lin)
        store_tile(block_pointer(gk_base, block_start, stride_gqk_n), gk_offsets, mask, dk)
        rk_hi, rk_lo = dot_operand(rk, DOT_MODE)
        store_tile(block_pointer(gv_base, block_start, stride_gv_n), gv_offsets, mask,
                   matmul_parts(rk_hi, rk_lo, dkv_hi, dkv_lo, zeros, DOT_MODE))
