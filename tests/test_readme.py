"""The README's Python snippets run as written, against the shipped model's bundle.

Each ```python block runs in a fresh interpreter whose working directory looks like a checkout after
the quick start: `examples/`, `mqt_edge/` and `mqt-edge-bundle/` (the shipped bundle). The serving
snippet talks to `mqt-edge serve`, started here with the README's own flags on a free port (the one
change made to its text). A new snippet is run too; one that cannot run here must be listed in SKIP.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
SKIP: dict[str, str] = {}  # _name(snippet) -> why it cannot run in a test


def snippets() -> list[str]:
    return BLOCK.findall(README.read_text())


def _name(code: str) -> str:
    """A snippet's first statement that is not an import (its imports are alike)."""
    lines = [line for line in code.splitlines() if line.strip()]
    return next((line for line in lines if not line.startswith(("import ", "from "))), lines[0])[:60]


@pytest.fixture(scope="module")
def checkout(shipped_bundle, tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("checkout")
    for name, target in (("examples", ROOT / "examples"), ("mqt_edge", ROOT / "mqt_edge"),
                         ("mqt-edge-bundle", shipped_bundle)):
        (where / name).symlink_to(target, target_is_directory=True)
    return where


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def server(checkout):
    """`mqt-edge serve` as the README starts it, on a free port; stopped after the module."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mqt_edge", "serve", "--bundle", "mqt-edge-bundle", "--port",
                             str(port), "--parallel", "2", "--model-name", "mqt"], cwd=checkout, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            pytest.fail(f"mqt-edge serve did not become healthy: {proc.stderr.read() if proc.poll() is not None else ''}")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_readme_has_the_snippets_this_test_knows():
    found = snippets()
    assert len(found) >= 4 and all("frame.jpg" not in code and "image.jpg" not in code for code in found)


@pytest.mark.parametrize("code", snippets(), ids=_name)
def test_a_readme_snippet_runs_as_written(code, checkout, request):
    if _name(code) in SKIP:
        pytest.skip(SKIP[_name(code)])
    if "MQTLlava" in code:
        pytest.importorskip("torch", reason="the reference needs the export extra")
    if "127.0.0.1:8080" in code:
        pytest.importorskip("openai")
        code = code.replace("127.0.0.1:8080", f"127.0.0.1:{request.getfixturevalue('server')}")
    r = subprocess.run([sys.executable, "-c", code], cwd=checkout, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip(), "every snippet prints something"
    if "What color is the circle?" in code:
        assert "red" in r.stdout, r.stdout  # the shipped model's answer about examples/shapes.png
