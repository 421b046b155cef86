"""How vision and the LLM share the CPU's cores when both run on it.

Measured on a 2-core AMD EPYC (`python benchmarks/cpu_share.py --bundle B`, docs/benchmarks.md):
onnxruntime's int8 vision with 2 threads and llama.cpp's decode with 2 threads at the same time ran
vision 1.7x and decode 1.3x slower than each alone, because 4 threads on 2 cores stall at every
barrier of both thread pools. Alone, each is fast: a lone sequence decodes as fast on 1 thread as
on 2 (it is bound by memory), while vision is compute-bound (2 threads: 1.7x faster than 1).

So threads are handed out, never oversubscribed:
- vision asks for its runner's threads and waits for the LLM's step in flight to end;
- the LLM's next step runs on what vision leaves (all of them when no vision runs), and waits
  while vision holds every thread;
- vision goes first when both wait: an image encoded sooner is a first token sooner, and the
  decoding streams lose one step's worth of time per frame, not more.

A pipeline whose vision or LLM runs on a GPU shares nothing (`CoreShare(None)`): both sides run at
once, as before.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class CoreShare:
    """The CPU's threads between vision runs and the LLM's decode steps (thread-safe)."""

    def __init__(self, total: int | None) -> None:
        # total: the CPU threads both sides use; None: they do not compete (a GPU on either side).
        self.total = total
        self._cv = threading.Condition()
        self._vision = 0  # threads held by vision runs now
        self._vision_waiting = 0
        self._llm_busy = False

    @property
    def shared(self) -> bool:
        return self.total is not None

    @contextmanager
    def vision(self, threads: int | None) -> Iterator[None]:
        """Hold `threads` of the cores (None or more than there are: all) for one vision run."""
        if self.total is None:
            yield
            return
        want = min(self.total, threads or self.total)
        with self._cv:
            self._vision_waiting += 1
            try:
                self._cv.wait_for(lambda: not self._llm_busy and self._vision + want <= self.total)
            finally:
                self._vision_waiting -= 1
            self._vision += want
        try:
            yield
        finally:
            with self._cv:
                self._vision -= want
                self._cv.notify_all()

    @contextmanager
    def llm(self) -> Iterator[int | None]:
        """One decode step; yields the threads it may use (None: no sharing, keep the context's)."""
        if self.total is None:
            yield None
            return
        with self._cv:
            self._cv.wait_for(lambda: not self._vision_waiting and self._vision < self.total)
            self._llm_busy = True
            free = self.total - self._vision
        try:
            yield free
        finally:
            with self._cv:
                self._llm_busy = False
                self._cv.notify_all()
