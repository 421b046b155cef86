"""Issue 25's HTTP defects, one test each: every one is a 4xx (or an answer) under its own error code,
and none of them is counted as internal_error.

The server runs in this process (uvicorn in a thread, 127.0.0.1, a free port), as in tests/test_serve.py.
"""

from __future__ import annotations

import base64
import json
import socket
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'mqt-edge[serve]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (dev extra)")

from test_serve import KEY, MODEL, Q, T, Server, chat, data_url, free_port, user  # noqa: E402

from mqt_edge.defaults import default_model  # noqa: E402
from mqt_edge.serve import ServeConfig  # noqa: E402

pytestmark = pytest.mark.skipif(default_model() is None, reason="no shipped default model in this source tree")
INTERNAL = 'mqt_errors_total{code="internal_error"}'
GARBAGE = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()


@pytest.fixture(scope="module")
def srv(shipped_bundle):
    cfg = ServeConfig(bundle=str(shipped_bundle), port=free_port(), parallel=2, api_key=KEY, model_name=MODEL,
                      max_body_mb=4, max_new_tokens=16)
    with Server(cfg) as s:
        yield s


@pytest.fixture(autouse=True)
def no_internal_errors(srv):
    yield
    assert srv.metric(INTERNAL) == 0, "a client's request was counted as a server bug"


def error(r: httpx.Response, status: int, code: str, param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    assert param == "any" or err["param"] == param, err
    return err


def red(r: httpx.Response) -> None:
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].lower().startswith("red")


# 1. temperature / top_p so small that the old sampler divided by 0 or kept no token
@pytest.mark.parametrize("sampling", [{"temperature": 1e-300}, {"temperature": 1, "top_p": 1e-300},
                                      {"temperature": 5e-324, "top_p": 5e-324}])
def test_tiny_temperature_or_top_p_answers(srv, sampling):
    red(srv.post(chat(data_url()) | {"max_tokens": 2} | sampling))


def test_tiny_temperature_streams(srv):
    with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=T, headers={"Authorization": f"Bearer {KEY}"},
                      json=chat(data_url()) | {"temperature": 1e-300, "stream": True}) as r:
        assert r.status_code == 200
        text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                       for line in r.iter_lines() if line.startswith("data: {"))
    assert text.lower().startswith("red")


# 2. JSON nested past Python's recursion limit
@pytest.mark.parametrize("body", ["[" * 100_000 + "]" * 100_000,
                                  json.dumps(chat(data_url()))[:-1] + ', "x": ' + "[" * 50_000 + "]" * 50_000 + "}"])
def test_deeply_nested_json_is_a_400(srv, body):
    error(srv.post(body), 400, "invalid_json", None)


def test_nesting_under_the_limit_is_an_answer(srv):
    red(srv.post(json.dumps(chat(data_url()) | {"temperature": 0})[:-1] + ', "x": ' + "[" * 500 + "]" * 500 + "}"))


# 3. two images in the first user message: refused whichever comes first
@pytest.mark.parametrize("urls", [(data_url(), GARBAGE), (GARBAGE, data_url()), (data_url(), data_url())])
def test_a_second_image_in_the_first_message_is_refused(srv, urls):
    parts = [{"type": "text", "text": Q}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    r = srv.post({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": parts}]})
    err = error(r, 400, "invalid_value", "messages.0.content")
    assert "one image" in err["message"]


# 4. a conversation longer than the context, with or without a length limit, and the limit's own name
def long_conversation(turns: int = 30) -> list[dict]:
    answer = "The circle in the picture is red, and the square beside it is blue. " * 3
    msgs = [user(Q, data_url())]
    for _ in range(turns):
        msgs += [{"role": "assistant", "content": answer}, {"role": "user", "content": Q}]
    return msgs  # 61 messages, about 1,900 positions: past the shipped model's 1,024


@pytest.mark.parametrize("limit, param", [({}, "messages"), ({"max_tokens": 8}, "max_tokens"),
                                          ({"max_completion_tokens": 8}, "max_completion_tokens")])
@pytest.mark.parametrize("stream", [False, True])
def test_an_over_long_conversation_is_context_length_exceeded(srv, limit, param, stream):
    body = {"model": MODEL, "messages": long_conversation(), "stream": stream} | limit
    error(srv.post(body), 400, "context_length_exceeded", param)


def test_an_oversized_max_completion_tokens_is_a_ceiling(srv):
    """max_tokens / max_completion_tokens past the room left are clamped, as llama-server does (docs/serve.md)."""
    r = srv.post(chat(data_url()) | {"max_tokens": None, "max_completion_tokens": 100_000})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


# 6. 405 says what the path allows
@pytest.mark.parametrize("method, path, allow", [("TRACE", "/health", "GET"), ("GET", "/v1/chat/completions", "POST"),
                                                 ("DELETE", "/v1/models", "GET")])
def test_405_has_an_allow_header(srv, method, path, allow):
    r = httpx.request(method, srv.url + path, timeout=T, headers={"Authorization": f"Bearer {KEY}"})
    error(r, 405, "method_not_allowed", None)
    assert r.headers["allow"] == allow
    assert allow in r.json()["error"]["message"]


# 7. a client that leaves while uploading its body
def test_a_disconnect_during_upload_is_counted_as_the_clients(srv):
    label = 'mqt_errors_total{code="client_disconnected"}'
    before = srv.metric(label)
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=T) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: 100000\r\n\r\n".encode() + b'{"model": "')
        time.sleep(0.3)  # the server is now waiting for the rest of the body
    deadline = time.monotonic() + 10
    while srv.metric(label) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert srv.metric(label) == before + 1
    red(srv.post(chat(data_url()) | {"temperature": 0}))  # and the server carries on


# smaller points: any 64-bit seed, signed or not; beyond that, a 400 naming seed
@pytest.mark.parametrize("seed", [-1, -2**63, 0, 2**63, 2**64 - 1])
def test_any_64_bit_seed_is_accepted(srv, seed):
    red(srv.post(chat(data_url()) | {"seed": seed, "temperature": 0.1}))


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1, 1.5])
def test_a_seed_that_cannot_be_used_is_named(srv, seed):
    error(srv.post(chat(data_url()) | {"seed": seed}), 400, "invalid_value", "seed")

