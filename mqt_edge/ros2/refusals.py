"""Refused input, counted by kind and logged without flooding (rclpy-free, so it is tested alone).

A camera with the wrong encoding sends 30 bad frames a second, so every refusal cannot be a log
line; but one throttle for all kinds hides the second kind of problem behind the first. So each
kind (`image_encoding`, `query`, ...) gets its own line at most once per `interval`, and the next
line of that kind says how many were held back in between.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

REFUSAL_LOG_INTERVAL_S = 2.0


class Refusals:
    """`refusals(kind, message)` counts and maybe logs one refusal; `counts` is {kind: total}.

    log: called with the line (a ROS logger's `warning`); on_change: called with a copy of the counts
    after every refusal (the node publishes them). Safe to call from any thread."""

    def __init__(self, log: Callable[[str], None], interval: float = REFUSAL_LOG_INTERVAL_S,
                 on_change: Callable[[dict[str, int]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log, self.interval, self.on_change, self.clock = log, interval, on_change, clock
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._held: dict[str, int] = {}  # refusals not logged since the kind's last line
        self._logged_at: dict[str, float] = {}

    def __call__(self, kind: str, message: str) -> bool:
        """Count one refusal of `kind`; returns whether it was logged."""
        now = self.clock()
        with self._lock:
            self._counts[kind] = self._counts.get(kind, 0) + 1
            counts = dict(self._counts)
            last = self._logged_at.get(kind)
            logged = last is None or now - last >= self.interval
            if logged:
                held, self._held[kind], self._logged_at[kind] = self._held.get(kind, 0), 0, now
            else:
                self._held[kind] = self._held.get(kind, 0) + 1
        if logged:
            since = f"; {held} more refused as {kind} since its last line" if held else ""
            self.log(f"{message.replace(chr(10), ' ')} [{kind}: {counts[kind]} refused in all{since}]")
        if self.on_change is not None:
            self.on_change(counts)
        return logged

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def held_back(self) -> dict[str, int]:
        """Refusals of each kind not yet reported in a line (for a summary at shutdown)."""
        with self._lock:
            return {k: n for k, n in self._held.items() if n}


__all__ = ["REFUSAL_LOG_INTERVAL_S", "Refusals"]
