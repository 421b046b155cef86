"""`mqt-edge serve`: the OpenAI dialect, KV reuse across turns, slots and queue, errors, metrics.

Every server here binds 127.0.0.1 on a free port, runs in this process (uvicorn in a thread) and is
stopped by its fixture; every request has a timeout. The model is the shipped default, exported once.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'mqt-edge[serve]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (dev extra)")
openai = pytest.importorskip("openai", reason="the openai client is not installed (dev extra)")

from mqt_edge.defaults import default_model  # noqa: E402
from mqt_edge.serve import ServeConfig, create_app  # noqa: E402

pytestmark = pytest.mark.skipif(default_model() is None, reason="no shipped default model in this source tree")

EXAMPLE = Path(__file__).parent.parent / "examples" / "shapes.png"
KEY = "sk-test-key"
MODEL = "mqt-default"
Q = "What color is the circle?"
T = 60  # seconds: the bound on any one request in these tests


def data_url(path: Path = EXAMPLE) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def variant_url(tag: str) -> str:
    """The example image with different bytes (a text chunk), so its content hash is new to the cache."""
    import io

    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("tag", tag)
    buf = io.BytesIO()
    Image.open(EXAMPLE).save(buf, format="PNG", pnginfo=info)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, url: str | None = None) -> dict:
    parts = [{"type": "text", "text": text}]
    if url:
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return {"role": "user", "content": parts}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread, on a free loopback port."""

    def __init__(self, cfg: ServeConfig) -> None:
        import uvicorn

        self.cfg = cfg
        self.app = create_app(cfg)
        self.engine = self.app.state.engine
        self.url = f"http://127.0.0.1:{cfg.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=cfg.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not become healthy in 120 s")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self, key: str | None = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", timeout=T, max_retries=0)

    def post(self, body, key: str | None = KEY, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if isinstance(body, (bytes, str)):
            return httpx.post(self.url + "/v1/chat/completions", content=body, timeout=T,
                              headers=headers | {"Content-Type": "application/json"}, **kw)
        return httpx.post(self.url + "/v1/chat/completions", json=body, timeout=T, headers=headers, **kw)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=T).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture(scope="module")
def bundle(shipped_bundle):
    return shipped_bundle


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    (d / "shapes.png").write_bytes(EXAMPLE.read_bytes())
    return d


@pytest.fixture(scope="module")
def srv(bundle, media):
    cfg = ServeConfig(bundle=str(bundle), port=free_port(), parallel=2, api_key=KEY, model_name=MODEL,
                      media_dir=str(media), max_body_mb=2, max_new_tokens=16)
    with Server(cfg) as s:
        yield s


def ask(client, messages, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kw)


# -- the OpenAI dialect -------------------------------------------------------------------------------

def test_openai_client_gets_red_streaming_and_not(srv):
    client = srv.client()
    r = ask(client, [user(Q, data_url())], max_tokens=8)
    assert r.choices[0].message.content.strip().lower().startswith("red"), r
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > r.usage.completion_tokens >= 1
    extra = r.model_extra["mqt"]
    assert extra["m"] == srv.engine.start.m and extra["refined"] is False

    pieces, usage, finish = [], None, None
    for chunk in ask(client, [user(Q, data_url())], max_tokens=8, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces).strip() == r.choices[0].message.content and finish == "stop"
    assert usage is not None and usage.prompt_tokens == r.usage.prompt_tokens


def test_models_and_health(srv):
    models = srv.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    card = models.data[0].model_extra["mqt"]  # M is max_m: max_tokens is OpenAI's, counting text tokens
    assert card["max_m"] == 256 and "max_tokens" not in card and 1 <= card["default_m"] <= 256
    h = httpx.get(srv.url + "/health", timeout=T).json()
    assert h["status"] == "ok" and h["slots"] == 2


def test_health_is_503_while_loading(bundle):
    from starlette.testclient import TestClient

    app = create_app(ServeConfig(bundle=str(bundle), model_name=MODEL), load=False)
    http = TestClient(app)  # no lifespan: nothing loads until we say so
    r = http.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "loading" and "Retry-After" in r.headers
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [user(Q, data_url())]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
    app.state.engine.load()
    try:
        assert http.get("/health").status_code == 200
    finally:
        app.state.engine.close()


