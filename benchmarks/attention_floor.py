"""The floor of the fused attention's design: its four passes with the math taken out.

Each direction of the op is a pass that sums over all of a head's tokens, then a pass that uses
the sum on every token (the forward: KV and k_bar, then the output; the backward: dKV and
d(k_bar) while writing d(q), then d(k) and dv). This script runs a skeleton of those four kernels
with the op's own launch geometry (launch_config: grids, warps, pipelining depth, partial states
folded or summed as the op does) and the same memory traffic (every input tile read once, every
output tile written once, each program's partial state written and the head's partials read
back), but an elementwise product in place of RoPE, the feature map and the matrix products.
`--empty` also times the same grids with no token loop at all (launch and partial states only).

The CUDA-graph time of the skeleton is what the design costs before any math: the best ratio
against torch.compile that the op could reach at a shape is compile's time over the skeleton's.

    python benchmarks/attention_floor.py [--models T B] [--stages 3 4] [--dtypes fp32 bf16] [--json F]
    python benchmarks/attention_floor.py --cpu-sanity   # tiny shape in the Triton interpreter
"""
import argparse
import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

if "--cpu-sanity" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from benchmarks.attention import BATCH, DTYPES, MODELS, STAGE_GRIDS  # noqa: E402
from mlla_kernels.cached_launch import launch  # noqa: E402
from mlla_kernels.triton._common import (block_mask, block_pointer, head_pointer, load_state, load_tile,  # noqa: E402
                                          program_head, store_state, store_tile, tile_offsets, token_run)
from mlla_kernels.triton.launch import FOLD_MAX_PARTIALS, _padded, _sum_partials, launch_config  # noqa: E402


@triton.jit
def skeleton_reduce_kernel(
    x_ptr, y_ptr, out_ptr, partials_ptr,
    num_tokens, num_heads, tokens_per_split, x_first_head, y_first_head,
    stride_x_b, stride_x_n, stride_x_c, stride_y_b, stride_y_n, stride_y_c, stride_o_b, stride_o_n, stride_o_c,
    stride_partial_bh, stride_partial_split,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr, WRITE_OUT: tl.constexpr,
    SKIP_TOKENS: tl.constexpr,
):
    """Program (bh, split) reads its tokens' x and y tiles (writing x + y to out if WRITE_OUT, as
    the backward's first pass writes d(q)) and stores the column sums of x * y as a partial state
    of the op's size."""
    bh, split, batch, head = program_head(num_heads)
    x_offsets = tile_offsets(stride_x_n, stride_x_c, BLOCK_N, DIM_PAD)
    y_offsets = tile_offsets(stride_y_n, stride_y_c, BLOCK_N, DIM_PAD)
    o_offsets = tile_offsets(stride_o_n, stride_o_c, BLOCK_N, DIM_PAD)
    x_base = head_pointer(x_ptr, batch, (x_first_head + head) * HEAD_DIM, stride_x_b, stride_x_c)
    y_base = head_pointer(y_ptr, batch, (y_first_head + head) * HEAD_DIM, stride_y_b, stride_y_c)
    o_base = head_pointer(out_ptr, batch, head * HEAD_DIM, stride_o_b, stride_o_c)
    products = tl.zeros((BLOCK_N, DIM_PAD), dtype=tl.float32)
    start, end = token_run(split, tokens_per_split, num_tokens)
    if not SKIP_TOKENS:
        for block_start in range(start, end, BLOCK_N):
            mask = block_mask(block_start + tl.arange(0, BLOCK_N), end, HEAD_DIM, DIM_PAD)
            x = load_tile(block_pointer(x_base, block_start, stride_x_n), x_offsets, mask)
            y = load_tile(block_pointer(y_base, block_start, stride_y_n), y_offsets, mask)
            products += x * y
            if WRITE_OUT:
                store_tile(block_pointer(o_base, block_start, stride_o_n), o_offsets, mask, x + y)
    column_sums = tl.sum(products, axis=0)
    state = column_sums[:, None] + tl.zeros((DIM_PAD, DIM_PAD), dtype=tl.float32)
    store_state(partials_ptr + bh * stride_partial_bh + split * stride_partial_split, state, column_sums, HEAD_DIM,
                DIM_PAD, False)


