#!/usr/bin/env bash
# GPU runbook (`make gpu-check`): the GPU tests, then the op and model benchmarks, on one CUDA machine.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        (default: $OUT if set, else runs/gpu_check)
#
# Needs a Python with torch (CUDA), Triton, timm and pytest -- the lent GPU machines' stock python3 has them; DALI,
# submitit and pip access are not needed. PYTHON overrides the interpreter (default: .venv/bin/python if present,
# else python3). Everything is logged and written under OUT_DIR: pytest_gpu.log, bench_ops.json/.log,
# bench_gpu.json/.log, environment.txt. Designed to finish in under 8 minutes on an H100: the model benchmark gets
# what is left of TOTAL_BUDGET_S (default 460 s) after the tests and the op benchmark, and skips (and lists) the
# compiled settings that would not fit. Exits non-zero if any stage failed; every stage runs regardless.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$OUT_DIR"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# A stray TRITON_INTERPRET=1 would run the "GPU" kernels in the CPU interpreter and prove nothing.
unset TRITON_INTERPRET
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-460}
START=$SECONDS
failed=()

stage() {  # stage NAME LOG CMD... : run, log, remember a failure, go on
    local name=$1 log=$2
    shift 2
    echo "=== $name ($((SECONDS - START)) s elapsed)"
    "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    if [[ $rc -ne 0 ]]; then
        failed+=("$name (exit $rc)")
        echo "=== $name FAILED with exit $rc"
    fi
}

# No CUDA or no Triton: nothing below would test what it claims to, so stop here, loudly.
if ! "$PYTHON" - <<'EOF' 2>&1 | tee "$OUT_DIR/environment.txt"; then
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device")
import timm
import triton

props = torch.cuda.get_device_properties(0)
print(f"GPU {props.name}, capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB")
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}, timm {timm.__version__}")
EOF
    echo "gpu_check: environment check failed (see above)"
    exit 2
fi

stage "pytest -m gpu" "$OUT_DIR/pytest_gpu.log" \
    "$PYTHON" -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -q -o addopts="" -ra --durations=10
stage "bench_ops" "$OUT_DIR/bench_ops.log" \
    "$PYTHON" -m benchmarks.bench_ops --json "$OUT_DIR/bench_ops.json"
left=$((TOTAL_BUDGET_S - (SECONDS - START)))
if ((left < 60)); then
    failed+=("bench_gpu (not run: ${left} s left of ${TOTAL_BUDGET_S} s)")
else
    stage "bench_gpu" "$OUT_DIR/bench_gpu.log" \
        "$PYTHON" -m benchmarks.bench_gpu --out "$OUT_DIR" --budget-s "$left"
fi

echo "=== gpu_check done in $((SECONDS - START)) s; results in $OUT_DIR"
if ((${#failed[@]})); then
    printf '=== FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "=== all stages passed"
