"""Does the answer depend on the object word? Question pairs that differ in that word only.

    python benchmarks/training_probes/words.py CHECKPOINT    (docs/training.md: the word-blind LLM)

For 24 two-shape scenes of the project's generator (seed 5) it asks pairs of questions that differ
in one word of the same token length, "What color is the circle?" / "... square?", "What shape is
the red object?" / "... blue object?" and "Is there a red circle?" / "Is there a blue circle?", and
compares the next-token distributions at the answer position (total variation distance). A model
that reads the word moves its answer; a model that only reads the question's type and length gives
both the same distribution (distance 0).
"""

import sys

import numpy as np
import torch

from mqt_edge.model import MQTLlava
from mqt_edge.vqa import random_scene

PAIRS = (("What color is the circle?", "What color is the square?"),
         ("What shape is the red object?", "What shape is the blue object?"),
         ("Is there a red circle?", "Is there a blue circle?"))


def next_token_probs(net: MQTLlava, visual: torch.Tensor, question: str) -> torch.Tensor:
    with torch.no_grad():
        return net.llm(inputs_embeds=net.prompt_embeds(question, visual)[None]).logits[0, -1].float().softmax(-1)


def main() -> None:
    torch.set_num_threads(1)
    net = MQTLlava.from_pretrained(sys.argv[1], dtype="float32")
    rng = np.random.default_rng(5)
    distances: dict[tuple[str, str], list[float]] = {p: [] for p in PAIRS}
    scenes = 0
    while scenes < 24:
        scene = random_scene(rng)
        if len(scene.shapes) != 2:
            continue
        scenes += 1
        visual = net.encode_image(scene.render(), m=net.num_queries)
        for q1, q2 in PAIRS:
            p1, p2 = next_token_probs(net, visual, q1), next_token_probs(net, visual, q2)
            distances[q1, q2].append(0.5 * float((p1 - p2).abs().sum()))
    for (q1, q2), d in distances.items():
        print(f"{q1!r} vs {q2!r}: mean distance {np.mean(d):.3f}, max {np.max(d):.3f}, "
              f"{sum(x < 1e-3 for x in d)}/{len(d)} scenes below 0.001")


if __name__ == "__main__":
    main()
