"""`mqt-edge calibrate` times what the runtime does: every request encodes a new image (the pipeline
caches encoded images), and the batched decode rate is measured through the runtime's shared context,
stored in the profile, printed, and used by the planner's `batch_speedup` instead of its default curve."""

import pytest
from conftest import cli

from mqt_edge.profiles import load_profile
from mqt_edge.profiles.planner import DEFAULT_BATCH_SPEEDUP, batch_speedup


def test_batched_decode_through_the_shared_context(shipped_bundle, monkeypatch):
    from mqt_edge.bundle import Bundle
    from mqt_edge.calibrate import measure_batched
    from mqt_edge.runtimes import llama

    calls = []
    decode = llama.SharedContext.decode_tokens
    monkeypatch.setattr(llama.SharedContext, "decode_tokens",
                        lambda self, rows: calls.append([(s, p) for s, p, _, _ in rows]) or decode(self, rows))
    model = llama.LlamaModel(Bundle.open(shipped_bundle, verify=False).path("llm"))
    try:
        rates = dict(measure_batched(model, threads=1, steps=8))
    finally:
        model.close()
    assert sorted(rates) == [1, 2, 4] and all(r > 0 for r in rates.values())
    # (timings on the tiny model are noise; what is checked is that each step carries every sequence)
    for n in (1, 2, 4):
        steps = [c for c in calls if len(c) == n and sorted(s for s, _ in c) == list(range(n))
                 and len({p for _, p in c}) == 1]
        positions = [c[0][1] for c in steps]
        assert len(set(positions)) >= 8 + 1, (n, positions)  # the warm-up and the timed steps, one position each


def test_calibrate_stores_and_prints_the_curve_the_planner_uses(shipped_bundle, tmp_path):
    out = tmp_path / "dev.toml"
    r = cli("calibrate", "--bundle", str(shipped_bundle), "--out", str(out), "--base", "cpu", "--runs", "1")
    assert r.returncode == 0, r.stderr
    p = load_profile(str(out))
    curve = dict(p.calibration.batch_tok_s)
    assert sorted(curve) == [1, 2, 4]
    said = " ".join(r.stderr.split())
    assert ("batched decode " + "/".join(f"{curve[n]:.0f}" for n in (1, 2, 4)) + " tok/s in total at 1/2/4 sequences"
            in said), said
    assert batch_speedup(p, 4) == pytest.approx(curve[4] / curve[1])
    assert batch_speedup(p, 2) == pytest.approx(curve[2] / curve[1])
    assert batch_speedup(load_profile("cpu"), 4) == dict(DEFAULT_BATCH_SPEEDUP)[4]  # uncalibrated: the default


def test_every_timed_request_runs_vision(shipped_bundle, monkeypatch):
    from mqt_edge.calibrate import POINTS, measure
    from mqt_edge.pipeline import Pipeline

    answers = []
    ask = Pipeline.ask
    monkeypatch.setattr(Pipeline, "ask", lambda self, *a, **k: answers.append(ask(self, *a, **k)) or answers[-1])
    cal = measure(str(shipped_bundle), runs=1, threads=1)
    assert len(answers) == 1 + len(POINTS)  # the warm-up, then one request per point
    # a cached image reports vision 0.0 and would calibrate vision as preprocessing alone
    assert all(a.timings_ms["vision"] > 0 for a in answers), [a.timings_ms for a in answers]
    assert cal.vision_ms >= min(a.timings_ms["vision"] for a in answers[1:])
