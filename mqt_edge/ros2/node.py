"""The ROS 2 node: camera frames and questions in, answers out, on the latest-frame policy.

Topics (relative, so a namespace or remapping moves them):
  image           sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8, 16-bit forms), sensor-data QoS
  image/compressed  sensor_msgs/CompressedImage (jpeg, png), sensor-data QoS
  query           std_msgs/String: answered once, about the newest frame
  answer          std_msgs/String: the answer text
  answer_info     std_msgs/String: JSON with m, timings, first-token probability, frame stamp

A standing query (parameter `query`) is answered continuously as frames allow, at most `rate`
times a second, or on every `every_n`-th frame. The model work runs on a thread of its own
(`Watch` on a one-slot mailbox), so callbacks only convert and store frames.

rclpy is imported when the node starts, never at import time of mqt_edge.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from dataclasses import dataclass, fields, replace
from typing import Any

from ..bundle import DEFAULT_BUNDLE
from ..errors import InputError, MQTEdgeError, require
from ..prompt import check_question
from . import image_from_ros

OVERLAP = {"auto": None, "on": True, "off": False}
LIVE = ("query", "rate", "every_n")  # parameters that may change while the node runs
QUEUED_QUERIES = 8  # questions waiting for the model; older ones are dropped (and logged) beyond this


@dataclass(frozen=True)
class NodeOptions:
    """The node's ROS parameters (0 or "" means "not set": ROS parameters cannot be None)."""

    bundle: str = str(DEFAULT_BUNDLE)
    m: int = 0  # fixed number of visual tokens; 0: the planner's m on `profile`
    profile: str = ""  # device profile for the planner ("" : auto)
    refine: int = 0  # refine to this m when the first token is not confident (0: never)
    confidence: float = 0.5
    max_new_tokens: int = 32
    temperature: float = 0.0
    query: str = ""  # the standing query ("" : answer only what arrives on `query`)
    rate: float = 0.0  # standing query at most this often, Hz (0: as often as frames allow)
    every_n: int = 0  # standing query on every n-th frame (0: not by count)
    overlap: str = "auto"  # auto | on | off: encode the next frame while the LLM decodes
    threads: int = 0  # CPU threads of the pipeline (0: all cores)
    vision_threads: int = 0
    llm_threads: int = 0
    vision_backend: str = "auto"
    n_gpu_layers: int = 0

    def check(self) -> NodeOptions:
        if self.overlap not in OVERLAP:
            raise InputError(f"overlap '{self.overlap}'", f"choose one of: {', '.join(OVERLAP)}")
        if self.rate < 0 or self.every_n < 0 or self.m < 0 or self.refine < 0:
            raise InputError("rate, every_n, m and refine cannot be negative", "use 0 to leave one unset")
        if self.refine and self.m and self.refine <= self.m:
            raise InputError(f"refine {self.refine} is not above m {self.m}", "refine to a larger m, or 0")
        if self.rate and self.every_n:
            raise InputError("both rate and every_n are set", "pace the standing query by one of them")
        return self


