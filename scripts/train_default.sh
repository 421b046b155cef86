#!/usr/bin/env bash
# Retrain the default model from scratch on a CPU, as recorded in docs/training.md.
#
#   bash scripts/train_default.sh [WORK_DIR]      (default WORK_DIR: runs/default)
#
# Every link is one `mqt-edge train` command with its seed and thread count; torch on the same CPU
# and thread count gives bit-identical weights, so each checkpoint matches the recorded one. A link
# whose checkpoint already exists is skipped, so an interrupted run resumes where it stopped.
# About 6.5 hours on a 2-core CPU (the sum of the recorded training times); each checkpoint is 8 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/default}
mkdir -p "$W"
T=".venv/bin/mqt-edge train"

link() {  # link NAME ARGS...: train NAME unless it is already there
    local name=$1; shift
    if [ -f "$W/$name/config.json" ]; then echo "$name: already trained, skipped"; return; fi
    echo "$name: mqt-edge train $*"
    $T --out "$W/$name" "$@"
}

link s0 --stage0-steps 1500 --stage1-steps 0 --stage2-steps 0 --stage0-lr 2e-3 --local-init --localize --seed 0 --threads 1
link g --model "$W/s0" --stage1-steps 1500 --stage2-steps 1500 --parts mqt,llm --turns 5 --batch-size 8 --lr 2e-3 --seed 0 --threads 1
link h --model "$W/g" --stage1-steps 0 --turns 5 --batch-size 8 --stage2-steps 2000 --parts mqt,llm --lr 1e-3 --seed 1 --threads 1
link i --model "$W/h" --stage1-steps 0 --turns 5 --batch-size 8 --stage2-steps 3000 --parts mqt,llm --lr 1e-3 --seed 2 --threads 2
link j --model "$W/i" --stage1-steps 0 --turns 5 --batch-size 8 --stage2-steps 1500 --parts vision,mqt,llm --aux-weight 0.5 --lr 1e-3 --seed 3 --threads 2
link k --model "$W/j" --stage1-steps 0 --turns 5 --batch-size 8 --stage2-steps 2000 --parts vision,mqt,llm --aux-weight 0.5 --lr 1e-3 --seed 4 --threads 2
link k0 --model "$W/k" --stage0-steps 3000 --stage1-steps 0 --stage2-steps 0 --stage0-lr 1e-3 --batch-size 16 --seed 7 --threads 2
link k1 --model "$W/k0" --stage1-steps 0 --turns 5 --batch-size 8 --stage2-steps 3000 --parts mqt,llm --lr 1e-3 --seed 8 --threads 2
link k3 --model "$W/k1" --stage1-steps 0 --stage2-steps 4000 --parts mqt,llm --turns 10 --batch-size 8 --lr 1e-3 --seed 9 --threads 2
link k4 --model "$W/k3" --stage1-steps 0 --stage2-steps 4000 --parts mqt,llm --turns 10 --batch-size 8 --lr 1e-3 --seed 10 --threads 2
link k6 --model "$W/k4" --stage1-steps 0 --stage2-steps 4000 --parts mqt,llm --turns 10 --batch-size 8 --lr 1e-3 --token-aux-weight 0.1 --seed 12 --threads 1
link k7 --model "$W/k6" --stage1-steps 0 --stage2-steps 4000 --parts mqt,llm --turns 10 --batch-size 8 --lr 1e-3 --token-aux-weight 0.1 --seed 14 --threads 1
link k10 --model "$W/k7" --stage1-steps 0 --stage2-steps 3000 --parts mqt,llm --turns 10 --batch-size 8 --lr 1e-3 --token-aux-weight 0.1 --colour-twins --seed 17 --threads 1
# A fresh LLM on k10's vision tower and MQT (frozen), the visual tokens rescaled to the text scale:
# k10's LLM had stopped reading the question's object word (docs/training.md: the word-blind LLM).
link r1 --model "$W/k10" --reset-llm --visual-norm 1.0 --stage1-steps 0 --stage2-steps 4000 --parts llm --turns 10 --batch-size 8 --lr 1e-3 --colour-twins --seed 20 --threads 2
link r2 --model "$W/r1" --stage1-steps 0 --stage2-steps 4000 --parts llm --turns 10 --batch-size 8 --lr 1e-3 --colour-twins --seed 21 --threads 2
echo "done: $W/r2 = mqt_edge/assets/default-model (docs/training.md lists each link's held-out accuracy)"
