"""The ROS 2 node: camera frames and questions in, answers out, on the latest-frame policy.

Topics (relative, so a namespace or remapping moves them), for each image topic T of the parameter
`image_topics` (default ["image"]):
  T               sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8, 16-bit forms), sensor-data QoS
  T/compressed    sensor_msgs/CompressedImage (jpeg, png), sensor-data QoS
and, shared by all streams:
  query           std_msgs/String: answered once by every stream, about its newest frame
  answer          std_msgs/String: the answer text
  answer_info     std_msgs/String: JSON with the stream (T), the text, m, timings, frame stamp, refusals
  refused         std_msgs/String: JSON {kind: count} of refused input, sent on each refusal (latched)

A standing query (parameter `query`) is answered continuously on every stream as frames allow, at
most `rate` times a second, or on every `every_n`-th frame. With `m` unset and a `rate`, one m for
every stream comes from the planner's `plan_streams` at start and whenever `rate` changes (`plan`,
logged). Each stream answers on a thread of its own (`Stream`, a `Watch` on a one-slot mailbox) over
the one shared `Pipeline`, so callbacks only convert and store frames, and several cameras' answers
run at the same time.

rclpy is imported when the node starts, never at import time of mqt_edge.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
import time
from dataclasses import dataclass, fields, replace
from typing import Any, Iterator

from ..bundle import DEFAULT_BUNDLE
from ..errors import InputError, MQTEdgeError, require
from ..prompt import check_question
from . import RosImageError, image_from_ros
from .refusals import Refusals
from .stream import OVERLAP, Stream

LIVE = ("query", "rate", "every_n")  # parameters that may change while the node runs
SPIN_POLL_S = 0.2  # the executor's longest wait before it looks at the context again (see `spin`)
CLOSE_WAIT_S = 1.5  # how long closing waits for an answer in flight before leaving it to the process exit


@dataclass(frozen=True)
class NodeOptions:
    """The node's ROS parameters (0 or "" means "not set": ROS parameters cannot be None)."""

    bundle: str = str(DEFAULT_BUNDLE)
    image_topics: tuple[str, ...] = ("image",)  # one stream per topic (and its /compressed), one Pipeline
    m: int = 0  # fixed number of visual tokens; 0: the planner's m on `profile` (for every stream at `rate` when set)
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
        topics = [str(t).strip() for t in self.image_topics]
        if not topics or not all(topics) or len(set(topics)) < len(topics):
            raise InputError(f"image_topics {list(self.image_topics)} must be distinct, non-empty topic names",
                             'give at least one, e.g. image_topics:="[front/image, rear/image]"')
        return self


