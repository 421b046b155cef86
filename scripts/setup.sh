#!/usr/bin/env bash
# Set up (or refresh) ./.venv with everything the tests and the quickstart need, on a CPU machine.
# Idempotent: a second run only checks that the packages are there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
# CPU torch first: an unpinned torch pulled in by another package would fetch gigabytes of CUDA.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
# llama-cpp-python compiles from source the first time (about 4 minutes on 2 cores); pip caches it.
.venv/bin/python -m pip install --quiet -e ".[dev]"
