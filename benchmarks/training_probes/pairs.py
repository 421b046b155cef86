"""Does the model bind each colour to its shape? Two-shape scenes that only binding can answer.

    python benchmarks/training_probes/pairs.py CHECKPOINT    (docs/training.md: runs k6-k9)

For every ordered pair of shape kinds (left, right) and every ordered pair of distinct colours, two
scenes of our renderer (320 x 240 and 240 x 240, both shapes 25% of the shorter side, side by side)
are asked about the right-hand shape: "What shape is the {colour} object?" and "What color is the
{kind}?". Both colours and both kinds are present, so a bag of colours and kinds cannot answer them.
It prints the correct answers (of 48) per layout, then the total (of 288). It also counts, over 3,000
training conversations (`--turns 10`, seed 0), how many questions are binding-critical: their
answer changes when the colours are permuted among the scene's shapes.
"""

import itertools
import sys
from collections import Counter

import numpy as np
import torch

from mqt_edge.evaluate import first_word
from mqt_edge.model import MQTLlava
from mqt_edge.vqa import COLORS, SHAPES, Scene, Shape, conversation


def probe(net: MQTLlava) -> int:
    total = 0
    for left, right in itertools.permutations(SHAPES, 2):
        ok = 0
        for c1, c2 in itertools.permutations(COLORS, 2):
            for w, h in ((320, 240), (240, 240)):
                size = 0.25 * min(w, h)
                scene = Scene(w, h, (235, 230, 222), (Shape(left, c1, COLORS[c1], 0.3 * w, h / 2, size),
                                                      Shape(right, c2, COLORS[c2], 0.7 * w, h / 2, size)))
                image = scene.render()
                for question, answer in ((f"What shape is the {c2} object?", right),
                                         (f"What color is the {right}?", c2)):
                    ok += first_word(net.generate(image, question, m=256, max_new_tokens=3).text) == answer
        print(f"{left} left, {right} right: {ok}/48", flush=True)
        total += ok
    return total


def binding_critical(conversations: int = 3000, turns: int = 10) -> Counter:
    counts: Counter = Counter()
    rng = np.random.default_rng(0)
    for _ in range(conversations):
        scene, asked = conversation(rng, turns)
        permuted = [{q: a for _, q, a in scene.recoloured(order).questions()}
                    for order in itertools.permutations(range(len(scene.shapes)))]
        for qtype, question, answer in asked:
            counts[qtype, "all"] += 1
            counts[qtype, "critical"] += any(p.get(question, answer) != answer for p in permuted)
    return counts


def main() -> None:
    torch.set_num_threads(1)
    net = MQTLlava.from_pretrained(sys.argv[1], dtype="float32")
    print(f"total: {probe(net)}/288")
    counts = binding_critical()
    for qtype in sorted({t for t, _ in counts}):
        print(f"training questions of type {qtype}: {counts[qtype, 'critical']}/{counts[qtype, 'all']} binding-critical")


if __name__ == "__main__":
    main()