@triton.jit
def skeleton_apply_kernel(
    x_ptr, y_ptr, partials_ptr, out_x_ptr, out_y_ptr,
    num_tokens, num_heads, tokens_per_split, x_first_head, y_first_head,
    stride_x_b, stride_x_n, stride_x_c, stride_y_b, stride_y_n, stride_y_c,
    stride_ox_b, stride_ox_n, stride_ox_c, stride_oy_b, stride_oy_n, stride_oy_c,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr, NUM_PARTIALS: tl.constexpr,
    HAS_Y: tl.constexpr, SKIP_TOKENS: tl.constexpr,
):
    """Program (bh, split) adds up its head's NUM_PARTIALS partial states (as the op's output and
    key_value_grad programs do) and writes s * x (and s * y if HAS_Y) for its tokens, s being the
    sum of the state's last d entries."""
    bh, split, batch, head = program_head(num_heads)
    _, column_sums = load_state(partials_ptr, bh, NUM_PARTIALS, HEAD_DIM, DIM_PAD)
    scale = tl.sum(column_sums, axis=0)
    x_offsets = tile_offsets(stride_x_n, stride_x_c, BLOCK_N, DIM_PAD)
    y_offsets = tile_offsets(stride_y_n, stride_y_c, BLOCK_N, DIM_PAD)
    ox_offsets = tile_offsets(stride_ox_n, stride_ox_c, BLOCK_N, DIM_PAD)
    oy_offsets = tile_offsets(stride_oy_n, stride_oy_c, BLOCK_N, DIM_PAD)
    x_base = head_pointer(x_ptr, batch, (x_first_head + head) * HEAD_DIM, stride_x_b, stride_x_c)
    y_base = head_pointer(y_ptr, batch, (y_first_head + head) * HEAD_DIM, stride_y_b, stride_y_c)
    ox_base = head_pointer(out_x_ptr, batch, (x_first_head + head) * HEAD_DIM, stride_ox_b, stride_ox_c)
    oy_base = head_pointer(out_y_ptr, batch, (y_first_head + head) * HEAD_DIM, stride_oy_b, stride_oy_c)
    start, end = token_run(split, tokens_per_split, num_tokens)
    if not SKIP_TOKENS:
        for block_start in range(start, end, BLOCK_N):
            mask = block_mask(block_start + tl.arange(0, BLOCK_N), end, HEAD_DIM, DIM_PAD)
            x = load_tile(block_pointer(x_base, block_start, stride_x_n), x_offsets, mask)
            store_tile(block_pointer(ox_base, block_start, stride_ox_n), ox_offsets, mask, x * scale)
            if HAS_Y:
                y = load_tile(block_pointer(y_base, block_start, stride_y_n), y_offsets, mask)
                store_tile(block_pointer(oy_base, block_start, stride_oy_n), oy_offsets, mask, y * scale)


def _reduce(x, y, out, x_first_head, y_first_head, num_heads, head_dim, cfg, skip_tokens):
    """The summing pass; returns (partials, how many per head) as the op's fold would see them."""
    batch, num_tokens, _ = x.shape
    state_size = head_dim * head_dim + head_dim
    batch_heads = batch * num_heads
    partials = torch.empty((batch_heads, cfg.reduce_splits, state_size), dtype=torch.float32, device=x.device)
    write_out = out is not None
    out = out if write_out else x
    launch(skeleton_reduce_kernel, (batch_heads, cfg.reduce_splits),
           (x, y, out, partials, num_tokens, num_heads, cfg.reduce_tokens_per_split, x_first_head, y_first_head,
            *x.stride(), *y.stride(), *out.stride(), cfg.reduce_splits * state_size, state_size),
           cfg.num_warps, cfg.reduce_num_stages, HEAD_DIM=head_dim, DIM_PAD=_padded(head_dim), BLOCK_N=cfg.block_n,
           WRITE_OUT=write_out, SKIP_TOKENS=skip_tokens)
    if cfg.reduce_splits <= FOLD_MAX_PARTIALS:
        return partials, cfg.reduce_splits
    return _sum_partials(partials).view(batch_heads, 1, state_size), 1


