#!/usr/bin/env bash
# The test suite: set-up, then pytest (extra arguments go to pytest, e.g. -m heavy).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
