"""Picking a token from logits: one rule for the API, the server and the scheduler.

No accepted setting can produce NaN: a temperature below `GREEDY_BELOW` is greedy (dividing by a
tiny temperature overflows float32), and top-p always keeps the most likely token.
"""

from __future__ import annotations

import numpy as np

GREEDY_BELOW = 1e-4  # logits / 1e-4 stay finite for any logit float32 can hold after the max shift


def pick(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """The next token: argmax when greedy, else a draw from the tempered, nucleus-cut distribution."""
    if temperature < GREEDY_BELOW:
        return int(np.argmax(logits))
    z = (logits.astype(np.float64) - float(np.max(logits))) / temperature
    p = np.exp(z)
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        keep = order[before < top_p]
        if not len(keep):
            keep = order[:1]
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return int(rng.choice(len(p), p=p))


def first_prob(logits: np.ndarray, token: int) -> float:
    """softmax(logits)[token] at temperature 1: how sure the model is of its first token."""
    z = logits.astype(np.float64) - float(np.max(logits))
    return float(np.exp(z[token]) / np.exp(z).sum())
