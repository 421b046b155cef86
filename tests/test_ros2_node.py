"""The ROS 2 node, end to end: a publisher node sends examples/shapes.png and a query, "red" comes back."""

import json
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

try:
    import rclpy
    from rcl_interfaces.msg import Log
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import String
except Exception as exc:  # ImportError, or a missing librmw_*.so when rclpy comes without its middleware
    pytest.skip(f"rclpy is not importable ({type(exc).__name__}: {exc}); install it with "
                "pip install 'mqt-edge[ros2]' or source a ROS 2 install", allow_module_level=True)

from mqt_edge.ros2.node import MqtEdgeNode, NodeOptions

EXAMPLE = np.asarray(PILImage.open(Path(__file__).parent.parent / "examples" / "shapes.png").convert("RGB"))
Q = "What color is the circle?"
TIMEOUT = 60.0


def image_msg(rgb: np.ndarray, encoding: str = "bgr8", pad: int = 4, stamp: int = 42) -> Image:
    h, w, _ = rgb.shape
    pixels = rgb[..., ::-1] if encoding == "bgr8" else rgb
    rows = np.concatenate([pixels.reshape(h, -1), np.zeros((h, pad), np.uint8)], axis=1)
    msg = Image(height=h, width=w, encoding=encoding, is_bigendian=0, step=rows.shape[1], data=rows.tobytes())
    msg.header.stamp.sec, msg.header.frame_id = stamp, "camera"
    return msg


