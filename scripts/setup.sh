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
# llama-cpp-python compiles from source the first time (about 5 minutes on 2 cores); pip caches it.
# The default is pip's native build (GGML_NATIVE): measured fastest on the AMX Xeons and AMD EPYCs
# here, and correct on AMX CPUs because the runtime loads models with the AMX guard
# (docs/runtime.md). LLAMA_CPP_BUILD=portable rebuilds it without native tuning and without AMX,
# with the instruction sets this CPU has, for a machine where the native build misbehaves.
if [ "${LLAMA_CPP_BUILD:-native}" = portable ]; then
  flags="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  for f in avx2:AVX2 fma:FMA f16c:F16C avx512f:AVX512 avx512_vnni:AVX512_VNNI avx_vnni:AVX_VNNI; do
    if grep -qw "${f%%:*}" /proc/cpuinfo; then flags="$flags -DGGML_${f##*:}=ON"; fi
  done
  CMAKE_ARGS="$flags" .venv/bin/python -m pip install --quiet --force-reinstall --no-deps --no-cache-dir \
    "llama-cpp-python==0.3.36"
elif [ "${LLAMA_CPP_BUILD:-native}" != native ]; then
  echo "LLAMA_CPP_BUILD=${LLAMA_CPP_BUILD} is not native or portable" >&2
  exit 2
fi
.venv/bin/python -m pip install --quiet -e ".[dev]"
# CI only (CI=true, as root, with apt-get): Debian's chromium and chromium-driver, so that
# tests/serve/test_page.py drives the page at / in a headless browser instead of skipping. A developer's
# machine is left alone (no sudo from a set-up script); there the test skips and says what to install.
if [ "${CI:-}" = true ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
   && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
    || echo "setup.sh: apt-get could not install chromium; tests/serve/test_page.py will skip" >&2
fi
