"""Closed-form ridge probe: how well do the vision features tell the shape of each object?

    python benchmarks/training_probes/shape.py CHECKPOINT        (docs/training.md: runs s0, J, K, ...)

A ridge regression (standardised inputs, lambda = 1, one-hot targets) reads the local shape label
(mqt_edge.train.patch_labels: circle, square or triangle, on object patches only) from single
patch features. It is fitted on 200 images of the project's generator (seed 21) and scored on 150
others (seed 22): per patch, and per object, where the object's patches vote by summing their
scores. Objects are bucketed by how many patches they cover (small < 6, mid < 25, big). Questions
about colour of a shape, shape of a colour and "is there a ..." all need the shape, so an object
the features misread caps the answers built on it.
"""

import sys

import torch

from mqt_edge.image import preprocess
from mqt_edge.model import MQTLlava
from mqt_edge.train import COLUMN, Example, _features, patch_labels, synthetic_examples

from ridge import fit


def collect(net: MQTLlava, seed: int, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    data = synthetic_examples(seed)
    feats, labels = [], []
    for _ in range(n):
        image, question, answer, scene = next(data)
        x = torch.from_numpy(preprocess(image, net.image_spec)[0])
        with torch.no_grad():
            feats.append(_features(net, [Example(x, question, answer)])[0])  # (P, C)
        labels.append(torch.from_numpy(patch_labels(scene, net.image_spec, net.mqt.config.key_grid)))
    return feats, labels


def main() -> None:
    torch.set_num_threads(1)
    net = MQTLlava.from_pretrained(sys.argv[1], dtype="float32")
    shape, colour = COLUMN["shape"], COLUMN["colour"]
    ftr, ytr = collect(net, 21, 200)
    fte, yte = collect(net, 22, 150)
    scores_of = fit(torch.cat(ftr), torch.cat(ytr)[:, shape], 3)
    right = total = 0
    objects: dict[str, list[int]] = {"small": [0, 0], "mid": [0, 0], "big": [0, 0]}
    for f, y in zip(fte, yte):
        scores = scores_of(f)
        on = y[:, shape] != -100
        right += int((scores[on].argmax(1) == y[on, shape]).sum())
        total += int(on.sum())
        # one object per (colour, shape) pair: the task never repeats a pair in a scene
        for kind in y[on, shape].unique():
            for hue in y[on & (y[:, shape] == kind), colour].unique():
                patches = on & (y[:, shape] == kind) & (y[:, colour] == hue)
                n = int(patches.sum())
                bucket = objects["small" if n < 6 else "mid" if n < 25 else "big"]
                bucket[0] += int(scores[patches].sum(0).argmax()) == int(kind)
                bucket[1] += 1
    print(f"{sys.argv[1]}: patches {right / total:.3f}; objects "
          + ", ".join(f"{k} {a}/{n}" for k, (a, n) in objects.items())
          + f", all {sum(a for a, _ in objects.values()) / sum(n for _, n in objects.values()):.3f}")


if __name__ == "__main__":
    main()
