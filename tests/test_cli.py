"""The CLI's own promises: every command's --help renders (each usage error points the user at it)."""

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from conftest import cli
from mqt_edge.cli import RUN_JSON_KEYS, app
from mqt_edge.errors import InputError


def command_paths(group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and sub-command, walked from the Click tree so new commands are covered too."""
    paths = [prefix]
    for name, sub in getattr(group, "commands", {}).items():  # typer may vendor its own click
        paths += command_paths(sub, prefix + (name,))
    return paths


PATHS = command_paths(typer.main.get_command(app))


def test_the_walk_finds_the_commands():
    names = {p[0] for p in PATHS if p}
    assert {"run", "export", "plan", "eval", "profiles", "train", "synth"} <= names
    assert ("profiles", "show") in PATHS


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "mqt-edge")
def test_every_help_renders(path):
    r = CliRunner().invoke(app, [*path, "--help"], terminal_width=100)
    assert r.exception is None, f"{' '.join(path)} --help raised {r.exception!r}"
    assert r.exit_code == 0 and "Usage" in r.output


def test_run_help_in_a_real_process():
    r = cli("run", "--help")
    assert r.returncode == 0 and "--vision-backend" in r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message, where", [
    (["run", "x.png", "q", "--tokens", "abc"], "Invalid value for '--tokens'", "run --help"),
    (["run"], "Missing argument 'image'", "run --help"),
    (["run", "x.png", "q", "--nope"], "No such option: --nope", "run --help"),
    (["bogus"], "No such command 'bogus'", "mqt_edge --help"),
    (["profiles", "show"], "Missing argument 'name'", "profiles show --help"),
])
def test_usage_errors_are_one_line_naming_the_help_to_run(args, message, where):
    r = cli(*args)
    lines = [line for line in r.stderr.splitlines() if line.strip() and "DeprecationWarning" not in line]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert message in lines[0] and lines[0].endswith(where) and "Usage:" not in r.stderr


# ---- run --json: the same keys every time -----------------------------------------------------------
SHAPES = str(Path(__file__).resolve().parents[1] / "examples" / "shapes.png")
CIRCLE = "What color is the circle?"


def _run_json(bundle, *args) -> dict:
    r = CliRunner().invoke(app, ["run", SHAPES, CIRCLE, "--bundle", str(bundle), "--json", *args])
    assert r.exit_code == 0, (r.output, r.exception)
    return json.loads(r.stdout)


def test_run_json_keys_are_fixed_and_null_when_unknown(shipped_bundle):
    one = _run_json(shipped_bundle, "--tokens", "2", "--max-new-tokens", "1")
    assert list(one) == list(RUN_JSON_KEYS)
    # one token: no decode speed; m given: no prediction; not refined
    assert one["decode_tokens_per_s"] is None and one["predicted"] is None and one["refined_from"] is None
    assert one["request_ttft_ms"] == one["timings_ms"]["ttft"]
    planned = _run_json(shipped_bundle, "--max-new-tokens", "8")  # the planner picks m
    assert list(planned) == list(RUN_JSON_KEYS)
    assert set(planned["predicted"]) >= {"memory_mb", "ttft_ms", "reason"} and planned["profile"]
    assert set(planned["timings_ms"]) == set(one["timings_ms"])


def test_a_refined_answer_reports_the_whole_request_and_each_attempt(shipped_bundle):
    out = _run_json(shipped_bundle, "--tokens", "2", "--refine", "16", "--confidence", "1.01",
                    "--max-new-tokens", "4")
    first = out["refined_from"]
    assert out["m"] == 16 and first["m"] == 2 and list(out) == list(RUN_JSON_KEYS)
    assert first["timings_ms"]["vision"] > 0 and out["timings_ms"]["vision"] == 0  # the image was encoded once
    assert out["request_ttft_ms"] == pytest.approx(first["timings_ms"]["ttft"] + out["timings_ms"]["ttft"], abs=0.02)
    assert out["request_ttft_ms"] > out["timings_ms"]["ttft"]
    r = CliRunner().invoke(app, ["run", SHAPES, CIRCLE, "--bundle", str(shipped_bundle), "--tokens", "2",
                                 "--refine", "16", "--confidence", "1.01", "--max-new-tokens", "4"])
    assert r.exit_code == 0 and "first attempt +" in r.stderr and "refined from m=2" in r.stderr, r.output


def test_gpu_layers_on_a_cpu_only_llama_cpp_is_a_one_line_error(shipped_bundle, monkeypatch):
    from mqt_edge.runtimes import llama

    monkeypatch.setattr(llama, "supports_gpu_offload", lambda: False)
    r = CliRunner().invoke(app, ["run", SHAPES, CIRCLE, "--bundle", str(shipped_bundle), "--n-gpu-layers", "10"])
    # in-process the error reaches the runner; `main()` prints it as one line (the real-process test)
    assert isinstance(r.exception, InputError) and r.stdout == "", r.output
    text = str(r.exception)
    assert "\n" not in text and "--n-gpu-layers 10" in text and "without GPU offload" in text and "GGML_CUDA" in text
    monkeypatch.setattr(llama, "supports_gpu_offload", lambda: True)  # a GPU build passes the check
    r = CliRunner().invoke(app, ["run", SHAPES, CIRCLE, "--bundle", str(shipped_bundle), "--n-gpu-layers", "10",
                                 "--tokens", "2", "--max-new-tokens", "2", "--json"])
    assert r.exit_code == 0, r.output


def test_gpu_layers_on_this_llama_cpp_in_a_real_process(shipped_bundle):
    from mqt_edge.runtimes.llama import supports_gpu_offload

    if supports_gpu_offload():
        pytest.skip("this llama.cpp offloads to a GPU: --n-gpu-layers is honoured")
    r = cli("run", SHAPES, CIRCLE, "--bundle", str(shipped_bundle), "--n-gpu-layers", "1")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "without GPU offload" in lines[0] and "Traceback" not in r.stderr


def test_an_interrupt_never_raises_inside_a_finalizer():
    # Ctrl-C during export: a KeyboardInterrupt raised inside __del__ is swallowed by Python and its
    # traceback printed ("Exception ignored in ..."); the export stops at its next stage instead
    import sys

    from mqt_edge.cli import interrupt_unless_finalizing

    seen = []

    class Finalized:
        def __del__(self):
            try:
                interrupt_unless_finalizing(sys._getframe())
                seen.append("no raise")
            except KeyboardInterrupt:
                seen.append("raised")

    Finalized()  # collected at once: __del__ runs here
    assert seen == ["no raise"]
    with pytest.raises(KeyboardInterrupt):
        interrupt_unless_finalizing(sys._getframe())


def test_a_first_interrupt_inside_an_import_or_torch_waits_for_the_stage_boundary():
    # torch runs Python from C++ while it traces and exports, and an import may be inside a C
    # extension's init: a KeyboardInterrupt raised there can crash the process (seen in CI). The first Ctrl-C there is left to the next stage
    # boundary; a second one (defer_native=False) raises where it lands.
    import os
    import sys

    from mqt_edge.cli import interrupt_unless_finalizing

    scope: dict = {"interrupt": interrupt_unless_finalizing, "sys": sys}
    fake = os.path.join(os.sep, "site-packages", "torch", "onnx", "fake_exporter.py")
    exec(compile("def forward(defer):\n    interrupt(sys._getframe(), defer_native=defer)\n", fake, "exec"), scope)
    scope["forward"](True)  # deferred: no raise
    with pytest.raises(KeyboardInterrupt):
        scope["forward"](False)
    # the same inside an import: a C extension's init interrupted half way crashed the process
    exec(compile("def create_module(defer):\n    interrupt(sys._getframe(), defer_native=defer)\n",
                 "<frozen importlib._bootstrap_external>", "exec"), scope)
    scope["create_module"](True)
    with pytest.raises(KeyboardInterrupt):
        scope["create_module"](False)
    with pytest.raises(KeyboardInterrupt):  # outside torch a first Ctrl-C still stops at once
        interrupt_unless_finalizing(sys._getframe(), defer_native=True)
