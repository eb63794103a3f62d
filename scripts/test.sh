#!/usr/bin/env bash
# Runs the whole test suite with the project's venv. CI sets MIXMO_REQUIRE_SLURM=1 so a SLURM that cannot start fails.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec .venv/bin/python -m pytest tests "$@"
