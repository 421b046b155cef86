"""Closed-form ridge probes: do the vision features and the visual tokens carry the scene facts?

    python benchmarks/training_probes/ridge.py CHECKPOINT        (docs/training.md: run D)

A ridge regression (standardised inputs, lambda = 1, one-hot targets) is fitted on 160 images of the
project's generator and scored on 48 others, for single vision features (every 9th patch) and single
visual tokens at m = 256 (every 4th). The scene-wide labels are the same on every patch, so each
feature/token is asked for the whole scene's fact. No optimiser: nothing to tune, nothing to converge.
"""

import sys

import torch

from mqt_edge.image import preprocess
from mqt_edge.model import MQTLlava
from mqt_edge.train import LABELS, Example, _features, patch_labels, synthetic_examples

FACTS = {2: "count", 16: "colour of circle", 17: "colour of square", 18: "colour of triangle",
         19: "shape of red", 20: "shape of green", 21: "shape of blue", 22: "shape of yellow"}


def collect(net: MQTLlava, seed: int, n: int):
    data = synthetic_examples(seed)
    feats, tokens, labels = [], [], []
    for _ in range(n // 16):
        batch = []
        for _ in range(16):
            image, q, a, scene = next(data)
            y = torch.from_numpy(patch_labels(scene, net.image_spec, net.mqt.config.key_grid))
            batch.append(Example(torch.from_numpy(preprocess(image, net.image_spec)[0]), q, a, y))
        with torch.no_grad():
            f = _features(net, batch)  # (16, P, C)
            t = net.mqt(f, tokens=net.num_queries)  # (16, M, hidden)
        feats.append(f[:, ::9])
        tokens.append(t[:, ::4])
        labels.append(torch.stack([e.labels[0] for e in batch]))  # scene-wide columns: any patch's row
    return torch.cat(feats), torch.cat(tokens), torch.cat(labels)


def ridge_accuracy(xtr, ytr, xte, yte, col: int) -> float:
    n = LABELS[col]
    a, b = xtr.reshape(-1, xtr.shape[-1]), xte.reshape(-1, xte.shape[-1])
    ya, yb = ytr[:, col].repeat_interleave(xtr.shape[1]), yte[:, col].repeat_interleave(xte.shape[1])
    mu, sd = a.mean(0), a.std(0) + 1e-6
    a, b = (a - mu) / sd, (b - mu) / sd
    keep, keep_b = ya != -100, yb != -100
    a1 = torch.cat([a[keep], torch.ones(int(keep.sum()), 1)], 1)
    w = torch.linalg.solve(a1.T @ a1 + torch.eye(a1.shape[1]), a1.T @ torch.nn.functional.one_hot(ya[keep], n).float())
    pred = (torch.cat([b[keep_b], torch.ones(int(keep_b.sum()), 1)], 1) @ w).argmax(1)
    return float((pred == yb[keep_b]).float().mean())


def main() -> None:
    torch.set_num_threads(2)
    net = MQTLlava.from_pretrained(sys.argv[1], dtype="float32")
    ftr, ttr, ytr = collect(net, 11, 160)
    fte, tte, yte = collect(net, 12, 48)
    for col, name in FACTS.items():
        print(f"{name:20s} features {ridge_accuracy(ftr, ytr, fte, yte, col):.2f}  "
              f"tokens {ridge_accuracy(ttr, ytr, tte, yte, col):.2f}", flush=True)


if __name__ == "__main__":
    main()
