"""mqt_edge.sampling.pick: a token for every accepted temperature and top_p, never NaN (issue 25, defect 1)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mqt_edge.sampling import GREEDY_BELOW, pick

logit_values = st.floats(-1e4, 1e4, allow_nan=False, width=32)
logits = arrays(np.float32, st.integers(1, 64), elements=logit_values)
# every value the API and the server accept: temperature >= 0 (the server's ceiling is 2), top_p in (0, 1]
temperatures = st.one_of(st.just(0.0), st.floats(0.0, 2.0), st.floats(1e-320, 1e-3), st.sampled_from([1e-300, 5e-324]))
top_ps = st.one_of(st.just(1.0), st.floats(0.0, 1.0, exclude_min=True), st.sampled_from([1e-300, 5e-324]))


def _nucleus(x: np.ndarray, temperature: float, top_p: float) -> set[int]:
    """The tokens a sample may return, computed the slow, obvious way (float64, sorted by hand)."""
    x = x.astype(np.float64)
    p = np.exp((x - x.max()) / temperature)
    p /= p.sum()
    ranked = sorted(range(len(x)), key=lambda i: -p[i])
    out, mass = set(), 0.0
    for i in ranked:
        if out and mass >= top_p * (1 - 1e-9):
            break
        out.add(i)
        mass += p[i]
    return out | {i for i in range(len(x)) if p[i] == p[ranked[0]]}  # ties with the top


@settings(max_examples=300, deadline=None)
@given(x=logits, temperature=temperatures, top_p=top_ps, seed=st.integers(0, 2**32))
def test_pick_returns_a_valid_token_and_warns_nothing(x, temperature, top_p, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "invalid value encountered" is the NaN's first sign
        token = pick(x, temperature, top_p, np.random.default_rng(seed))
    assert isinstance(token, int) and 0 <= token < len(x)
    if temperature < GREEDY_BELOW:
        assert token == int(np.argmax(x))
    else:
        assert token in _nucleus(x, temperature, top_p)


@pytest.mark.parametrize("temperature, top_p", [(1e-300, 1.0), (1.0, 1e-300), (1e-300, 1e-300), (0.0, 1e-300)])
def test_the_reported_values_are_greedy(temperature, top_p):
    """Issue 25's two 500s: a temperature that is 0 in float32, and a top_p that keeps no token."""
    x = np.random.default_rng(0).normal(0, 3, 32000).astype(np.float32)
    for seed in range(5):
        assert pick(x, temperature, top_p, np.random.default_rng(seed)) == int(np.argmax(x))


def test_sampling_still_samples():
    x = np.zeros(4, np.float32)  # four equal logits: each should be drawn
    rng = np.random.default_rng(0)
    assert {pick(x, 1.0, 1.0, rng) for _ in range(200)} == {0, 1, 2, 3}
    assert {pick(x, 1.0, 0.5, rng) for _ in range(200)} == {0, 1}  # the first half of the mass


def test_odd_logits_never_win_or_break_it():
    rng = np.random.default_rng(0)
    assert pick(np.array([np.nan, 1.0, 0.5], np.float32), 1.0, 1.0, rng) in (1, 2)
    assert pick(np.array([0.0, np.inf, 3.0], np.float32), 1.0, 0.9, rng) == 1
    assert pick(np.array([-np.inf, -np.inf], np.float32), 1.0, 0.9, rng) in (0, 1)
    assert pick(np.array([0.0, 2.0, 1.0], np.float32), 1.0, 0.0, rng) == 1  # top_p 0 (the checks refuse it): the top


def test_the_api_uses_the_same_rule(shipped_bundle):
    """Pipeline/Session answers go through the same pick: the values that were a 500 over HTTP answer here."""
    from pathlib import Path

    from mqt_edge import Pipeline

    image = Path(__file__).parent.parent / "examples" / "shapes.png"
    with Pipeline.load(shipped_bundle) as pipe:
        for temperature, top_p in [(1e-300, 1.0), (1.0, 1e-300)]:
            a = pipe.ask(image, "What color is the circle?", m=16, max_new_tokens=2, temperature=temperature,
                         top_p=top_p, seed=1)
            assert a.answer.lower().startswith("red"), (temperature, top_p, a.answer)