def test_mqt_field_sets_m_and_refines(srv):
    client, a, b = srv.client(), variant_url("refine-a"), variant_url("refine-b")
    r = ask(client, [user(Q, a)], max_tokens=4, extra_body={"mqt": {"m": 16}})
    assert r.model_extra["mqt"]["m"] == 16
    always = {"mqt": {"m": 4, "refine": 64, "confidence": 1.01}}  # 1.01: refine whatever the first token
    info = ask(client, [user("How many shapes are there?", b)], max_tokens=4, extra_body=always).model_extra["mqt"]
    assert info["m"] == 64 and info["refined"] and info["refined_from"]["m"] == 4
    # a cached session of this image at an m between tokens and refine serves the request from its m
    info = ask(client, [user("How many shapes are there?", a)], max_tokens=4, extra_body=always).model_extra["mqt"]
    assert info["cache_hit"] and info["refined_from"]["m"] == 16 and info["m"] == 64
    never = {"mqt": {"m": 4, "refine": 64, "confidence": 0.0}}
    info = ask(client, [user(Q, variant_url("refine-c"))], max_tokens=4, extra_body=never).model_extra["mqt"]
    assert info["m"] == 4 and not info["refined"]


def test_stop_sequences_cut_the_answer(srv):
    full = ask(srv.client(), [user(Q, data_url())], max_tokens=8).choices[0].message.content
    cut = ask(srv.client(), [user(Q, data_url())], max_tokens=8, stop=[full[1:3]]).choices[0]
    assert cut.message.content == full[:1] and cut.finish_reason == "stop"


# -- conversations keep the image ----------------------------------------------------------------------

def test_second_turn_reports_cached_tokens_and_prefills_only_the_new_text(srv):
    client, url = srv.client(), data_url()
    first = ask(client, [user(Q, url)], max_tokens=8, extra_body={"mqt": {"m": 36}})
    a1 = first.choices[0].message.content
    q2 = "What color is the square?"
    second = ask(client, [user(Q, url), {"role": "assistant", "content": a1}, user(q2)], max_tokens=8,
                 extra_body={"mqt": {"m": 36}})
    pipe = srv.engine.pipe
    new_text = 1 + len(pipe.llm.tokenize(f"USER: {q2} ASSISTANT:", add_bos=False))  # </s> + the new turn
    info, usage = second.model_extra["mqt"], second.usage
    assert info["cache_hit"] and info["turns_reused"] == 1
    assert usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens + len(
        pipe.llm.tokenize(a1, add_bos=False))
    assert usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens == new_text == info["prefilled"]
    assert info["timings_ms"]["vision"] == 0 and info["timings_ms"]["mqt"] == 0
    assert second.choices[0].message.content.lower().startswith("blue")
    # the first turn pays for everything but the prompt head, which every request restores (docs/runtime.md)
    assert first.model_extra["mqt"]["prefilled"] == first.usage.prompt_tokens - len(pipe.prefix_ids)
    assert first.usage.prompt_tokens_details.cached_tokens == len(pipe.prefix_ids)


# -- concurrency ---------------------------------------------------------------------------------------

QUESTIONS = ["What color is the circle?", "What color is the square?", "How many shapes are there?",
             "Is there a red circle?", "What shape is the blue object?"]


def test_four_clients_times_25_requests_match_serial_answers(srv):
    url, body = data_url(), lambda q: {"model": MODEL, "messages": [user(q, url)], "max_tokens": 4,
                                       "temperature": 0, "mqt": {"m": 16}}
    serial = {q: srv.post(body(q)).json()["choices"][0]["message"]["content"] for q in QUESTIONS}
    got, errors = [], []

    def client(k: int) -> None:
        with httpx.Client(timeout=T, headers={"Authorization": f"Bearer {KEY}"}) as http:
            for i in range(25):
                q = QUESTIONS[(k + i) % len(QUESTIONS)]
                r = http.post(srv.url + "/v1/chat/completions", json=body(q))
                (got if r.status_code == 200 else errors).append((q, r.json()))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[:2]
    assert len(got) == 100
    assert all(r["choices"][0]["message"]["content"] == serial[q] for q, r in got)


