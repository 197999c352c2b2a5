"""How many Triton compiles the fused attention needs over the 1x pipeline's input sizes (computed).

    python benchmarks/attention_specialisations.py [--iters 20000] [--sms 132] [--json PATH]

CPU only, no kernel runs: the padded sizes of input_sizes.py, each stage's token map of MLLA-T at 2
images per batch, and the attention's launch configuration (mlla_kernels/triton/launch.py, for a
GPU of --sms SMs) give, per pass and direction, what Triton compiles a kernel for: the constexprs
and options that follow from the size (partials, pipelining depth, register cap, atomic or not)
and the integer arguments' specialisation (equal to 1, divisible by 16) of the token count and
the map's width. Reported: distinct compile keys after k iterations with those two integers
specialised (the kernels before 2026-12-07, sixth session) and unspecialised (Triton's
do_not_specialize: the kernels since, mlla_kernels/triton/_common.py UNSPECIALISED_SIZES).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import write_json  # noqa: E402
from benchmarks.input_sizes import padded_batch_sizes  # noqa: E402

MLLA_T = dict(channels=(64, 128, 256, 512), heads=(2, 4, 8, 16))
CHECKPOINTS = (20, 40, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


def compile_keys(height: int, width: int, stage: int, images: int, sms: int, specialise_sizes: bool) -> list:
    """The compile keys of one stage's attention, forward and backward, at a padded input size."""
    import mlla_kernels.triton.launch as launch
    launch._sm_count = lambda device_index: sms  # noqa: E731  (no GPU here: its SM count)
    device = torch.device("cuda", 0)
    stride = 4 * 2 ** stage  # the stem's 4, then 2 per downsampling
    map_h, map_w = -(-height // stride), -(-width // stride)
    tokens = map_h * map_w
    heads = MLLA_T["heads"][stage]
    head_dim = MLLA_T["channels"][stage] // heads
    sizes = (tokens % 16 == 0, map_w % 16 == 0, tokens == 1, map_w == 1) if specialise_sizes else ()
    keys = []
    for direction in ("forward", "backward"):
        cfg = launch._new_launch_config(tokens, images * heads, head_dim, device, direction)
        partials = cfg.reduce_splits if 1 < cfg.reduce_splits <= launch.FOLD_MAX_PARTIALS else 1
        common = (stage, direction) + sizes
        keys.append(("reduce",) + common + (cfg.reduce_splits > 1, cfg.reduce_num_stages, cfg.reduce_max_registers))
        keys.append(("apply",) + common + (partials, cfg.num_stages, cfg.max_registers))
    return keys


def count_keys(sizes, sms: int, specialise_sizes: bool, images: int = 2) -> dict:
    seen, after, iterations_with_new = set(), {}, []
    for index, (height, width) in enumerate(sizes):
        before = len(seen)
        for stage in range(4):
            seen.update(compile_keys(height, width, stage, images, sms, specialise_sizes))
        if len(seen) > before:
            iterations_with_new.append(index + 1)
        if index + 1 in CHECKPOINTS:
            after[index + 1] = len(seen)
    return dict(keys_after=after, iterations_with_new_keys=iterations_with_new)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20000)
    parser.add_argument("--sms", type=int, default=132, help="the GPU's SM count (H100 SXM: 132)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    sizes = padded_batch_sizes(args.iters)
    rows = []
    for specialise_sizes in (True, False):
        counted = count_keys(sizes, args.sms, specialise_sizes)
        late = [i for i in counted["iterations_with_new_keys"] if i > 500]
        rows.append(dict(sizes_specialised=specialise_sizes, sms=args.sms, iterations=args.iters,
                         keys_after=counted["keys_after"], iterations_with_new_keys_after_500=len(late)))
        label = "sizes specialised (before)" if specialise_sizes else "token count and width unspecialised (now)"
        print(f"{label:>42}: compile keys after k iterations {counted['keys_after']}; "
              f"iterations bringing new keys after 500: {len(late)}")
    if args.json:
        write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
