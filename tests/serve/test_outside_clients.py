"""`mqt-edge serve` as clients we did not write see it: a real server process on 127.0.0.1 (a free port,
the shipped model), driven by the official openai client and by a schema-driven fuzz over the
server's own /openapi.json (schemathesis).

The openai client runs with its strict response validation on (by default it builds its types from
the JSON without validating them), and the tests parse the raw bodies with the same types again.
The fuzz is bounded: at most FUZZ_EXAMPLES cases per operation and mode, derandomised so that CI
sees the same cases every run, and under FUZZ_SECONDS in all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'mqt-edge[serve]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (dev extra)")
openai = pytest.importorskip("openai", reason="the openai client is not installed (dev extra)")

from openai.types import Model  # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402
from test_serve import KEY, MODEL, Q, T, data_url, free_port, user  # noqa: E402

from mqt_edge.defaults import default_model  # noqa: E402

pytestmark = pytest.mark.skipif(default_model() is None, reason="no shipped default model in this source tree")
AUTH = {"Authorization": f"Bearer {KEY}"}
# cases per operation (positive, negative): 150 at most, most of them for the one route that takes a body
FUZZ_EXAMPLES = {"POST /v1/chat/completions": (50, 30), "GET /health": (5, 1)}
FUZZ_OTHERS = (10, 10)
FUZZ_SECONDS = 60
ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass
class Running:
    url: str
    proc: subprocess.Popen
    log: Path

    def client(self, key: str = KEY) -> openai.OpenAI:
        # strict: the client validates every body and chunk against its own types instead of trusting them
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, timeout=T, max_retries=0,
                             _strict_response_validation=True)

    def answers_red(self) -> bool:
        body = {"model": MODEL, "messages": [user(Q, data_url())], "max_tokens": 2, "temperature": 0}
        r = httpx.post(self.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=T)
        return r.status_code == 200 and r.json()["choices"][0]["message"]["content"].lower().startswith("red")


@pytest.fixture(scope="module")
def server(shipped_bundle, tmp_path_factory):
    port, log = free_port(), tmp_path_factory.mktemp("outside") / "serve.log"
    cmd = [sys.executable, "-m", "mqt_edge", "serve", "--bundle", str(shipped_bundle), "--port", str(port),
           "--api-key", KEY, "--model-name", MODEL, "--parallel", "2", "--max-new-tokens", "16", "--max-body-mb", "4"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    s = Running(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(s.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail(f"mqt-edge serve did not become healthy: {log.read_text()[-2000:]}")
        yield s
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    # the server's own log: no request of a client was taken for a bug
    assert "internal error" not in log.read_text()


# -- the openai client ------------------------------------------------------------------------------

def test_openai_client_non_streaming(server):
    raw = server.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=[user(Q, data_url())], max_tokens=4, temperature=0)
    body = ChatCompletion.model_validate(json.loads(raw.http_response.text))  # the client's own types, validated
    assert body.choices[0].message.content.lower().startswith("red")
    assert body.choices[0].finish_reason in ("stop", "length") and body.usage.total_tokens > 0
    assert raw.parse().id == body.id


def test_openai_client_streaming_with_usage(server):
    stream = server.client().chat.completions.create(
        model=MODEL, messages=[user(Q, data_url())], max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = [ChatCompletionChunk.model_validate(c.to_dict()) for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.lower().startswith("red")
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens >= 1  # the usage chunk comes last
    assert all(c.usage is None for c in body)
    assert [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason] in (["stop"], ["length"])


def test_openai_client_second_turn_reuses_the_image(server):
    client = server.client()
    first = client.chat.completions.create(model=MODEL, messages=[user(Q, data_url())], max_tokens=4, temperature=0)
    answer = first.choices[0].message.content
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, temperature=0, max_tokens=4,
        messages=[user(Q, data_url()), {"role": "assistant", "content": answer}, user("Is it a circle?")])
    second = ChatCompletion.model_validate(json.loads(raw.http_response.text))
    assert second.choices[0].message.content
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_openai_client_lists_the_model(server):
    models = server.client().models.list()
    assert [Model.model_validate(m.to_dict()).id for m in models.data] == [MODEL]
    assert Model.model_validate(server.client().models.retrieve(MODEL).to_dict()).id == MODEL


ERRORS = [  # what the client sends -> the exception it raises, its status and the error's code
    ({"model": "gpt-4o"}, openai.NotFoundError, 404, "model_not_found"),
    ({"messages": [user(Q, "data:image/png;base64,aGVsbG8=")]}, openai.BadRequestError, 400, "invalid_image"),
    ({"messages": [user(Q, data_url())] + [{"role": "assistant", "content": "red"}, {"role": "user", "content": Q * 40}]
      * 8}, openai.BadRequestError, 400, "context_length_exceeded"),
    ({"n": 2}, openai.BadRequestError, 400, "unsupported_parameter"),
    ({"extra_body": {"mqt": {"m": 9999}}}, openai.UnprocessableEntityError, 422, "invalid_m"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("change, exc, status, code", ERRORS, ids=[e[3] for e in ERRORS])
def test_openai_client_raises_on_errors(server, change, exc, status, code, stream):
    kw = {"model": MODEL, "messages": [user(Q, data_url())], "max_tokens": 4, "stream": stream} | change
    with pytest.raises(exc) as info:
        list(server.client().chat.completions.create(**kw)) if stream else server.client().chat.completions.create(**kw)
    assert info.value.status_code == status and info.value.code == code
    assert set(info.value.body) == ERROR_KEYS  # the client hands over the "error" object


def test_openai_client_wrong_key(server):
    with pytest.raises(openai.AuthenticationError) as info:
        server.client(key="sk-wrong").models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"


# -- a schema-driven fuzz over /openapi.json ----------------------------------------------------------

def test_the_published_schema_is_typed(server):
    doc = httpx.get(server.url + "/openapi.json", timeout=T).json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert {"200", "400", "401", "404", "413", "422", "503"} <= set(chat["responses"])
    schemas = doc["components"]["schemas"]
    assert {"ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk", "ModelList", "ErrorResponse"} <= set(schemas)
    assert schemas["ChatCompletionRequest"]["properties"]["model"]["enum"] == [MODEL]


def test_a_stream_matches_the_published_schema(server):
    """Every event of a stream (chunks, the usage chunk, [DONE]) against the schema's own event description."""
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (dev extra)")
    from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

    op = schemathesis.openapi.from_url(server.url + "/openapi.json", timeout=T)["/v1/chat/completions"]["POST"]
    case = op.Case(body={"model": MODEL, "messages": [user(Q, data_url())], "max_tokens": 4, "stream": True,
                         "stream_options": {"include_usage": True}}, media_type="application/json")
    response = case.call(base_url=server.url, headers=AUTH, timeout=T)
    assert response.status_code == 200 and "data: [DONE]" in response.text
    case.validate_response(response, checks=[response_schema_conformance, content_type_conformance])


