"""Frames on their way from a camera to the model: the one-slot mailbox of the latest-frame policy.

A frame that arrives while the slot is still full replaces the one there, which is dropped
(counted), so an answer is always about the newest frame at the moment its work began and never
about a backlog. A push source (a ROS callback) puts into a `Latest` itself.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Union


@dataclass
class Frame:
    index: int  # position in its stream, from 0
    image: Any  # HxWx3 uint8 RGB (or any image the pipeline takes)
    meta: Any  # what the source attached (e.g. a ROS header stamp), else None
    arrived: float  # time.perf_counter() when it reached the mailbox
    stream: str | None = None  # the source's name when a watch has several


Question = Union[str, Callable[[Frame], Union[str, None]]]


class Latest:
    """A one-slot mailbox of frames: `put` replaces a frame not yet taken (it is dropped)."""

    def __init__(self, keep_all: bool = False) -> None:
        self.keep_all = keep_all  # block the producer instead of dropping (offline video)
        self._cond = threading.Condition()
        self._slot: Frame | None = None
        self._closed = False
        self.received = 0
        self.dropped = 0
        self._dropped_at_take = 0

    def put(self, image: Any, meta: Any = None) -> int:
        """Offer a frame; returns its index (-1 once closed)."""
        with self._cond:
            while self.keep_all and self._slot is not None and not self._closed:
                self._cond.wait()
            if self._closed:
                return -1
            if self._slot is not None:
                self.dropped += 1
            self._slot = Frame(self.received, image, meta, time.perf_counter())
            self.received += 1
            self._cond.notify_all()
            return self._slot.index

    def take(self, timeout: float | None = None) -> tuple[Frame, int] | None:
        """The newest frame and how many were dropped since the last take; None when closed and
        empty (or after `timeout` seconds)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._slot is not None or self._closed, timeout):
                return None
            if self._slot is None:
                return None
            frame, self._slot = self._slot, None
            dropped, self._dropped_at_take = self.dropped - self._dropped_at_take, self.dropped
            self._cond.notify_all()
            return frame, dropped

    def close(self) -> None:
        """No more frames: a waiting `take` returns what is left, then None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


class Handoff:
    """A small queue between two threads (the callers bound what waits in it)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: list = []

    def put(self, item: Any) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify()

    def get(self) -> Any:
        with self._cond:
            self._cond.wait_for(lambda: self._items)
            return self._items.pop(0)
