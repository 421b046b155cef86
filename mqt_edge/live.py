"""The front end of `mqt-edge watch`: a frame source feeding `Watch`, answers shown as they come.

A reader thread takes frames from the source (mqt_edge.sources) and offers every `every`-th one to
Watch's one-slot mailbox (`Latest`), so the model always answers about the newest frame and the
frames it had no time for are counted as dropped. `rate` paces the answers (at most that many a
second, each about the newest frame when it starts). Every frame read is accounted for:

    read = answered + dropped + skipped (--every, --rate) + failed (+ left: in flight at Ctrl-C)

Output: one JSON line per answer and a last {"summary": ...} line (`as_json`), else a live rich
panel on a terminal, else one plain line per answer. The summary also goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from .errors import InputError
from .pipeline import DEFAULT_CONFIDENCE
from .sources import Source
from .watch import Frame, Latest, Watch, WatchAnswer


@dataclass(frozen=True)
class WatchSettings:
    """What the command line chose; checked before the bundle loads."""

    question: str
    m: int | None = None
    refine: int | None = None
    confidence: float = DEFAULT_CONFIDENCE
    every: int = 1  # offer every n-th frame read
    rate: float | None = None  # at most this many answers a second
    speed: float = 1.0  # a video file's playback speed (0: as fast as it decodes)
    no_drop: bool = False  # answer every offered frame, holding the reader (offline video, folders)
    max_new_tokens: int = 32
    profile: str | None = None

    def check(self) -> WatchSettings:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise InputError(f"--every {self.every}", "use an integer >= 1 (1: every frame)")
        if self.rate is not None and not self.rate > 0:
            raise InputError(f"--rate {self.rate}", "use a positive number of answers per second, or leave it out")
        if not self.speed >= 0:
            raise InputError(f"--speed {self.speed}", "use 1 for the video's own frame rate, 0 for as fast as it decodes")
        return self


@dataclass
class Tally:
    """Counts for the summary; `latencies_ms` from frame arrival to its answer."""

    read: int = 0
    answered: int = 0
    dropped: int = 0  # before the answered frames (the summary counts all)
    latencies_ms: list = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


class _Reader:
    """The source's thread: reads frames, offers every n-th to the mailbox, closes it at the end."""

    def __init__(self, source: Source, mailbox: Latest, every: int, speed: float) -> None:
        self.source, self.mailbox, self.every, self.speed = source, mailbox, every, speed
        self.error: BaseException | None = None
        self.skipped = 0  # read but not offered (--every)
        self.thread = threading.Thread(target=self._run, name="mqt-edge-watch-source", daemon=True)

    def _run(self) -> None:
        try:
            for frame in self.source.frames(self.speed):
                if (self.source.read - 1) % self.every:
                    self.skipped += 1
                    continue
                meta = {"index": self.source.read - 1, "t": frame.t, "name": frame.name}
                if self.mailbox.put(frame.image, meta) < 0:
                    break  # the watch ended (Ctrl-C): stop reading
        except BaseException as exc:  # a source that fails ends the watch with its error
            self.error = exc
        finally:
            self.mailbox.close()

    def stop(self) -> None:
        """Close the mailbox and wait briefly: a reader blocked in a network read stays a daemon
        until the read times out (Source.close waits for it to leave the decoder)."""
        self.mailbox.close()
        self.thread.join(timeout=2.0)


def _pace(question: str, rate: float | None) -> Callable[[Frame], str | None] | str:
    """The question for each frame taken: None (skip it) until 1/rate s after the last answer began."""
    if rate is None:
        return question
    last = [float("-inf")]

    def ask(frame: Frame) -> str | None:
        now = time.monotonic()
        if now - last[0] < 1.0 / rate:
            return None
        last[0] = now
        return question

    return ask


def run_watch(pipe: Any, source: Source, settings: WatchSettings, *, as_json: bool = False,
              out: Console | None = None, err: Console | None = None) -> dict:
    """Answer about `source` until it ends or Ctrl-C; returns the summary (also printed)."""
    out = out or Console(highlight=False)
    err = err or Console(stderr=True, highlight=False)
    mailbox = Latest(keep_all=settings.no_drop)
    reader = _Reader(source, mailbox, settings.every, settings.speed)
    watch = Watch(pipe, mailbox, _pace(settings.question, settings.rate), m=settings.m, profile=settings.profile,
                  refine=settings.refine, confidence=settings.confidence, max_new_tokens=settings.max_new_tokens,
                  on_error=lambda f, e: err.print(f"frame {_where(f.meta, f.index)} not answered: {escape(str(e))}",
                                                  soft_wrap=True))
    tally, stopped = Tally(), threading.Event()
    show = _json_line if as_json else (_Panel(source, settings, out) if out.is_terminal else _plain_line)
    reader.thread.start()
    try:
        with _ctrl_c(stopped, mailbox), watch, (show if isinstance(show, _Panel) else contextlib.nullcontext()):
            for a in watch:
                tally.read = source.read
                tally.answered, tally.dropped = tally.answered + 1, tally.dropped + a.dropped
                tally.latencies_ms.append(a.timings_ms["latency"])
                show(a, tally, out)
                if stopped.is_set():  # Ctrl-C: a frame still in the mailbox stays unanswered ("left")
                    break
    except KeyboardInterrupt:  # off the main thread, or a second Ctrl-C during the first one's ending
        stopped.set()
    finally:
        reader.stop()
    interrupted = stopped.is_set()
    if reader.error is not None and not interrupted:
        raise reader.error  # e.g. a video whose first frame does not decode: one line from the CLI
    summary = _summary(watch, source, reader.skipped, tally, interrupted)
    if as_json:
        print(json.dumps({"summary": summary}), flush=True)
    err.print(escape(_summary_line(summary)), soft_wrap=True)
    return summary


