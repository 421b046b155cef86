#!/usr/bin/env bash
# The main job on a fresh machine: set up, get a model, answer a question about a sample image.
# Until the export and run stages land, this uses a generated checkpoint and the PyTorch reference.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=${MODEL:-models/tiny}
[ -d "$MODEL" ] || .venv/bin/mqt-edge synth --preset tiny --out "$MODEL"
.venv/bin/mqt-edge reference "$MODEL" examples/shapes.png "What color is the circle?" --tokens 16 --max-new-tokens 16