class MqtEdgeNode:
    """Owns an rclpy node (composition, so this module defines no class on rclpy at import)."""

    def __init__(self, options: NodeOptions = NodeOptions(), context: Any = None, name: str = "mqt_edge") -> None:
        rclpy = require("rclpy", "ros2")
        from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
        from sensor_msgs.msg import CompressedImage, Image
        from std_msgs.msg import String

        from ..pipeline import Pipeline

        self.node = rclpy.create_node(name, context=context)
        self.log = self.node.get_logger()
        self.options = self._declare(options.check())
        self._String, self._publishing, self.answered = String, threading.Lock(), 0
        self.answer_pub = self.node.create_publisher(String, "answer", 10)
        self.info_pub = self.node.create_publisher(String, "answer_info", 10)
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.refused_pub = self.node.create_publisher(String, "refused", latched)
        self.refusals = Refusals(self.log.warning, on_change=self._publish_refused)
        o, self.streams = self.options, {}
        for topic in o.image_topics:  # before the model loads, so that a bad topic name fails at once
            on_image = functools.partial(self._on_image, topic)
            _subscribe(self.node, Image, topic, on_image, qos_profile_sensor_data)
            _subscribe(self.node, CompressedImage, f"{topic}/compressed", on_image, qos_profile_sensor_data)
        self.node.create_subscription(String, "query", self._on_query, 10)
        self.pipe = Pipeline.load(o.bundle, profile=o.profile or None, vision_backend=o.vision_backend,
                                  n_gpu_layers=o.n_gpu_layers, threads=o.threads or None)
        with _undone_on_error(self.pipe, self.node):  # a rate no m meets: one line, nothing left behind
            self.plan = self._plan_streams(o)
        planned = self.plan["m"] if self.plan else None
        self.streams = {t: Stream(t, self.pipe, lambda: self.options, self._publish, self.refusals, self.log,
                                  planned).start()
                        for t in o.image_topics}
        self.node.add_on_set_parameters_callback(self._on_parameters)
        standing = f", standing query {o.query!r}" if o.query else ""
        if self.node.context.ok():  # not after a signal during the load: rosout is gone then
            self.log.info(f"ready: bundle {o.bundle}, streams {', '.join(o.image_topics)}, "
                          f"m {o.m or planned or 'from the planner'}{standing}")

    def _plan_streams(self, o: NodeOptions) -> dict | None:
        """With m unset and a rate, one m for every image topic from the planner (`plan_streams`):
        the largest at which they all get `rate` answers/s. Made at start, and again when `rate` changes."""
        if o.m or not o.rate:
            return None
        choice = self.pipe.choose_stream_tokens(len(o.image_topics), o.rate, o.max_new_tokens, o.profile or None,
                                                o.query or None)
        plan = {"m": choice.m, "profile": choice.profile} | choice.predicted
        self.log.info(f"m = {choice.m} for {len(o.image_topics)} stream(s) at {o.rate:g} answers/s each on "
                      f"{choice.profile}: {plan['reason']}")
        return plan

    def _declare(self, options: NodeOptions) -> NodeOptions:
        """Each option is a ROS parameter whose default is the value given (CLI or caller)."""
        values = {}
        for f in fields(NodeOptions):
            default = getattr(options, f.name)
            try:
                param = self.node.declare_parameter(f.name, default)
            except Exception as exc:  # rclpy's InvalidParameterTypeException: -p rate:=2 for a double
                kind, example = type(default).__name__, f"{f.name}:={default!r}"
                if isinstance(default, tuple):
                    kind, example = "list of strings", f'{f.name}:="[{", ".join(default)}]"'
                raise InputError(f"ROS parameter {f.name}: {exc}", f"give it a {kind}, like {example}") from None
            values[f.name] = type(default)(param.value)
        return NodeOptions(**values).check()

    # -- callbacks (executor thread): convert, store, never raise ---------------------------------
    def _on_image(self, topic: str, msg: Any) -> None:
        try:
            rgb = image_from_ros(msg)
        except RosImageError as exc:
            self.refusals(exc.kind, f"{topic}: image refused: {exc}")
            return
        except MQTEdgeError as exc:
            self.refusals("image", f"{topic}: image refused: {exc}")
            return
        stream = self.streams.get(topic)
        if stream is not None:  # None while the model loads
            stream.offer(rgb, {"stamp": {"sec": msg.header.stamp.sec, "nanosec": msg.header.stamp.nanosec},
                               "frame_id": msg.header.frame_id})

    def _on_query(self, msg: Any) -> None:
        text = str(msg.data)
        try:
            check_question(text)
        except MQTEdgeError as exc:
            self.refusals("query", f"query refused: {exc}")
            return
        for stream in self.streams.values():
            stream.ask(text)

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
            plan = self._plan_streams(options) if options.rate != self.options.rate else self.plan
        except (MQTEdgeError, TypeError, ValueError) as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        self.options = options
        if plan is not self.plan:  # a new rate with m unset: every stream's next watch takes the new m
            self.plan = plan
            for stream in self.streams.values():
                stream.replan(plan["m"] if plan else None)
        return SetParametersResult(successful=True)

    # -- out ------------------------------------------------------------------------------------
    def _publish(self, stream: Stream, a: Any) -> None:
        """From a stream's thread: the text on `answer`, then everything on `answer_info`, the two
        adjacent (a lock) so that a reader of both can pair them even with several streams."""
        ans = a.answer
        info = {"stream": stream.name, "answer": ans.answer, "frame": a.frame, "stamp": a.meta["stamp"],
                "frame_id": a.meta["frame_id"], "question": a.question, "m": ans.m,
                "first_token_prob": ans.first_token_prob, "timings_ms": ans.timings_ms, "stream_ms": a.timings_ms,
                "dropped": a.dropped, "token_ids": ans.token_ids, "refined_from": ans.refined_from,
                "predicted": ans.predicted or self.plan, "refused": self.refusals.counts}
        with self._publishing:
            self.answer_pub.publish(self._String(data=ans.answer))
            self.info_pub.publish(self._String(data=json.dumps(info)))
            self.answered += 1

    def _publish_refused(self, counts: dict[str, int]) -> None:
        self.refused_pub.publish(self._String(data=json.dumps(counts)))

    @property
    def refused(self) -> int:
        return self.refusals.total

    def close(self) -> None:
        """Stop every stream; the model is freed once no answer is in flight (else by the process exit)."""
        for stream in self.streams.values():
            stream.close()
        deadline = time.monotonic() + CLOSE_WAIT_S
        idle = [s.join(max(0.0, deadline - time.monotonic())) for s in self.streams.values()]
        if held := self.refusals.held_back():
            self.log.info(f"refusals not logged line by line: {held}; in all: {self.refusals.counts}")
        if all(idle):
            self.pipe.close()
        else:
            self.log.warning(f"an answer was still running after {CLOSE_WAIT_S} s; leaving it to the process exit")
        self.node.destroy_node()


