"""Host side of the kernels: checks, launch geometry, workspaces, and the two passes of each
direction. The custom ops in op.py call attention_forward / attention_backward.
"""
import contextlib
import dataclasses
import functools
import os
from typing import Optional

import torch
import triton

from ..cached_launch import launch
from ..checks import TRITON_DTYPES, check_triton_inputs
from ..device import on_device
from .backward import key_value_grad_kernel, query_grad_state_kernel
from .forward import kv_state_kernel, output_kernel, sum_partials_kernel

SUPPORTED_DTYPES = TRITON_DTYPES
# Programs to aim for per SM in a pass: enough to hide memory latency with several resident. Where
# that would leave each program fewer than MIN_BLOCKS_PER_PROGRAM blocks (MLLA-T stages 3-4), the
# backward runs FEW_BLOCKS_PROGRAMS_PER_SM with twice the blocks each (its fp32 kernels hold
# ~210-255 registers a thread, two programs resident per SM; the v9 sweep on an H200 timed it 7-9%
# faster there). The forward's reducing pass runs fewer programs too where that leaves few enough
# partial states for the output pass to add up itself (FOLD_MAX_PARTIALS; v13 sweep: -3% fwd+bwd
# at stage 4 against folding 16 partials from 4 programs per SM, slower at stage 2 where it would
# not fold; how many: FEW_BLOCKS_REDUCE_PROGRAMS_PER_SM_FORWARD).
PROGRAMS_PER_SM = 4
FEW_BLOCKS_PROGRAMS_PER_SM = 2
MIN_BLOCKS_PER_PROGRAM = 4
# Under that rule the backward's applying pass (key_value_grad_kernel: ~208 registers a thread in
# fp32 as the compiler chooses, ~155 in bf16) runs 3 programs per SM, its registers capped so that
# 3 fit (65536 / (3 x 128 threads) -> 168; no spills in fp32 or bf16 at 4 warps, compiler report,
# triton 3.6); not where the cap would not let 3 fit (8 warps, d = 64). H200 sweep (NOTES.md v23):
# its time 13.0 -> 11.6 us at MLLA-B stage 4 fp32, 24.0 -> 21.0 at stage 3; fwd+bwd -2..5% at
# MLLA-B stages 3-4 and MLLA-T stage 3. The backward's reducing pass keeps 2 per SM: capping
# query_grad_state_kernel (~250 registers) to fit 3 spilled and ran slower everywhere.
FEW_BLOCKS_APPLY_PROGRAMS_PER_SM_BACKWARD = 3
FEW_BLOCKS_APPLY_MAX_REGISTERS_BACKWARD = 168
REGISTERS_PER_SM = 65536  # sm_80 / sm_90
# The forward's reducing pass under the same rule: the first of these programs per SM whose
# partial states the output pass can still fold (FOLD_MAX_PARTIALS); otherwise as many as the
# rest of the forward. kv_state (~70-90 registers) fits 3 per SM. H200 sweep (NOTES.md v25): 3
# rather than 2 at MLLA-B stage 4 (8 partials instead of 6) made the fp32 forward 18.5 -> 17.5 us,
# fwd+bwd -3%; at MLLA-T stage 3, 3 per SM would leave 21 partials for an extra summing kernel
# (+12% forward), so 2 there.
FEW_BLOCKS_REDUCE_PROGRAMS_PER_SM_FORWARD = (3, 2)
# Software pipelining depth of the token loops (Triton's num_stages): Triton's default of 3, and 2
# where a program runs only a few blocks (the rule above). Measured on an H100 (NOTES.md v16):
# MLLA-T stage 4 fp32 fwd+bwd 6% faster at 2 (bf16 and stage 3 unchanged); 2 at stage 1 was up to
# 11% slower (bf16 forward) and 4 was slower everywhere.
NUM_STAGES = 3
FEW_BLOCKS_NUM_STAGES = 2
# How the small matrix products (BLOCK_N x d x d per block) run: "ieee" (exact fp32 products on
# the FMA units), "tf32x3" (tensor cores, three tf32 products per fp32 one: fp32-level error) or
# "tf32" (tensor cores, one product on operands rounded to 10 mantissa bits). The operands are
# phi(x) after RoPE in fp32 whatever the input dtype. Defaults per input dtype and pass (state,
# output, backward), from the H200 sweeps (NOTES.md v6, v7, v9): fp32 keeps fp32 accuracy with
# ieee in the state pass (~90 registers instead of ~150 with tf32x3 as launched, so more programs
# fit per SM: 38 vs 54 us at MLLA-T stage 1) and tf32x3 in the output pass (29 vs 38 us) and the backward
# (0.26 vs 0.44 ms fwd+bwd); 16-bit inputs carry 8-11 mantissa bits, so tf32's rounding is below
# their own. MLLA_DOT_MODE forces one mode for every dtype and pass.
DOT_MODES = ("ieee", "tf32", "tf32x3")
DIRECTIONS = ("forward", "backward")
PASSES = ("state", "output", "backward")
FORWARD_PASSES = ("state", "output")
DEFAULT_DOT_MODES = {torch.float32: ("ieee", "tf32x3", "tf32x3"), torch.float16: ("tf32", "tf32", "tf32"),
                     torch.bfloat16: ("tf32", "tf32", "tf32")}
