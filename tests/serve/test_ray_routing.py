"""The Ray routing pieces without a cluster: the key an ingress derives, the router's pins, threads per replica;
and (heavy) repeated SIGTERMs to `mqt-edge serve --ray`, some during its start."""

from __future__ import annotations

import json
import random
import time

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'mqt-edge[ray]')")

from mqt_edge.serve import ServeConfig  # noqa: E402
from mqt_edge.serve.ray import MAX_KEY_CHARS, replica_threads, routing_key  # noqa: E402
from mqt_edge.serve.ray_router import Pins  # noqa: E402


def body(*messages) -> bytes:
    return json.dumps({"model": "m", "messages": list(messages)}).encode()


def turn(text: str, url: str | None = None) -> dict:
    parts = [{"type": "text", "text": text}] + ([{"type": "image_url", "image_url": {"url": url}}] if url else [])
    return {"role": "user", "content": parts}


def test_every_turn_of_a_conversation_gets_its_images_key():
    first = body(turn("What color?", "data:image/png;base64,AAAA"))
    second = body(turn("What color?", "data:image/png;base64,AAAA"), {"role": "assistant", "content": "red"},
                  turn("And the square?"))
    other = body(turn("What color?", "data:image/png;base64,BBBB"))
    assert routing_key({}, first) == routing_key({}, second) != routing_key({}, other)
    assert routing_key({}, first).startswith("i:")


def test_the_session_header_wins_and_a_long_one_is_hashed():
    b = body(turn("q", "data:image/png;base64,AAAA"))
    assert routing_key({"x-session-id": "robot-7"}, b) == "s:robot-7"
    long = routing_key({"x-session-id": "x" * (MAX_KEY_CHARS + 1)}, b)
    assert long.startswith("s:") and len(long) == 2 + 64
    assert routing_key({"x-session-id": "  "}, b) == routing_key({}, b)  # blank: as if absent


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b'{"messages": 3}', b"[" * 100_000 + b"]" * 100_000,
                                 json.dumps({"messages": [{"content": [{"image_url": {"url": 5}}]}]}).encode(),
                                 body(turn("text only"))])
def test_a_body_without_an_image_has_no_key(raw):
    assert routing_key({}, raw) is None  # Ray spreads it; the app answers it


def test_an_image_url_given_as_a_bare_string_still_keys():
    raw = json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]}).encode()
    assert routing_key({}, raw) is not None


def test_pins_spread_new_keys_by_count_and_keep_them():
    pins, live = Pins(), [("A", "a"), ("B", "b")]
    placed = [pins.place(f"img-{i}", live) for i in range(5)]
    assert sorted(placed.count(r) for r in "AB") == [2, 3]
    assert [pins.place(f"img-{i}", list(reversed(live))) for i in range(5)] == placed  # sticky, any order


def test_a_key_whose_replica_went_away_is_placed_again():
    pins = Pins()
    first = pins.place("k", [("A", "a"), ("B", "b")])
    survivor = "B" if first == "A" else "A"
    assert pins.place("k", [(survivor, survivor.lower())]) == survivor
    assert pins.place("k", [("A", "a"), ("B", "b")]) == survivor


def test_pins_forget_the_oldest_keys_beyond_their_bound():
    pins, live = Pins(max_keys=4), [("A", "a"), ("B", "b")]
    for i in range(10):
        pins.place(f"k{i}", live)
    assert len(pins) == 4
    assert sorted(pins._count.values()) == [2, 2]  # counts follow what is remembered


@pytest.mark.parametrize("threads, parallel, cpus, want", [(None, 1, 1.0, 1), (None, 2, 4.0, 2), (None, 4, 2.0, 1),
                                                          (None, 1, 2.5, 2), (3, 1, 1.0, 3)])
def test_threads_follow_the_cpus_ray_reserved(tmp_path, threads, parallel, cpus, want):
    cfg = ServeConfig(bundle=str(tmp_path), threads=threads, parallel=parallel)
    assert replica_threads(cfg, cpus) == want


@pytest.mark.heavy
def test_sigterm_ends_every_ray_process_every_time(shipped_bundle, tmp_path):
    """Six starts: three SIGTERMs while serving, three at a random moment of the start-up."""
    from test_serve_ray import RayServer

    for i in range(6):
        srv = RayServer(shipped_bundle, tmp_path / f"serve-{i}.log")
        try:
            if i % 2:
                deadline = time.monotonic() + random.Random(i).uniform(8, 20)
                while not srv.ray_processes()[1] and time.monotonic() < deadline + 30:
                    time.sleep(0.2)  # some Ray process is up: stopping now must still clean up
                time.sleep(max(0.0, deadline - time.monotonic()))
            else:
                srv.wait_serving()
            srv.stop_and_check(serving=not i % 2)
        finally:
            if srv.proc.poll() is None:
                srv.kill()
