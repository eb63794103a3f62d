#!/usr/bin/env bash
# Runs the test suite with the project's venv; arguments go to pytest. Test paths among them (tests/test_ops.py,
# tests/test_ops.py::test_x) run only those; without any, the whole of tests/ runs.
# CI sets MIXMO_REQUIRE_SLURM=1 so a SLURM that cannot start fails.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
# pytest runs every path it is given, so passing `tests` beside a file ran the whole suite anyway.
for arg in "$@"; do
  if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
    exec .venv/bin/python -m pytest "$@"
  fi
done
exec .venv/bin/python -m pytest tests "$@"
