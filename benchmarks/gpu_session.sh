#!/usr/bin/env bash
# Everything a GPU session checks and measures, as stages run in the order given; pick the stages
# so that one device call stays under 10 minutes. On the GPU machine, from the project's root,
# with .whl carried:
#   source .whl/prelude.sh && bash benchmarks/gpu_session.sh tests dwconv backbone
# Stages (rough H100/H200 wall time):
#   tests            all GPU tests (and the attention file's CPU tests on the GPU), three pytest processes side by
#                    side (~3.5 min, compiles included)
#   attention-sweep  launch shapes and product modes of the fused op at MLLA-T stages 1, 3 and 4, per-kernel
#                    times, host profile; no table (~1 min)
#   tests-attention  the attention file alone, every test on the GPU (~3 min)
#   attention-ncu    Nsight Compute stall sampling of the four kernels, one fp32 forward+backward at stage 4
#                    of MLLA-T and MLLA-B (needs ncu's hardware counters: Firecracker machines; ~1.5 min)
#   attention-floor  benchmarks/attention_floor.py: the fused op against a skeleton of its four passes (same
#                    launches and traffic, no math) and the same grids empty, MLLA-T and -B stages 1-4 (~1 min)
#   tests-no-dwconv  the tests stage without tests/test_dwconv.py (when only the attention changed; ~2 min)
#   attention        benchmarks/attention.py, MLLA-T and -B, the torch.compile graphs compiled by 8 workers
#                    side by side first (~2.5 min)
#   dwconv-sweep     launch shapes of the dwconv kernels at the four MLLA-T stages, CUDA-graph timed (~1 min)
#   dwconv           benchmarks/dwconv.py, fwd+bwd compiled once per conv (~2 min)
#   backbone         benchmarks/backbone.py T: eager, fused-attn, fused; train + inference (~2 min)
#   backbone-compile torch.compile of the eager and of the fused backbone, train, bf16 (~5 min:
#                    the eager fp32 one compiled in 121 s on an H200)
#   backbone-all     backbone.py T, every impl x mode x dtype in one run, compile caches warmed first by
#                    eight workers side by side (~8 min)
#   detector-all     the same for detector.py (~8 min)
#   backbone-graphs  backbone.py T, eager and fused, launched and replayed from CUDA graphs (make_graphed_callables),
#                    train + inference, fp32 + bf16 (~4 min)
#   backbone-compile-graphs  train, fp32 + bf16: torch.compile default and mode="reduce-overhead" of the eager and
#                    the fused backbone (compiled first by 8 workers side by side) beside eager, fused and
#                    fused-graph (~8 min)
#   detector-graphs  detector.py T, train: backbone + FPN (the default --compile-scopes) compiled in default and
#                    reduce-overhead (CUDA-graph) mode beside eager, fused-attn and fused (~7 min)
#   detector-scopes  detector.py T, train, bf16: eager and compile-fused-graph with each --compile-scopes,
#                    three interleaved rounds (~6 min)
#   detector-rounds  detector.py T, train, bf16: the paper's eager model (its per-parameter AdamW groups), the
#                    same with the config's optimizer, fused and compile-fused-graph (backbone + FPN), five
#                    interleaved rounds after one cold compile (~5 min)
#   detector-sections  detector.py --sections T, bf16: host and GPU time of forward, backward and optimizer
#                    update, eager (both optimizers) and fused (~1.5 min)
#   profile          backbone.py --profile T, train, fp32 and bf16: eager, fused-attn, fused (~2 min)
#   detector         benchmarks/detector.py T: eager, fused-attn, fused (~2 min)
#   detector-compile detector.py T with the backbone under torch.compile, train (~4 min)
#   bundle           pack everything in $OUT into $OUT/session.tgz (the device tool brings back
#                    at most 8 files); run it last
#   tests-graphs     BlockGraphsHook's GPU tests, both backends or the one GRAPHS_BACKEND names (~2.5 min)
#   train-graphs     train_throughput.py, TRAIN_ITERS iterations (120; medians after TRAIN_WARMUP, 40) each of
#                    TRAIN_VARIANTS (default: the defaults, the defaults with pinned batches, one fixed size;
#                    ~1.5 min each, ~3.5 min with the blocks' CUDA graphs), TRAIN_EVAL_IMAGES evaluation images
#                    (20), TRAIN_EXTRA more arguments (e.g. --prewarm), under TRAIN_TIMEOUT seconds (330)
#   train-gemm       GemmConvHook's GPU tests, linear_host_cost.py, then train_throughput.py: the defaults without
#                    GEMM convolutions against the defaults (host profile of both), 60 iterations (~5 min)
#   train-ratios     the GPU tests of the GEMM convolutions and the heads' utilities (GPU_TESTS_TIMEOUT), then
#                    train_throughput.py: a prewarm run of the defaults (Triton's disk cache; the host
#                    profile), RATIOS_VARIANTS (the two baselines given the per-size fixes, the defaults without
#                    and with the blocks' CUDA graphs: each new canvas costs two slow iterations, so give the
#                    graphs RATIOS_ITERS >= 150 and RATIOS_WARMUP ~50 for medians past the first canvases), RATIOS_ITERS
#                    (30) iterations and RATIOS_EVAL_IMAGES (8) evaluation images each, then the defaults
#                    in fp32 (RATIOS_FP32=0 skips; RATIOS_FP32_TIMEOUT, 200 s), prewarmed too (~10 min: a cold
#                    prewarm alone took 112 s on an H100; RATIOS_PREWARM=0 drops the prewarm process and its
#                    host profile, for when a carried triton_cache.tar.xz holds the kernels already; then
#                    RATIOS_HOST_PROFILE=N profiles N iterations of every variant instead)
#   train-precision  train_throughput.py, the defaults 50 iterations each: bf16 with the dynamic loss scale (the
#                    benchmark's default until 2026-12-07), bf16 without a loss scaler (tools/train.py --amp
#                    bf16, the default since), fp32 (~5 min)
#   shapes           the quick start: train, evaluate, render a prediction (~5 min a config), for each config
#                    in SHAPES_CONFIGS (default: the shipped one; e.g. add benchmarks/configs/shapes_fast_hooks.py),
#                    each under SHAPES_TIMEOUT seconds (560)
#   dist             2 GPUs x 2 images vs 1 GPU x 4 images, same iterations, then a rendered
#                    prediction (needs a 2-GPU machine; ~8 min on 2 x H200: run it alone)
#   save-triton-cache  Triton's cache (the kernels this call compiled) packed as $OUT/triton_cache.tar.xz
#                    when it is small enough to come back (16 MiB); run it last
# Triton's compiled kernels can travel between calls: a cold prewarm of the 1x pipeline spent
# ~110 s of a call compiling them (H100). Bring a triton_cache.tar.xz back with save-triton-cache,
# copy it into the project's root (git-ignored) and carry it with .whl: this script unpacks it into
# Triton's cache before the stages run (the same kernels on any sm_90 card; a changed kernel simply
# compiles again).
# Full logs and JSON go to $OUT (the device tool brings them back); short summaries print.
# The golden-data tests need ../shared/reference on the GPU machine too, where only the repository
# travels: once here, `mkdir -p shared && cp -r ../shared/reference shared/ && echo /shared/ >>
# .git/info/exclude`, then carry "shared" (30 MB) with ".whl".
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: gpu_session.sh STAGE... (see the header)" >&2; exit 2; }
out=${OUT:-/tmp/gpu_session}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
reference_dir=${MLLA_REFERENCE_DIR:-shared/reference}
[ -d "$reference_dir" ] || reference_dir=../shared/reference
export MLLA_REFERENCE_DIR=$reference_dir
triton_cache=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
export TRITON_CACHE_DIR=$triton_cache
if [ -f triton_cache.tar.xz ]; then
  mkdir -p "$triton_cache" && tar -C "$triton_cache" -xJf triton_cache.tar.xz \
    && echo "Triton cache: $(find "$triton_cache" -mindepth 1 -maxdepth 1 | wc -l) kernels unpacked from triton_cache.tar.xz"
