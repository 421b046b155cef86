"""Choosing the next token from the LLM's logits: one rule for the API and the server.

Every accepted `temperature` (>= 0) and `top_p` (in (0, 1]) gives a token, never NaN:
- a temperature below `GREEDY_BELOW` is greedy. Far below it the scaled logits are no longer finite
  numbers (1e-300 is 0 in float32, and -5 / 1e-300 overflows float64), and near it sampling is
  greedy anyway: a logit gap of 1e-3 over 1e-5 leaves the runner-up e^-100 of the top's weight;
- the arithmetic is float64, so a tiny `top_p` does not round to 0 as it does against float32;
- the nucleus always holds the most likely token, however small `top_p` is.
"""

from __future__ import annotations

import numpy as np

GREEDY_BELOW = 1e-5  # vLLM uses the same floor for "temperature 0"


def pick(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """The index of the next token: argmax when greedy, else a sample of the top-p nucleus at this temperature."""
    x = np.asarray(logits, dtype=np.float64).ravel()
    x = np.where(np.isnan(x), -np.inf, x)  # a NaN logit is never chosen
    best = int(np.argmax(x))
    if not temperature >= GREEDY_BELOW or not np.isfinite(x[best]):  # also a NaN temperature; +inf wins outright
        return best
    with np.errstate(over="ignore", under="ignore"):
        p = np.exp((x - x[best]) / temperature)  # the top is exp(0) = 1, so the sum is >= 1
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]  # mass of the tokens ranked above each one
        keep = before < top_p * p.sum()
        keep[0] = True  # the top token, whatever top_p is
        mask = np.zeros_like(p)
        mask[order[keep]] = p[order[keep]]
        p = mask
    return int(rng.choice(len(p), p=p / p.sum()))


def first_prob(logits: np.ndarray, token: int) -> float:
    """softmax(logits)[token] at temperature 1: how sure the model is of its first token."""
    z = logits.astype(np.float64) - float(np.max(logits))
    return float(np.exp(z[token]) / np.exp(z).sum())
