#!/usr/bin/env bash
# `make demo`: trains configs/demo.yaml (2-member Cut-MixMo, one augmented view per copy) and configs/demo_vanilla.yaml
# (a vanilla ResNet-18) on the same data and schedule, each into runs/demo/<name> with 2 processes on CPU (gloo) or
# 1 process per GPU, then puts them side by side with `python -m mixmo_dist.compare` (runs/demo/compare/compare.md, .csv, .png).
# Extra words go to both trainings (e.g. --run.seed=1); DEMO_OUT sets the parent directory (default runs/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${DEMO_OUT:-runs/demo}
ngpu=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -gt 0 ]; then
  procs=$ngpu
else
  procs=${NPROC_DEMO:-2}
fi

train() {
  local name=$1 config=$2
  shift 2
  local port
  port=$($PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  echo "== demo: training $name into $OUT/$name"
  # --multi_gpu is what makes Accelerate start N real processes; on CPU the trainer then builds a gloo world.
  .venv/bin/accelerate launch --multi_gpu --num_processes "$procs" --num_machines 1 --mixed_precision no \
    --dynamo_backend no --main_process_port "$port" -m mixmo_dist.train --config "$config" \
    --run.name="demo-$name" --run.output_dir="$OUT/$name" "$@"
}

start=$(date +%s)
train cutmixmo configs/demo.yaml "$@"
# The same 32 unique images per rank and step, the same epochs and learning rate: one network, no mixing.
train vanilla configs/demo_vanilla.yaml "$@"
echo "== demo: comparing (evaluate with temperature scaling, cost per row) into $OUT/compare"
$PY -m mixmo_dist.compare "$OUT/cutmixmo" "$OUT/vanilla" --out "$OUT/compare"
echo "== demo: done in $(( $(date +%s) - start )) s; table: $OUT/compare/compare.md, plot: $OUT/compare/compare.png"
