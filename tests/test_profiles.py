"""Device profiles, the planner, calibration, and planning inside `run`."""

import json
import sys

import numpy as np
import pytest

from conftest import cli, stderr_lines

import mqt_edge.profiles as profiles
from mqt_edge import device
from mqt_edge.profiles import DATASHEET, ProfileError, builtin_names, load_profile, parse_profile
from mqt_edge.profiles.planner import ModelFacts, Options, memory_breakdown, plan, predict

EXPECTED = {"jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-32gb", "jetson-agx-orin-64gb",
            "jetson-thor", "rtx-4090", "rtx-3060-12gb", "l4", "a100-80gb", "h100-80gb", "cpu"}
# Measured on this project's build machine: `mqt-edge export` of the mqt-llava-7b preset at q4_k_m.
REAL_7B_Q4_GGUF = 4_081_193_920
REAL_7B_VISION_ONNX = 1_162_811_070  # fp32, 23 of 24 CLIP-L layers


def test_builtin_set_and_sources():
    assert set(builtin_names()) == EXPECTED
    for name in EXPECTED:
        p = load_profile(name)
        assert all(p.sources[k] for k in DATASHEET), name
        assert 0 < p.memory.usable_gb < p.memory.total_gb
        assert eval(repr(p), {"load_profile": load_profile}) == p
    nano = load_profile("jetson-orin-nano-8gb", mode="super")
    assert nano.memory.bandwidth_gbs == 102.0 and "super" in nano.modes
    assert eval(repr(nano), {"load_profile": load_profile}) == nano


def _text(**override):
    text = (profiles.HERE / "cpu.toml").read_text()
    for old, new in override.items():
        text = text.replace(old, new)
    return text


def test_more_malformed_profiles():
    base = _text()
    cases = {
        base.replace('kind = "cpu"', 'kind = "cpu"\nmodes = 5'): "modes",
        base + '\n[modes.fast]\nbandwidth_gbs = "fast"\nsource = "x"\n': "bandwidth_gbs",
        base + "\n[modes.fast]\nbandwidth_gbs = 90.0\n": "no source",
        _text(**{"bandwidth_gbs = 60.0": "bandwidth_gbs = 0.0"}): "positive",
        _text(**{"bandwidth_gbs = 60.0": "bandwidth_gbs = nan"}): "positive",
        base + "\n[memroy]\nx = 1\n": "unknown key 'memroy'",
        "": "missing 'name'",
    }
    for text, match in cases.items():
        with pytest.raises(ProfileError, match=match):
            parse_profile(text, "p.toml")


@pytest.mark.parametrize("text, match", [
    (_text(**{"bandwidth_gbs = 60.0": "bandwith_gbs = 60.0"}), r"line 9: unknown key 'bandwith_gbs' in \[memory\]"),
    (_text(**{"cpu_cores = 8\n": "cpu_cores = \"eight\"\n"}), r"line 15: 'cpu_cores' is 'eight', expected int"),
    (_text(**{'kind = "cpu"': 'kind = "cpu"\ncolour = "red"'}), r"line 5: unknown key 'colour'"),
    (_text(**{"[limits]": "[limits"}), "not valid TOML"),
    (_text(**{"ttft_ms = 5000.0\n": ""}), r"\[limits\] is missing 'ttft_ms'"),
])
def test_malformed_profiles_name_the_key_and_line(text, match):
    with pytest.raises(ProfileError, match=match):
        parse_profile(text, "my.toml")


def test_a_misspelt_vision_backend_is_refused_when_the_profile_loads(tmp_path):
    path = tmp_path / "dev.toml"
    path.write_text(_text(**{'vision_backend = "onnxruntime/cpu"': 'vision_backend = "tensorrtt"'}))
    with pytest.raises(ProfileError, match=r"dev.toml, line 24: \[prefer\] vision_backend 'tensorrtt'") as exc:
        load_profile(str(path))
    assert "\n" not in str(exc.value) and "tensorrt, onnxruntime" in str(exc.value)  # the fix lists the names
    r = cli("plan", "--profile", str(path), "--preset", "bench")
    assert r.returncode == 2 and len(stderr_lines(r)) == 1 and "vision_backend 'tensorrtt'" in r.stderr, r.stderr


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ProfileError, match="did you mean jetson-orin-nano-8gb.*known: a100-80gb"):
        load_profile("jetson-orin-nano-8g")