@contextlib.contextmanager
def _undone_on_error(pipe: Any, node: Any) -> Iterator[None]:
    """Free the model and leave the ROS graph when start-up fails after the model loaded."""
    try:
        yield
    except BaseException:
        pipe.close()
        node.destroy_node()
        raise


def _subscribe(node: Any, msg_type: Any, topic: str, callback: Any, qos: Any) -> None:
    from rclpy.exceptions import InvalidTopicNameException

    try:
        node.create_subscription(msg_type, topic, callback, qos)
    except InvalidTopicNameException:
        raise InputError(f"image topic '{topic}' is not a valid ROS topic name",
                         "use letters, digits, _ and /, not starting with a digit (e.g. front/image)") from None


def spin(executor: Any, context: Any, poll: float = SPIN_POLL_S) -> None:
    """Run callbacks until the context is shut down (a signal, or `rclpy.shutdown`).

    Not `executor.spin()`: on SIGINT/SIGTERM rclpy's signal thread first wakes the executors (their
    signal guard condition) and only then shuts the contexts down. An executor that wakes in between
    sees a live context, goes back to an unbounded wait, and nothing wakes it again: the node survives
    the signal until a second one. A bounded wait looks at the context at least every `poll` s."""
    from rclpy.executors import ExternalShutdownException

    try:
        while context.ok():
            executor.spin_once(timeout_sec=poll)
    except ExternalShutdownException:
        pass


def main(options: NodeOptions = NodeOptions(), ros_args: list[str] | None = None) -> None:
    """Run the node until a shutdown request (Ctrl-C, SIGTERM, the launch system's SIGINT), then
    free the model and leave the ROS graph before returning."""
    rclpy = require("rclpy", "ros2")
    from rclpy.executors import SingleThreadedExecutor

    rclpy.init(args=["mqt_edge", *(ros_args or [])])  # installs rclpy's SIGINT/SIGTERM handlers
    context, node = rclpy.get_default_context(), None
    executor = SingleThreadedExecutor(context=context)  # before a signal can invalidate the context
    try:
        node = MqtEdgeNode(options)
        if context.ok():  # else a signal came while the model loaded
            executor.add_node(node.node)
            spin(executor, context)
    except KeyboardInterrupt:
        pass
    except Exception:
        if context.ok():  # a signal during start-up shuts the context down and rclpy's next call raises
            raise
    finally:
        if node is not None:
            node.close()
        executor.shutdown(timeout_sec=0.5)
        rclpy.try_shutdown()
        destroy = getattr(context, "destroy", None)  # rclpy >= 7 (Jazzy); older ones leave it to the GC
        if destroy is not None:
            destroy()  # the DDS participant says goodbye now, not at interpreter exit


__all__ = ["MqtEdgeNode", "NodeOptions", "main", "spin"]
