"""`mqt-edge serve --ray` as a user runs it: 2 CPU replicas behind Ray's proxy, conversations routed back to
the replica that cached them, the start-up line logged, and one SIGTERM that ends every Ray process it started.

One Ray start for the whole file (about 25 s of it); the tests run in file order and the last one stops it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'mqt-edge[serve]')")
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'mqt-edge[ray]')")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'mqt-edge[ray]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (dev extra)")
openai = pytest.importorskip("openai", reason="the openai client is not installed (dev extra)")
import psutil  # noqa: E402  (Ray ships it and puts it on sys.path)

from test_serve import Q, data_url, free_port, user, variant_url  # noqa: E402

MODEL, T = "mqt-ray", 60
START_S, STOP_S = 150, 30  # bounds: Ray's start and the model's load; one SIGTERM to nothing left
SESSION = re.compile(r"session_\d{4}-\d\d-\d\d_[\d_-]+\d")


class RayServer:
    """`mqt-edge serve --ray` in its own session, its output in a file (a pipe could fill and block it)."""

    def __init__(self, bundle: Path, log: Path, replicas: int = 2) -> None:
        self.port, self.log = free_port(), log
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                            os.environ.get("PYTHONPATH", "")])}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mqt_edge", "serve", "--bundle", str(bundle), "--ray", "--replicas",
                 str(replicas), "--port", str(self.port), "--model-name", MODEL],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_serving(self, timeout: float = START_S) -> None:
        deadline = time.monotonic() + timeout
        while "\nserving " not in "\n" + self.output():
            assert self.proc.poll() is None, self.output()[-3000:]
            assert time.monotonic() < deadline, self.output()[-3000:]
            time.sleep(0.5)

    def ray_processes(self) -> tuple[list[psutil.Process], str]:
        """Every process under the server (gcs, raylet, agents, actors) and Ray's session name."""
        procs = psutil.Process(self.proc.pid).children(recursive=True)
        names = [m.group(0) for p in procs for m in [SESSION.search(" ".join(_cmdline(p)))] if m]
        return procs, names[0] if names else ""

    def stop_and_check(self, timeout: float = STOP_S, serving: bool = True) -> float:
        """One SIGTERM; asserts the server and every Ray process of its session end within timeout."""
        procs, session = self.ray_processes()
        assert not serving or (len(procs) >= 4 and session), [_cmdline(p) for p in procs]
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=timeout)
        while time.monotonic() - t0 < timeout:
            left = [p for p in procs if _alive(p)] + (_with_session(session) if session else [])
            if not left:
                return time.monotonic() - t0
            time.sleep(0.25)
        raise AssertionError(f"{len(left)} Ray processes outlived SIGTERM by {timeout} s: "
                             f"{[(p.pid, _cmdline(p)[:2]) for p in left]}")

    def kill(self) -> None:
        """Teardown after a failure: leave nothing running."""
        procs = self.ray_processes()[0] if self.proc.poll() is None else []
        for p in [self.proc, *procs]:
            try:
                p.kill()
            except (ProcessLookupError, psutil.Error):
                pass
        self.proc.wait(timeout=10)


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _with_session(session: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter() if session in " ".join(_cmdline(p)) and _alive(p)]


@pytest.fixture(scope="module")
def ray_cli(shipped_bundle, tmp_path_factory):
    srv = RayServer(shipped_bundle, tmp_path_factory.mktemp("ray") / "serve.log")
    try:
        srv.wait_serving()
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.kill()


def both_replicas(url: str) -> set[int]:
    pids, deadline = set(), time.monotonic() + T
    while len(pids) < 2 and time.monotonic() < deadline:  # both replicas loaded and reachable
        r = httpx.get(url + "/health", timeout=10)
        if r.status_code == 200:
            pids.add(r.json()["pid"])
        else:
            time.sleep(0.2)
    return pids


def chat(url: str, messages: list, headers: dict | None = None) -> httpx.Response:
    body = {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers or {}, timeout=T)
    assert r.status_code == 200, r.text
    return r


def test_two_replicas_answer_through_rays_proxy(ray_cli):
    assert len(both_replicas(ray_cli.url)) == 2
    client = openai.OpenAI(base_url=ray_cli.url + "/v1", api_key="none", max_retries=0, timeout=T)
    for stream in (False, True):
        r = client.chat.completions.create(model=MODEL, messages=[user(Q, data_url())], max_tokens=4,
                                           temperature=0, stream=stream)
        text = "".join(c.choices[0].delta.content or "" for c in r if c.choices) if stream else r.choices[0].message.content
        assert text.strip().lower().startswith("red"), text
    r = httpx.post(ray_cli.url + "/v1/chat/completions", json={"model": MODEL, "messages": [], "n": 2}, timeout=T)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"
    r = httpx.request("TRACE", ray_cli.url + "/v1/models", timeout=T)  # the app's own errors pass through
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_second_turns_go_back_to_the_replica_that_cached_the_first(ray_cli):
    """Plain clients (no header): the image's hash keeps a conversation on one replica, whose cache it hits."""
    convs = [variant_url(f"ray-conv-{i}") for i in range(6)]
    firsts = [chat(ray_cli.url, [user(Q, url)]) for url in convs]
    for url, first in zip(convs, firsts):
        a = first.json()
        history = [user(Q, url), {"role": "assistant", "content": a["choices"][0]["message"]["content"]},
                   user("And the square?")]
        second = chat(ray_cli.url, history)
        assert second.headers["x-mqt-replica"] == first.headers["x-mqt-replica"]
        cached = second.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= a["usage"]["prompt_tokens"] + a["usage"]["completion_tokens"] - 1, (cached, a["usage"])
    replicas = [f.headers["x-mqt-replica"] for f in firsts]
    assert min(replicas.count(r) for r in set(replicas)) >= 2 and len(set(replicas)) == 2, replicas  # by count


def test_x_session_id_pins_requests_about_different_images(ray_cli):
    got = {chat(ray_cli.url, [user(Q, variant_url(f"ray-sid-{i}"))], {"x-session-id": "robot-7"}).headers["x-mqt-replica"]
           for i in range(4)}
    assert len(got) == 1, got


def test_start_up_is_logged_once_per_replica_without_rays_http_options_notice(ray_cli):
    import time

    ready = r"mqt_edge\.serve: ready in [\d.]+ s: m = \d+"
    deadline = time.monotonic() + 90  # a replica may still be loading when the first answers
    while len(re.findall(ready, ray_cli.output())) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    out = ray_cli.output()
    assert len(re.findall(ready, out)) == 2, out[-3000:]
    assert "will not be applied" not in out


def test_one_sigterm_ends_the_server_and_every_ray_process(ray_cli):
    took = ray_cli.stop_and_check()
    assert ray_cli.proc.returncode == 0
    assert "SIGTERM: stopping Ray Serve" in ray_cli.output()
    print(f"all Ray processes gone {took:.1f} s after SIGTERM")