def _openai_shaped(response) -> None:
    if 400 <= response.status_code < 500:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


def test_schema_fuzz_finds_no_server_error(server):
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (dev extra)")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", timeout=T)
    statuses, t0, cases = Counter(), time.monotonic(), 0
    for result in schema.get_all_operations():
        op = result.ok()
        budget = FUZZ_EXAMPLES.get(f"{op.method.upper()} {op.path}", FUZZ_OTHERS)
        for mode, examples in zip((GenerationMode.POSITIVE, GenerationMode.NEGATIVE), budget):
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode), real_image=st.booleans())
            def one(case, real_image):
                assert time.monotonic() - t0 < FUZZ_SECONDS, "the fuzz ran past its time bound"
                if real_image and mode == GenerationMode.POSITIVE and isinstance(case.body, dict):
                    # a conversation the model can answer, so that the other fields reach it
                    case.body = case.body | {"messages": [user(Q, data_url())]}
                response = case.call(base_url=server.url, headers=AUTH, timeout=T)
                statuses[f"{op.method.upper()} {op.path} {response.status_code}"] += 1
                case.validate_response(response, checks=checks)
                _openai_shaped(response)
                assert server.answers_red()  # the server is up and answers a normal request after every case

            try:
                one()
            except Unsatisfiable:  # nothing to make invalid: /health and /metrics take no input
                assert mode == GenerationMode.NEGATIVE and not op.body and op.path in ("/health", "/metrics")
    cases = sum(statuses.values())
    print(f"\nfuzz: {cases} cases in {time.monotonic() - t0:.1f} s; statuses: {dict(sorted(statuses.items()))}")
    assert cases >= 50 and not any(k.endswith(tuple(f" {s}" for s in range(500, 600))) for k in statuses)
    assert server.answers_red()  # a normal request after the fuzz