_DOT_MODE_FORCED = os.environ.get("MLLA_DOT_MODE") or None
if _DOT_MODE_FORCED is not None and _DOT_MODE_FORCED not in DOT_MODES:
    raise ValueError(f"MLLA_DOT_MODE must be one of {DOT_MODES}, got {_DOT_MODE_FORCED!r}")


# The deterministic sum of the per-split partial states: at most MAX_BLOCK_SPLITS partials per step,
# BLOCK_STATE entries of a head per program, halved from MAX_BLOCK_STATE down to MIN_BLOCK_STATE
# while that leaves fewer than SUM_PROGRAMS_PER_SM programs per SM (MLLA-T stage 1 has 4 heads:
# 68 programs of 64 entries for 132 SMs).
SUM_MAX_BLOCK_SPLITS = 64
SUM_MAX_BLOCK_STATE = 64
SUM_MIN_BLOCK_STATE = 16
SUM_PROGRAMS_PER_SM = 2
# Up to this many partial states per head, each program of the pass that needs the state adds them
# up itself (4 KB apiece at d = 32, read from L2) instead of a summing kernel running in between.
FOLD_MAX_PARTIALS = 16


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    block_n: int          # tokens per block; >= 16 for tl.dot
    splits: int           # programs per (batch, head) along the tokens
    tokens_per_split: int  # a multiple of block_n
    num_warps: int
    reduce_splits: int    # the same two for the pass that reduces over the tokens
    reduce_tokens_per_split: int
    num_stages: int       # software pipelining depth of the token loops
    reduce_num_stages: int  # the same for the reducing pass
    fast_trig: bool       # RoPE's cos/sin on the special function unit (rope_cos_sin's FAST_TRIG)
    max_registers: Optional[int] = None  # Triton's maxnreg for the applying pass (None: the compiler's choice)
    reduce_max_registers: Optional[int] = None  # the same for the reducing pass


_overrides: dict = {}


