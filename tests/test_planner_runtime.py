"""The planner counts what the runtime does: the KV context the pipeline allocates, and the measured
prefill curve (the cost per position falls as the batch grows) instead of a straight line."""

from dataclasses import replace

import pytest

from mqt_edge.profiles import Calibration, load_profile
from mqt_edge.profiles.planner import (QUESTION_TOKENS, ModelFacts, Options, memory_breakdown, plan_streams,
                                       stream_cycle_ms, terms)

FACTS = ModelFacts.from_preset("bench", "q4_k_m")
POINTS = ((13, 430.0), (28, 780.0), (268, 5370.0))


@pytest.mark.parametrize("parallel", [1, 3])
def test_the_kv_counted_is_the_context_the_pipeline_allocates(shipped_bundle, parallel):
    from mqt_edge.bundle import Bundle
    from mqt_edge.pipeline import Pipeline

    facts = ModelFacts.from_bundle(Bundle.open(shipped_bundle))
    with Pipeline.load(shipped_bundle, threads=1, parallel=parallel) as pipe:
        st = pipe.scheduler.stats()
        choice = pipe.choose_tokens(None, 4, profile="cpu")  # a request's plan counts the pipeline's context
        opts = Options.for_run(pipe.vision_backend, pipe.n_gpu_layers, pipe.sequential, facts, pipe.vision_precision)
    assert choice.predicted["memory_mb"] == memory_breakdown(
        load_profile("cpu"), facts, choice.m, replace(opts, max_new_tokens=4, parallel=parallel))["total_mb"]
    for m in (1, 256):  # the context is sized for the largest m, whatever m a request uses
        kv = memory_breakdown(load_profile("cpu"), facts, m, Options(parallel=parallel))["kv_cache"]
        assert kv == pytest.approx(st.n_ctx * st.position_bytes / 2**20, abs=0.05)


def test_streams_count_a_context_sized_for_every_stream():
    cpu = load_profile("cpu")
    p = plan_streams(cpu, FACTS, 4, 1e-6)
    for c in p.candidates:
        assert c.memory_mb == memory_breakdown(cpu, FACTS, c.m, Options(max_new_tokens=16, parallel=4))["total_mb"]
    assert p.candidates[0].memory_mb > memory_breakdown(cpu, FACTS, 1, Options(max_new_tokens=16))["total_mb"]


def calibrated(points=POINTS):
    cal = Calibration(vision_ms=2000.0, mqt_ms_fixed=30.0, mqt_ms_per_token=0.03, prefill_ms_fixed=569.0,
                      prefill_ms_per_token=17.27, decode_ms_per_token=56.7, peak_mb=1900.0,
                      llm_params=FACTS.llm_params, llm_bytes=FACTS.llm_bytes, vision_flops=FACTS.vision_flops,
                      prefill_points=points)
    return replace(load_profile("cpu"), calibration=cal)


def test_prefill_goes_through_the_measured_points():
    p, o = calibrated(), Options()
    prefill = lambda n: terms(p, FACTS, 16, o, prefill=n)["prefill"]  # noqa: E731
    assert prefill(13) == pytest.approx(430.0) and prefill(28) == pytest.approx(780.0)
    assert prefill(20) == pytest.approx(430.0 + 7 * 350 / 15)  # between two points: on the segment
    assert prefill(6) == pytest.approx(430.0 * 6 / 13)  # below the first: towards nothing at 0
    assert prefill(300) == pytest.approx(5370.0 + 32 * (5370.0 - 780.0) / 240)  # beyond: the last slope
    m2 = terms(p, FACTS, 2, o)["prefill"]
    assert m2 == pytest.approx(430.0 + (2 + QUESTION_TOKENS - 13) * 350 / 15)
    assert m2 < terms(calibrated(()), FACTS, 2, o)["prefill"]  # the line's fixed 569 ms over-predicts small m
    assert terms(calibrated(()), FACTS, 2, o)["prefill"] == pytest.approx(569.0 + 17.27 * (2 + QUESTION_TOKENS))


def test_a_known_question_is_prefilled_at_its_own_length():
    p = calibrated()
    assert terms(p, FACTS, 2, Options(question_tokens=11))["prefill"] == pytest.approx(430.0)  # 13 positions
    assert terms(p, FACTS, 2, Options())["prefill"] > 430.0  # a typical question is longer


def test_a_cycle_prefills_each_frame_on_its_own():
    p = calibrated()
    t = terms(p, FACTS, 16, Options())
    batch = terms(p, FACTS, 16, Options(), prefill=4 * (16 + QUESTION_TOKENS))["prefill"]
    assert stream_cycle_ms(p, FACTS, 16, 4, 1) == pytest.approx(4 * (t["vision"] + t["mqt"] + t["prefill"]))
    assert batch < 4 * t["prefill"]  # on the measured curve one batch of 128 is cheaper: not what runs


def test_on_a_cpu_only_the_repacked_types_count_twice(monkeypatch):
    """The file's pages hold every weight; llama.cpp's x86 repack copies only some types beside them."""
    import mqt_edge.profiles.planner as planner

    monkeypatch.setattr(planner.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("MQT_EDGE_EXTRA_BUFFERS", raising=False)
    cpu, mb = load_profile("cpu"), 1024 * 1024
    parts = lambda f: memory_breakdown(cpu, f, 16, Options())  # noqa: E731
    own = parts(replace(FACTS, llm_repacked_bytes=300 * mb))  # a bundle's manifest: its GGUF's own bytes
    assert own["llm_weights"] == 300.0 and own["llm_file_pages"] == round(FACTS.llm_bytes / mb, 1)
    assert parts(FACTS)["llm_weights"] == round(FACTS.llm_bytes * 0.77 / mb, 1)  # a preset: q4_k_m's share
    q8 = ModelFacts.from_preset("bench", "q8_0")
    assert parts(q8)["llm_weights"] == 0.0 and parts(q8)["llm_file_pages"] == round(q8.llm_bytes / mb, 1)
    monkeypatch.setattr(planner.platform, "machine", lambda: "aarch64")  # ARM repacks more: all of it
    assert parts(q8)["llm_weights"] == round(q8.llm_bytes / mb, 1)
    monkeypatch.setenv("MQT_EDGE_EXTRA_BUFFERS", "off")  # no repack: the file's pages alone
    assert parts(q8)["llm_file_pages"] == 0 and parts(q8)["llm_weights"] == round(q8.llm_bytes / mb, 1)


def test_a_long_known_question_counts_in_the_context_check():
    """The context must hold the prompt, m, the question's own ids and the answer."""
    from mqt_edge.profiles.planner import plan

    cpu = load_profile("cpu")
    room = FACTS.context_length - FACTS.prompt_tokens - 128  # what m and the question may take
    fits = lambda q: {c.m for c in plan(cpu, FACTS, 1e9, 1e9, 128, Options(question_tokens=q)).candidates  # noqa: E731
                      if c.fits}
    assert 256 in fits(16)
    assert 256 not in fits(room - 255) and 144 in fits(room - 255)  # 256 + the question overflows by one
