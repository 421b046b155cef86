"""The stages of one watched stream (`Stream`) and the loops that drive one or several of them.

One stream: a reader thread fills the mailbox; the caller's thread (or an encoder thread when
overlapping) takes the newest frame, asks its question, encodes and answers.

Several streams: one answering thread per stream, each taking its own newest frame, encoding it
and answering on its own Session. The pipeline's scheduler puts every decoding stream's next
token into the same llama.cpp step, so the streams share each decode step; vision runs one frame
at a time under the pipeline's vision lock, or at once on a runner of the watch's own (batching
frames gained about 1.1x on the CPU, not done yet: docs/benchmarks.md, "Several cameras"). A stream
that fails is logged once and ends; the others go on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from .errors import MQTEdgeError
from .frames import Frame, Handoff, Latest, Question
from .pipeline import Answer, EncodedImage, Pipeline, Session
from .prompt import check_question

log = logging.getLogger("mqt_edge.watch")


@dataclass(frozen=True)
class Ask:
    """What every frame of a watch is asked with."""

    m: int
    predicted: dict | None  # the planner's prediction when it chose m
    refine: int | None
    confidence: float
    gen: dict  # max_new_tokens, temperature, top_p, seed


@dataclass
class WatchAnswer:
    frame: int  # index of the frame answered, in its stream
    question: str
    answer: Answer
    dropped: int  # frames dropped between the previous frame taken and this one
    timings_ms: dict  # wait (arrival -> taken), encode, handoff (encoded -> LLM), llm, latency (arrival -> answer)
    meta: Any = None
    started: float = 0.0  # time.perf_counter() when its frame was taken from the mailbox
    stream: str | None = None  # the source's name when the watch has several

    def to_dict(self) -> dict:
        named = {"stream": self.stream} if self.stream is not None else {}
        return named | {"frame": self.frame, "question": self.question, "dropped": self.dropped,
                        "timings_ms": self.timings_ms, "answer": self.answer.to_dict()}


@dataclass
class Job:
    frame: Frame
    dropped: int
    question: str
    encoded: EncodedImage
    taken: float
    encoded_at: float = field(default_factory=time.perf_counter)


class Stream:
    """One source: its mailbox, its question, its counts, and the steps from a frame to an answer.

    on_error: called with (frame, error) for a user error on one frame; without it the error is raised."""

    def __init__(self, name: str | None, pipe: Pipeline, frames: Iterable | Latest, question: Question, ask: Ask,
                 keep_all: bool, on_error: Callable[[Frame, MQTEdgeError], None] | None, runner: object = None) -> None:
        self.name, self.pipe, self.question, self.ask = name, pipe, question, ask
        self.on_error, self.runner = on_error, runner
        if isinstance(frames, Latest):
            self.mailbox, self.source = frames, None
        else:
            self.mailbox, self.source = Latest(keep_all), iter(frames)
        self.skipped = self.answered = self.failed = 0
        self.error: BaseException | None = None  # what ended the stream early
        self.started_at: float | None = None  # the first frame taken
        self.first_at: float | None = None  # the first answer done
        self.last_at: float | None = None

    def read(self, stop: threading.Event) -> None:
        """The reader thread: the source's frames into the mailbox."""
        try:
            for image in self.source:
                if stop.is_set() or self.mailbox.put(image) < 0:
                    break
        except BaseException as exc:  # a failing source ends this stream with its error
            self.error = self.error or exc
        finally:
            self.mailbox.close()

    def next_job(self, stop: threading.Event) -> Job | None:
        """Take the newest frame, ask the question function, encode: None at the end."""
        while not stop.is_set():
            got = self.mailbox.take(timeout=0.1)
            if got is None:
                if self.mailbox.closed:
                    return None
                continue
            frame, dropped = got
            frame.stream = self.name
            taken = time.perf_counter()
            self.started_at = self.started_at or taken
            q = self.question if isinstance(self.question, str) else self.question(frame)
            if q is None:
                self.skipped += 1
                continue
            try:
                check_question(q)
                enc = self.pipe.encode(frame.image, self.ask.m, runner=self.runner)
            except MQTEdgeError as exc:
                self.failed_frame(frame, exc)
                continue
            return Job(frame, dropped, q, enc, taken)
        return None

    def failed_frame(self, frame: Frame, exc: MQTEdgeError) -> None:
        if self.on_error is None:
            raise exc
        self.failed += 1
        self.on_error(frame, exc)

    def try_answer(self, job: Job) -> WatchAnswer | None:
        try:
            return self.answer(job)
        except MQTEdgeError as exc:
            self.failed_frame(job.frame, exc)
            return None

    def answer(self, job: Job) -> WatchAnswer:
        ask, start = self.ask, time.perf_counter()
        reserve = self.pipe.reserve_for(job.question, ask.gen["max_new_tokens"])
        with Session(self.pipe, job.encoded, None, reserve, refinable=ask.refine is not None) as s:
            answer = s.answer(job.question, refine_to=ask.refine, confidence=ask.confidence, **ask.gen)
        answer.predicted = ask.predicted
        done = self.last_at = time.perf_counter()
        self.first_at = self.first_at or done
        self.answered += 1
        ms = lambda a, b: round(1000 * (b - a), 2)  # noqa: E731
        timings = {"wait": ms(job.frame.arrived, job.taken), "encode": round(1000 * sum(job.encoded.seconds), 2),
                   "handoff": ms(job.encoded_at, start), "llm": ms(start, done), "latency": ms(job.frame.arrived, done)}
        return WatchAnswer(job.frame.index, job.question, answer, job.dropped, timings, job.frame.meta, job.taken,
                           self.name)

    def stats(self) -> dict:
        """answers_per_s: the steady rate, answers after the first over the time between the first and
        the last answer (from the first frame instead, the first answer's latency would count as one
        more cycle); None before a second answer. seconds: first frame taken to last answer."""
        seconds = (self.last_at - self.started_at) if self.started_at and self.last_at else 0.0
        span = (self.last_at - self.first_at) if self.first_at and self.last_at else 0.0
        rate = round((self.answered - 1) / span, 3) if self.answered > 1 and span else None
        return {"frames": self.mailbox.received, "answered": self.answered, "dropped": self.mailbox.dropped,
                "skipped": self.skipped, "failed": self.failed, "seconds": round(seconds, 3), "answers_per_s": rate}


