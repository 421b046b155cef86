#!/usr/bin/env bash
# The main job on a fresh machine: set up, get a model, answer a question about a sample image.
# Until the trained default model and `mqt-edge run` land, this uses a generated checkpoint, exports
# it to a verified bundle, and answers with the PyTorch reference.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=${MODEL:-models/tiny}
[ -d "$MODEL" ] || .venv/bin/mqt-edge synth --preset tiny --out "$MODEL"
.venv/bin/mqt-edge export "$MODEL" --out mqt-edge-bundle --max-tokens 256
.venv/bin/mqt-edge reference "$MODEL" examples/shapes.png "What color is the circle?" --tokens 16 --max-new-tokens 16
