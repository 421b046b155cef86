"""Shared fixtures: checkpoints are generated once per session, never downloaded."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach for the hub


def pytest_report_header(config) -> str:
    """Every CI log says what machine it ran on: `mqt-edge doctor`'s one-line summary."""
    try:
        from mqt_edge.doctor import summary

        return f"mqt-edge doctor: {summary()}"
    except Exception as exc:  # the header must never stop the suite
        return f"mqt-edge doctor: unavailable ({type(exc).__name__}: {exc})"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from mqt_edge.model.synth import write_checkpoint

    return write_checkpoint("tiny", tmp_path_factory.mktemp("synth") / "tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    from mqt_edge.model import MQTLlava

    return MQTLlava.from_pretrained(tiny_ckpt, dtype="float32")


def scene(width: int = 200, height: int = 120, seed: int = 0) -> Image.Image:
    """A real-looking test image: background, shapes and some noise, in a non-square frame."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(180, 255, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(3):
        x, y = rng.integers(0, width - 30), rng.integers(0, height - 30)
        s = int(rng.integers(15, 40))
        d.ellipse([x, y, x + s, y + s], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    noise = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(im) + noise, 0, 255).astype(np.uint8))


def cli(*args) -> subprocess.CompletedProcess:
    """Run `mqt-edge ARGS` in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, "-m", "mqt_edge", *args], capture_output=True, text=True)


def stderr_lines(r: subprocess.CompletedProcess) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def shipped_bundle(tmp_path_factory):
    """The shipped default model exported once per test session (q4_k_m, m up to 256; no parity run)."""
    from mqt_edge.defaults import default_model
    from mqt_edge.exporters import ExportOptions, export

    model = default_model()
    if model is None:
        pytest.skip("no shipped default model in this source tree")
    out = tmp_path_factory.mktemp("shipped") / "bundle"
    return export(ExportOptions(model=str(model), out=out, max_tokens=256, parity=False)).bundle.root


@pytest.fixture(scope="session")
def tiny_f32_bundle(tiny_ckpt, tmp_path_factory):
    """Random tiny weights as an f32 bundle: answers that run to max_new_tokens (no parity run)."""
    from mqt_edge.exporters import ExportOptions, export

    out = tmp_path_factory.mktemp("tiny-f32") / "bundle"
    return export(ExportOptions(model=str(tiny_ckpt), out=out, quant="f32", parity=False)).bundle.root


@pytest.fixture(scope="session")
def default_bundle(shipped_bundle):
    """The same export under the name the stream and ROS 2 tests use."""
    return shipped_bundle