def spawn(threads: list[threading.Thread], target: Callable[[], None], name: str) -> None:
    t = threading.Thread(target=target, name=name, daemon=True)
    threads.append(t)
    t.start()


def sequential(stream: Stream, stop: threading.Event) -> Iterator[WatchAnswer]:
    while (job := stream.next_job(stop)) is not None:
        if (a := stream.try_answer(job)) is not None:
            yield a


def overlapped(stream: Stream, stop: threading.Event, threads: list, wake: list) -> Iterator[WatchAnswer]:
    """Encode the next frame on a second thread while this one answers. `slot` lets the encoder
    start a frame only once the LLM has taken the previous one, so at most one encoded frame waits:
    the overlap hides encoding, it never queues frames. `wake` gets the slot's release for close()."""
    slot, ready = threading.Semaphore(1), Handoff()

    def encode_loop() -> None:
        try:
            while slot.acquire() and not stop.is_set():
                job = stream.next_job(stop)
                if job is None:
                    break
                ready.put(job)
        except BaseException as exc:
            stream.error = stream.error or exc
        finally:
            ready.put(None)

    spawn(threads, encode_loop, "mqt-edge-watch-encoder")
    wake.append(slot.release)
    while (job := ready.get()) is not None:
        slot.release()
        if (a := stream.try_answer(job)) is not None:
            yield a


def concurrent(streams: list[Stream], stop: threading.Event, threads: list, wake: list) -> Iterator[WatchAnswer]:
    """One answering thread per stream; answers come out as they are ready. A stream hands over one
    answer and takes its next frame only once the consumer has taken that one, so a slow consumer
    makes each stream drop frames instead of queueing answers."""
    out = Handoff()

    def answer_loop(stream: Stream, taken: threading.Semaphore) -> None:
        try:
            for a in sequential(stream, stop):
                out.put((a, taken))
                taken.acquire()
        except BaseException as exc:  # this stream ends; the others go on
            stream.error = stream.error or exc
        finally:
            stream.mailbox.close()
            if stream.error is not None and not stop.is_set():
                log.warning("stream %r stopped: %s: %s", stream.name, type(stream.error).__name__, stream.error)
            out.put(None)

    for s in streams:
        taken = threading.Semaphore(0)
        wake.append(taken.release)
        spawn(threads, lambda s=s, t=taken: answer_loop(s, t), f"mqt-edge-watch-{s.name}")
    running = len(streams)
    while running:
        item = out.get()
        if item is None:
            running -= 1
            continue
        answer, taken = item
        taken.release()
        yield answer
