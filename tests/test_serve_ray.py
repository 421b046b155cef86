"""The server on Ray Serve: 2 CPU replicas on a local Ray instance, reached through Ray's HTTP proxy."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'mqt-edge[serve]')")
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'mqt-edge[ray]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'mqt-edge[ray]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (dev extra)")
openai = pytest.importorskip("openai", reason="the openai client is not installed (dev extra)")

from test_serve import Q, data_url, free_port, user  # noqa: E402

from mqt_edge.serve import ServeConfig  # noqa: E402
from mqt_edge.serve.ray import deployment  # noqa: E402


@pytest.fixture(scope="module")
def ray_server(shipped_bundle):
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = ServeConfig(bundle=str(shipped_bundle), model_name="mqt-ray", threads=1)
        serve.run(deployment(cfg, replicas=2), name="mqt-edge", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_through_rays_proxy(ray_server):
    pids, deadline = set(), time.monotonic() + 60
    while (len(pids) < 2) and time.monotonic() < deadline:  # both replicas loaded and reachable
        r = httpx.get(ray_server + "/health", timeout=10)
        if r.status_code == 200:
            pids.add(r.json()["pid"])
        else:
            time.sleep(0.2)
    assert len(pids) == 2, pids
    client = openai.OpenAI(base_url=ray_server + "/v1", api_key="none", max_retries=0, timeout=60)
    for stream in (False, True):
        r = client.chat.completions.create(model="mqt-ray", messages=[user(Q, data_url())], max_tokens=4,
                                           temperature=0, stream=stream)
        text = "".join(c.choices[0].delta.content or "" for c in r if c.choices) if stream else r.choices[0].message.content
        assert text.strip().lower().startswith("red"), text
    r = httpx.post(ray_server + "/v1/chat/completions", json={"model": "mqt-ray", "messages": [], "n": 2}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"