def _apply(x, y, partials, num_partials, out_x, out_y, x_first_head, y_first_head, num_heads, head_dim, cfg,
           skip_tokens):
    batch, num_tokens, _ = x.shape
    has_y = y is not None
    y, out_y = (y, out_y) if has_y else (x, out_x)
    launch(skeleton_apply_kernel, (batch * num_heads, cfg.splits),
           (x, y, partials, out_x, out_y, num_tokens, num_heads, cfg.tokens_per_split, x_first_head, y_first_head,
            *x.stride(), *y.stride(), *out_x.stride(), *out_y.stride()),
           cfg.num_warps, cfg.num_stages, HEAD_DIM=head_dim, DIM_PAD=_padded(head_dim), BLOCK_N=cfg.block_n,
           NUM_PARTIALS=num_partials, HAS_Y=has_y, SKIP_TOKENS=skip_tokens)


def skeleton_forward(qk, v, num_heads, skip_tokens=False, out=None):
    """out = s_head * q, s_head = sum over the head's tokens and channels of k * v (the forward's
    traffic: k and v read by the summing pass, q read and out written by the second). `out`, if
    given, is filled in place."""
    head_dim = v.shape[2] // num_heads
    cfg = launch_config(v.shape[1], v.shape[0] * num_heads, head_dim, v.device, "forward")
    out = torch.empty_like(v) if out is None else out
    partials, num_partials = _reduce(qk, v, None, num_heads, 0, num_heads, head_dim, cfg, skip_tokens)
    _apply(qk, None, partials, num_partials, out, None, 0, 0, num_heads, head_dim, cfg, skip_tokens)
    return out


def skeleton_backward(grad, qk, v, num_heads, skip_tokens=False, grad_qk=None, grad_v=None):
    """grad_qk = (q + g | s_head * k), grad_v = s_head * v, s_head = sum of q * g over the head
    (the backward's traffic: q and dout read and d(q) written by the summing pass, k and v read
    and d(k), dv written by the second). grad_qk / grad_v, if given, are filled in place."""
    head_dim = v.shape[2] // num_heads
    cfg = launch_config(v.shape[1], v.shape[0] * num_heads, head_dim, v.device, "backward")
    grad_qk = torch.empty_like(qk) if grad_qk is None else grad_qk
    grad_v = torch.empty_like(v) if grad_v is None else grad_v
    partials, num_partials = _reduce(qk, grad, grad_qk, 0, 0, num_heads, head_dim, cfg, skip_tokens)
    _apply(qk, v, partials, num_partials, grad_qk, grad_v, num_heads, 0, num_heads, head_dim, cfg, skip_tokens)
    return grad_qk, grad_v


def expected_skeleton(qk, v, grad, num_heads):
    """What the skeleton computes, in float64 torch."""
    qk, v, grad = qk.double(), v.double(), grad.double()
    batch, num_tokens, channels = v.shape
    head_dim = channels // num_heads
    q, k = qk[..., :channels], qk[..., channels:]

    def head_sums(a, b):
        return (a * b).view(batch, num_tokens, num_heads, head_dim).sum(dim=(1, 3))[:, None, :, None]

    def per_head(t):
        return t.view(batch, num_tokens, num_heads, head_dim)

    out = (per_head(q) * head_sums(k, v)).view_as(v)
    s = head_sums(q, grad)
    grad_qk = torch.cat([q + grad, (per_head(k) * s).view_as(v)], dim=-1)
    return out, grad_qk, (per_head(v) * s).view_as(v)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["T", "B"], choices=list(MODELS))
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3, 4], choices=[1, 2, 3, 4])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--empty", action="store_true", help="also time the grids with no token loop")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--cpu-sanity", action="store_true",
                        help="check the skeleton's results at a tiny shape in the Triton interpreter, no timing")
    return parser.parse_args(argv)


