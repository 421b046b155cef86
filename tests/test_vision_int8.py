"""INT8 vision: `export --vision-quant int8`, its parity figures, the runtime's choice and the planner."""

import json
import shutil
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import cli, scene, stderr_lines
from mqt_edge.bundle import Bundle, write_manifest
from mqt_edge.errors import InputError
from mqt_edge.exporters import ExportError, ExportOptions, export, parity
from mqt_edge.pipeline import Pipeline
from mqt_edge.image import sample_images

Q = "What color is the circle?"
TIMINGS = {"preprocess", "vision", "mqt", "prefill", "ttft", "decode", "total"}


@pytest.fixture(scope="module")
def int8_bundle(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "b"
    return export(ExportOptions(model=str(tiny_ckpt), out=out, max_tokens=16, quant="f32", vision_quant="int8")).bundle


@pytest.fixture(scope="module")
def fp32_only(int8_bundle, tmp_path_factory):
    """The same bundle without its int8 graph (as an export without --vision-quant writes it)."""
    root = tmp_path_factory.mktemp("fp32") / "b"
    shutil.copytree(int8_bundle.root, root)
    (root / "vision-int8.onnx").unlink()
    manifest = int8_bundle.manifest
    write_manifest(root, replace(manifest, artifacts={k: v for k, v in manifest.artifacts.items() if k != "vision_int8"}))
    return Bundle.open(root)


def session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_int8_graph_is_in_the_bundle_and_the_manifest(int8_bundle):
    m = int8_bundle.manifest.to_json()
    assert m["artifacts"]["vision_int8"]["path"] == "vision-int8.onnx" and m["export"]["vision_quant"] == "int8"
    Bundle.open(int8_bundle.root)  # its sha256 is checked like every artifact's
    fp32 = onnx.load(str(int8_bundle.path("vision")))
    q = onnx.load(str(int8_bundle.path("vision_int8")))
    consts = {t.name for t in fp32.graph.initializer}
    weight_matmuls = sum(n.op_type == "MatMul" and n.input[1] in consts for n in fp32.graph.node)
    assert weight_matmuls == 6 * m["vision"]["layers_run"]  # q, k, v, out, fc1, fc2 per layer
    assert sum(n.op_type == "MatMulInteger" for n in q.graph.node) == weight_matmuls
    assert m["vision"]["int8"]["quantized_matmuls"] == weight_matmuls and m["vision"]["int8"]["method"] == "dynamic"
    assert m["artifacts"]["vision_int8"]["bytes"] < 0.6 * m["artifacts"]["vision"]["bytes"]
    # same interface as vision.onnx
    s = session(int8_bundle.path("vision_int8"))
    assert [(i.name, i.shape) for i in s.get_inputs()] == [("pixel_values", ["batch", 3, 336, 336])]
    assert [o.name for o in s.get_outputs()] == ["image_features"]


def test_int8_parity_figures_are_the_int8_graphs(int8_bundle, tiny_model):
    """The reported token cosine is recomputed here from the int8 graph and the PyTorch reference."""
    r = int8_bundle.manifest.parity["vision_int8"]
    assert r["thresholds"] == {"min_token_cosine": parity.INT8_MIN_COSINE, "min_agreement": parity.INT8_MIN_AGREEMENT}
    assert r["enforced"] is False and r["pass"]  # random weights: reported, as q4_k_m is
    px = np.concatenate([tiny_model.pixel_values(im).numpy() for im in sample_images(3)])
    feats = session(int8_bundle.path("vision_int8")).run(None, {"pixel_values": px})[0]
    mqt = session(int8_bundle.path("mqt"))
    worst = 1.0
    for m in r["tokens"]:
        got = mqt.run(None, {"image_features": feats, "query_ids": np.arange(m)})[0]
        with torch.no_grad():
            ref = tiny_model.mqt(tiny_model.image_features(torch.from_numpy(px)), m=m).numpy()
        fig = parity.int8_token_report(got, ref)
        assert fig["min_cosine"] == pytest.approx(r[f"m={m}"]["min_cosine"], abs=1e-6)
        worst = min(worst, fig["min_cosine"])
    assert r["min_token_cosine"] == pytest.approx(worst, abs=1e-6)
    assert 0.9 < worst < 1 - 1e-7  # quantised: close to the reference, not equal to it
    assert 1e-4 < r["features"]["rms_rel_err"] < 0.2  # the fp32 graph's is ~1e-6
    a = r["answers"]
    assert a["prompts"] == len(r["tokens"]) * 3 * len(parity.SAMPLE_QUESTIONS)
    assert r["answer_agreement"] == a["agreement"] and 0 <= a["agreement"] <= 1


def test_answer_agreement_counts_differing_answers(int8_bundle, tiny_model):
    before, _ = tiny_model.prompt_ids("?")
    questions = [tiny_model.prompt_ids(q)[1] for q in parity.SAMPLE_QUESTIONS[:2]]
    rng = np.random.default_rng(0)
    tokens = {4: rng.normal(0, 1, (2, 4, 128)).astype(np.float32)}
    llm = int8_bundle.path("llm")
    assert parity.answer_agreement(llm, before, questions, tokens, tokens)["agreement"] == 1.0
    other = {4: rng.normal(0, 30, (2, 4, 128)).astype(np.float32)}
    r = parity.answer_agreement(llm, before, questions, tokens, other)
    assert r["prompts"] == 4 and r["agreement"] < 1.0


def test_trained_models_are_gated(tiny_ckpt, tmp_path, monkeypatch):
    """For a trained model the int8 thresholds are enforced: a miss discards the export."""
    ckpt = tmp_path / "trained"
    shutil.copytree(tiny_ckpt, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mqt_edge_train"] = {"steps": 1}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(parity, "INT8_MIN_COSINE", 0.9999999)
    stages = []
    with pytest.raises(ExportError, match="int8 vision graph .*worst token cosine.* --vision-quant fp32"):
        export(ExportOptions(model=str(ckpt), out=tmp_path / "b", max_tokens=4, quant="f32", vision_quant="int8"),
               on_stage=stages.append)
    assert not (tmp_path / "b").exists()
    assert not any(s.startswith("gguf") for s in stages)  # refused at the vision check, before the LLM work


def test_answer_gate_raises_for_a_trained_model(int8_bundle, tiny_model):
    from mqt_edge.exporters.onnx_quant import _int8_answers

    entry = dict(int8_bundle.manifest.parity["vision_int8"], enforced=True)
    before, _ = tiny_model.prompt_ids("?")
    questions = [tiny_model.prompt_ids(q)[1] for q in parity.SAMPLE_QUESTIONS[:2]]
    rng = np.random.default_rng(1)
    same = {4: rng.normal(0, 1, (2, 4, 128)).astype(np.float32)}
    ok = _int8_answers(entry, int8_bundle.path("llm"), before, questions, {"fp32": same, "int8": same}, None, parity)
    assert ok["pass"] and ok["answer_agreement"] == 1.0
    other = {4: rng.normal(0, 30, (2, 4, 128)).astype(np.float32)}
    with pytest.raises(ExportError, match="answer agreement"):
        _int8_answers(entry, int8_bundle.path("llm"), before, questions, {"fp32": same, "int8": other}, None, parity)


def test_bad_vision_quant_is_refused_before_work(tiny_ckpt, tmp_path):
    with pytest.raises(InputError, match="--vision-quant"):
        export(ExportOptions(model=str(tiny_ckpt), out=tmp_path / "b", vision_quant="int4"))
    r = cli("export", str(tiny_ckpt), "--out", str(tmp_path / "c"), "--vision-quant", "int4")
    assert r.returncode == 2 and len(stderr_lines(r)) == 1 and "int4" in r.stderr
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_runtime_picks_int8_on_the_cpu_and_can_be_forced_to_fp32(int8_bundle):
    im = scene(seed=3)
    px = None
    with Pipeline.load(int8_bundle.root) as pipe:
        assert pipe.backends["vision"] == "onnxruntime/cpu int8" and pipe.backends["mqt"] == "onnxruntime/cpu"
        a = pipe.ask(im, Q, m=4, max_new_tokens=4)
        assert set(a.timings_ms) == TIMINGS
        from mqt_edge.image import preprocess

        px = preprocess(im, pipe.image_spec)  # (1, 3, H, W)
        got8 = pipe.vision.features(px)
    with Pipeline.load(int8_bundle.root, vision_precision="fp32") as pipe:
        assert pipe.backends["vision"] == "onnxruntime/cpu"
        got32 = pipe.vision.features(px)
    assert np.array_equal(got8, session(int8_bundle.path("vision_int8")).run(None, {"pixel_values": px})[0])
    assert np.array_equal(got32, session(int8_bundle.path("vision")).run(None, {"pixel_values": px})[0])


def test_int8_on_a_bundle_without_it_is_one_line(fp32_only, tmp_path):
    with Pipeline.load(fp32_only.root) as pipe:  # auto: fp32, nothing to pick
        assert pipe.backends["vision"] == "onnxruntime/cpu"
    with pytest.raises(InputError, match="no int8 vision graph"):
        Pipeline.load(fp32_only.root, vision_precision="int8")
    scene().save(tmp_path / "img.png")
    for flags, msg in ((["--vision-precision", "int8"], "--vision-quant int8"),
                       (["--vision-precision", "int4"], "unknown vision precision")):
        r = cli("run", str(tmp_path / "img.png"), Q, "--bundle", str(fp32_only.root), "-m", "2", *flags)
        lines = stderr_lines(r)
        assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], r.stderr


def test_run_json_names_the_int8_backend_and_keeps_its_fields(int8_bundle, tmp_path):
    scene().save(tmp_path / "img.png")
    r = cli("run", str(tmp_path / "img.png"), Q, "--bundle", str(int8_bundle.root), "-m", "2",
            "--max-new-tokens", "3", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["backends"]["vision"] == "onnxruntime/cpu int8" and set(out["timings_ms"]) == TIMINGS
    r = cli("run", str(tmp_path / "img.png"), Q, "--bundle", str(int8_bundle.root), "-m", "2",
            "--max-new-tokens", "3", "--json", "--vision-precision", "fp32")
    assert json.loads(r.stdout)["backends"]["vision"] == "onnxruntime/cpu"


def test_planner_costs_the_int8_graph(int8_bundle, fp32_only):
    from mqt_edge.profiles import Calibration, load_profile
    from mqt_edge.profiles.planner import INT8_VISION_SPEEDUP, ModelFacts, Options, _analytic, memory_breakdown

    f8, f32 = ModelFacts.from_bundle(int8_bundle), ModelFacts.from_bundle(fp32_only)
    assert f8.vision_int8_bytes == int8_bundle.manifest.artifacts["vision_int8"].bytes and not f32.vision_int8_bytes
    cpu = load_profile("cpu")
    t8, t32 = _analytic(cpu, f8, 16, Options()), _analytic(cpu, f32, 16, Options())
    forced = _analytic(cpu, f8, 16, Options(vision_precision="fp32"))
    assert forced["vision"] == t32["vision"]
    assert t8["vision"] < t32["vision"]
    big = dict(vision_flops=10**13)  # compute-bound: the roofline's time is FLOPs over the int8 speed-up
    vis = lambda f, **o: _analytic(cpu, replace(f, **big), 16, Options(**o))["vision"]  # noqa: E731
    assert vis(f8) == pytest.approx(vis(f32) / INT8_VISION_SPEEDUP)
    assert vis(f8, vision_on_cpu=True) == vis(f8)
    mem8 = memory_breakdown(cpu, f8, 16, Options())["vision_weights"]
    assert mem8 < memory_breakdown(cpu, f32, 16, Options())["vision_weights"]
    # A TensorRT GPU profile builds its engines from the fp32 graph: int8 changes nothing there.
    gpu = load_profile("rtx-4090")
    assert _analytic(gpu, f8, 16, Options()) == _analytic(gpu, f32, 16, Options())
    # A profile calibrated with fp32 vision predicts the int8 run faster by the same ratio.
    cal = Calibration(vision_ms=300.0, mqt_ms_fixed=1, mqt_ms_per_token=0.1, prefill_ms_fixed=5,
                      prefill_ms_per_token=1, decode_ms_per_token=10, peak_mb=500, llm_params=f8.llm_params,
                      llm_bytes=f8.llm_bytes, vision_flops=f8.vision_flops, vision_precision="fp32")
    from mqt_edge.profiles.planner import predict

    calibrated = replace(cpu, calibration=cal)
    ttft8 = predict(calibrated, f8, 16, Options())[1]
    ttft32 = predict(calibrated, f8, 16, Options(vision_precision="fp32"))[1]
    assert ttft32 - ttft8 == pytest.approx(300.0 * (1 - t8["vision"] / t32["vision"]), rel=1e-6)


def test_profile_rejects_an_unknown_calibrated_precision(tmp_path):
    from mqt_edge.profiles import Calibration, ProfileError, load_profile, parse_profile
    from mqt_edge.calibrate import to_toml

    cal = Calibration(vision_ms=3.0, mqt_ms_fixed=1, mqt_ms_per_token=0.1, prefill_ms_fixed=5, prefill_ms_per_token=1,
                      decode_ms_per_token=10, peak_mb=500, llm_params=1, llm_bytes=1, vision_flops=1,
                      vision_precision="int8")
    text = to_toml(replace(load_profile("cpu"), calibration=cal))
    assert parse_profile(text, "x.toml", "x.toml").calibration.vision_precision == "int8"
    with pytest.raises(ProfileError, match="vision_precision"):
        parse_profile(text.replace('vision_precision = "int8"', 'vision_precision = "int4"'), "x.toml", "x.toml")
