"""Two cameras on one node: each stream's answers are about its own images, over one Pipeline."""

import time

import pytest

pytest.importorskip("rclpy", reason="rclpy is not installed: pip install 'mqt-edge[ros2]' or source a ROS 2 install")
from test_ros2_node import EXAMPLE, Q, Harness, image_msg  # noqa: E402  (skips with that module)

from mqt_edge.ros2.refusals import Refusals  # noqa: E402

RED = EXAMPLE  # a red circle (and a blue square)
BLUE = EXAMPLE[..., ::-1].copy()  # red and blue swapped: a blue circle (and a red square)


def colour(text: str) -> str:
    return text.split()[0].lower().strip(".")


@pytest.fixture
def two(default_bundle):
    h = Harness(default_bundle, image_topics=("front/image", "rear/image"), m=16, max_new_tokens=4)
    yield h
    h.close()


def ask_both(h: Harness, front, rear, stamp: int) -> dict[str, dict]:
    """Send one frame to each camera, then one query; the two answers by stream."""
    seen = len(h.infos)
    h.pubs["front/image"][0].publish(image_msg(front, stamp=stamp))
    h.pubs["rear/image"][0].publish(image_msg(rear, "rgb8", stamp=stamp))
    h.wait(lambda: all(s.frames >= stamp for s in h.vlm.streams.values()), "both frames")
    h.queries.publish(h.queries.msg_type(data=Q))
    h.wait(lambda: len(h.infos) >= seen + 2, "an answer from each stream")
    time.sleep(0.2)  # a third answer would be a bug: one query, one answer per stream
    new = h.infos[seen:]
    assert sorted(i["stream"] for i in new) == ["front/image", "rear/image"], new
    return {i["stream"]: i for i in new}


def test_each_stream_answers_about_its_own_camera(two):
    h = two
    assert {s.worker.name for s in h.vlm.streams.values()} == {"mqt-edge-ros2-front/image",
                                                              "mqt-edge-ros2-rear/image"}
    assert all(s.pipe is h.vlm.pipe for s in h.vlm.streams.values())  # one model in memory
    first = ask_both(h, RED, BLUE, stamp=1)
    assert colour(first["front/image"]["answer"]) == "red" and colour(first["rear/image"]["answer"]) == "blue"
    assert first["front/image"]["stamp"]["sec"] == first["rear/image"]["stamp"]["sec"] == 1

    second = ask_both(h, BLUE, RED, stamp=2)  # the cameras swap pictures: so do the answers
    assert colour(second["front/image"]["answer"]) == "blue" and colour(second["rear/image"]["answer"]) == "red"
    assert sorted(colour(a) for a in h.answers) == ["blue", "blue", "red", "red"]


def test_a_standing_query_runs_on_every_stream(default_bundle):
    h = Harness(default_bundle, image_topics=("left", "right"), m=16, max_new_tokens=4, query=Q, overlap="off")
    try:
        for i in range(3):
            h.pubs["left"][0].publish(image_msg(RED, stamp=i))
            h.pubs["right"][0].publish(image_msg(BLUE, stamp=i))
            time.sleep(0.1)
        h.wait(lambda: {i["stream"] for i in h.infos} == {"left", "right"}, "answers from both streams")
        for info in h.infos:
            assert colour(info["answer"]) == {"left": "red", "right": "blue"}[info["stream"]], info
    finally:
        h.close()


def test_a_bad_topic_name_is_one_line_before_the_model_loads(default_bundle):
    from conftest import cli, stderr_lines

    r = cli("ros2", "--bundle", str(default_bundle), "--image-topic", "front", "--image-topic", "rear camera")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert stderr_lines(r) == ["error: image topic 'rear camera' is not a valid ROS topic name; use letters, digits, "
                               "_ and /, not starting with a digit (e.g. front/image)"]


def test_refusals_are_limited_per_kind_and_report_what_they_held_back():
    lines, published, now = [], [], [0.0]
    refuse = Refusals(lines.append, interval=2.0, on_change=published.append, clock=lambda: now[0])
    assert refuse("image_encoding", "bad encoding") and refuse("query", "empty query\nsecond line")
    assert not refuse("image_encoding", "bad encoding") and not refuse("image_encoding", "bad encoding")
    now[0] = 1.9
    assert not refuse("image_encoding", "bad encoding")
    assert refuse.held_back() == {"image_encoding": 3}
    now[0] = 2.1
    assert refuse("image_encoding", "bad encoding")
    assert lines == ["bad encoding [image_encoding: 1 refused in all]", "empty query second line [query: 1 refused in all]",
                     "bad encoding [image_encoding: 5 refused in all; 3 more refused as image_encoding since its "
                     "last line]"]
    assert published[-1] == refuse.counts == {"image_encoding": 5, "query": 1} and len(published) == 6
    assert refuse.held_back() == {} and refuse.total == 6


