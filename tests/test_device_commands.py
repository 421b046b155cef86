"""Device commands work on a base install: torch, transformers and the exporters' packages absent.

Each command runs in a fresh interpreter whose import system refuses those packages (as if they
were not installed), with a bundle exported beforehand by this process. `pip install "mqt-edge[cpu]"`
gives numpy, Pillow, Typer, Rich, llama-cpp-python and onnxruntime; nothing else may be needed.
"""

import json
import subprocess
import sys

import pytest

from conftest import scene

# The `export` and `dev` extras' packages, and the PyTorch reference: none is on a device.
ABSENT = ("torch", "transformers", "onnx", "onnxscript", "optimum", "gguf", "safetensors", "sentencepiece",
          "huggingface_hub", "matplotlib", "mqt_edge.model")

WRAPPER = """
import importlib.abc, sys
ABSENT = {absent!r}

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == a or name.startswith(a + ".") for a in ABSENT):
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on a base install)", name=name)
        return None

sys.meta_path.insert(0, Absent())
{body}
"""


def without_build_tools(body: str, timeout: float = 120) -> subprocess.CompletedProcess:
    code = WRAPPER.format(absent=ABSENT, body=body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def device_cli(*args: str) -> subprocess.CompletedProcess:
    body = f"sys.argv = ['mqt-edge', *{list(map(str, args))!r}]\nfrom mqt_edge.cli import main\nmain()"
    return without_build_tools(body)


@pytest.fixture(scope="module")
def world(tiny_ckpt, tmp_path_factory):
    """A bundle (m up to 16, enough for calibrate), an image and a 3-question VQA set."""
    from mqt_edge.exporters import ExportOptions, export
    from mqt_edge.vqa import write_dataset

    root = tmp_path_factory.mktemp("device")
    # parity is the export tests' business; here the bundle only has to exist
    bundle = export(ExportOptions(model=str(tiny_ckpt), out=root / "bundle", quant="f32", max_tokens=16,
                                  parity=False)).bundle
    scene().save(root / "img.png")
    data = write_dataset(root / "vqa", 3, seed=0)  # the path of data.jsonl
    return {"bundle": str(bundle.root), "img": str(root / "img.png"), "data": str(data), "root": root}


def test_the_wrapper_really_hides_the_packages():
    for name in ("torch", "transformers", "onnx", "mqt_edge.model"):
        r = without_build_tools(f"import {name}")
        assert r.returncode != 0 and "absent on a base install" in r.stderr, name
    assert without_build_tools("import numpy, onnxruntime, llama_cpp, mqt_edge.cli").returncode == 0


COMMANDS = {
    "version": lambda w: ["--version"],
    "run": lambda w: ["run", w["img"], "What is it?", "--bundle", w["bundle"], "-m", "2", "--max-new-tokens", "2", "--json"],
    "run planned": lambda w: ["run", w["img"], "What is it?", "--bundle", w["bundle"], "--profile", "cpu",
                              "--max-new-tokens", "2", "--json"],
    "plan preset": lambda w: ["plan", "--profile", "jetson-orin-nano-8gb", "--preset", "mqt-llava-7b", "--quant", "q4_k_m"],
    "plan bundle": lambda w: ["plan", "--profile", "auto", "--bundle", w["bundle"], "--json"],
    "profiles": lambda w: ["profiles"],
    "profiles show": lambda w: ["profiles", "show", "jetson-orin-nano-8gb", "--mode", "super"],
    "eval": lambda w: ["eval", "--data", w["data"], "--bundle", w["bundle"], "--tokens", "1,4", "--limit", "2",
                       "--timing-samples", "1", "--json"],
    "doctor": lambda w: ["doctor"],  # --json: test_doctor_reports_every_probe_without_torch
    "watch": lambda w: ["watch", w["img"], "What is it?", "--bundle", w["bundle"], "-m", "2", "--max-new-tokens", "2",
                        "--json"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_device_command_runs_without_torch(world, command):
    r = device_cli(*COMMANDS[command](world))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    if command in ("run", "run planned", "plan bundle", "eval"):
        json.loads(r.stdout)


def test_chat_and_an_image_watch_need_neither_torch_nor_the_video_extra(world):
    # PyAV (and OpenCV) absent too: only cameras, videos and streams need the `video` extra
    body = ("import io\nsys.stdin = io.StringIO('What is it?\\n/m 2\\nWhat is it?\\n')\n"
            f"sys.argv = ['mqt-edge', 'chat', {world['img']!r}, '--bundle', {world['bundle']!r}, '-m', '4',"
            " '--max-new-tokens', '2', '--json']\nfrom mqt_edge.cli import main\nmain()")
    code = WRAPPER.format(absent=ABSENT + ("av", "cv2"), body=body)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(line)["m"] for line in r.stdout.splitlines()] == [4, 2]
    body = (f"sys.argv = ['mqt-edge', 'watch', {str(world['root'] / '*.png')!r}, 'What is it?', '--bundle', "
            f"{world['bundle']!r}, '-m', '2', '--max-new-tokens', '2', '--json']\nfrom mqt_edge.cli import main\nmain()")
    r = subprocess.run([sys.executable, "-c", WRAPPER.format(absent=ABSENT + ("av", "cv2"), body=body)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.splitlines()[-1])["summary"]["answered"] == 1


def test_calibrate_then_plan_with_the_profile_without_torch(world):
    profile = world["root"] / "this-device.toml"
    r = device_cli("calibrate", "--bundle", world["bundle"], "--out", profile, "--runs", "1")
    assert r.returncode == 0 and profile.is_file(), r.stderr[-2000:]
    r = device_cli("plan", "--profile", profile, "--bundle", world["bundle"], "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["chosen_m"] is not None


def test_doctor_reports_every_probe_without_torch(world):
    r = device_cli("doctor", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    probes = json.loads(r.stdout)["probes"]
    assert all(p["ok"] for p in probes.values()), {k: p for k, p in probes.items() if not p["ok"]}
