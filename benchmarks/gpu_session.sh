#!/usr/bin/env bash
# Everything a GPU session checks and measures, in stages that each fit one device call
# (< 10 minutes on an H100/H200). On the GPU machine, from the project's root, with .whl carried:
#   source .whl/prelude.sh && bash benchmarks/gpu_session.sh tests     # all GPU tests
#   source .whl/prelude.sh && bash benchmarks/gpu_session.sh kernels   # attention + dwconv benchmarks
#   source .whl/prelude.sh && bash benchmarks/gpu_session.sh models    # backbone (+profile) + detector
#   source .whl/prelude.sh && bash benchmarks/gpu_session.sh shapes    # the quick start: train, eval, picture
# Full logs and JSON go to $OUT (the device tool brings them back); a short summary prints last.
# The golden-data tests need ../shared/reference on the GPU machine too, where only the repository
# travels: once here, `mkdir -p shared && cp -r ../shared/reference shared/ && echo /shared/ >>
# .git/info/exclude`, then carry "shared" (30 MB) with ".whl".
set -uo pipefail
stage=${1:?usage: gpu_session.sh tests|kernels|models|shapes}
out=${OUT:-/tmp/gpu_session}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
reference_dir=${MLLA_REFERENCE_DIR:-shared/reference}
[ -d "$reference_dir" ] || reference_dir=../shared/reference

case "$stage" in
  tests)
    MLLA_REFERENCE_DIR=$reference_dir timeout 540 python3 -m pytest -m gpu -q -rf tests \
      > "$out/gpu_tests.log" 2>&1
    tail -n 15 "$out/gpu_tests.log" ;;
  kernels)
    timeout 300 python3 benchmarks/attention.py --json "$out/attention.json" --compile-budget-s 60 \
      > "$out/attention.log" 2>&1
    timeout 240 python3 benchmarks/dwconv.py --json "$out/dwconv.json" --compile-budget-s 60 \
      > "$out/dwconv.log" 2>&1
    tail -n 30 "$out/attention.log"; tail -n 20 "$out/dwconv.log" ;;
  models)
    timeout 150 python3 benchmarks/backbone.py --arch t --impls eager fused --json "$out/backbone_t.json" \
      > "$out/backbone_t.log" 2>&1
    timeout 90 python3 benchmarks/backbone.py --arch t --profile --modes train --impls eager fused \
      --profile-steps 2 --json "$out/backbone_t_profile.json" > "$out/backbone_t_profile.log" 2>&1
    timeout 150 python3 benchmarks/detector.py --arch t --json "$out/detector_t.json" \
      > "$out/detector_t.log" 2>&1
    timeout 150 python3 benchmarks/backbone.py --arch t --impls compile --modes train --dtypes bf16 \
      --json "$out/backbone_t_compile.json" > "$out/backbone_t_compile.log" 2>&1
    tail -n 14 "$out/backbone_t.log" "$out/detector_t.log" "$out/backbone_t_compile.log" ;;
  shapes)
    timeout 560 python3 tools/shapes_quickstart.py --work-dir /tmp/shapes_work --data-root /tmp/shapes_data \
      > "$out/shapes_quickstart.log" 2>&1
    echo "quickstart exit: $?"
    cp /tmp/shapes_work/metrics.json /tmp/shapes_work/prediction.png "$out/" 2>/dev/null
    grep -E "mAP_copypaste" "$out/shapes_quickstart.log"; tail -n 8 "$out/shapes_quickstart.log" ;;
  *)
    echo "unknown stage $stage: use tests, kernels, models or shapes" >&2; exit 2 ;;
esac