class MqtEdgeNode:
    """Owns an rclpy node (composition, so this module defines no class on rclpy at import)."""

    def __init__(self, options: NodeOptions = NodeOptions(), context: Any = None, name: str = "mqt_edge") -> None:
        rclpy = require("rclpy", "ros2")
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import CompressedImage, Image
        from std_msgs.msg import String

        self.node = rclpy.create_node(name, context=context)
        self.log = self.node.get_logger()
        self.options = self._declare(options.check())
        self._String = String
        self._lock = threading.Lock()
        self._queries: collections.deque[str] = collections.deque()
        self._latest: tuple[Any, dict] | None = None
        self._frames = 0  # images received (valid ones)
        self._last_standing = 0.0
        self.refused = 0  # images or queries refused, each logged in one line
        self.answered = 0
        from ..pipeline import Pipeline
        from ..watch import Latest, Watch

        o = self.options
        self.pipe = Pipeline.load(o.bundle, profile=o.profile or None, vision_backend=o.vision_backend,
                                  n_gpu_layers=o.n_gpu_layers, threads=o.threads or None)
        self._Latest, self._Watch = Latest, Watch
        self.mailbox = Latest()
        self._stop = threading.Event()
        self.answer_pub = self.node.create_publisher(String, "answer", 10)
        self.info_pub = self.node.create_publisher(String, "answer_info", 10)
        self.node.create_subscription(Image, "image", self._on_image, qos_profile_sensor_data)
        self.node.create_subscription(CompressedImage, "image/compressed", self._on_image, qos_profile_sensor_data)
        self.node.create_subscription(String, "query", self._on_query, 10)
        self.node.add_on_set_parameters_callback(self._on_parameters)
        self._worker = threading.Thread(target=self._work, name="mqt-edge-ros2-worker", daemon=True)
        self._worker.start()
        standing = f", standing query {o.query!r}" if o.query else ""
        self.log.info(f"ready: bundle {o.bundle}, m {o.m or 'from the planner'}{standing}")

    def _declare(self, options: NodeOptions) -> NodeOptions:
        """Each option is a ROS parameter whose default is the value given (CLI or caller)."""
        values = {}
        for f in fields(NodeOptions):
            default = getattr(options, f.name)
            try:
                param = self.node.declare_parameter(f.name, default)
            except Exception as exc:  # rclpy's InvalidParameterTypeException: -p rate:=2 for a double
                raise InputError(f"ROS parameter {f.name}: {exc}",
                                 f"give it a {type(default).__name__} value, like {f.name}:={default!r}") from None
            values[f.name] = type(default)(param.value)
        return NodeOptions(**values).check()

    # -- callbacks (executor thread): convert, store, never raise ---------------------------------
    def _on_image(self, msg: Any) -> None:
        try:
            rgb = image_from_ros(msg)
        except MQTEdgeError as exc:
            self._refuse(f"image refused: {exc}")
            return
        meta = {"stamp": {"sec": msg.header.stamp.sec, "nanosec": msg.header.stamp.nanosec},
                "frame_id": msg.header.frame_id}
        with self._lock:
            self._latest = (rgb, meta)
            self._frames += 1
            n, pending = self._frames, bool(self._queries)
        o = self.options
        standing = bool(o.query) and (not o.every_n or (n - 1) % o.every_n == 0)
        if standing or pending:
            self.mailbox.put(rgb, meta)

    def _on_query(self, msg: Any) -> None:
        text = str(msg.data)
        try:
            check_question(text)
        except MQTEdgeError as exc:
            self._refuse(f"query refused: {exc}")
            return
        with self._lock:
            if len(self._queries) == QUEUED_QUERIES:
                self.log.warning(f"{QUEUED_QUERIES} queries already wait; dropping the oldest: "
                                 f"{self._queries.popleft()!r}")
            self._queries.append(text)
            latest = self._latest
        if latest is None:
            self.log.warning(f"query {text!r} arrived before any image; it will be answered about the first one")
        else:
            self.mailbox.put(*latest)  # wake the model with the newest frame

    def _refuse(self, line: str) -> None:
        self.refused += 1
        self.log.warning(line.replace("\n", " "), throttle_duration_sec=2.0)

    def _on_parameters(self, params: list) -> Any:
        from rcl_interfaces.msg import SetParametersResult

        changes = {p.name: p.value for p in params}
        fixed = sorted(set(changes) - set(LIVE))
        if fixed:
            return SetParametersResult(successful=False, reason=f"{', '.join(fixed)} apply at start only: restart")
        try:
            options = replace(self.options, **{k: type(getattr(self.options, k))(v) for k, v in changes.items()})
            options.check()
            if options.query:
                check_question(options.query)
        except (MQTEdgeError, TypeError, ValueError) as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        self.options = options
        return SetParametersResult(successful=True)

    # -- the model's thread ----------------------------------------------------------------------
    def _question(self, frame: Any) -> str | None:
        """On-demand queries first; else the standing query if its pace allows."""
        with self._lock:
            if self._queries:
                return self._queries.popleft()
        o = self.options
        if not o.query:
            return None
        now = time.monotonic()
        if o.rate and now - self._last_standing < 1.0 / o.rate:
            return None
        self._last_standing = now
        return o.query

    def _work(self) -> None:
        """Answer until shutdown; a failure of one frame is logged and the loop goes on."""
        o = self.options
        while not self._stop.is_set():
            try:
                watch = self._Watch(self.pipe, self.mailbox, self._question, m=o.m or None, profile=o.profile or None,
                                    refine=o.refine or None, confidence=o.confidence,
                                    overlap=OVERLAP[o.overlap], vision_threads=o.vision_threads or None,
                                    llm_threads=o.llm_threads or None, max_new_tokens=o.max_new_tokens,
                                    temperature=o.temperature,
                                    on_error=lambda f, e: self._refuse(f"frame {f.index} not answered: {e}"))
                with watch:
                    for a in watch:
                        self._publish(a)
            except MQTEdgeError as exc:  # a setting that cannot work (e.g. refine <= m): say it, keep the node
                self.log.error(f"cannot answer: {exc}", throttle_duration_sec=10.0)
                self._stop.wait(5.0)
            except Exception as exc:  # a bug: keep the node alive and say what happened
                self.log.error(f"answering failed: {type(exc).__name__}: {exc}", throttle_duration_sec=10.0)
                self._stop.wait(1.0)
            if not self._stop.is_set():
                self.mailbox = self._Latest()  # the old watch closed its mailbox

    def _publish(self, a: Any) -> None:
        ans = a.answer
        info = {"frame": a.frame, "stamp": a.meta["stamp"], "frame_id": a.meta["frame_id"], "question": a.question,
                "m": ans.m, "first_token_prob": ans.first_token_prob, "timings_ms": ans.timings_ms,
                "stream_ms": a.timings_ms, "dropped": a.dropped, "token_ids": ans.token_ids,
                "refined_from": ans.refined_from, "predicted": ans.predicted}
        self.answer_pub.publish(self._String(data=ans.answer))
        self.info_pub.publish(self._String(data=json.dumps(info)))
        self.answered += 1

    def close(self) -> None:
        self._stop.set()
        self.mailbox.close()
        self._worker.join(timeout=60)
        self.pipe.close()
        self.node.destroy_node()


def main(options: NodeOptions = NodeOptions(), ros_args: list[str] | None = None) -> None:
    """Run the node until a shutdown request (Ctrl-C, `ros2 lifecycle`/launch shutdown, SIGTERM)."""
    rclpy = require("rclpy", "ros2")
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    rclpy.init(args=["mqt_edge", *(ros_args or [])])
    node = None
    try:
        node = MqtEdgeNode(options)
        executor = SingleThreadedExecutor()
        executor.add_node(node.node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.close()
        rclpy.try_shutdown()


__all__ = ["MqtEdgeNode", "NodeOptions", "main"]
