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
- a prefill goes first, then vision, then decoding: a request whose image is encoded gets its
  first token before the next image starts (with four requests at once, the first answers after one
  image's time, not four); the decoding streams pause while an image is encoded, which costs
  the batch less than the stalls of running both at once;
- after an image's prefill the same request's question follows within milliseconds (a second job
  from its thread): vision waits a moment for it (`hold`), or the question would queue behind a
  whole image.

A pipeline whose vision or LLM runs on a GPU shares nothing (`CoreShare(None)`): both sides run at
once, as before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


# How long vision waits, after an image is encoded or prefilled, for the same request's next LLM
# job: its thread submits it within milliseconds; the wait ends as soon as that job's step starts.
FOLLOWUP_S = 0.05
# A decode step that started inside that wait can outlast it (60-90 ms with 2-4 streams here), and
# the request's thread needs the loop between steps to open its sequence: so the wait starts again
# when such a step ends, up to this long after the image in all.
HOLD_MAX_S = 0.5


class CoreShare:
    """The CPU's threads between vision runs and the LLM's steps (thread-safe)."""

    def __init__(self, total: int | None) -> None:
        # total: the CPU threads both sides use; None: they do not compete (a GPU on either side).
        self.total = total
        self._cv = threading.Condition()
        self._vision = 0  # threads held by vision runs now
        self._vision_waiting = 0
        self._llm_busy = False
        self._hold_until = 0.0  # vision waits until then (monotonic), or until an urgent step starts
        self._hold_from = 0.0  # when that wait began
        # Whether the LLM has prefill work (a first token waits on it): set by the scheduler.
        self.urgent: Callable[[], bool] = lambda: False

    @property
    def shared(self) -> bool:
        return self.total is not None

    def _held(self) -> float:
        return self._hold_until - time.monotonic()

    def _vision_may_start(self, want: int) -> bool:
        return (not self._llm_busy and self._vision + want <= self.total and self._held() <= 0
                and not self.urgent())

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
                while not self._vision_may_start(want):
                    self._cv.wait(self._held() if self._held() > 0 else None)
            finally:
                self._vision_waiting -= 1
            self._vision += want
        try:
            yield
        finally:
            with self._cv:  # a re-entrant lock: hold() takes it again
                self._vision -= want
                self.hold(FOLLOWUP_S)  # this image's prefill comes next: it goes before the next image

    def hold(self, seconds: float) -> None:
        """Keep vision waiting for up to `seconds`, or until the next urgent step starts."""
        if self.total is not None:
            with self._cv:
                now = time.monotonic()
                if self._held() <= 0:
                    self._hold_from = now
                self._hold_until = max(self._hold_until, now + seconds)
                self._cv.notify_all()

    def wake(self) -> None:
        """New LLM work arrived: a step waiting for vision looks again whether it is urgent."""
        if self.total is not None:
            with self._cv:
                self._cv.notify_all()

    @contextmanager
    def llm(self) -> Iterator[int | None]:
        """One step; yields the threads it may use (None: no sharing, keep the context's).
        A step with prefill work (`urgent()`, asked again whenever `wake()` is called) goes before
        vision that waits; other steps go after it."""
        if self.total is None:
            yield None
            return
        with self._cv:
            while True:
                now_urgent = self.urgent()
                if self._vision < self.total and (now_urgent or not self._vision_waiting or self._held() > 0):
                    break
                self._cv.wait(self._held() if self._held() > 0 else None)
            if now_urgent:
                self._hold_until = 0.0
            held = self._held() > 0  # this step runs inside vision's wait for a follow-up
            self._llm_busy = True
            free = self.total - self._vision
        try:
            yield free
        finally:
            with self._cv:
                self._llm_busy = False
                if held and self._hold_until > 0:  # no urgent step has ended the wait: it starts again
                    self._hold_until = max(self._hold_until,
                                           min(time.monotonic() + FOLLOWUP_S, self._hold_from + HOLD_MAX_S))
                self._cv.notify_all()
