"""Camera streams: answer a question about the newest frame, again and again (`Watch`).

    from mqt_edge import Watch

    with Watch(pipe, camera_frames(), "Is the door open?", m=16) as w:
        for a in w:
            print(a.frame, a.answer.answer, a.dropped)

Latest-frame policy: a one-slot mailbox (`Latest`) sits between the source and the model. A frame
that arrives while the slot is still full replaces the one there, which is dropped (counted), so
an answer is always about the newest frame at the moment its work began and never about a backlog.
Any iterator feeds it from a reader thread; a push source (a ROS callback) puts into a `Latest`
itself and passes that.

Overlap: with `overlap=True` a second thread encodes the next frame (vision + MQT, onnxruntime with
its own `vision_threads`) while the LLM decodes the current answer (llama.cpp with `llm_threads`).
At most one encoded frame waits for the LLM, so the overlap never builds a queue. Whether it wins
depends on the device: see `overlap_wins` and docs/benchmarks.md.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Union

from .errors import InputError, MQTEdgeError
from .pipeline import DEFAULT_CONFIDENCE, Answer, EncodedImage, Pipeline, Session, check_confidence, check_sampling
from .prompt import check_question
from .runtimes import backend_info, make_vision


@dataclass
class Frame:
    index: int  # position in the stream, from 0
    image: Any  # HxWx3 uint8 RGB (or any image the pipeline takes)
    meta: Any  # what the source attached (e.g. a ROS header stamp), else None
    arrived: float  # time.perf_counter() when it reached the mailbox


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


@dataclass
class WatchAnswer:
    frame: int  # index of the frame answered
    question: str
    answer: Answer
    dropped: int  # frames dropped between the previous frame taken and this one
    timings_ms: dict  # wait (arrival -> taken), encode, handoff (encoded -> LLM), llm, latency (arrival -> answer)
    meta: Any = None
    started: float = 0.0  # time.perf_counter() when its frame was taken from the mailbox

    def to_dict(self) -> dict:
        return {"frame": self.frame, "question": self.question, "dropped": self.dropped,
                "timings_ms": self.timings_ms, "answer": self.answer.to_dict()}


@dataclass
class _Job:
    frame: Frame
    dropped: int
    question: str
    encoded: EncodedImage
    taken: float
    encoded_at: float = field(default_factory=time.perf_counter)


def overlap_wins(pipe: Pipeline, vision_threads: int | None, llm_threads: int | None) -> bool:
    """The default of `overlap`: a second thread pays only where vision and the LLM do not fight for
    the same cores. Measured (docs/benchmarks.md, "Camera streams"): on 2 shared CPU cores the
    default model's overlapped loop answered no faster than the sequential one (the bench preset's
    few answers leaned the other way, too few to decide), so a CPU-only pipeline overlaps only with
    8 or more cores (not measured); a GPU-side vision backend or LLM always overlaps (not measured)."""
    if not _vision_on_cpu(pipe) or pipe.llm.gpu_layers:
        return True
    cores = os.cpu_count() or 1
    return cores >= 8 and (vision_threads or 1) + (llm_threads or 1) <= cores


class Watch:
    """Answers about a stream of frames; iterate for `WatchAnswer`s, `stats` for the counts.

    question: a string, or a function of the Frame giving the question for it (None: skip the frame,
      not encoded, counted in `skipped`); it is read when the frame is taken.
    m: a fixed number of visual tokens, or None for the planner's m on `profile` (default: auto-detect).
    refine / confidence: per frame, grow to m=`refine` when the first token's probability is below
      `confidence` (as `mqt-edge run --refine`).
    overlap: encode the next frame on a second thread while the LLM decodes (None: `overlap_wins`).
    vision_threads / llm_threads: each side's thread budget (default: the pipeline's, or split the
      cores in two when overlapping). A vision budget other than the pipeline's opens a second vision
      runner (its memory once more) that this watch owns and closes.
    keep_all: answer every frame in order, blocking the source (offline video) instead of dropping.
    on_error: called with (frame, error) for a user error on one frame (a bad image or question, a
      question too long for the context); the frame counts in `failed` and the watch goes on.
      Without it the error ends the iteration.
    """

    def __init__(self, pipe: Pipeline, frames: Iterable | Latest, question: Question, *, m: int | None = None,
                 profile: str | None = None, refine: int | None = None, confidence: float = DEFAULT_CONFIDENCE,
                 overlap: bool | None = None, vision_threads: int | None = None, llm_threads: int | None = None,
                 keep_all: bool = False, on_error: Callable[[Frame, MQTEdgeError], None] | None = None,
                 max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0) -> None:
        if isinstance(question, str):
            check_question(question)
        elif not callable(question):
            raise InputError(f"question of type {type(question).__name__}",
                             "pass a string, or a function of the frame that returns one (or None to skip)")
        check_sampling(max_new_tokens, temperature, top_p, seed)
        confidence = check_confidence(confidence)
        self.pipe, self.question = pipe, question
        self.gen = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        self.m, self.predicted = choose_tokens(pipe, m, profile, max_new_tokens)
        if refine is not None and pipe.check_tokens(refine) <= self.m:
            raise InputError(f"refine={refine} is not above m = {self.m}", "refine to a larger m, or pass None")
        self.refine, self.confidence = refine, confidence
        self.overlap = overlap_wins(pipe, vision_threads, llm_threads) if overlap is None else bool(overlap)
        if self.overlap and vision_threads is None and llm_threads is None and _vision_on_cpu(pipe):
            cores = pipe.threads or os.cpu_count() or 2
            vision_threads, llm_threads = max(1, cores // 2), max(1, cores - cores // 2)
        self.vision_threads, self.llm_threads = vision_threads, llm_threads
        self._runner = _own_runner(pipe, vision_threads)
        if isinstance(frames, Latest):
            self.mailbox, self._source = frames, None
        else:
            self.mailbox, self._source = Latest(keep_all), iter(frames)
        self.on_error = on_error
        self.skipped = self.answered = self.failed = 0
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started_at: float | None = None
        self._last_at: float | None = None

    # -- the two stages ---------------------------------------------------------------------------
    def _read(self) -> None:
        try:
            for image in self._source:
                if self._stop.is_set() or self.mailbox.put(image) < 0:
                    break
        except BaseException as exc:  # a failing source ends the watch with its error
            self._error = self._error or exc
        finally:
            self.mailbox.close()

    def _next_job(self) -> _Job | None:
        """Take the newest frame, ask the question function, encode: None at the end."""
        while not self._stop.is_set():
            got = self.mailbox.take(timeout=0.1)
            if got is None:
                if self.mailbox.closed:
                    return None
                continue
            frame, dropped = got
            taken = time.perf_counter()
            self._started_at = self._started_at or taken
            q = self.question if isinstance(self.question, str) else self.question(frame)
            if q is None:
                self.skipped += 1
                continue
            try:
                check_question(q)
                enc = self.pipe.encode(frame.image, self.m, runner=self._runner)
            except MQTEdgeError as exc:
                self._failed(frame, exc)
                continue
            return _Job(frame, dropped, q, enc, taken)
        return None

    def _failed(self, frame: Frame, exc: MQTEdgeError) -> None:
        if self.on_error is None:
            raise exc
        self.failed += 1
        self.on_error(frame, exc)

    def _try_answer(self, job: _Job) -> WatchAnswer | None:
        try:
            return self._answer(job)
        except MQTEdgeError as exc:
            self._failed(job.frame, exc)
            return None

    def _answer(self, job: _Job) -> WatchAnswer:
        start = time.perf_counter()
        reserve = self.pipe.reserve_for(job.question, self.gen["max_new_tokens"])
        with Session(self.pipe, job.encoded, None, reserve, refinable=self.refine is not None) as s:
            answer = s.answer(job.question, refine_to=self.refine, confidence=self.confidence, **self.gen)
        answer.predicted = self.predicted
        done = self._last_at = time.perf_counter()
        self.answered += 1
        ms = lambda a, b: round(1000 * (b - a), 2)  # noqa: E731
        timings = {"wait": ms(job.frame.arrived, job.taken), "encode": round(1000 * sum(job.encoded.seconds), 2),
                   "handoff": ms(job.encoded_at, start), "llm": ms(start, done), "latency": ms(job.frame.arrived, done)}
        return WatchAnswer(job.frame.index, job.question, answer, job.dropped, timings, job.frame.meta, job.taken)

    # -- iteration --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[WatchAnswer]:
        if self._threads or self._stop.is_set():
            raise InputError("this watch was already iterated", "start a new one with Watch(pipe, ...)")
        if self._source is not None:
            self._spawn(self._read, "mqt-edge-watch-reader")
        try:
            yield from (self._overlapped() if self.overlap else self._sequential())
            if self._error is not None:
                raise self._error
        finally:
            self.close()

    def _sequential(self) -> Iterator[WatchAnswer]:
        while (job := self._next_job()) is not None:
            if (a := self._try_answer(job)) is not None:
                yield a

    def _overlapped(self) -> Iterator[WatchAnswer]:
        # `slot` lets the encoder start a frame only once the LLM has taken the previous one, so at
        # most one encoded frame waits: the overlap hides encoding, it never queues frames.
        slot, ready = threading.Semaphore(1), _Handoff()

        def encode_loop() -> None:
            try:
                while slot.acquire() and not self._stop.is_set():
                    job = self._next_job()
                    if job is None:
                        break
                    ready.put(job)
            except BaseException as exc:
                self._error = self._error or exc
            finally:
                ready.put(None)

        self._spawn(encode_loop, "mqt-edge-watch-encoder")
        self._release_slot = slot.release
        while (job := ready.get()) is not None:
            slot.release()
            if (a := self._try_answer(job)) is not None:
                yield a

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    # -- ending -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the threads this watch started and free its own vision runner (idempotent)."""
        self._stop.set()
        self.mailbox.close()
        release = getattr(self, "_release_slot", None)
        if release:
            release()  # wake an encoder waiting for the LLM
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=30)  # a reader blocked inside the source is a daemon: left to the source
        if self._runner is not None and not any(t.is_alive() and "encoder" in t.name for t in self._threads):
            self._runner.deactivate()
            self._runner = None

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def stats(self) -> dict:
        seconds = (self._last_at - self._started_at) if self._started_at and self._last_at else 0.0
        return {"frames": self.mailbox.received, "answered": self.answered, "dropped": self.mailbox.dropped,
                "skipped": self.skipped, "failed": self.failed, "seconds": round(seconds, 3),
                "answers_per_s": round((self.answered - 1) / seconds, 3) if self.answered > 1 and seconds else None,
                "m": self.m, "overlap": self.overlap, "vision_threads": self.vision_threads,
                "llm_threads": self.llm_threads}


