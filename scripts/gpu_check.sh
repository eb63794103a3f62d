#!/usr/bin/env bash
# GPU runbook (`make gpu-check`): every GPU check in stages with hard time budgets, ending by itself within about
# 6 minutes on one GPU (benchmarks/gpu_check.py lists the stages and budgets).
#
#   bash scripts/gpu_check.sh [OUT_DIR]        (default: $OUT if set, else runs/gpu_check)
#
# Needs a Python with torch (CUDA), Triton, timm, accelerate, pytest, pyyaml and safetensors -- the lent GPU machines'
# stock python3 has them; DALI, submitit, a venv and network access are not needed. PYTHON overrides the interpreter
# (default: .venv/bin/python if present, else python3). Results: OUT_DIR/gpu_check.json (rewritten after every
# stage) plus each stage's log and JSON. TOTAL_BUDGET_S (default 345) bounds the whole run;
# MIXMO_GPU_CHECK_DRY_RUN=1 runs the plumbing on CPU at toy sizes. Exit status: 0 all passed, 1 a stage failed or
# timed out, 2 no CUDA.
set -uo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m benchmarks.gpu_check "$@"
