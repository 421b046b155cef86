"""The planner for N streams: the choice logic, the CLI table and its errors."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from mqt_edge.errors import InputError
from mqt_edge.profiles import load_profile
from mqt_edge.profiles.planner import ModelFacts, plan_streams, stream_cycle_ms

FACTS = ModelFacts.from_preset("bench", "q4_k_m")


@pytest.fixture(scope="module")
def gpu():
    return load_profile("jetson-agx-orin-64gb")


def test_more_streams_or_a_higher_rate_never_gives_a_larger_m(gpu):
    rates = (0.5, 1, 2, 4, 8, 16)
    for streams in (1, 2, 4, 8):
        ms = [plan_streams(gpu, FACTS, streams, r).chosen_m or 0 for r in rates]
        assert ms == sorted(ms, reverse=True), (streams, ms)
    for rate in rates:
        ms = [plan_streams(gpu, FACTS, n, rate).chosen_m or 0 for n in (1, 2, 4, 8)]
        assert ms == sorted(ms, reverse=True), (rate, ms)


def test_chosen_m_meets_the_rate_and_the_next_step_does_not(gpu):
    found = 0
    for streams in (1, 2, 4):
        for rate in (1, 2, 4, 8, 16):
            p = plan_streams(gpu, FACTS, streams, rate)
            if p.chosen_m is None or p.chosen_m == FACTS.max_tokens:
                continue
            found += 1
            assert 1000 / stream_cycle_ms(gpu, FACTS, p.chosen_m, streams, 16) >= rate
            ms = [c.m for c in p.candidates]
            nxt = ms[ms.index(p.chosen_m) + 1]
            assert 1000 / stream_cycle_ms(gpu, FACTS, nxt, streams, 16) < rate
    assert found  # the grid holds at least one choice strictly inside the range


def test_batching_makes_a_cycle_cheaper_than_streams_one_by_one(gpu):
    one = stream_cycle_ms(gpu, FACTS, 16, 1, 16)
    four = stream_cycle_ms(gpu, FACTS, 16, 4, 16)
    assert 2 * one < four < 4 * one  # every frame's vision and prefill counted, decode shared


@pytest.mark.parametrize("kw", [dict(streams=0, rate_hz=2), dict(streams=2, rate_hz=-1),
                                dict(streams=2, rate_hz=float("nan")), dict(streams=2)])
def test_bad_targets_are_input_errors(gpu, kw):
    with pytest.raises(InputError):
        plan_streams(gpu, FACTS, **kw)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mqt_edge", "plan", "-p", "jetson-agx-orin-64gb",
                           "--preset", "bench", *args], capture_output=True, text=True, timeout=60)


def test_cli_table_and_json():
    r = _cli("--streams", "4", "--rate", "2")
    assert r.returncode == 0, r.stderr
    assert "answers/s per stream" in r.stdout and "chosen m = " in r.stdout
    j = json.loads(_cli("--streams", "4", "--rate", "2", "--json").stdout)
    assert j["chosen_m"] == plan_streams(load_profile("jetson-agx-orin-64gb"), FACTS, 4, 2).chosen_m


@pytest.mark.parametrize("args", [("--streams", "0", "--rate", "2"), ("--streams", "2", "--rate", "-1"),
                                  ("--rate", "2",), ("--streams", "2")])
def test_cli_errors_are_one_line(args):
    r = _cli(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_plan_prints_the_digits_that_decide_a_fit():
    p = load_profile("cpu")
    from mqt_edge.profiles.planner import Options, predict

    mem = predict(p, FACTS, 256, replace(Options(), max_new_tokens=128))[0]
    limit = round(mem - 0.3, 1)  # just under: rounding to whole MB would print both as the same number
    r = subprocess.run([sys.executable, "-m", "mqt_edge", "plan", "-p", "cpu", "--preset", "bench",
                        "--memory-mb", str(limit), "--ttft-ms", "1e9"], capture_output=True, text=True, timeout=60)
    assert f"{mem:,.1f}" in r.stdout and f"{limit:,.1f} MB" in r.stdout, r.stdout


def test_every_frame_pays_its_own_vision_and_its_own_prefill(gpu):
    from mqt_edge.profiles.planner import QUESTION_TOKENS, Options, terms

    # a one-token answer has no decode steps: the cycle is the frames' work alone, each frame's
    # prefill right after its image (cores.py's follow-up wait), not one batch of all four
    one = terms(gpu, FACTS, 16, Options())
    four = terms(gpu, FACTS, 16, Options(), prefill=4 * (16 + QUESTION_TOKENS))
    assert stream_cycle_ms(gpu, FACTS, 16, 4, 1) == pytest.approx(4 * (one["vision"] + one["mqt"] + one["prefill"]))
    assert four["prefill"] < 4 * one["prefill"]  # so batching them would have predicted a shorter cycle