class _Handoff:
    """One encoded job from the encoder thread to the LLM (the semaphore keeps it to one)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: list = []

    def put(self, item) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify()

    def get(self):
        with self._cond:
            self._cond.wait_for(lambda: self._items)
            return self._items.pop(0)


def _vision_on_cpu(pipe: Pipeline) -> bool:
    return backend_info(pipe.vision.backend).on_gpu is False


def _own_runner(pipe: Pipeline, threads: int | None):
    """A vision runner with its own thread budget, or None to share the pipeline's (made with
    `pipe.threads`). It runs the backend and the graph (fp32 | int8) that the pipeline's runner runs."""
    vision = pipe.vision
    if threads is None or not backend_info(vision.backend).threads or threads == pipe.threads:
        return None
    return make_vision(pipe.bundle, vision.backend, threads, vision.precision).activate()


def choose_tokens(pipe: Pipeline, m: int | None, profile: str | None, max_new_tokens: int) -> tuple[int, dict | None]:
    """m for every frame: a fixed `m`, else the planner's for `profile` (auto: this device),
    through the Pipeline's one policy; the prediction is returned for the answers."""
    if m is not None:
        return pipe.check_tokens(m), None
    choice = pipe.choose_tokens(None, max_new_tokens, profile=profile)
    return choice.m, {"profile": choice.profile} | choice.predicted