fi

stamp() { echo "== $1 ($(date +%T))"; }
gpu_tests() { timeout "${GPU_TESTS_TIMEOUT:-400}" python3 -m pytest -m gpu -q -rf "$@"; }
# compile_then_time SCRIPT NAME MODES COLD_IMPLS TIMED_IMPLS TAIL_LINES: benchmarks/SCRIPT.py (MLLA-T) for
# MODES x fp32/bf16 in one timed run of TIMED_IMPLS, into $out/SCRIPT_NAME.{json,log}. First one worker
# process per (COLD_IMPLS entry, mode, dtype), side by side, compiles the torch.compile graphs, so that
# the timed run compiles from Inductor's on-disk caches; the workers' logs keep the cold compile times
# (first_call_s, inflated by compiling side by side) and their rows, timed while others compile.
compile_then_time() {
  local script=benchmarks/$1.py name=$1_$2 modes=$3 cold=$4 timed=$5 lines=$6 impl mode dtype
  for impl in $cold; do for mode in $modes; do for dtype in fp32 bf16; do
    timeout 300 python3 "$script" --arch t --impls "$impl" --modes "$mode" --dtypes "$dtype" --warmup-ms 0 \
      --rep-ms 1 --json "$out/${name}_cold_${impl}_${mode}_${dtype}.json" \
      > "$out/${name}_cold_${impl}_${mode}_${dtype}.log" 2>&1 &
  done; done; done
  wait
  grep -h -E "^\| +(train|inference)" "$out/${name}"_cold_*.log
  # shellcheck disable=SC2086  # the lists are word lists
  timeout 330 python3 "$script" --arch t --modes $modes --impls $timed --json "$out/$name.json" > "$out/$name.log" 2>&1
  tail -n "$lines" "$out/$name.log"
}

