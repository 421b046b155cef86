"""`max_tokens` beyond what the context has left is clamped, as llama-server does, not refused.

Clients such as Live VLM WebUI send 512 by default and allow up to 4096, while the shipped model's
context is 1024 positions; docs/serve.md ("max_tokens") says why the server clamps. Each server binds
127.0.0.1 on a free port in this process and is stopped by its fixture; every request has a timeout.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'mqt-edge[serve]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (dev extra)")

from mqt_edge.serve import ServeConfig, create_app  # noqa: E402

EXAMPLE = Path(__file__).parent.parent.parent / "examples" / "shapes.png"
Q = "What color is the circle?"
T = 60  # seconds: the bound on any one request


def _body(**kw) -> dict:
    url = "data:image/png;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode()
    return {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": Q}, {"type": "image_url", "image_url": {"url": url}}]}]} | kw


@contextmanager
def _serve(bundle: Path, **cfg):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(ServeConfig(bundle=str(bundle), port=port, model_name="m", **cfg))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            if time.monotonic() > deadline:
                pytest.fail("the server did not become healthy in 120 s")
            time.sleep(0.2)
        yield url, app.state.engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_max_tokens_over_the_room_left_runs_to_the_context_and_says_length(tiny_f32_bundle):
    """Random tiny weights never stop on their own, so the clamp is what ends the answer."""
    ramble = {"temperature": 1.0, "seed": 3, "mqt": {"m": 4}}
    with _serve(tiny_f32_bundle, conversation_tokens=64) as (url, engine):
        n_ctx = engine.start.n_ctx
        r = httpx.post(url + "/v1/chat/completions", json=_body(max_tokens=100_000, **ramble), timeout=T)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"] == n_ctx, (out["usage"], n_ctx)

        finish, usage = None, None
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=T, json=_body(
                max_tokens=100_000, stream=True, stream_options={"include_usage": True}, **ramble)) as s:
            assert s.status_code == 200
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    finish = next((c["finish_reason"] for c in chunk["choices"] if c["finish_reason"]), finish)
                    usage = chunk.get("usage") or usage
        assert finish == "length" and usage["prompt_tokens"] + usage["completion_tokens"] == n_ctx

        # a next turn after an answer that filled the context is refused in one line, naming no internal field
        turns = _body()["messages"] + [{"role": "assistant", "content": out["choices"][0]["message"]["content"]},
                                       {"role": "user", "content": "And the square?"}]
        r = httpx.post(url + "/v1/chat/completions", json=_body(messages=turns, max_tokens=8, **ramble), timeout=T)
        err = r.json()["error"]
        assert r.status_code == 400 and "context" in err["message"] and "max_new_tokens" not in err["message"], r.text


def test_live_vlm_webui_s_largest_max_tokens_is_answered_on_the_shipped_model(shipped_bundle):
    with _serve(shipped_bundle) as (url, engine):
        assert engine.start.n_ctx <= 1024  # the case the clamp is for: 4096 could never fit
        r = httpx.post(url + "/v1/chat/completions", json=_body(max_tokens=4096, temperature=0.7, seed=0), timeout=T)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["message"]["content"].lower().startswith("red") and choice["finish_reason"] == "stop"
