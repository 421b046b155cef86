#!/usr/bin/env bash
# The main job on a fresh machine: set up, export a model to a verified bundle, then answer a
# question about a sample image with the device runtime (onnxruntime + llama.cpp).
# Without MODEL it exports the shipped default model (mqt_edge/assets/default-model, trained on the
# synthetic shapes task: docs/training.md); MODEL=path/to/checkpoint exports that MQT-LLaVA checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/mqt-edge export ${MODEL:+"$MODEL"} --out mqt-edge-bundle --max-tokens 256
.venv/bin/mqt-edge run examples/shapes.png "What color is the circle?" --bundle mqt-edge-bundle --max-new-tokens 16