@pytest.fixture(scope="module")
def one_slot(tiny_f32_bundle):
    """One slot and a queue of one, on random tiny weights: their answers run to max_tokens, not to "red"."""
    cfg = ServeConfig(bundle=str(tiny_f32_bundle), port=free_port(), parallel=1, queue=1, model_name=MODEL,
                      timeout_s=30)
    with Server(cfg) as s:
        yield s


RAMBLE = {"model": MODEL, "messages": [user(Q, None)], "max_tokens": 400, "temperature": 1.0, "seed": 3,
          "stream": True, "mqt": {"m": 4}}


def test_a_disconnect_mid_stream_frees_the_slot(one_slot):
    url = data_url()
    quick = {"model": MODEL, "messages": [user(Q, url)], "max_tokens": 4, "temperature": 0, "mqt": {"m": 4}}
    t0 = time.monotonic()
    assert one_slot.post(quick, key=None).status_code == 200
    normal = time.monotonic() - t0
    body = RAMBLE | {"messages": [user(Q, url)]}
    t0 = time.monotonic()
    full = one_slot.post(body | {"stream": False}, key=None).json()
    ramble = time.monotonic() - t0
    assert full["usage"]["completion_tokens"] == 400  # the answer the client will walk away from
    with httpx.stream("POST", one_slot.url + "/v1/chat/completions", json=body, timeout=T) as r:
        assert r.status_code == 200
        chunks = (line for line in r.iter_lines() if line.startswith("data:"))
        seen = [next(chunks) for _ in range(4)]  # a few pieces, then hang up
    assert all('"content"' in s for s in seen)
    t0 = time.monotonic()
    r = one_slot.post(quick, key=None)
    waited = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert waited < 3 * normal + 1.0 and waited < ramble / 2, (waited, normal, ramble)  # not stuck behind it
    assert one_slot.metric('mqt_cancelled_total{reason="disconnect"}') == 1


