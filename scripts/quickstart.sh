#!/usr/bin/env bash
# The main job on a fresh machine: set up, export the shipped default model to a verified bundle,
# then answer a question about a sample image with the device runtime (onnxruntime + llama.cpp).
# MODEL=path/to/checkpoint exports another MQT-LLaVA checkpoint instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/mqt-edge export ${MODEL:+"$MODEL"} --out mqt-edge-bundle --max-tokens 256
.venv/bin/mqt-edge run examples/shapes.png "What color is the circle?" --bundle mqt-edge-bundle
