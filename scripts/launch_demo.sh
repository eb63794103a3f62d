#!/usr/bin/env bash
# `make demo`: trains configs/demo.yaml into runs/demo with 2 processes on CPU (gloo), or 1 process per GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
ngpu=$($PY -c "import torch; print(torch.cuda.device_count())")
port=$($PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
if [ "$ngpu" -gt 0 ]; then
  procs=$ngpu
else
  procs=${NPROC_DEMO:-2}
fi
# --multi_gpu is what makes Accelerate start N real processes; on CPU the trainer then builds a gloo world.
exec .venv/bin/accelerate launch --multi_gpu --num_processes "$procs" --num_machines 1 --mixed_precision no \
  --dynamo_backend no --main_process_port "$port" -m mixmo_dist.train --config configs/demo.yaml "$@"