@contextlib.contextmanager
def _ctrl_c(stopped: threading.Event, mailbox: Latest) -> Iterator[None]:
    """The first Ctrl-C ends the watch after the answer in progress; a second one interrupts.

    A KeyboardInterrupt cannot be relied on here: Python raises it in whatever Python code runs
    next, and when that is llama-cpp-python's log callback (called from C while a context is
    made) ctypes prints it and drops it, so the watch would go on. A handler that only closes the
    mailbox cannot be lost that way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame) -> None:
        stopped.set()
        mailbox.close()  # Latest's condition is reentrant: safe from a handler on the main thread
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _summary(watch: Watch, source: Source, every_skipped: int, tally: Tally, interrupted: bool) -> dict:
    stats = watch.stats
    skipped = every_skipped + stats["skipped"]  # --every (never offered) and --rate (taken, not asked)
    lat = tally.latencies_ms
    return {"read": source.read, "answered": stats["answered"], "dropped": stats["dropped"], "skipped": skipped,
            "failed": stats["failed"],
            "left": source.read - stats["answered"] - stats["dropped"] - skipped - stats["failed"],
            "mean_latency_ms": round(statistics.fmean(lat), 2) if lat else None,
            "answers_per_s": stats["answers_per_s"], "seconds": round(time.perf_counter() - tally.started, 3),
            "m": stats["m"], "interrupted": interrupted, "ended": source.ended}


def _summary_line(s: dict) -> str:
    latency = f", mean latency {s['mean_latency_ms']:.0f} ms" if s["mean_latency_ms"] is not None else ""
    why = " (interrupted)" if s["interrupted"] else (f" (the source ended: {s['ended']})" if s["ended"] else "")
    left = f", {s['left']} in flight" if s["left"] else ""
    return (f"watched {s['seconds']:.1f} s{why}: {s['answered']} answered, {s['dropped']} dropped, "
            f"{s['skipped']} skipped, {s['failed']} failed{left} of {s['read']} frames read{latency} (m = {s['m']})")


def answer_record(a: WatchAnswer, read: int) -> dict:
    """One JSON line: the frame, its timestamp, the answer, m and every timing of its way through."""
    ans, meta = a.answer, a.meta or {}
    record = {"frame": meta.get("index", a.frame), "t": meta.get("t"), "name": meta.get("name"), "read": read,
              "question": a.question, "answer": ans.answer, "m": ans.m, "dropped": a.dropped,
              "first_token_prob": ans.first_token_prob, "prefilled": ans.prefilled, "timings_ms": ans.timings_ms | a.timings_ms}
    if ans.refined_from:
        record["refined_from"] = ans.refined_from
    return {k: v for k, v in record.items() if v is not None}


def _json_line(a: WatchAnswer, tally: Tally, out: Console) -> None:
    sys.stdout.write(json.dumps(answer_record(a, tally.read)) + "\n")
    sys.stdout.flush()  # a pipe is block-buffered: a script reading line by line must get each answer now


def _where(meta: dict | None, index: int) -> str:
    """A frame as the user knows it: its index in the source, its time or its file."""
    meta = meta or {}
    t, name = meta.get("t"), meta.get("name")
    return f"{meta.get('index', index)}" + (f" at {t:.2f} s" if t is not None else "") + (f" ({name})" if name else "")


def _plain_line(a: WatchAnswer, tally: Tally, out: Console) -> None:
    print(f"frame {_where(a.meta, a.frame)}: m={a.answer.m} {a.timings_ms['latency']:.0f} ms "
          f"(dropped {a.dropped}): {a.answer.answer}", flush=True)


class _Panel:
    """The live display on a terminal: the newest answer and the running counts."""

    def __init__(self, source: Source, settings: WatchSettings, out: Console) -> None:
        self.source, self.settings = source, settings
        self.live = Live(self._render(None, None), console=out, auto_refresh=False, transient=False)

    def __call__(self, a: WatchAnswer, tally: Tally, out: Console) -> None:
        self.live.update(self._render(a, tally), refresh=True)

    def __enter__(self) -> _Panel:
        self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.live.__exit__(*exc)

    def _render(self, a: WatchAnswer | None, tally: Tally | None) -> Group:
        grid = Table.grid(padding=(0, 2))
        grid.add_row("source", escape(f"{self.source.spec} ({self.source.kind})"))
        grid.add_row("question", escape(self.settings.question))
        if a is None:
            grid.add_row("answer", "[dim]waiting for the first frame...[/]")
            return Group(grid)
        grid.add_row("answer", f"[bold]{escape(a.answer.answer)}[/]")
        grid.add_row("frame", escape(_where(a.meta, a.frame)))
        grid.add_row("m / TTFT / latency", f"{a.answer.m} / {a.answer.timings_ms['ttft']:.0f} ms / "
                                           f"{a.timings_ms['latency']:.0f} ms")
        grid.add_row("read / answered / dropped", f"{self.source.read} / {tally.answered} / {tally.dropped}, "
                                                  f"mean latency {statistics.fmean(tally.latencies_ms):.0f} ms")
        return Group(grid)