def test_full_queue_is_503_with_retry_after(one_slot):
    body = RAMBLE | {"messages": [user(Q, data_url())], "stream": False}
    results = []
    threads = [threading.Thread(target=lambda: results.append(one_slot.post(body, key=None))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    codes = sorted(r.status_code for r in results)
    busy = [r for r in results if r.status_code == 503]
    assert codes.count(200) >= 1 and busy, codes  # 1 slot + 1 queued: the others are refused at once
    assert all(r.headers["Retry-After"].isdigit() and r.json()["error"]["code"] == "server_busy" for r in busy)


# -- errors --------------------------------------------------------------------------------------------

def png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels (its header is all a size check reads)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def chat(url: str, **kw) -> dict:
    return {"model": MODEL, "messages": [user(Q, url)], "max_tokens": 2} | kw


CASES = {
    "bad base64": (chat("data:image/png;base64,!!not-base64!!"), KEY, 400, "invalid_image"),
    "not an image": (chat("data:image/png;base64," + base64.b64encode(b"hello").decode()), KEY, 400, "invalid_image"),
    "image too large": (chat("data:image/png;base64," + base64.b64encode(png_header(9000, 8000)).decode()), KEY,
                        413, "image_too_large"),
    "remote URL while off": (chat("http://169.254.169.254/latest/meta-data"), KEY, 400, "image_source_refused"),
    "file outside media dir": (chat("file:///etc/passwd"), KEY, 400, "image_source_refused"),
    "path escaping media dir": (chat("../../../../etc/hostname"), KEY, 400, "image_source_refused"),
    "unknown model": (chat(data_url()) | {"model": "gpt-4o"}, KEY, 404, "model_not_found"),
    "missing API key": (chat(data_url()), None, 401, "invalid_api_key"),
    "wrong API key": (chat(data_url()), "sk-wrong", 401, "invalid_api_key"),
    "malformed JSON": (b'{"model": "mqt-default", "messages": [', KEY, 400, "invalid_json"),
    "n = 2": (chat(data_url()) | {"n": 2}, KEY, 400, "unsupported_parameter"),
    "m above the bundle's": (chat(data_url()) | {"mqt": {"m": 999}}, KEY, 422, "invalid_m"),
    "unknown mqt key": (chat(data_url()) | {"mqt": {"tokens": 16}}, KEY, 400, "invalid_value"),
    "no image": ({"model": MODEL, "messages": [{"role": "user", "content": Q}]}, KEY, 400, "invalid_value"),
    "body too large": (json.dumps(chat(data_url()) | {"pad": "x" * 3 * 2**20}), KEY, 413, "request_too_large"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_errors_are_openai_shaped(srv, case):
    body, key, status, code = CASES[case]
    r = srv.post(body, key=key)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    assert err["message"] and "Traceback" not in r.text


def test_an_unknown_mqt_key_is_refused_in_one_line():
    """The extension field is strict: a key it does not have (e.g. "tokens" for m) is a 400, not ignored."""
    from mqt_edge.serve.errors import APIError
    from mqt_edge.serve.schema import parse_chat

    body = {"model": MODEL, "messages": [{"role": "user", "content": Q}], "mqt": {"tokens": 16}}
    with pytest.raises(APIError) as info:
        parse_chat(json.dumps(body).encode())
    assert info.value.status == 400 and info.value.param == "mqt.tokens"
    assert "\n" not in info.value.message and "mqt.tokens" in info.value.message


def test_media_dir_paths_are_served(srv, media):
    for url in ("shapes.png", f"file://{media}/shapes.png"):
        r = srv.post(chat(url) | {"temperature": 0, "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].lower().startswith("red")


def test_unknown_routes_and_bugs_are_openai_shaped(srv, monkeypatch):
    r = httpx.get(srv.url + "/v1/nothing", timeout=T)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    from mqt_edge.serve import policy

    def broken(*a, **k):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(policy, "answer", broken)
    r = srv.post(chat(data_url()))
    assert r.status_code == 500 and "secret" not in r.text and r.json()["error"]["type"] == "server_error"


# -- metrics -------------------------------------------------------------------------------------------

def test_metrics_count_requests_hits_and_m(srv):
    before = srv.metric("mqt_image_cache_hits_total")
    for _ in range(2):
        assert srv.post(chat(data_url()) | {"mqt": {"m": 8}}).status_code == 200
    assert srv.metric("mqt_image_cache_hits_total") >= before + 1
    text = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=T).text
    for name in ("mqt_requests_total", "mqt_errors_total", "mqt_queue_depth", "mqt_ttft_seconds_bucket",
                 "mqt_request_seconds_bucket", "mqt_visual_tokens_bucket", "mqt_session_evictions_total"):
        assert name in text, name
    assert 'mqt_visual_tokens_bucket{le="8.0"}' in text
    assert httpx.get(srv.url + "/metrics", timeout=T).status_code == 401


def test_a_second_first_question_about_a_cached_image_counts_as_a_fork(srv):
    url = variant_url("fork-count")  # an image no other test sent
    forks = httpx.get(srv.url + "/health", timeout=T).json()["cache"]["forks"]
    counted = srv.metric("mqt_session_forks_total")
    for q in (Q, "How many shapes are there?"):  # two clients, one image, different first questions
        assert srv.post(chat(url) | {"messages": [user(q, url)]}).status_code == 200
    assert httpx.get(srv.url + "/health", timeout=T).json()["cache"]["forks"] == forks + 1
    assert srv.metric("mqt_session_forks_total") == counted + 1


# -- the CLI, on a base install ---------------------------------------------------------------------------

def test_cli_serve_runs_without_torch(bundle):
    port = free_port()
    code = ("import sys\nsys.modules['torch'] = None\nsys.modules['transformers'] = None\n"
            "from mqt_edge.cli import main\n"
            f"sys.argv = ['mqt-edge', 'serve', '--bundle', {str(bundle)!r}, '--port', '{port}', '--model-name', 'x']\n"
            "main()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, status = time.monotonic() + 90, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code
                if status == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        assert status == 200, proc.stderr.read() if proc.poll() is not None else "no health"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat(data_url()) | {"model": "x"},
                       timeout=T)
        assert r.status_code == 200, r.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_serve_bad_bundle_is_one_line():
    from conftest import cli, stderr_lines

    r = cli("serve", "--bundle", "/nonexistent")
    assert r.returncode == 2 and len(stderr_lines(r)) == 1 and "no bundle" in r.stderr
