"""Camera streams: answer a question about the newest frame, again and again (`Watch`).

    from mqt_edge import Watch

    with Watch(pipe, camera_frames(), "Is the door open?", m=16) as w:
        for a in w:
            print(a.frame, a.answer.answer, a.dropped)

    # several cameras: one name per source, answers carry it (load the pipeline with parallel=2)
    with Watch(pipe, {"front": front(), "rear": rear()}, "Is anyone there?", m=16) as w:
        for a in w:
            print(a.stream, a.frame, a.answer.answer)

Latest-frame policy: a one-slot mailbox (`Latest`, mqt_edge/frames.py) sits between each source and
the model. A frame that arrives while the slot is still full replaces the one there, which is
dropped (counted), so an answer is always about the newest frame at the moment its work began.

Overlap (one source): with `overlap=True` a second thread encodes the next frame (vision + MQT,
onnxruntime with its own `vision_threads`) while the LLM decodes the current answer. Whether it wins
depends on the device: see `overlap_wins` and docs/benchmarks.md.

Several sources: one answering thread per stream (mqt_edge/stream.py); the scheduler decodes the
streams' answers in the same llama.cpp steps, which `parallel` at load sizes for.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Callable, Iterable, Iterator

from .errors import InputError, MQTEdgeError
from .frames import Frame, Latest, Question  # noqa: F401 (the public names of a watch)
from .pipeline import DEFAULT_CONFIDENCE, Pipeline, check_confidence, check_sampling
from .prompt import check_question
from .runtimes import backend_info, make_vision
from .stream import Ask, Stream, WatchAnswer, concurrent, overlapped, sequential, spawn  # noqa: F401

log = logging.getLogger("mqt_edge.watch")
Sources = Iterable | Latest


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
    """Answers about one stream of frames, or several named ones; iterate for `WatchAnswer`s.

    frames: an iterable of images or a `Latest`; or a mapping of names to those, one stream each
      (each with its own mailbox, drops and question; answers carry `stream`, the name).
    question: a string, or a function of the Frame giving the question for it (None: skip the frame,
      not encoded, counted in `skipped`); with several streams, also a mapping of names to those.
    m: a fixed number of visual tokens, or None for the planner's m on `profile` (default: auto-detect).
    rate: with m None, the answers per second each stream needs: the planner then picks the largest m
      at which all the streams together sustain it (`plan_streams`, one m for all, the answer planned
      at `max_new_tokens` tokens); without it, the single-request choice. The choice and its
      prediction are logged once and kept in `plan`.
    refine / confidence: per frame, grow to m=`refine` when the first token's probability is below
      `confidence` (as `mqt-edge run --refine`).
    overlap: encode the next frame on a second thread while the LLM decodes (None: `overlap_wins`);
      one source only: several streams overlap one another.
    vision_threads / llm_threads: each side's thread budget (llm_threads: one source only). A vision
      budget other than the pipeline's opens a second vision runner (its memory once more) that this
      watch owns; several streams share it without the pipeline's vision lock, so their frames
      encode at once (onnxruntime's run is thread-safe), each on `vision_threads` threads.
    keep_all: answer every frame in order, blocking the source (offline video) instead of dropping.
    on_error: called with (frame, error) for a user error on one frame (a bad image or question, a
      question too long for the context); the frame counts in `failed` and the stream goes on.
      Without it the error ends the iteration (one source) or that stream (several).
    With several streams, a stream whose source fails is logged once and ends (`errors`); the others go on.
    """

    def __init__(self, pipe: Pipeline, frames: Sources | Mapping[str, Sources], question: Question | Mapping,
                 *, m: int | None = None, rate: float | None = None, profile: str | None = None,
                 refine: int | None = None,
                 confidence: float = DEFAULT_CONFIDENCE, overlap: bool | None = None,
                 vision_threads: int | None = None, llm_threads: int | None = None, keep_all: bool = False,
                 on_error: Callable[[Frame, MQTEdgeError], None] | None = None, max_new_tokens: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> None:
        sources = _sources(frames)
        questions = _questions(question, sources)
        check_sampling(max_new_tokens, temperature, top_p, seed)
        gen = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        self.m, predicted = _choose(pipe, m, rate, profile, max_new_tokens, len(sources), questions)
        self.plan: dict | None = None if predicted is None else {"m": self.m} | predicted
        if refine is not None and pipe.check_tokens(refine) <= self.m:
            raise InputError(f"refine={refine} is not above m = {self.m}", "refine to a larger m, or pass None")
        ask = Ask(self.m, predicted, refine, check_confidence(confidence), gen)
        self.pipe, self.several = pipe, isinstance(frames, Mapping)
        if self.several:
            _check_several(pipe, len(sources), overlap, llm_threads)
            overlap = False
        self.overlap = overlap_wins(pipe, vision_threads, llm_threads) if overlap is None else bool(overlap)
        if self.overlap and vision_threads is None and llm_threads is None and _vision_on_cpu(pipe):
            cores = pipe.threads or os.cpu_count() or 2
            vision_threads, llm_threads = max(1, cores // 2), max(1, cores - cores // 2)
        self.vision_threads, self.llm_threads = vision_threads, llm_threads
        self._runner = _own_runner(pipe, vision_threads)
        self.streams = [Stream(name, pipe, src, questions[name], ask, keep_all, on_error, self._runner)
                        for name, src in sources.items()]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._wake: list[Callable[[], None]] = []  # releases what a stream's thread may wait on

    @property
    def mailbox(self) -> Latest:
        return self.streams[0].mailbox

    @property
    def errors(self) -> dict:
        """Streams that ended early, by name: their exception."""
        return {s.name: s.error for s in self.streams if s.error is not None}

    def __iter__(self) -> Iterator[WatchAnswer]:
        if self._threads or self._stop.is_set():
            raise InputError("this watch was already iterated", "start a new one with Watch(pipe, ...)")
        for s in self.streams:
            if s.source is not None:
                spawn(self._threads, lambda s=s: s.read(self._stop), "mqt-edge-watch-reader")
        try:
            if self.several:
                yield from concurrent(self.streams, self._stop, self._threads, self._wake)
                return
            one = self.streams[0]
            yield from (overlapped(one, self._stop, self._threads, self._wake) if self.overlap
                        else sequential(one, self._stop))
            if one.error is not None:
                raise one.error
        finally:
            self.close()

    def close(self) -> None:
        """Stop the threads this watch started and free its own vision runner (idempotent)."""
        self._stop.set()
        for s in self.streams:
            s.mailbox.close()
        for release in self._wake:
            release()  # wake an encoder waiting for the LLM, a stream waiting for its consumer
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=30)  # a reader blocked inside the source is a daemon: left to the source
        if self._runner is not None and not any(t.is_alive() and "reader" not in t.name for t in self._threads):
            self._runner.deactivate()
            self._runner = None

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def stats(self) -> dict:
        """Counts over all streams (answers_per_s: their sum); with several, `streams` by name."""
        each = {s.name: s.stats() | ({"error": repr(s.error)} if s.error else {}) for s in self.streams}
        total = {k: sum(v[k] for v in each.values()) for k in ("frames", "answered", "dropped", "skipped", "failed")}
        rates = [v["answers_per_s"] for v in each.values() if v["answers_per_s"] is not None]
        total |= {"seconds": max(v["seconds"] for v in each.values()),
                  "answers_per_s": round(sum(rates), 3) if rates else None, "m": self.m, "overlap": self.overlap,
                  "vision_threads": self.vision_threads, "llm_threads": self.llm_threads}
        return total | ({"streams": each} if self.several else {})


def _sources(frames) -> dict:
    if not isinstance(frames, Mapping):
        return {None: frames}
    if not frames:
        raise InputError("no sources", "pass at least one: {'front': frames, ...}")
    bad = [n for n in frames if not isinstance(n, str) or not n]
    if bad:
        raise InputError(f"source name {bad[0]!r}", "name each source with a non-empty string, like 'front'")
    return dict(frames)


def _questions(question, sources: dict) -> dict:
    """One question (string or function) per stream, each checked now."""
    if isinstance(question, Mapping):
        if set(question) != set(sources) or None in sources:
            raise InputError(f"questions for {sorted(map(str, question))}, sources {sorted(map(str, sources))}",
                             "give one question per source name, or one question for all")
        return {n: _question(q) for n, q in question.items()}
    return dict.fromkeys(sources, _question(question))


def _question(question) -> Question:
    if isinstance(question, str):
        check_question(question)
    elif not callable(question):
        raise InputError(f"question of type {type(question).__name__}",
                         "pass a string, or a function of the frame that returns one (or None to skip)")
    return question


def _check_several(pipe: Pipeline, n: int, overlap, llm_threads) -> None:
    if overlap or llm_threads is not None:
        raise InputError("overlap / llm_threads with several sources",
                         "leave them unset: the streams' threads overlap one another on the pipeline's threads")
    if pipe.parallel < n:
        log.warning("%d streams on a pipeline loaded with parallel=%d: they share a context sized for %d "
                    "requests and may wait for room; load it with Pipeline.load(..., parallel=%d)",
                    n, pipe.parallel, pipe.parallel, n)


def _vision_on_cpu(pipe: Pipeline) -> bool:
    return backend_info(pipe.vision.backend).on_gpu is False


def _own_runner(pipe: Pipeline, threads: int | None):
    """A vision runner with its own thread budget, or None to share the pipeline's (made with
    `pipe.threads`). It runs the backend and the graph (fp32 | int8) that the pipeline's runner runs."""
    vision = pipe.vision
    if threads is None or not backend_info(vision.backend).threads or threads == pipe.threads:
        return None
    return make_vision(pipe.bundle, vision.backend, threads, vision.precision).activate()