for stage in "$@"; do
  stamp "$stage"
  case "$stage" in
    tests|tests-no-dwconv|tests-attention)
      # Three pytest processes side by side: the dwconv file, the attention file, everything else.
      [ "$stage" = tests ] && gpu_tests tests/test_dwconv.py > "$out/gpu_tests_dwconv.log" 2>&1 &
      # The attention file whole: its interpreter tests (small shapes, forced launch shapes) run
      # on the GPU too.
      timeout 400 python3 -m pytest -q -rf tests/test_linear_attention_triton.py > "$out/gpu_tests_attention.log" 2>&1 &
      [ "$stage" != tests-attention ] && gpu_tests tests --ignore tests/test_dwconv.py \
        --ignore tests/test_linear_attention_triton.py > "$out/gpu_tests_other.log" 2>&1 &
      wait
      tail -n 6 "$out"/gpu_tests_*.log ;;
    attention-sweep)
      timeout 300 python3 benchmarks/attention.py --json "$out/attention_sweep.json" --sweep-budget-s 220 \
        --sweep-stages 1 3 4 --sweep-only --profile-host > "$out/attention_sweep.log" 2>&1
      grep -E "^sweep|^  kernel|^host" "$out/attention_sweep.log" ;;
    attention-ncu)
      for model in T B; do
        timeout 150 ncu --clock-control none --profile-from-start off \
          -k regex:'kv_state|output_kernel|query_grad_state|key_value_grad' --section WarpStateStats \
          --section SourceCounters -o "$out/ncu_${model}4" python3 benchmarks/attention.py --profiler-range "$model" 4 fp32 \
          > "$out/ncu_${model}4.log" 2>&1
        ncu --import "$out/ncu_${model}4.ncu-rep" --page source --csv --print-source sass > "$out/ncu_${model}4_source.csv" 2>&1
        ncu --import "$out/ncu_${model}4.ncu-rep" --page details > "$out/ncu_${model}4_details.txt" 2>&1
        grep -E "^  [a-z_]+kernel|Warp Cycles Per Issued|No Eligible" "$out/ncu_${model}4_details.txt"
      done ;;
    attention-floor)
      timeout 200 python3 benchmarks/attention_floor.py --empty --json "$out/attention_floor.json" \
        > "$out/attention_floor.log" 2>&1
      cat "$out/attention_floor.log" ;;
    attention)
      timeout 370 python3 benchmarks/attention.py --json "$out/attention.json" --compile-workers 8 \
        --compile-budget-s 150 > "$out/attention.log" 2>&1
      grep -E "^compile" "$out/attention.log"; tail -n 36 "$out/attention.log" ;;
    dwconv)
      timeout 200 python3 benchmarks/dwconv.py --json "$out/dwconv.json" --compile dynamic \
        --compile-modes fwd_bwd --compile-budget-s 45 --sweep-budget-s 0 > "$out/dwconv.log" 2>&1
      tail -n 30 "$out/dwconv.log" ;;
    dwconv-sweep)
      timeout 200 python3 benchmarks/dwconv.py --json "$out/dwconv_sweep.json" --sweep-only --sweep-budget-s 150 \
        > "$out/dwconv_sweep.log" 2>&1
      grep -E "^sweep|^host" "$out/dwconv_sweep.log" ;;
    backbone)
      timeout 200 python3 benchmarks/backbone.py --arch t --impls eager fused-attn fused \
        --json "$out/backbone_t.json" > "$out/backbone_t.log" 2>&1
      tail -n 16 "$out/backbone_t.log" ;;
    backbone-compile)
      timeout 420 python3 benchmarks/backbone.py --arch t --impls eager compile fused-attn fused compile-fused --modes train \
        --dtypes bf16 --json "$out/backbone_t_compile.json" > "$out/backbone_t_compile.log" 2>&1
      tail -n 6 "$out/backbone_t_compile.log" ;;
    backbone-all)
      compile_then_time backbone t_all "train inference" "compile compile-fused" \
        "eager fused-attn fused compile compile-fused" 24 ;;
    detector-all)
      compile_then_time detector t_all "train inference" compile "eager fused-attn fused compile" 24 ;;
    backbone-graphs)
      timeout 330 python3 benchmarks/backbone.py --arch t --impls eager eager-graph fused fused-graph \
        --json "$out/backbone_t_graphs.json" > "$out/backbone_t_graphs.log" 2>&1
      tail -n 20 "$out/backbone_t_graphs.log" ;;
    backbone-compile-graphs)
      compile_then_time backbone t_compile_graphs train "compile compile-graph compile-fused compile-fused-graph" \
        "eager fused fused-graph compile compile-graph compile-fused compile-fused-graph" 18 ;;
    detector-graphs)
      compile_then_time detector t_graphs train "compile compile-graph compile-fused-graph" \
        "eager fused-attn fused compile compile-graph compile-fused-graph" 16 ;;
    detector-scopes)
      for scope in backbone backbone-neck features; do
        timeout 300 python3 benchmarks/detector.py --arch t --impls compile-fused-graph --modes train --dtypes bf16 \
          --compile-scopes "$scope" --warmup-ms 0 --rep-ms 1 > "$out/detector_scopes_cold_$scope.log" 2>&1 &
      done
      wait
      timeout 330 python3 benchmarks/detector.py --arch t --impls eager compile-fused-graph --modes train \
        --dtypes bf16 --compile-scopes backbone backbone-neck features --rounds 3 \
        --json "$out/detector_t_scopes.json" > "$out/detector_t_scopes.log" 2>&1
      tail -n 8 "$out/detector_t_scopes.log" ;;
    detector-rounds)
      timeout 300 python3 benchmarks/detector.py --arch t --impls compile-fused-graph --modes train --dtypes bf16 \
        --warmup-ms 0 --rep-ms 1 > "$out/detector_rounds_cold.log" 2>&1
      timeout 420 python3 benchmarks/detector.py --arch t --impls eager fused compile-fused-graph --modes train \
        --dtypes bf16 --rounds 5 --eager-config-optimizer --json "$out/detector_t_rounds.json" \
        > "$out/detector_t_rounds.log" 2>&1
      tail -n 9 "$out/detector_t_rounds.log" ;;
    detector-sections)
      timeout 200 python3 benchmarks/detector.py --arch t --impls eager fused --modes train --dtypes bf16 \
        --sections 10 --eager-config-optimizer --json "$out/detector_t_sections.json" \
        > "$out/detector_t_sections.log" 2>&1
      tail -n 6 "$out/detector_t_sections.log" ;;
    profile)
      timeout 140 python3 benchmarks/backbone.py --arch t --profile --modes train \
        --impls eager fused-attn fused --profile-steps 3 --json "$out/backbone_t_profile.json" \
        > "$out/backbone_t_profile.log" 2>&1
      grep -E "^## |attention op" "$out/backbone_t_profile.log" ;;
    detector)
      timeout 200 python3 benchmarks/detector.py --arch t --impls eager fused-attn fused \
        --json "$out/detector_t.json" > "$out/detector_t.log" 2>&1
      tail -n 12 "$out/detector_t.log" ;;
    detector-compile)
      timeout 300 python3 benchmarks/detector.py --arch t --impls compile --modes train \
        --json "$out/detector_t_compile.json" > "$out/detector_t_compile.log" 2>&1
      tail -n 5 "$out/detector_t_compile.log" ;;
    tests-graphs)
      gpu_tests -k "${GRAPHS_BACKEND:-gpu} or assignment or anchors" tests/test_canvas.py tests/test_assigners.py tests/test_anchor_generators.py > "$out/graphs_tests.log" 2>&1
      tail -n 4 "$out/graphs_tests.log" ;;
    train-graphs)
      TORCH_LOGS=recompiles timeout "${TRAIN_TIMEOUT:-330}" python3 benchmarks/train_throughput.py \
        --variants "${TRAIN_VARIANTS:-default,default-pinned,default@fixed}" --iters "${TRAIN_ITERS:-120}" \
        --warmup "${TRAIN_WARMUP:-40}" --eval-images "${TRAIN_EVAL_IMAGES:-20}" ${TRAIN_EXTRA:-} \
        --json "$out/train_throughput_graphs.json" > "$out/train_throughput_graphs.log" 2>&1
      grep -v -i warn "$out/train_throughput_graphs.log" | tail -n 30 ;;
    train-gemm)
      gpu_tests tests/test_gemm_conv.py > "$out/gemm_tests.log" 2>&1
      tail -n 3 "$out/gemm_tests.log"
      timeout 60 python3 benchmarks/linear_host_cost.py --json "$out/linear_host_cost.json"
      timeout 300 python3 benchmarks/train_throughput.py --variants default-no-gemm,default --iters 60 --warmup 22 \
        --eval-images 10 --host-profile 2 --json "$out/train_throughput_gemm.json" > "$out/train_throughput_gemm.log" 2>&1
      grep -A8 -E "training on|median ms per" "$out/train_throughput_gemm.log" ;;
    train-ratios)
      gpu_tests tests/test_gemm_conv.py tests/test_samplers.py tests/test_bbox_coders.py tests/test_mask_head.py \
        tests/test_device_masks.py tests/test_rpn_head.py tests/test_roi_extractors.py \
        tests/test_benchmarks.py::test_host_wait_probe_counts_the_waits_of_its_iteration_only \
        > "$out/ratios_tests.log" 2>&1
      tail -n 4 "$out/ratios_tests.log"
      prewarm="--prewarm --host-profile 2"
      [ "${RATIOS_PREWARM:-1}" = 1 ] || prewarm="--host-profile ${RATIOS_HOST_PROFILE:-0}"
      # shellcheck disable=SC2086  # prewarm is a word list
      timeout "${RATIOS_TIMEOUT:-420}" python3 benchmarks/train_throughput.py \
        --variants "${RATIOS_VARIANTS:-paper-no-cudnn,paper+repo-optim,default-no-graphs,default}" \
        $prewarm --iters "${RATIOS_ITERS:-30}" --warmup "${RATIOS_WARMUP:-10}" --eval-images "${RATIOS_EVAL_IMAGES:-8}" \
        --json "$out/train_throughput_ratios.json" > "$out/train_throughput_ratios.log" 2>&1
      grep -A8 -E "training on|median ms per" "$out/train_throughput_ratios.log"
      grep -A14 "Python functions by own time" "$out/train_throughput_ratios.log" | cut -c1-150
      if [ "${RATIOS_FP32:-1}" = 1 ]; then
        timeout "${RATIOS_FP32_TIMEOUT:-200}" python3 benchmarks/train_throughput.py --variants default --amp off \
          --prewarm --iters "${RATIOS_ITERS:-30}" --warmup 10 \
          --eval-images 0 --json "$out/train_throughput_fp32.json" > "$out/train_throughput_fp32.log" 2>&1
        echo "fp32:"; grep -A4 -E "training on|median ms per" "$out/train_throughput_fp32.log" | grep -E "^\| +default"
      fi ;;
    train-precision)
      for mode in "--amp bf16 --loss-scale dynamic" "--amp bf16 --loss-scale off" "--amp off"; do
        name=$(echo "$mode" | tr -d '-' | tr ' ' '_')
        # shellcheck disable=SC2086  # the mode is a word list
        timeout 150 python3 benchmarks/train_throughput.py --variants default $mode --iters 50 --warmup 20 \
          --eval-images 0 --json "$out/train_throughput_$name.json" > "$out/train_throughput_$name.log" 2>&1
        echo "$mode"; grep -A4 "training on" "$out/train_throughput_$name.log" | tail -n 1
      done ;;
    shapes)
      for config in ${SHAPES_CONFIGS:-configs/mlla/mask-rcnn_mlla-t_fpn_shapes.py}; do
        name=$(basename "$config" .py)
        timeout "${SHAPES_TIMEOUT:-560}" python3 tools/shapes_quickstart.py --config "$config" \
          --work-dir "/tmp/$name" --data-root /tmp/shapes_data > "$out/$name.log" 2>&1
        echo "quickstart ($name) exit: $?"
        cp "/tmp/$name/metrics.json" "$out/$name.metrics.json" 2>/dev/null
        cp "/tmp/$name/prediction.png" "$out/$name.prediction.png" 2>/dev/null
        grep -E "Iter\(train\) \[ *[0-9]+00/" "$out/$name.log" | sed -E 's/.*(\[ *[0-9]+\/[0-9]+\]).*( time: [0-9.]+).*/\1\2/'
        grep -E "mAP_copypaste" "$out/$name.log"; tail -n 9 "$out/$name.log" | head -n 5
      done ;;
    dist)
      timeout 570 bash benchmarks/scaling_2gpu.sh "$out" > "$out/dist.log" 2>&1
      echo "dist exit: $?"; tail -n 25 "$out/dist.log" ;;
    save-triton-cache)
      XZ_OPT="-T0 -6" tar -C "$triton_cache" -cJf "$out/triton_cache.tar.xz" .
      size=$(stat -c %s "$out/triton_cache.tar.xz")
      if [ "$size" -gt 16000000 ]; then
        echo "Triton cache: $size bytes packed, over the 16 MiB a file may come back with; not kept"
        rm -f "$out/triton_cache.tar.xz"
      else
        echo "Triton cache: $(find "$triton_cache" -mindepth 1 -maxdepth 1 | wc -l) kernels, $size bytes packed"
      fi ;;
    bundle)
      tar czf /tmp/session.tgz -C "$out" . && rm -rf "${out:?}"/* && mv /tmp/session.tgz "$out/" ;;
    *)
      echo "unknown stage $stage (see the header of $0)" >&2; exit 2 ;;
  esac
done