class Harness:
    """The node under test and a tester node in one process, on a domain of their own."""

    def __init__(self, bundle: Path, image_topics: tuple[str, ...] = ("image",), **options) -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=random.Random(os.getpid()).randint(100, 200))
        self.vlm = MqtEdgeNode(NodeOptions(bundle=str(bundle), image_topics=image_topics, threads=1, **options),
                               context=self.context)
        self.tester = rclpy.create_node("tester", context=self.context)
        self.pubs = {t: (self.tester.create_publisher(Image, t, qos_profile_sensor_data),
                         self.tester.create_publisher(CompressedImage, f"{t}/compressed", qos_profile_sensor_data))
                     for t in image_topics}
        self.images, self.compressed = self.pubs[image_topics[0]]
        self.queries = self.tester.create_publisher(String, "query", 10)
        self.answers, self.infos, self.refused, self.logs = [], [], [], []
        self.tester.create_subscription(String, "answer", lambda m: self.answers.append(m.data), 10)
        self.tester.create_subscription(String, "answer_info", lambda m: self.infos.append(json.loads(m.data)), 10)
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.tester.create_subscription(String, "refused", lambda m: self.refused.append(json.loads(m.data)), latched)
        self.tester.create_subscription(Log, "/rosout", self._on_log, QoSProfile(depth=100))
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.vlm.node)
        self.executor.add_node(self.tester)
        self.spinner = threading.Thread(target=self.executor.spin, daemon=True)
        self.spinner.start()
        self.wait(lambda: self.queries.get_subscription_count() and self.vlm.answer_pub.get_subscription_count()
                  and all(p.get_subscription_count() for pubs in self.pubs.values() for p in pubs), "discovery")

    def _on_log(self, msg: Log) -> None:
        if msg.name == self.vlm.node.get_name():
            self.logs.append(msg.msg)

    def wait(self, done, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def close(self) -> None:
        self.vlm.close()
        self.executor.shutdown()
        self.tester.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self.spinner.join(timeout=10)


@pytest.fixture
def harness(default_bundle):
    h = Harness(default_bundle, m=16, max_new_tokens=4)
    yield h
    h.close()


def test_round_trip_answers_red_and_survives_bad_input(harness):
    h = harness
    h.queries.publish(String(data=Q))  # before any frame: logged, answered about the first one
    h.wait(lambda: h.vlm.streams["image"].queries, "the early query")
    h.images.publish(image_msg(EXAMPLE))  # bgr8 with padded rows
    h.wait(lambda: h.answers, "the first answer")
    assert h.answers[0].split()[0].lower().strip(".") == "red", h.answers
    info = h.infos[0]
    assert info["m"] == 16 and info["stamp"] == {"sec": 42, "nanosec": 0} and info["frame_id"] == "camera"
    assert 0 < info["first_token_prob"] <= 1 and info["timings_ms"]["total"] > 0 and info["question"] == Q
    assert info["stream"] == "image" and info["answer"] == h.answers[0] and info["refused"] == {}

    bad = [image_msg(EXAMPLE, "yuv422"), Image(height=0, width=0, encoding="rgb8", step=0)]
    short = image_msg(EXAMPLE, "rgb8")
    short.data = short.data[: len(short.data) // 2]  # shorter than height x step
    for msg in bad + [short]:
        h.images.publish(msg)
    h.compressed.publish(CompressedImage(format="jpeg", data=b"not a jpeg"))
    h.queries.publish(String(data="   "))  # an empty query
    h.wait(lambda: h.vlm.refused >= 5, "the five refusals")
    assert h.vlm.streams["image"].worker.is_alive()

    h.queries.publish(String(data=Q))  # the newest valid frame is still shapes.png
    h.wait(lambda: len(h.answers) >= 2, "the answer after bad input")
    assert h.answers[1] == h.answers[0] and h.infos[1]["token_ids"] == info["token_ids"]


def test_each_kind_of_refusal_gets_its_own_log_line_and_the_counts_are_published(harness):
    """Three bad images of three kinds and an empty query within 1.5 s: four lines, not one; a second
    bad image of a kind already logged is counted, not logged; the counts go out on `refused`."""
    h = harness
    short = image_msg(EXAMPLE, "rgb8")
    short.data = short.data[: len(short.data) // 2]
    start = time.monotonic()
    for msg in [image_msg(EXAMPLE, "yuv422"), Image(height=0, width=0, encoding="rgb8", step=0), short,
                image_msg(EXAMPLE, "yuv422")]:
        h.images.publish(msg)
    h.queries.publish(String(data="   "))
    h.wait(lambda: h.vlm.refused == 5, "the five refusals")
    assert time.monotonic() - start < 1.5  # all inside one throttle interval of the old single call site
    counts = {"image_encoding": 2, "image_empty": 1, "image_data": 1, "query": 1}
    h.wait(lambda: h.refused and h.refused[-1] == counts, "the published counts")
    kinds = lambda: [k for k in counts for line in h.logs if f"[{k}:" in line]  # noqa: E731
    h.wait(lambda: len(kinds()) >= 4, "a log line per kind")
    time.sleep(0.3)  # a late fifth line would show here
    assert sorted(kinds()) == sorted(counts), h.logs
    assert any("encoding 'yuv422' is not supported" in line for line in h.logs)

    h.images.publish(image_msg(EXAMPLE))
    h.queries.publish(String(data=Q))
    h.wait(lambda: h.infos, "an answer")
    assert h.infos[-1]["refused"] == counts


def test_standing_query_on_every_nth_frame(default_bundle):
    h = Harness(default_bundle, m=16, max_new_tokens=4, query=Q, every_n=3, overlap="off")
    try:
        import io

        buf = io.BytesIO()
        PILImage.fromarray(EXAMPLE).save(buf, format="PNG")
        for i in range(7):  # frames 0, 3 and 6 are due; each waits until the last answer is out
            h.compressed.publish(CompressedImage(format="png", data=buf.getvalue()))
            h.wait(lambda: h.vlm.streams["image"].frames > i, f"frame {i}")
            if i % 3 == 0:
                h.wait(lambda: len(h.answers) == i // 3 + 1, f"the answer to frame {i}")
        time.sleep(0.3)
        assert len(h.answers) == 3 and {a.split()[0].lower().strip(".") for a in h.answers} == {"red"}
    finally:
        h.close()


def test_live_parameters(harness):
    from rclpy.parameter import Parameter

    h = harness
    (fixed,) = h.vlm.node.set_parameters([Parameter("m", value=64)])
    assert not fixed.successful and "restart" in fixed.reason
    (empty,) = h.vlm.node.set_parameters([Parameter("rate", value=-1.0)])
    assert not empty.successful and "negative" in empty.reason
    assert all(r.successful for r in h.vlm.node.set_parameters([Parameter("query", value=Q)]))
    h.images.publish(image_msg(EXAMPLE, "rgb8", pad=0))  # the standing query now answers frames
    h.wait(lambda: h.answers, "an answer to the standing query set at run time")
    assert h.answers[0].split()[0].lower().strip(".") == "red" and h.infos[0]["question"] == Q
