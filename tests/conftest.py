"""Shared fixtures: checkpoints are generated once per session, never downloaded."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach for the hub


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
def default_bundle(tmp_path_factory):
    """The shipped default model exported once per test session (q4_k_m, parity checks skipped)."""
    from mqt_edge.defaults import default_model
    from mqt_edge.exporters import ExportOptions, export

    model = default_model()
    if model is None:
        pytest.skip("no default model in mqt_edge/assets/default-model (a source tree without the shipped model)")
    out = tmp_path_factory.mktemp("default") / "bundle"
    return export(ExportOptions(model=str(model), out=out, parity=False)).bundle.root
