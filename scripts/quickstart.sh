#!/usr/bin/env bash
# The main job on a fresh machine: set up, export a model to a verified bundle, then answer a
# question about a sample image with the device runtime (onnxruntime + llama.cpp).
# MODEL=path/to/checkpoint exports that MQT-LLaVA checkpoint. Without it, the shipped default model
# is exported; an install without one (it is not trained yet, see issue 6 / docs/training.md) uses a
# generated random-weight checkpoint: the answer is noise, but every stage runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${MODEL:-}" ] && ! .venv/bin/python -c "from mqt_edge.defaults import default_model as d; raise SystemExit(d() is None)"; then
    MODEL=models/tiny
    [ -d "$MODEL" ] || .venv/bin/mqt-edge synth --preset tiny --out "$MODEL"
fi
.venv/bin/mqt-edge export ${MODEL:+"$MODEL"} --out mqt-edge-bundle --max-tokens 256
.venv/bin/mqt-edge run examples/shapes.png "What color is the circle?" --bundle mqt-edge-bundle --max-new-tokens 16
