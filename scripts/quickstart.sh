#!/usr/bin/env bash
# The main job on a fresh machine: set up, get a model, answer a question about a sample image.
# Until the trained default model lands, this uses a generated (random-weight) checkpoint: the
# answer is noise, but every stage runs: export to a verified bundle, then the device runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=${MODEL:-models/tiny}
[ -d "$MODEL" ] || .venv/bin/mqt-edge synth --preset tiny --out "$MODEL"
.venv/bin/mqt-edge export "$MODEL" --out mqt-edge-bundle --max-tokens 256
.venv/bin/mqt-edge run examples/shapes.png "What color is the circle?" --bundle mqt-edge-bundle --tokens 16 --max-new-tokens 16