def test_aliases_and_detection(monkeypatch, tmp_path):
    monkeypatch.setattr(device, "DEVICE_TREE_MODEL", tmp_path / "model")  # profiles detect through device.py
    monkeypatch.setitem(sys.modules, "jtop", None)  # jetson-stats, if installed, must not answer here
    monkeypatch.setattr(profiles, "_total_ram_gb", lambda: 7.4)
    monkeypatch.setattr(profiles, "detect_gpu", lambda: None)
    assert load_profile("jetson-orin").name == "jetson-agx-orin-64gb"  # not a Jetson
    assert load_profile("auto").name == "cpu"
    (tmp_path / "model").write_text("NVIDIA Jetson Orin Nano Developer Kit\x00")
    assert load_profile("jetson-orin").name == "jetson-orin-nano-8gb"
    assert load_profile("auto").name == "jetson-orin-nano-8gb"
    (tmp_path / "model").write_text("NVIDIA Jetson Orin NX Engineering Reference Developer Kit\x00")
    assert profiles.detect_jetson() is None  # an 8 GB NX: no built-in profile
    monkeypatch.setattr(profiles, "_total_ram_gb", lambda: 15.3)
    assert profiles.detect_jetson() == "jetson-orin-nx-16gb"
    (tmp_path / "model").write_text("NVIDIA Jetson Xavier NX Developer Kit\x00")
    assert profiles.detect_jetson() is None  # not an Orin
    monkeypatch.setattr(profiles, "_total_ram_gb", lambda: 30.0)
    (tmp_path / "model").write_text("Jetson AGX Orin\x00")
    assert profiles.detect_jetson() == "jetson-agx-orin-32gb"
    (tmp_path / "model").write_text("Raspberry Pi 5\x00")
    monkeypatch.setattr(profiles, "detect_gpu", lambda: "rtx-4090")
    assert profiles.detect()[0] == "rtx-4090"


@pytest.mark.parametrize("name, mem, expected", [
    ("NVIDIA GeForce RTX 4090", 25.3, "rtx-4090"), ("NVIDIA GeForce RTX 4090 Laptop GPU", 17.2, None),
    ("NVIDIA A100-SXM4-80GB", 85.0, "a100-80gb"), ("NVIDIA A100-PCIE-40GB", 42.4, None),
    ("NVIDIA GeForce RTX 3060 Ti", 8.6, None), ("NVIDIA H200", 150.0, None), ("NVIDIA L4", 24.1, "l4"),
])
def test_gpus_map_to_profiles_by_name_and_memory(name, mem, expected):
    assert profiles.match_gpu(name, mem) == expected


@pytest.fixture(scope="module")
def facts_7b():
    return ModelFacts.from_preset("mqt-llava-7b", "q4_k_m")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_7b_tables_are_sane(facts_7b, name):
    p = load_profile(name)
    parts = memory_breakdown(p, facts_7b, 256, Options())
    vision_real = REAL_7B_VISION_ONNX / (2 if p.prefer.vision_backend.startswith("tensorrt") else 1)
    real = (REAL_7B_Q4_GGUF + vision_real) / 2**20
    gguf = parts["llm_file_pages"] or parts["llm_weights"]  # on a CPU the file's pages are the whole GGUF
    predicted = gguf + parts["vision_weights"]
    assert abs(predicted - real) / real <= 0.10, (predicted, real)
    result = plan(p, facts_7b)
    ttfts = [c.ttft_ms for c in result.candidates]
    # TTFT rises with m: never falls, and m = 256 costs more than m = 1 (a memory-bound prefill is
    # flat in the roofline, so neighbours may tie on fast GPUs)
    assert ttfts == sorted(ttfts) and ttfts[-1] > ttfts[0] * 1.2
    assert all(c.total_ms > c.ttft_ms for c in result.candidates)
    mems = [c.memory_mb for c in result.candidates]
    assert mems == sorted(mems)


def test_chosen_is_the_largest_m_meeting_the_ttft_limit(facts_7b):
    p = load_profile("jetson-orin-nx-16gb")
    cands = plan(p, facts_7b).candidates
    lo, hi = cands[5], cands[6]  # m = 36 and 64
    result = plan(p, facts_7b, ttft_ms=(lo.ttft_ms + hi.ttft_ms) / 2)
    assert result.chosen_m == lo.m
    assert [c.fits for c in result.candidates] == [c.m <= lo.m for c in result.candidates]
    assert "largest m that fits" in result.reason


def test_nothing_fits_says_what_would(facts_7b):
    p = load_profile("jetson-orin-nano-8gb")
    # (6000 MB: the 7B's shared context, sized for conversations of m = 256, needs 6.4 GB at any m)
    result = plan(p, facts_7b, memory_mb=6000)
    assert result.chosen_m is None and result.suggestions
    for s in result.suggestions:
        assert s["memory_mb"] <= 6000 and s["ttft_ms"] <= result.limits["ttft_ms"]
    changes = [s["change"] for s in result.suggestions]
    assert any(c.startswith("--sequential") for c in changes)
    assert not any("onnxruntime/cpu" in c for c in changes)  # shared memory: fp32 vision on the CPU costs more
    seq = plan(p, facts_7b, memory_mb=6000, options=Options(sequential_load=True))
    assert seq.chosen_m is not None  # the suggestion holds when applied
    hopeless = plan(p, facts_7b, memory_mb=100)
    need = hopeless.suggestions[-1]["change"]
    limit = float(need.split()[1])
    assert plan(p, facts_7b, memory_mb=limit).chosen_m is not None  # "--memory-mb N" is enough