def test_m_unset_and_a_rate_plan_one_m_for_every_topic(default_bundle):
    from test_watch_plan import NEW, planned, rate_for

    from mqt_edge.pipeline import Pipeline

    with Pipeline.load(default_bundle, threads=1) as p:
        rate = rate_for(p, 2, 16)
        assert planned(p, 1, rate) > 16  # planning for one topic would give a larger m
    h = Harness(default_bundle, image_topics=("left", "right"), max_new_tokens=NEW, profile="cpu", rate=rate,
                query=Q, overlap="off")
    try:
        assert h.vlm.plan["m"] == 16 and h.vlm.plan["streams"] == 2
        h.pubs["left"][0].publish(image_msg(RED, stamp=1))
        h.pubs["right"][0].publish(image_msg(BLUE, stamp=1))
        h.wait(lambda: {i["stream"] for i in h.infos} == {"left", "right"}, "answers from both streams")
        assert all(i["m"] == 16 and i["predicted"]["streams"] == 2 for i in h.infos), h.infos
    finally:
        h.close()


def test_a_new_rate_plans_m_again_and_a_rate_no_m_meets_is_refused(default_bundle):
    from rclpy.parameter import Parameter
    from test_watch_plan import NEW, planned, rate_for

    from mqt_edge.pipeline import Pipeline

    with Pipeline.load(default_bundle, threads=1) as p:
        fast, slow = rate_for(p, 2, 16), rate_for(p, 2, 64)
        assert planned(p, 2, fast) == 16 and planned(p, 2, slow) == 64
    h = Harness(default_bundle, image_topics=("left", "right"), max_new_tokens=NEW, profile="cpu", rate=fast,
                query=Q, overlap="off")
    try:
        assert h.vlm.plan["m"] == 16
        (too_fast,) = h.vlm.node.set_parameters([Parameter("rate", value=1e6)])
        assert not too_fast.successful and "lower rate" in too_fast.reason, too_fast.reason
        assert h.vlm.plan["m"] == 16 and h.vlm.options.rate == fast  # the refused rate changed nothing
        (ok,) = h.vlm.node.set_parameters([Parameter("rate", value=slow)])
        assert ok.successful and h.vlm.plan["m"] == 64 and h.vlm.plan["target_rate_hz"] == slow
        for stamp in range(1, 4):  # the watches end and start again at the new m: frames until both answer
            h.pubs["left"][0].publish(image_msg(RED, stamp=stamp))
            h.pubs["right"][0].publish(image_msg(BLUE, stamp=stamp))
            time.sleep(0.3)
        h.wait(lambda: {i["stream"] for i in h.infos if i["m"] == 64} == {"left", "right"}, "answers at the new m")
        assert all(i["predicted"]["m"] == 64 for i in h.infos if i["m"] == 64), h.infos
    finally:
        h.close()


def test_a_start_up_rate_no_m_meets_is_one_error_and_frees_the_node(default_bundle, monkeypatch):
    import os
    import random

    import rclpy

    from mqt_edge.errors import MQTEdgeError
    from mqt_edge.pipeline import Pipeline
    from mqt_edge.ros2.node import MqtEdgeNode, NodeOptions

    closed = []
    real_close = Pipeline.close
    monkeypatch.setattr(Pipeline, "close", lambda self: closed.append(self) or real_close(self))
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=random.Random(os.getpid()).randint(100, 200))
    try:
        with pytest.raises(MQTEdgeError, match="lower rate"):
            MqtEdgeNode(NodeOptions(bundle=str(default_bundle), image_topics=("a", "b"), threads=1, rate=1e6,
                                    query=Q), context=context)
        assert len(closed) == 1  # the model it loaded is freed
        probe = rclpy.create_node("probe", context=context)
        try:
            assert "mqt_edge" not in probe.get_node_names()  # and it left the graph
        finally:
            probe.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)
