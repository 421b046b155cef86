"""One camera stream of the ROS 2 node: its newest frame, its waiting queries, and its own answering
thread (a `Watch` on a one-slot mailbox). rclpy-free: the node feeds it from its callbacks.

Every stream has its own thread, so the answers of several cameras run at the same time on the one
shared `Pipeline`, each on the latest-frame policy of its own camera.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable

from ..errors import MQTEdgeError

QUEUED_QUERIES = 8  # questions waiting for the model, per stream; older ones are dropped (and counted)
OVERLAP = {"auto": None, "on": True, "off": False}


class Stream:
    """Frames of one image topic in, `WatchAnswer`s out through `publish(stream, answer)`.

    options: a function giving the node's current options (the live ones may change while it runs);
    refuse: `Refusals`-like, called with (kind, message); log: a ROS logger (error, warning);
    m: the node's planned m, used while the option m is 0."""

    def __init__(self, name: str, pipe: Any, options: Callable[[], Any], publish: Callable[[Stream, Any], None],
                 refuse: Callable[[str, str], Any], log: Any, m: int | None = None) -> None:
        from ..watch import Latest

        self.name, self.pipe, self.options, self.publish = name, pipe, options, publish
        self.planned_m = m  # the node's m for all its streams when the option m is unset (None: per request)
        self.refuse, self.log = refuse, log
        self._Latest = Latest
        self.mailbox = Latest()
        self._lock = threading.Lock()
        self.queries: collections.deque[str] = collections.deque()
        self.latest: tuple[Any, dict] | None = None
        self.frames = 0  # valid images received
        self._last_standing = 0.0
        self._stop = threading.Event()
        self.worker = threading.Thread(target=self._work, name=f"mqt-edge-ros2-{name}", daemon=True)

    def start(self) -> Stream:
        self.worker.start()
        return self

    # -- fed by the executor's callbacks: store, never block on the model ------------------------
    def offer(self, rgb: Any, meta: dict) -> None:
        """A valid frame: kept as the newest, and handed to the model when a question is due."""
        with self._lock:
            self.latest = (rgb, meta)
            self.frames += 1
            n, pending = self.frames, bool(self.queries)
        o = self.options()
        standing = bool(o.query) and (not o.every_n or (n - 1) % o.every_n == 0)
        if standing or pending:
            self.mailbox.put(rgb, meta)

    def ask(self, text: str) -> None:
        """A checked question, answered once about the newest frame (or the first one to come)."""
        with self._lock:
            dropped = self.queries.popleft() if len(self.queries) == QUEUED_QUERIES else None
            self.queries.append(text)
            latest = self.latest
        if dropped is not None:
            self.refuse("query_dropped", f"{self.name}: {QUEUED_QUERIES} queries already wait; dropped the oldest, "
                                         f"{dropped!r}")
        if latest is None:
            self.log.warning(f"{self.name}: query {text!r} arrived before any image; it will be answered about "
                             "the first one")
        else:
            self.mailbox.put(*latest)  # wake the model with the newest frame

    def _question(self, frame: Any) -> str | None:
        """On-demand queries first; else the standing query if its pace allows."""
        with self._lock:
            if self.queries:
                return self.queries.popleft()
        o = self.options()
        if not o.query:
            return None
        now = time.monotonic()
        if o.rate and now - self._last_standing < 1.0 / o.rate:
            return None
        self._last_standing = now
        return o.query

    # -- the stream's own thread -----------------------------------------------------------------
    def _watch(self) -> Any:
        from ..watch import Watch

        o = self.options()
        return Watch(self.pipe, self.mailbox, self._question, m=o.m or self.planned_m, profile=o.profile or None,
                     refine=o.refine or None, confidence=o.confidence, overlap=OVERLAP[o.overlap],
                     vision_threads=o.vision_threads or None, llm_threads=o.llm_threads or None,
                     max_new_tokens=o.max_new_tokens, temperature=o.temperature,
                     on_error=lambda f, e: self.refuse("frame", f"{self.name}: frame {f.index} not answered: {e}"))

    def _work(self) -> None:
        """Answer until closed; a failure of one frame is counted and the loop goes on."""
        while not self._stop.is_set():
            try:
                with self._watch() as watch:
                    for a in watch:
                        self.publish(self, a)
            except MQTEdgeError as exc:  # a setting that cannot work (e.g. refine <= m): say it, keep the node
                self.log.error(f"{self.name}: cannot answer: {exc}", throttle_duration_sec=10.0)
                self._stop.wait(5.0)
            except Exception as exc:  # a bug: keep the node alive and say what happened
                self.log.error(f"{self.name}: answering failed: {type(exc).__name__}: {exc}",
                               throttle_duration_sec=10.0)
                self._stop.wait(1.0)
            if not self._stop.is_set():
                self.mailbox = self._Latest()  # the old watch closed its mailbox
                if self._stop.is_set():  # close() ran in between and closed the old one
                    self.mailbox.close()
                with self._lock:
                    latest = self.latest if self.queries else None
                if latest is not None:  # a query waits: the new watch answers it about the newest frame
                    self.mailbox.put(*latest)

    def replan(self, m: int | None) -> None:
        """The node's new planned m (its `rate` changed): the watch in progress ends once its answer in
        flight is out, and the next one answers at m."""
        if m != self.planned_m:
            self.planned_m = m
            self.mailbox.close()

    def close(self) -> None:
        """Ask the thread to stop (it ends once its answer in flight, if any, is out)."""
        self._stop.set()
        self.mailbox.close()

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the thread; True when it has ended."""
        if self.worker.is_alive():
            self.worker.join(timeout)
        return not self.worker.is_alive()


__all__ = ["OVERLAP", "QUEUED_QUERIES", "Stream"]