def test_jetson_pitfalls_vision_beside_the_llm(facts_7b):
    nano = load_profile("jetson-orin-nano-8gb")
    default = predict(nano, facts_7b, 64, Options())[0]
    sequential = predict(nano, facts_7b, 64, Options(sequential_load=True))[0]
    assert sequential < default - 200  # the vision graph is gone before the KV cache and buffers are made
    gpu = load_profile("rtx-3060-12gb")
    assert predict(gpu, facts_7b, 64, Options(vision_on_cpu=True))[0] < predict(gpu, facts_7b, 64, Options())[0]
    # vision on the CPU is slower
    assert predict(gpu, facts_7b, 64, Options(vision_on_cpu=True))[1] > predict(gpu, facts_7b, 64, Options())[1]


def test_accuracy_table_picks_the_smallest_m_within_the_drop(facts_7b):
    from dataclasses import replace

    f = replace(facts_7b, accuracy=((2, 0.70), (16, 0.90), (64, 0.915), (256, 0.92)))
    result = plan(load_profile("jetson-agx-orin-64gb"), f, accuracy_drop=0.02)
    assert result.chosen_m == 16 and "smallest m" in result.reason


def test_plan_cli_json_and_table():
    r = cli("plan", "--profile", "jetson-orin-nano-8gb", "--preset", "mqt-llava-7b", "--quant", "q4_k_m", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert {"profile", "chosen_m", "candidates", "limits"} <= set(d)
    assert set(d["candidates"][0]) == {"m", "memory_mb", "ttft_ms", "total_ms", "fits"}
    assert set(d["limits"]) == {"memory_mb", "ttft_ms"}
    r = cli("plan", "--profile", "jetson-orin-nano-8gb", "--preset", "mqt-llava-7b", "--memory-mb", "4000")
    assert r.returncode == 0 and "nothing fits" in r.stdout and "would fit" in r.stdout
    r = cli("plan", "--profile", "jetson-orin", "--preset", "bench")
    assert "not on a Jetson, so jetson-orin means jetson-agx-orin-64gb" in r.stderr
    assert "chosen m = " in r.stdout


@pytest.mark.parametrize("args, match", [
    (["plan", "--profile", "jetson-nanoo", "--preset", "bench"], "unknown profile 'jetson-nanoo'"),
    (["plan", "--profile", "cpu"], "exactly one of --bundle and --preset"),
    (["plan", "--profile", "cpu", "--preset", "bench", "--quant", "q2"], "unknown quant"),
    (["profiles", "show", "nope"], "unknown profile"),
])
def test_cli_errors_are_one_line(args, match):
    r = cli(*args)
    lines = stderr_lines(r)
    assert r.returncode == 2 and len(lines) == 1 and match in lines[0], r.stderr


@pytest.mark.parametrize("args, match", [
    (["plan", "--profile", "cpu", "--preset", "bench", "--ttft-ms", "nan"], "positive numbers"),
    (["plan", "--profile", "cpu", "--preset", "bench", "--memory-mb", "-5"], "positive numbers"),
    (["calibrate", "--out", "/nonexistent/dir/x.toml"], "existing directory"),
])
def test_more_cli_errors(args, match):
    r = cli(*args)
    lines = stderr_lines(r)
    assert r.returncode == 2 and len(lines) == 1 and match in lines[0], r.stderr


def test_binary_profile_file(tmp_path):
    (tmp_path / "x.toml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ProfileError, match="UTF-8"):
        load_profile(str(tmp_path / "x.toml"))
    with pytest.raises(ProfileError):
        load_profile(str(tmp_path))  # a directory


def test_run_flags_reach_the_planner(facts_7b):
    from mqt_edge.profiles.planner import Options

    o = Options.for_run("onnxruntime/cpu", 10, True, facts_7b)
    assert o.vision_on_cpu and o.sequential_load and o.gpu_layers == 10
    assert Options.for_run("auto", 99, False, facts_7b).gpu_layers is None
    gpu = load_profile("rtx-3060-12gb")
    cpu_llm = predict(gpu, facts_7b, 16, Options.for_run("auto", 0, False, facts_7b))[1]
    assert cpu_llm > 3 * predict(gpu, facts_7b, 16, Options())[1]  # llama.cpp on the CPU is far slower


def test_calibration_scales_to_another_model(bundle, tmp_path):
    from dataclasses import replace

    out = tmp_path / "dev.toml"
    assert cli("calibrate", "--bundle", str(bundle.root), "--out", str(out), "--base", "cpu", "--runs", "1").returncode == 0
    p = load_profile(str(out))
    f = ModelFacts.from_bundle(bundle)
    double = replace(f, llm_params=2 * f.llm_params, llm_bytes=2 * f.llm_bytes)
    _, _, total1 = predict(p, f, 16, Options())
    _, _, total2 = predict(p, double, 16, Options())
    assert total2 > total1  # twice the LLM: slower prefill and decode
    assert predict(p, f, 16, Options(sequential_load=True))[1] > predict(p, f, 16, Options())[1]


def test_malformed_profile_file_in_the_cli(tmp_path):
    (tmp_path / "dev.toml").write_text(_text(**{"bandwidth_gbs = 60.0": "bandwith_gbs = 60.0"}))
    r = cli("plan", "--profile", str(tmp_path / "dev.toml"), "--preset", "bench")
    assert r.returncode == 2 and "line 9: unknown key 'bandwith_gbs'" in r.stderr


def test_profiles_list_and_show():
    r = cli("profiles")
    assert r.returncode == 0 and "jetson-orin-nano" in r.stdout and "super" in r.stdout
    r = cli("profiles", "show", "jetson-orin-nano-8gb", "--mode", "super")
    assert r.returncode == 0 and "102.0" in r.stdout and "DS-11105" in r.stdout


@pytest.fixture(scope="module")
def bundle(tiny_ckpt, tmp_path_factory):
    from mqt_edge.exporters import ExportOptions, export

    return export(ExportOptions(model=str(tiny_ckpt), out=tmp_path_factory.mktemp("pl") / "b", quant="f32")).bundle


def test_calibrate_writes_a_profile_the_planner_uses(bundle, tmp_path):
    out = tmp_path / "my-device.toml"
    r = cli("calibrate", "--bundle", str(bundle.root), "--out", str(out), "--base", "cpu", "--runs", "1")
    assert r.returncode == 0, r.stderr
    p = load_profile(str(out))
    c = p.calibration
    # (the tiny model's prefill slope is within noise; benchmarks/calibration_check.py measures a real one)
    assert p.name == "my-device" and c.vision_ms > 0 and c.decode_ms_per_token > 0
    f = ModelFacts.from_bundle(bundle)
    _, ttft, _ = predict(p, f, 64, Options())
    n = 64 + 16  # m and the question: the prompt head is shared, never prefilled per request
    xs, ys = zip(*sorted(c.prefill_points))  # the measured prefill per request, through its points
    prefill = float(np.interp(n, (0, *xs), (0, *ys)))
    expected = c.vision_ms + c.mqt_ms_fixed + 64 * c.mqt_ms_per_token + prefill
    assert ttft == pytest.approx(expected)
    r = cli("plan", "--profile", str(out), "--bundle", str(bundle.root), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["profile"] == "my-device"


def test_run_asks_the_planner_when_tokens_are_absent(bundle, tmp_path):
    from conftest import scene

    scene().save(tmp_path / "img.png")
    r = cli("run", str(tmp_path / "img.png"), "Q?", "--bundle", str(bundle.root), "--profile", "cpu",
            "--max-new-tokens", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    expected = plan(load_profile("cpu"), ModelFacts.from_bundle(bundle), max_new_tokens=2).chosen_m
    assert out["profile"] == "cpu" and out["m"] == expected and out["predicted"]["ttft_ms"] > 0
    r = cli("run", str(tmp_path / "img.png"), "Q?", "--bundle", str(bundle.root), "--profile", "cpu",
            "--ttft-ms", "0.001")
    assert r.returncode == 2 and "nothing fits" in r.stderr and "would fit" in r.stderr


def test_calibration_line_fit_never_goes_negative():
    from mqt_edge.calibrate import line_fit

    # a plain fit of these timings has a negative intercept (the CI failure that motivated this)
    x, y = [4, 4, 19, 19, 67, 67], [0.1, 0.2, 1.3, 1.0, 5.9, 6.3]
    assert np.polyfit(x, y, 1)[1] < 0
    fixed, slope = line_fit(x, y)
    assert fixed == 0.0 and slope > 0
    assert abs(slope - np.dot(x, y) / np.dot(x, x)) < 1e-12
    # falling timings: flat at the mean
    assert line_fit([1, 2, 3], [3.0, 2.0, 1.0]) == (2.0, 0.0)
    # a clean line is recovered as is
    f, s = line_fit([1, 2, 3, 4], [2.5, 3.0, 3.5, 4.0])
    assert abs(f - 2.0) < 1e-9 and abs(s - 0.5) < 1e-9
