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
            t = net.mqt(f, m=net.num_queries)  # (16, M, hidden)
        feats.append(f[:, ::9])
        tokens.append(t[:, ::4])
        labels.append(torch.stack([e.labels[0] for e in batch]))  # scene-wide columns: any patch's row
    return torch.cat(feats), torch.cat(tokens), torch.cat(labels)


def fit(x: torch.Tensor, y: torch.Tensor, classes: int):
    """Ridge (inputs standardised on all rows, lambda = 1, one-hot targets) on the rows labelled != -100;
    returns the class scores of new rows (argmax: the predicted class)."""
    keep = y != -100
    mu, sd = x.mean(0), x.std(0) + 1e-6
    a = torch.cat([((x - mu) / sd)[keep], torch.ones(int(keep.sum()), 1)], 1)
    w = torch.linalg.solve(a.T @ a + torch.eye(a.shape[1]), a.T @ torch.nn.functional.one_hot(y[keep], classes).float())
    return lambda rows: (torch.cat([(rows - mu) / sd, torch.ones(rows.shape[0], 1)], 1) @ w)


def ridge_accuracy(xtr, ytr, xte, yte, col: int) -> float:
    a, b = xtr.reshape(-1, xtr.shape[-1]), xte.reshape(-1, xte.shape[-1])
    ya, yb = ytr[:, col].repeat_interleave(xtr.shape[1]), yte[:, col].repeat_interleave(xte.shape[1])
    keep_b = yb != -100
    pred = fit(a, ya, LABELS[col])(b[keep_b]).argmax(1)
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