@contextlib.contextmanager
def launch_overrides(**kwargs):
    """Force block_n (both directions) / block_n_forward / block_n_backward / splits /
    programs_per_sm / reduce_splits and reduce_programs_per_sm (the reducing pass only) /
    programs_per_sm_forward / programs_per_sm_backward (that direction's applying pass, within the
    few-blocks rule) / reduce_programs_per_sm_forward / reduce_programs_per_sm_backward /
    max_registers[_forward|_backward] and reduce_max_registers[_forward|_backward] (Triton's maxnreg of
    the applying / reducing pass) /
    fold_max_partials (0: never fold) / sum_block_state / num_warps (both directions) /
    num_warps_forward / num_warps_backward / num_stages (both directions) / num_stages_forward /
    num_stages_backward / fast_trig / fast_trig_forward / fast_trig_backward (True / False) /
    dot_mode (every pass) / dot_mode_forward (both forward passes) / dot_mode_state /
    dot_mode_output / dot_mode_backward: tests use it to get many splits
    and partial blocks from a few dozen tokens under the interpreter, the benchmark to sweep
    launch shapes."""
    mode_keys = {"dot_mode", "dot_mode_forward", *(f"dot_mode_{name}" for name in PASSES)}
    unknown = set(kwargs) - mode_keys - {"block_n", "block_n_forward", "block_n_backward", "splits",
                                         "num_warps", "num_warps_forward",
                                         "num_warps_backward", "num_stages", "num_stages_forward",
                                         "num_stages_backward", "fast_trig", "fast_trig_forward",
                                         "fast_trig_backward", "programs_per_sm",
                                         "reduce_splits", "reduce_programs_per_sm", "fold_max_partials",
                                         "sum_block_state",
                                         *(f"{name}{suffix}" for name in ("programs_per_sm", "reduce_programs_per_sm")
                                           for suffix in ("_forward", "_backward")),
                                         *(f"{name}{suffix}" for name in ("max_registers", "reduce_max_registers")
                                           for suffix in ("", "_forward", "_backward"))}
    if unknown:
        raise TypeError(f"unknown launch overrides {sorted(unknown)}")
    for key in mode_keys & set(kwargs):
        if kwargs[key] not in DOT_MODES:
            raise ValueError(f"{key} must be one of {DOT_MODES}, got {kwargs[key]!r}")
    saved = dict(_overrides)
    _overrides.update(kwargs)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_config(num_tokens: int, batch_heads: int, head_dim: int, device: torch.device,
                  direction: str) -> LaunchConfig:
    """Tile, split and warp counts of one direction ("forward" or "backward") at this shape."""
    # Called once per direction on the host's critical path: remember the answers.
    key = (num_tokens, batch_heads, head_dim, device.type, device.index, direction,
           tuple(sorted(_overrides.items())))
    cfg = _launch_configs.get(key)
    if cfg is None:
        cfg = _launch_configs[key] = _new_launch_config(num_tokens, batch_heads, head_dim, device, direction)
    return cfg


_launch_configs: dict = {}


def _new_launch_config(num_tokens: int, batch_heads: int, head_dim: int, device: torch.device,
                       direction: str) -> LaunchConfig:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    # Tile shapes from the compiler's register reports and the H200 sweeps (NOTES.md v3, v5, v6):
    # d = 64 spills at 32 tokens, so 16 there with 8 warps; at d <= 32, 64-token tiles and 4 warps
    # in both directions (fewest instructions per token; 8 warps or 32 tokens were slower at
    # every stage in the sweeps).
    wide_head = triton.next_power_of_2(head_dim) > 32
    block_n = _override("block_n", direction) or (16 if wide_head else 64)
    num_warps = _override("num_warps", direction) or (8 if wide_head else 4)
    blocks = triton.cdiv(num_tokens, block_n)
    programs_per_sm = _overrides.get("programs_per_sm") or PROGRAMS_PER_SM
    splits = _overrides.get("splits") or _splits(batch_heads, device, programs_per_sm)
    reduce_splits = splits
    few_blocks = device.type == "cuda" and not {"splits", "programs_per_sm"} & set(_overrides) \
        and blocks < MIN_BLOCKS_PER_PROGRAM * splits
    num_stages = _override("num_stages", direction) or (FEW_BLOCKS_NUM_STAGES if few_blocks else NUM_STAGES)
    max_registers = None
    if few_blocks:
        few_blocks_splits = _splits(batch_heads, device, FEW_BLOCKS_PROGRAMS_PER_SM)
        if direction == "backward":
            splits = reduce_splits = few_blocks_splits
            if (num_warps * 32 * FEW_BLOCKS_APPLY_PROGRAMS_PER_SM_BACKWARD * FEW_BLOCKS_APPLY_MAX_REGISTERS_BACKWARD
                    <= REGISTERS_PER_SM):
                splits = _splits(batch_heads, device, FEW_BLOCKS_APPLY_PROGRAMS_PER_SM_BACKWARD)
                max_registers = FEW_BLOCKS_APPLY_MAX_REGISTERS_BACKWARD
        else:
            for programs in FEW_BLOCKS_REDUCE_PROGRAMS_PER_SM_FORWARD:
                candidate = _splits(batch_heads, device, programs)
                if _split(blocks, block_n, candidate)[0] <= FOLD_MAX_PARTIALS:
                    reduce_splits = candidate
                    break
    if f"programs_per_sm_{direction}" in _overrides:
        splits = _splits(batch_heads, device, _overrides[f"programs_per_sm_{direction}"])
    reduce_programs = _override("reduce_programs_per_sm", direction)
    if "reduce_splits" in _overrides or reduce_programs:
        reduce_splits = _overrides.get("reduce_splits") or _splits(batch_heads, device, reduce_programs)
    reduce_splits, reduce_tokens_per_split = _split(blocks, block_n, reduce_splits)
    reduce_num_stages = num_stages
    if (few_blocks and direction == "forward" and _override("num_stages", direction) is None
            and reduce_tokens_per_split >= MIN_BLOCKS_PER_PROGRAM * block_n):
        reduce_num_stages = NUM_STAGES
    fast_trig = _override("fast_trig", direction)
    if fast_trig is None:
        fast_trig = device.type == "cuda"
    elif fast_trig and device.type != "cuda":
        raise ValueError("fast_trig needs compiled kernels on a CUDA device (the interpreter has no sin.approx)")
    max_registers = _override("max_registers", direction) or max_registers
    reduce_max_registers = _override("reduce_max_registers", direction)
    return LaunchConfig(block_n, *_split(blocks, block_n, splits), num_warps, reduce_splits, reduce_tokens_per_split,
                        num_stages, reduce_num_stages, bool(fast_trig), max_registers, reduce_max_registers)