def check_skeleton(device, height=5, width=7, channels=32, heads=2, seed=0):
    """Relative errors of the skeleton's out, grad_qk, grad_v against expected_skeleton, at a small
    shape with 16-token blocks and 3 splits (several partial states, a partial last block), into
    NaN-filled buffers so an unwritten element shows."""
    from mlla_kernels.triton import launch_overrides
    gen = torch.Generator().manual_seed(seed)
    qk, v, grad = (torch.randn(2, height * width, c, generator=gen).to(device) for c in (2 * channels, channels,
                                                                                         channels))
    got = [torch.full_like(t, float("nan")) for t in (v, qk, v)]
    with launch_overrides(block_n=16, splits=3):
        skeleton_forward(qk, v, heads, out=got[0])
        skeleton_backward(grad, qk, v, heads, grad_qk=got[1], grad_v=got[2])
    return [((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, expected_skeleton(qk, v, grad, heads), strict=True)]


def time_shape(model, stage, dtype_name, empty):
    """One row: the fused op's and the skeleton's CUDA-graph times (us) at a stage shape."""
    from benchmarks.attention import forward_backward_runner, forward_runner, make_sets
    from mlla_kernels.triton import linear_attention_triton
    bench = triton.testing.do_bench_cudagraph
    (height, width), channels, heads = STAGE_GRIDS[stage - 1], MODELS[model][0][stage - 1], MODELS[model][1][stage - 1]
    sets = make_sets(BATCH, height * width, channels, DTYPES[dtype_name], "cuda", False)[:4]
    sets_grad = [(qk.detach().requires_grad_(), v.detach().requires_grad_(), g) for qk, v, g in sets]
    row = dict(model=model, stage=stage, dtype=dtype_name, device=torch.cuda.get_device_name())
    fused = functools.partial(linear_attention_triton, hw_shape=(height, width), num_heads=heads)
    row["fwd_fused_us"] = 1e3 * bench(forward_runner(fused, sets), rep=40, return_mode="median")
    row["fwd_bwd_fused_us"] = 1e3 * bench(forward_backward_runner(fused, sets_grad), rep=40, return_mode="median")
    for name, skip_tokens in [("skeleton", False)] + ([("empty", True)] if empty else []):
        calls = [0]

        def forward(calls=calls, skip_tokens=skip_tokens):
            qk, v, _ = sets[calls[0] % len(sets)]
            calls[0] += 1
            skeleton_forward(qk, v, heads, skip_tokens)

        def forward_backward(calls=calls, skip_tokens=skip_tokens):
            qk, v, grad = sets[calls[0] % len(sets)]
            calls[0] += 1
            skeleton_forward(qk, v, heads, skip_tokens)
            skeleton_backward(grad, qk, v, heads, skip_tokens)
        row[f"fwd_{name}_us"] = 1e3 * bench(forward, rep=40, return_mode="median")
        row[f"fwd_bwd_{name}_us"] = 1e3 * bench(forward_backward, rep=40, return_mode="median")
    return row


def main(argv=None):
    args = parse_args(argv)
    if args.cpu_sanity:
        errors = check_skeleton(torch.device("cpu"))
        print("skeleton relative errors (out, grad_qk, grad_v): " + ", ".join(f"{e:.1e}" for e in errors))
        return 0 if all(error < 1e-5 for error in errors) else 1
    if not torch.cuda.is_available():
        print("attention_floor.py times CUDA graphs: no CUDA device here (try --cpu-sanity)")
        return 0
    names = ("fused", "skeleton", "empty") if args.empty else ("fused", "skeleton")
    print("CUDA-graph time, us: " + " / ".join(names) + " (skeleton: the op's launches and traffic, no math)")
    rows = []
    for model in args.models:
        for stage in args.stages:
            for dtype_name in args.dtypes:
                row = time_shape(model, stage, dtype_name, args.empty)
                rows.append(row)
                cells = " | ".join(f"{mode} " + " / ".join(f"{row[f'{mode}_{name}_us']:.1f}" for name in names)
                                   for mode in ("fwd", "fwd_bwd"))
                print(f"{model} stage {stage} {dtype_name}: {cells}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
