"""`mqt-edge doctor`: every probe reports or says it failed; the command itself never fails."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mqt_edge import device, doctor
from mqt_edge.cli import app


def test_the_report_describes_this_machine():
    rep = doctor.report()
    probes = rep["probes"]
    assert list(probes) == list(doctor.PROBES)
    for name in ("versions", "cpu", "gpus", "jetson", "profile", "tensorrt"):
        assert probes[name]["ok"], (name, probes[name])
    assert probes["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert probes["cpu"]["cores"] == device.usable_cores() and probes["cpu"]["model"]
    assert probes["profile"]["auto"] in ("cpu", *__import__("mqt_edge.profiles").profiles.builtin_names())
    line = doctor.summary(rep)
    assert "\n" not in line and line.startswith("mqt-edge ") and f"Python {probes['versions']['python']}" in line
    json.dumps(rep)  # --json must be able to print it


def test_llama_and_onnxruntime_probes_read_the_runtimes():
    import onnxruntime as ort

    from mqt_edge.runtimes import llama

    probes = doctor.report()["probes"]
    assert probes["llama.cpp"]["system_info"] == llama.system_info()
    assert probes["llama.cpp"]["amx_guard"] == llama.amx_guard()[0]
    assert probes["onnxruntime"]["providers"] == ort.get_available_providers()


def _break_everything(monkeypatch):
    def boom(*_a, **_k):
        raise RuntimeError("probe forced to fail")

    from mqt_edge import profiles
    from mqt_edge.runtimes import llama

    for name in ("cpu_info", "gpus", "jetson_model", "total_ram_bytes"):
        monkeypatch.setattr(device, name, boom)
    monkeypatch.setattr(llama, "_lib", boom)
    monkeypatch.setattr(profiles, "detect", boom)
    monkeypatch.setattr(doctor.platform, "python_version", boom)
    monkeypatch.setattr(doctor.importlib.util, "find_spec", boom)
    monkeypatch.setattr(doctor.os, "getloadavg", boom)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError


def test_every_probe_failing_still_gives_a_report(monkeypatch):
    _break_everything(monkeypatch)
    rep = doctor.report()
    for name, facts in rep["probes"].items():
        assert facts["ok"] is False and facts["error"], name
    assert "probe forced to fail" in rep["probes"]["cpu"]["error"]
    assert "onnxruntime" in rep["probes"]["onnxruntime"]["error"]
    assert doctor.summary(rep).count("probe failed") == len(doctor.PROBES)
    assert any("probe failed" in line for line in doctor.lines(rep))


def test_the_command_exits_0_with_every_probe_failing(monkeypatch):
    _break_everything(monkeypatch)
    runner = CliRunner()
    r = runner.invoke(app, ["doctor"])
    assert r.exit_code == 0 and "cpu: probe failed: RuntimeError: probe forced to fail" in r.output, r.output
    r = runner.invoke(app, ["doctor", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["probes"]["gpus"]["ok"] is False


def test_a_probe_returning_junk_does_not_break_the_summary(monkeypatch):
    monkeypatch.setitem(doctor.PROBES, "gpus", lambda: {"count": "many", "devices": None})
    rep = doctor.report()  # the note and summary code meet a shape they do not expect
    assert isinstance(doctor.summary(rep), str) and doctor.lines(rep)


def _probes(**over):
    base = {
        "versions": {"ok": True}, "tensorrt": {"ok": True, "present": False},
        "cpu": {"ok": True, "arch": "x86_64", "features": ["AVX2"], "cores": 2, "host_cores": 2},
        "load": {"ok": True, "1m": 0.3, "5m": 0.3, "15m": 0.3, "cores": 2, "host_cores": 2},
        "llama.cpp": {"ok": True, "gpu_offload": True, "amx_guard": False},
        "onnxruntime": {"ok": True, "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]},
        "gpus": {"ok": True, "count": 1}, "jetson": {"ok": True, "present": False},
        "profile": {"ok": True, "auto": "l4", "calibrated": True},
    }
    return base | over


def _notes(probes):
    return [n for f in doctor.NOTES if (n := f(probes))]


def test_notes_say_why_it_may_be_slow():
    assert _notes(_probes()) == []
    assert "vision encoder runs on the CPU" in _notes(_probes(onnxruntime={"ok": True, "providers": ["CPUExecutionProvider"]}))[0]
    assert "LLM runs on the CPU" in _notes(_probes(**{"llama.cpp": {"ok": True, "gpu_offload": False, "amx_guard": False}}))[0]
    assert "AMX guard on" in _notes(_probes(**{"llama.cpp": {"ok": True, "gpu_offload": True, "amx_guard": True}}))[0]
    assert "no AVX2" in _notes(_probes(cpu={"ok": True, "arch": "x86_64", "features": [], "cores": 2, "host_cores": 2}))[0]
    assert "2 of 16 cores" in _notes(_probes(cpu={"ok": True, "arch": "x86_64", "features": ["AVX2"], "cores": 2,
                                                  "host_cores": 16}))[0]
    assert "not calibrated" in _notes(_probes(profile={"ok": True, "auto": "cpu", "calibrated": False}))[0]
    # without a GPU, a CPU-only onnxruntime and llama.cpp are what they should be
    assert _notes(_probes(gpus={"ok": True, "count": 0}, onnxruntime={"ok": True, "providers": ["CPUExecutionProvider"]},
                          **{"llama.cpp": {"ok": True, "gpu_offload": False, "amx_guard": False}})) == []


@pytest.mark.parametrize("load, cores, host_cores, threads", [
    (0.3, 2, 2, None),  # a quiet machine: all cores
    (0.99, 2, 2, None),  # less than one core's worth taken
    (1.0, 2, 2, 1),
    (2.4, 2, 2, 1),  # the machine: more work than cores, still one thread
    (3.4, 8, 8, 4),  # 4.6 cores left: the whole ones
    (4.0, 2, 16, None),  # a 2-core container on a 16-core host: 0.5 of its cores taken
    (12.0, 2, 16, 1),
])
def test_doctor_says_what_to_pass_when_the_load_is_high(monkeypatch, load, cores, host_cores, threads):
    monkeypatch.delenv("MQT_EDGE_SPIN", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(doctor.os, "getloadavg", lambda: (load, 0.5, 0.5))
    monkeypatch.setattr(doctor.os, "cpu_count", lambda: host_cores)
    monkeypatch.setattr(device, "usable_cores", lambda: cores)
    rep = doctor.report()
    assert rep["probes"]["load"] == {"ok": True, "1m": load, "5m": 0.5, "15m": 0.5, "cores": cores,
                                     "host_cores": host_cores}
    busy = [n for n in rep["notes"] if n.startswith("the CPU is busy")]
    if threads is None:
        assert busy == []
    else:
        assert len(busy) == 1 and f"--threads {threads} " in busy[0] and f"threads={threads})" in busy[0]
        assert f"load average {load:g}" in busy[0]
    assert f"load {load:g} on {cores} cores" in doctor.summary(rep)


@pytest.mark.parametrize("env, named", [({"MQT_EDGE_SPIN": "on"}, "MQT_EDGE_SPIN=on"),
                                        ({"OMP_WAIT_POLICY": "ACTIVE"}, "OMP_WAIT_POLICY=ACTIVE"),
                                        ({"OMP_WAIT_POLICY": "PASSIVE"}, None), ({}, None)])
def test_on_a_busy_cpu_doctor_names_the_setting_that_makes_threads_spin(monkeypatch, env, named):
    for key in ("MQT_EDGE_SPIN", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    probes = _probes(load={"ok": True, "1m": 3.0, "5m": 3.0, "15m": 3.0, "cores": 2, "host_cores": 2})
    (note,) = [n for n in _notes(probes) if n.startswith("the CPU is busy")]
    assert "--threads 1" in note
    if named:
        assert f"idle threads spin ({named})" in note
    else:
        assert "spin" not in note and "all cores stay the faster choice" in note


def test_gpus_from_nvidia_smi_when_nvml_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(device.shutil, "which", lambda name: "/usr/bin/" + name)
    out = "NVIDIA GeForce RTX 4090, 24564, 550.54.14\nNVIDIA L4, 23034, 550.54.14\n"
    monkeypatch.setattr(device.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=out, stderr=""))
    found = device.gpus()
    assert [(g.name, round(g.memory_gb, 1), g.driver, g.source) for g in found] == [
        ("NVIDIA GeForce RTX 4090", 25.8, "550.54.14", "nvidia-smi"), ("NVIDIA L4", 24.2, "550.54.14", "nvidia-smi")]
    from mqt_edge import profiles

    assert profiles.detect_gpu() == "rtx-4090"  # detection reads the same probe

    def hang(*a, **k):
        raise subprocess.TimeoutExpired(a, 10)

    monkeypatch.setattr(device.subprocess, "run", hang)
    assert device.gpus() == []


def test_jetson_model_and_release(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "jtop", None)
    monkeypatch.setattr(device, "DEVICE_TREE_MODEL", tmp_path / "model")
    monkeypatch.setattr(device, "NV_TEGRA_RELEASE", tmp_path / "nv_tegra_release")
    assert device.jetson_model() is None and device.l4t_release() is None
    (tmp_path / "model").write_text("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super\x00")
    (tmp_path / "nv_tegra_release").write_text(
        "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n")
    assert device.jetson_model() == "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"
    assert device.l4t_release() == "36.4.3"
    monkeypatch.setattr(device, "jetpack_version", lambda: "6.2")
    facts = doctor.probe_jetson()
    assert facts == {"present": True, "model": device.jetson_model(), "jetpack": "6.2", "l4t": "36.4.3"}
    assert "JetPack 6.2, L4T 36.4.3" in doctor.summary({"probes": {"jetson": {"ok": True, **facts}}})


def test_pytest_header_is_the_one_line_summary():
    from conftest import pytest_report_header

    header = pytest_report_header(None)
    assert header.startswith("mqt-edge doctor: mqt-edge ") and "\n" not in header