def _override(name: str, direction: str):
    """launch_overrides' value of `name` for this direction: name_direction's, else name's, else None."""
    for key in (f"{name}_{direction}", name):
        if key in _overrides:
            return _overrides[key]
    return None


def _splits(batch_heads: int, device: torch.device, programs_per_sm: int) -> int:
    """Programs per (batch, head) for programs_per_sm on every SM (2 off the GPU: the interpreter)."""
    if device.type != "cuda":
        return 2
    return triton.cdiv(programs_per_sm * _sm_count(device.index or 0), batch_heads)


def _split(blocks: int, block_n: int, splits: int):
    """(splits, tokens_per_split): runs of whole blocks, none empty."""
    splits = max(1, min(splits, blocks))
    blocks_per_split = triton.cdiv(blocks, splits)
    return triton.cdiv(blocks, blocks_per_split), blocks_per_split * block_n


def _padded(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def check_offsets_fit(block_n: int, dim_pad: int, *tensors: torch.Tensor) -> None:
    """The kernels address a block of tokens by int32 offsets from the block's first row."""
    for t in tensors:
        reach = (block_n - 1) * abs(t.stride(1)) + (dim_pad - 1) * abs(t.stride(2))
        if reach >= 2 ** 31:
            raise ValueError(f"a tensor of shape {tuple(t.shape)} with strides {t.stride()} spans more than 2**31 "
                             f"elements within one block of {block_n} tokens; pass a contiguous tensor")


def _geometry(v: torch.Tensor, num_heads: int):
    batch, num_tokens, channels = v.shape
    head_dim = channels // num_heads
    return batch, num_tokens, channels, head_dim, _padded(head_dim)


def dot_mode(dtype: torch.dtype, pass_name: str) -> str:
    """The product mode of one pass ("state", "output" or "backward") for inputs of this dtype:
    override of the pass > dot_mode_forward (forward passes) > dot_mode > MLLA_DOT_MODE > default."""
    forward = _overrides.get("dot_mode_forward") if pass_name in FORWARD_PASSES else None
    return (_overrides.get(f"dot_mode_{pass_name}") or forward or _overrides.get("dot_mode") or _DOT_MODE_FORCED
            or DEFAULT_DOT_MODES[dtype][PASSES.index(pass_name)])


def _launch_pass(kernel, grid, args: tuple, cfg: LaunchConfig, reducing: bool = False, **constexprs) -> None:
    """A kernel with a token loop, at cfg's block of tokens, warps and pipelining depth (the
    reducing pass's depth if `reducing`)."""
    num_stages = cfg.reduce_num_stages if reducing else cfg.num_stages
    max_registers = cfg.reduce_max_registers if reducing else cfg.max_registers
    launch(kernel, grid, args, cfg.num_warps, num_stages, max_registers, BLOCK_N=cfg.block_n, **constexprs)


def _reduce_over_tokens(kernel, pointers: tuple, rest: tuple, batch_heads: int, state_size: int,
                        cfg: LaunchConfig, deterministic: bool, device: torch.device, **meta):
    """Run a (batch_heads, reduce_splits) reduction kernel; return (sums, partials): sums is
    (batch_heads, partials, state_size), the state of each head in `partials` parts that add up to
    it, in order (load_state adds them where they are used).

    Deterministic: each split writes its own partial; more than fold_max_partials are summed here
    by sum_partials_kernel in a fixed order. Otherwise the splits add into one zeroed buffer with
    fp32 atomics (order varies run to run).
    """
    splits = cfg.reduce_splits
    grid = (batch_heads, splits)
    if splits == 1 or not deterministic:
        alloc = torch.empty if splits == 1 else torch.zeros
        state = alloc((batch_heads, 1, state_size), dtype=torch.float32, device=device)
        _launch_pass(kernel, grid, (*pointers, state, *rest, state_size, 0), cfg, reducing=True, ATOMIC=splits > 1,
                     **meta)
        return state, 1
    partials = torch.empty((batch_heads, splits, state_size), dtype=torch.float32, device=device)
    _launch_pass(kernel, grid, (*pointers, partials, *rest, splits * state_size, state_size), cfg, reducing=True,
                 ATOMIC=False, **meta)
    if splits <= _overrides.get("fold_max_partials", FOLD_MAX_PARTIALS):
        return partials, splits
    return _sum_partials(partials).view(batch_heads, 1, state_size), 1


def _sum_partials(partials: torch.Tensor) -> torch.Tensor:
    """(batch_heads, state_size): partials (batch_heads, splits, state_size) summed over the splits."""
    batch_heads, splits, state_size = partials.shape
    state = torch.empty((batch_heads, state_size), dtype=torch.float32, device=partials.device)
    block_splits = min(SUM_MAX_BLOCK_SPLITS, 1 << (splits - 1).bit_length())
    block_state = _overrides.get("sum_block_state") or _sum_block_state(batch_heads, state_size, partials.device)
    grid = (batch_heads, triton.cdiv(state_size, block_state))
    launch(sum_partials_kernel, grid, (partials, state, splits, state_size), 4, BLOCK_SPLITS=block_splits,
           BLOCK_STATE=block_state)
    return state


@functools.lru_cache(maxsize=None)
def _sum_block_state(batch_heads: int, state_size: int, device: torch.device) -> int:
    block_state = SUM_MAX_BLOCK_STATE
    if device.type == "cuda":
        wanted_programs = SUM_PROGRAMS_PER_SM * _sm_count(device.index or 0)
        while (block_state > SUM_MIN_BLOCK_STATE
               and batch_heads * triton.cdiv(state_size, block_state) < wanted_programs):
            block_state //= 2
    return block_state


def _output_buffer(buffer, shape, like: torch.Tensor, name: str) -> torch.Tensor:
    if buffer is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(buffer.shape) != tuple(shape) or buffer.dtype != like.dtype or buffer.device != like.device:
        raise ValueError(f"{name} must be {tuple(shape)} {like.dtype} on {like.device}, got "
                         f"{tuple(buffer.shape)} {buffer.dtype} on {buffer.device}")
    return buffer


def attention_forward(qk: torch.Tensor, v: torch.Tensor, height: int, width: int, num_heads: int,
                      deterministic: bool = True, out: torch.Tensor = None):
    """Returns (out (B, N, C) in v's dtype, state (B, heads, d*d + d) fp32).

    `out`, if given, must be a contiguous (B, N, C) tensor of v's dtype; it is filled in place
    (tests hand in a NaN-filled buffer to prove every element is written).
    """
    check_triton_inputs(qk, v, (height, width), num_heads)
    batch, num_tokens, channels, head_dim, dim_pad = _geometry(v, num_heads)
    batch_heads = batch * num_heads
    state_size = head_dim * head_dim + head_dim
    cfg = launch_config(num_tokens, batch_heads, head_dim, v.device, "forward")
    out = _output_buffer(out, (batch, num_tokens, channels), v, "out")
    check_offsets_fit(cfg.block_n, dim_pad, qk, v, out)
    meta = dict(HEAD_DIM=head_dim, DIM_PAD=dim_pad, FAST_TRIG=cfg.fast_trig)
    with on_device(v.device):
        sums, partials = _reduce_over_tokens(
            kv_state_kernel, (qk, v),
            (num_tokens, width, num_heads, channels // 4, cfg.reduce_tokens_per_split, *qk.stride(), *v.stride()),
            batch_heads, state_size, cfg, deterministic, v.device, DOT_MODE=dot_mode(v.dtype, "state"), **meta)
        state = sums.view(batch_heads, state_size) if partials == 1 else torch.empty(
            (batch_heads, state_size), dtype=torch.float32, device=v.device)
        _launch_pass(output_kernel, (batch_heads, cfg.splits),
                     (qk, sums, state, out, num_tokens, width, num_heads, channels // 4,
                      cfg.tokens_per_split, *qk.stride(), *out.stride()),
                     cfg, NUM_PARTIALS=partials, DOT_MODE=dot_mode(v.dtype, "output"), WRITE_STATE=partials > 1,
                     **meta)
    return out, state.view(batch, num_heads, state_size)


def attention_backward(grad_out: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, state: torch.Tensor,
                       height: int, width: int, num_heads: int, deterministic: bool = True,
                       grad_qk: torch.Tensor = None, grad_v: torch.Tensor = None):
    """Returns (grad_qk (B, N, 2C), grad_v (B, N, C)), contiguous, in the inputs' dtypes.

    grad_qk / grad_v, if given, are filled in place (tests hand in NaN-filled buffers).
    """
    batch, num_tokens, channels, head_dim, dim_pad = _geometry(v, num_heads)
    if grad_out.shape != v.shape:
        raise ValueError(f"grad_out must be {tuple(v.shape)}, got {tuple(grad_out.shape)}")
    batch_heads = batch * num_heads
    state_size = head_dim * head_dim + head_dim
    state = state.reshape(batch_heads, state_size)
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError("state must be the contiguous fp32 tensor the forward returned")
    cfg = launch_config(num_tokens, batch_heads, head_dim, v.device, "backward")
    grad_qk = _output_buffer(grad_qk, (batch, num_tokens, 2 * channels), qk, "grad_qk")
    grad_v = _output_buffer(grad_v, (batch, num_tokens, channels), v, "grad_v")
    check_offsets_fit(cfg.block_n, dim_pad, qk, v, grad_out, grad_qk, grad_v)
    meta = dict(HEAD_DIM=head_dim, DIM_PAD=dim_pad, DOT_MODE=dot_mode(v.dtype, "backward"),
                FAST_TRIG=cfg.fast_trig)
    with on_device(v.device):
        grad_sums, partials = _reduce_over_tokens(
            query_grad_state_kernel, (qk, grad_out, state, grad_qk),
            (num_tokens, width, num_heads, channels // 4, cfg.reduce_tokens_per_split,
             *qk.stride(), *grad_out.stride(), *grad_qk.stride()),
            batch_heads, state_size, cfg, deterministic, v.device, **meta)
        _launch_pass(key_value_grad_kernel, (batch_heads, cfg.splits),
                     (qk, v, grad_sums, grad_qk, grad_v, num_tokens, width, num_heads, channels // 4,
                      cfg.tokens_per_split, *qk.stride(), *v.stride(), *grad_qk.stride(), *grad_v.stride()),
                     cfg, NUM_PARTIALS=partials, **meta)
    return grad_qk, grad_v
