"""Slots, the queue and the Pipeline's lifetime.

`--parallel N` requests are answered at once; their tokens share each decode step of the
pipeline's scheduler (one llama.cpp context, mqt_edge/scheduler.py), and each slot thread only waits
on its request's tokens. Requests beyond the N wait in a queue of at most `--queue`; one more is
answered 503 with Retry-After at once.
A request's deadline (`--timeout`) covers its wait and its compute: waiting past it gives a 503,
computing past it stops the generation at the next token (504, or an error event in a stream).
A client that goes away sets the same cancel flag, so its slot is free after at most one token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ..errors import MQTEdgeError
from . import policy
from .config import ServeConfig
from .errors import APIError
from .metrics import Metrics

log = logging.getLogger("mqt_edge.serve")
BUSY_RETRY_S = 2.0
LOADING_RETRY_S = 5.0


class Cancel:
    """Why a request stops early; the slot thread polls `flag` between tokens."""

    def __init__(self) -> None:
        self.flag = threading.Event()
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        if not self.flag.is_set():
            self.reason = reason
            self.flag.set()


class Engine:
    def __init__(self, cfg: ServeConfig, metrics: Metrics) -> None:
        self.cfg, self.metrics = cfg, metrics
        self.pipe = None
        self.start: policy.Startup | None = None
        self.cache = None  # the pipeline's ConversationCache, once loaded
        self.load_error: str | None = None
        self.ready = threading.Event()
        self._executor = ThreadPoolExecutor(cfg.parallel, thread_name_prefix="mqt-slot")
        self._slots: asyncio.Semaphore | None = None
        self._waiting = 0
        self._loader: threading.Thread | None = None
        self._counted = {"evictions": 0, "forks": 0}  # the cache's counts as the metrics have them

    # -- lifetime --------------------------------------------------------------------------------
    def start_loading(self) -> None:
        if self._loader is None:
            self._loader = threading.Thread(target=self.load, name="mqt-load", daemon=True)
            self._loader.start()

    def load(self) -> None:
        from ..pipeline import Pipeline

        cfg, t0 = self.cfg, time.perf_counter()
        try:
            # One context computes every slot's tokens in one batch: it takes every core given.
            self.pipe = Pipeline.load(cfg.bundle, profile=cfg.profile, mode=cfg.mode,
                                      vision_backend=cfg.vision_backend, n_gpu_layers=cfg.n_gpu_layers,
                                      threads=cfg.threads, verify=cfg.verify, parallel=cfg.parallel)
            self.start = policy.plan_startup(self.pipe, cfg)
            self.cache = self.pipe.conversations
        except MQTEdgeError as exc:
            self.load_error = str(exc)
            log.error("cannot start: %s", exc)
            return
        s = self.start
        log.info("ready in %.1f s: m = %d (%s, %s); %d slots in one batch; cache %.0f MB (%d conversations "
                 "of %.1f MB at their longest)", time.perf_counter() - t0, s.m, s.profile, s.reason, cfg.parallel,
                 s.budget_bytes / 2**20, s.capacity, s.conversation_bytes / 2**20)
        self.ready.set()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None

    def check_ready(self) -> None:
        if self.load_error:
            raise APIError(503, f"the model failed to load: {self.load_error}", "model_load_failed")
        if not self.ready.is_set():
            raise APIError(503, "the model is loading", "loading", retry_after=LOADING_RETRY_S)

    # -- one request -----------------------------------------------------------------------------
    async def submit(self, ask: policy.Ask, emit: Callable[[str], None], cancel: Cancel,
                     deadline: float) -> asyncio.Future:
        """Wait for a slot (bounded), then start the request on it; returns the future of its Outcome."""
        self.check_ready()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.cfg.parallel)
        if self._slots.locked() and self._waiting >= self.cfg.queue:
            raise APIError(503, f"the server is busy ({self.cfg.parallel} slots and {self.cfg.queue} queued)",
                           "server_busy", retry_after=BUSY_RETRY_S)
        self._waiting += 1
        self.metrics.queue_depth.set(self._waiting)
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise APIError(503, f"no slot became free within the {self.cfg.timeout_s:g} s timeout", "server_busy",
                           retry_after=BUSY_RETRY_S) from None
        finally:
            self._waiting -= 1
            self.metrics.queue_depth.set(self._waiting)
        loop = asyncio.get_running_loop()
        self.metrics.busy_slots.inc()
        fut = loop.run_in_executor(self._executor, self._work, ask, emit, cancel)

        def done(_f) -> None:
            self._slots.release()
            self.metrics.busy_slots.dec()
            self.metrics.cached_sessions.set(self.cache.idle)
            for name in self._counted:
                self._count(name)

        fut.add_done_callback(done)
        timer = loop.call_later(max(0.0, deadline - time.monotonic()), cancel.set, "timeout")
        fut.add_done_callback(lambda _f: timer.cancel())
        return fut

    def _count(self, name: str) -> None:
        """The cache's `name` count (evictions, forks) since the last call onto the counter of that name."""
        now = getattr(self.cache, name)
        if now > self._counted[name]:
            getattr(self.metrics, name).inc(now - self._counted[name])
        self._counted[name] = now

    def _work(self, ask: policy.Ask, emit: Callable[[str], None], cancel: Cancel) -> policy.Outcome:
        if cancel.flag.is_set():  # gave up while queued
            return policy.Outcome(finish="cancelled")
        return policy.answer(self.pipe, self.cache, self.start, ask, emit, cancel.flag)
