#!/usr/bin/env bash
# Issue 6's two-GPU check, on a machine with 2 GPUs (about 8 minutes on 2 x H200):
#   bash benchmarks/scaling_2gpu.sh OUT_DIR
# 1. the fused kernels on cuda:1 (tests/test_second_device_gpu.py);
# 2. the shapes-scaling config trained for the same iterations on 2 GPUs x 2 images
#    (tools/dist_train.sh, torchrun + DDP) and on 1 GPU x 4 images (tools/train.py);
# 3. the 2-GPU checkpoint evaluated on 2 GPUs (tools/dist_test.sh) and on 1 GPU (tools/test.py):
#    the gathered metrics must be the same;
# 4. a rendered prediction of the 2-GPU model on a validation image.
# OUT_DIR gets each run's log and scalars.json, the test logs and prediction.png;
# benchmarks/plot_scaling.py OUT_DIR turns them into the table and chart of the README.
set -uo pipefail
out=${1:?usage: scaling_2gpu.sh OUT_DIR}
cfg=configs/mlla/mask-rcnn_mlla-t_fpn_shapes-scaling.py
work=${SCALING_WORK_DIR:-/tmp/scaling}
mkdir -p "$out" "$work"
nvidia-smi -L
python3 -m mlla_det.datasets.shapes --out data/shapes || exit 1

python3 -m pytest -m gpu -q -rs tests/test_second_device_gpu.py 2>&1 | tail -n 3

keep_run() {  # keep_run NAME: the run's text log and logged scalars
  local log
  log=$(ls -t "$work/$1"/*/*.log 2>/dev/null | head -n 1)
  mkdir -p "$out/$1"
  [ -n "$log" ] && cp "$log" "$out/$1/train.log"
  cp "$(dirname "$log")/vis_data/scalars.json" "$out/$1/scalars.json" 2>/dev/null
}

start=$(date +%s)
PORT=29511 bash tools/dist_train.sh "$cfg" 2 --work-dir "$work/2x2"; echo "2x2 exit $? after $(( $(date +%s) - start )) s"
keep_run 2x2
start=$(date +%s)
python3 tools/train.py "$cfg" --work-dir "$work/1x4" --cfg-options train_dataloader.batch_size=4
echo "1x4 exit $? after $(( $(date +%s) - start )) s"
keep_run 1x4

checkpoint=$(cat "$work/2x2/last_checkpoint")
PORT=29512 bash tools/dist_test.sh "$cfg" "$checkpoint" 2 --work-dir "$work/test_2gpu" > "$out/test_2gpu.log" 2>&1
echo "dist_test exit $?"
python3 tools/test.py "$cfg" "$checkpoint" --work-dir "$work/test_1gpu" > "$out/test_1gpu.log" 2>&1
echo "test exit $?"
grep -h "bbox_mAP_copypaste\|segm_mAP_copypaste" "$out/test_2gpu.log" "$out/test_1gpu.log"

image=$(python3 -c "import sys; sys.path.insert(0, 'tools'); from shapes_quickstart import pick_render_image
print(pick_render_image('data/shapes', 'data/shapes/annotations/instances_val.json'))")
python3 tools/demo.py "$image" "$cfg" "$checkpoint" --out "$out/prediction.png"