def _longest(pipe: Pipeline, questions: dict) -> str | None:
    """The fixed question with the most ids, for the planner's prefill; None when any is a function."""
    if not all(isinstance(q, str) for q in questions.values()):
        return None
    return max(questions.values(), key=lambda q: len(pipe.question_ids(q)))


def _choose(pipe: Pipeline, m: int | None, rate: float | None, profile: str | None, max_new_tokens: int,
            streams: int, questions: dict) -> tuple[int, dict | None]:
    """m and the planner's prediction (None when m is given); a planned m is logged here, once."""
    if rate is not None and m is not None:
        raise InputError(f"both m={m} and rate={rate}", "give m, or a rate for the planner to choose m by")
    if isinstance(rate, bool):
        raise InputError(f"rate {rate!r}", "give the answers per second each stream needs, a number above 0")
    question = None if m is not None else _longest(pipe, questions)  # tokenised only when planning
    if rate is None:
        m, predicted = choose_tokens(pipe, m, profile, max_new_tokens, question)
        what = "one request"
    else:
        choice = pipe.choose_stream_tokens(streams, rate, max_new_tokens, profile, question)
        m, predicted = choice.m, {"profile": choice.profile} | choice.predicted
        what = f"{streams} stream(s) at {rate:g} answers/s each"
    if predicted is not None:
        log.info("m = %d for %s on %s: %s", m, what, predicted["profile"], predicted.get("reason", ""))
    return m, predicted


def choose_tokens(pipe: Pipeline, m: int | None, profile: str | None, max_new_tokens: int,
                  question: str | None = None) -> tuple[int, dict | None]:
    """m for every frame: a fixed `m`, else the planner's for `profile` (auto: this device),
    through the Pipeline's one policy; the prediction is returned for the answers."""
    if m is not None:
        return pipe.check_tokens(m), None
    choice = pipe.choose_tokens(None, max_new_tokens, profile=profile, question=question)
    return choice.m, {"profile": choice.profile} | choice.predicted
