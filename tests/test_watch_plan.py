"""`Watch(..., rate=R)` without m: the planner's m for N streams (`plan_streams`), logged once and kept
in `watch.plan`; without a rate, the single-request choice."""

import logging

import numpy as np
import pytest

from mqt_edge.errors import InputError, MQTEdgeError
from mqt_edge.pipeline import Pipeline
from mqt_edge.profiles import load_profile
from mqt_edge.profiles.planner import ModelFacts, Options, plan_streams
from mqt_edge.watch import Watch

Q = "What color is the circle?"
NEW = 4
FRAME = np.full((64, 64, 3), 200, np.uint8)


@pytest.fixture(scope="module")
def pipe(shipped_bundle):
    with Pipeline.load(shipped_bundle, threads=1, parallel=2) as p:
        yield p


def planned(pipe, streams: int, rate: float) -> int | None:
    facts = ModelFacts.from_bundle(pipe.bundle)
    opts = Options.for_run(pipe.vision_backend, pipe.n_gpu_layers, pipe.sequential, facts, pipe.vision_precision)
    return plan_streams(load_profile("cpu"), facts, streams, rate, answer_tokens=NEW, options=opts).chosen_m


def rate_for(pipe, streams: int, m: int) -> float:
    """A target just under what `streams` streams sustain at m by the planner: it chooses exactly m."""
    facts = ModelFacts.from_bundle(pipe.bundle)
    opts = Options.for_run(pipe.vision_backend, pipe.n_gpu_layers, pipe.sequential, facts, pipe.vision_precision)
    p = plan_streams(load_profile("cpu"), facts, streams, 1e-6, answer_tokens=NEW, options=opts)
    return next(c.rate_hz for c in p.candidates if c.m == m) * 0.999


def test_a_rate_plans_m_for_every_stream_together(pipe, caplog):
    rate = rate_for(pipe, 2, 16)
    assert planned(pipe, 2, rate) == 16 and planned(pipe, 1, rate) > 16  # the count of streams decides
    with caplog.at_level(logging.INFO, logger="mqt_edge.watch"):
        with Watch(pipe, {"front": [FRAME], "rear": [FRAME]}, Q, rate=rate, profile="cpu", max_new_tokens=NEW) as w:
            answers = list(w)
    assert w.m == 16 and w.plan["m"] == 16 and w.plan["streams"] == 2 and w.plan["profile"] == "cpu"
    assert w.plan["rate_hz"] >= rate and w.plan["target_rate_hz"] == rate and w.plan["answer_tokens"] == NEW
    prediction = {k: v for k, v in w.plan.items() if k != "m"}
    assert len(answers) == 2 and all(a.answer.m == 16 and a.answer.predicted == prediction for a in answers)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("m = ")]
    assert said == [f"m = 16 for 2 stream(s) at {rate:g} answers/s each on cpu: {w.plan['reason']}"]


def test_one_stream_with_a_rate_plans_for_one(pipe):
    rate = rate_for(pipe, 1, 16)
    with Watch(pipe, [FRAME], Q, rate=rate, profile="cpu", max_new_tokens=NEW) as w:
        list(w)
    assert w.m == 16 and w.plan["streams"] == 1


def test_without_a_rate_the_single_request_choice_and_no_plan_with_m(pipe):
    with Watch(pipe, {"a": [FRAME], "b": [FRAME]}, Q, profile="cpu", max_new_tokens=NEW) as w:
        list(w)
    assert w.m == pipe.choose_tokens(None, NEW, profile="cpu").m and "ttft_ms" in w.plan
    with Watch(pipe, [FRAME], Q, m=2, max_new_tokens=NEW) as w:
        list(w)
    assert w.m == 2 and w.plan is None


@pytest.mark.parametrize("kw", [dict(m=4, rate=2.0), dict(rate=True), dict(rate=-1.0), dict(rate=float("nan")),
                                dict(rate="2")])
def test_bad_rates_are_input_errors(pipe, kw):
    with pytest.raises(InputError):
        Watch(pipe, [FRAME], Q, profile="cpu", **kw)


def test_a_rate_nothing_meets_is_one_line(pipe):
    with pytest.raises(MQTEdgeError) as e:
        Watch(pipe, {"a": [FRAME], "b": [FRAME]}, Q, rate=1e9, profile="cpu")
    assert "nothing meets" in str(e.value) and "lower rate" in str(e.value) and "\n" not in str(e.value)


def test_the_planner_prefills_a_known_question_at_its_own_length(pipe, monkeypatch):
    """`answer`, a Watch and the streams planner count the request's question ids, not a typical 16."""
    from mqt_edge.profiles import planner

    seen = []
    for name, at in (("plan", 5), ("plan_streams", 6)):  # where each takes its Options
        real = getattr(planner, name)
        monkeypatch.setattr(planner, name, lambda *a, _real=real, _at=at, **k: seen.append(
            (k.get("options") or a[_at]).question_tokens) or _real(*a, **k))
    long_q = "Describe every shape in this picture, its colour, its size and where it lies, in one long sentence."
    pipe.answer(FRAME, long_q, max_new_tokens=NEW)
    with Watch(pipe, {"a": [FRAME], "b": [FRAME]}, {"a": Q, "b": long_q}, rate=1e-3, max_new_tokens=NEW) as w:
        list(w)
    with Watch(pipe, [FRAME], lambda f: Q, max_new_tokens=NEW) as w:  # a question function: a typical length
        list(w)
    n = len(pipe.question_ids(long_q))
    assert n > planner.QUESTION_TOKENS and seen == [n, n, planner.QUESTION_TOKENS], seen
