"""The scheduler: one llama.cpp context for every request, one batch per step.

Every caller (`Pipeline.ask`/`stream`/`answer`, `Session`, `Conversation`, the server, `Watch`, the
ROS 2 node) reaches llama.cpp through here. One loop thread owns the `SharedContext` and makes each
step's batches:

- a token batch: one row for every generation that is decoding (its last token, logits on), then
  token prefill of sequences that are starting, first come first served, up to `n_batch` rows;
- an embedding batch: visual tokens of starting sequences, at most `n_batch` rows per step, so a
  256-token image never stalls the decoding streams for more than one step (a `llama_batch` carries
  ids or embeddings, never both).

Each generation samples with its own settings and seed (mqt_edge.sampling); its tokens go to the
caller's thread through a queue. A generation pauses after its first token until the caller reads it,
so the refinement policy can still drop an unsure first token before any text exists.

Memory is one pool of KV cells (`n_ctx`, unified across sequences). Sequence 0 holds the prompt
head; a new sequence shares those cells (`seq_cp`), it never prefills them. An idle sequence stays in
the context while there is room; when a new request needs cells or a sequence id, the least recently
used idle sequence is parked on the host (`llama_state_seq_get_data`) and written back when its owner
uses it again. Parked bytes are bounded too: past `host_bytes`, the least recently used parked
sequences that a cache (not a user) holds are dropped, and their owner is told. A fork (a second
client's conversation about a cached image) shares its parent's cells the same way; `CellBook` counts
every shared cell once, until its last holder lets go.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .caches import ImageCache
from .conversation import ConversationCache
from .cores import FOLLOWUP_S, CoreShare
from .errors import ClosedError, InputError, MQTEdgeError
from .runtimes.llama import LlamaModel, SequenceState, SharedContext
from .sampling import first_prob, pick

log = logging.getLogger("mqt_edge.scheduler")
_order = itertools.count()
# Prefill rows per step while other sequences decode: a long prompt or a 256-token image is fed in
# slices, so each decoding stream still gets a token every step (bounded stall), and a lone
# request (nobody decoding) still prefills in full batches.
PREFILL_WHILE_DECODING = 64

# How long the loop waits, after handing out a step's tokens, for the callers reading them to take
# them and come back, before it starts the next step: a caller's Python running during a decode takes
# a core from one of llama.cpp's threads, and every barrier waits on that thread. Waiting made a step
# of 4 streams 1.2x faster here (docs/benchmarks.md); a slower caller costs each step this much at most.
SETTLE_S = 0.003


class Sequence:
    """One conversation's positions in the shared context (resident) or on the host (parked)."""

    def __init__(self, scheduler: Scheduler, droppable: bool) -> None:
        self.scheduler = scheduler
        self.id: int | None = None  # llama.cpp seq id while resident
        self.n_past = 0  # positions held: 0..n_past-1
        self.spans: list[_Span] = []  # its cells beyond the shared head, in position order
        self.parked: SequenceState | None = None
        self.busy = 0  # jobs in flight: never parked while > 0
        self.used = next(_order)  # least recently used first out
        self.droppable = droppable  # a cache's entry (may be dropped), not one a caller holds
        self.on_drop: Callable[[], None] | None = None
        self.closed = False

    @property
    def resident(self) -> bool:
        return self.id is not None

    @property
    def own(self) -> int:
        """Cells it holds alone: what parking or closing it frees."""
        return sum(s.end - s.start for s in self.spans if s.holders == {self})

    def close(self) -> None:
        """Free its cells or host bytes (from any thread)."""
        if not self.closed:
            self.scheduler.call(lambda: self.scheduler._forget(self), wait=False)


@dataclass
class _Gen:
    """Sampling state of one generation."""

    max_new: int
    temperature: float
    top_p: float
    rng: np.random.Generator
    is_eog: Callable[[int], bool]
    first: int = -1
    first_prob: float = 0.0
    last: int = -1
    emitted: int = 0
    paused: bool = True


class Job:
    """A prefill (ids and/or embeddings after `keep` positions), optionally followed by a generation.
    The caller waits on it with `wait_prefill()`, then reads tokens with `tokens()`."""

    def __init__(self, seq: Sequence, keep: int, parts: list, logits: bool, gen: _Gen | None,
                 deadline: float | None) -> None:
        self.seq, self.keep, self.gen, self.logits = seq, keep, gen, logits or gen is not None
        self.parts = deque((k, v) for k, v in parts if len(v))  # ("ids", list[int]) | ("emb", (n, d) array)
        self.need = sum(len(v) for _, v in self.parts) + (gen.max_new if gen else 0)
        self.deadline = deadline
        self.prefilled = threading.Event()
        self.error: BaseException | None = None
        self.last_logits: np.ndarray | None = None
        self.cancelled = False
        self.done = False  # the loop let go of it
        self._queue: deque[int | None] = deque()
        self._cv = threading.Condition()
        self.reader = False  # a caller is reading tokens()
        self._back = False  # ... and waits in it for the next token
        self.reserved = 0  # cells still reserved for it (need less what it has fed)

    # -- the caller's side ---------------------------------------------------------------------------
    def wait_prefill(self) -> None:
        self.prefilled.wait()
        if self.error is not None:
            raise self.error

    def tokens(self):
        """Resume the paused generation and yield its token ids until it ends."""
        self.reader = True  # the loop waits a moment for this reader between steps (SETTLE_S)
        try:
            self.seq.scheduler._resume(self)
            while True:
                with self._cv:
                    self._back = True  # back for the next token: the loop may start its next step
                    self._cv.notify_all()
                    self._cv.wait_for(lambda: self._queue)
                    self._back = False
                    item = self._queue.popleft()
                if item is None:
                    if self.error is not None:
                        raise self.error
                    return
                yield item
        finally:
            self.reader = False

    def cancel(self) -> None:
        """Stop at the next step and wait until the loop lets go of the sequence; the tokens
        already fed stay in it."""
        self.cancelled = True
        self.seq.scheduler._wake()
        with self._cv:
            self._cv.wait_for(lambda: self.done)

    # -- the loop's side -----------------------------------------------------------------------------
    def _put(self, item: int | None) -> None:
        with self._cv:
            self.done = self.done or item is None
            self._queue.append(item)
            self._cv.notify_all()

    def _settle(self, until: float) -> None:
        """Wait (until `until`, monotonic) for the caller to take its token and come back for the next."""
        with self._cv:
            self._cv.wait_for(lambda: self.done or not self.reader or (self._back and not self._queue),
                              until - time.monotonic())

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self.prefilled.set()
        self._put(None)


@dataclass
class Stats:
    """What the scheduler holds, for /health and the tests."""

    n_ctx: int
    n_seq: int
    position_bytes: int
    cells_used: int
    resident: int
    parked: int
    parked_bytes: int
    host_bytes: int
    steps: int
    rows: int
    max_rows: int
    parks: int
    drops: int
    extra: dict = field(default_factory=dict)


class _Span:
    """KV cells at positions [start, end) held by one or more sequences: `seq_cp` gives a sequence
    another's cells without copying them, and llama.cpp frees a cell when its last holder lets go."""

    __slots__ = ("start", "end", "holders")

    def __init__(self, start: int, end: int, holders: set) -> None:
        self.start, self.end, self.holders = start, end, holders


class CellBook:
    """The cells that resident sequences hold beyond the shared head, each counted once however many
    sequences share it (a forked conversation shares its parent's prefix)."""

    def __init__(self) -> None:
        self.count = 0

    def grow(self, seq: Sequence, n: int) -> None:
        """`n` new cells after seq's n_past."""
        if n <= 0:
            return
        last = seq.spans[-1] if seq.spans else None
        if last is not None and last.end == seq.n_past and last.holders == {seq}:
            last.end += n
        else:
            seq.spans.append(_Span(seq.n_past, seq.n_past + n, {seq}))
        self.count += n

    def restored(self, seq: Sequence, n: int) -> None:
        """seq's positions 0..n-1 came back from the host: all its own cells, the head included."""
        seq.spans = [_Span(0, n, {seq})]
        self.count += n

    def cut(self, seq: Sequence, keep: int) -> None:
        """seq lets go of its positions from `keep` on; a cell another sequence holds stays counted."""
        for span in [s for s in seq.spans if s.start < keep < s.end]:
            self._split(span, keep)
        for span in [s for s in seq.spans if s.start >= keep]:
            span.holders.discard(seq)
            if not span.holders:
                self.count -= span.end - span.start
        seq.spans = [s for s in seq.spans if s.start < keep]

    def share(self, src: Sequence, dst: Sequence, p0: int, p1: int) -> None:
        """dst now holds src's cells at p0..p1-1 too (after `seq_cp`): nothing new to count."""
        for at in (p0, p1):
            for span in [s for s in src.spans if s.start < at < s.end]:
                self._split(span, at)
        for span in src.spans:
            if p0 <= span.start and span.end <= p1:
                span.holders.add(dst)
                dst.spans.append(span)

    @staticmethod
    def _split(span: _Span, at: int) -> None:
        tail = _Span(at, span.end, set(span.holders))
        span.end = at
        for seq in span.holders:
            seq.spans.insert(seq.spans.index(span) + 1, tail)


class _Forks:
    """A second conversation about a cached image (SequencePool's half for forks): the parent's
    cells shared in the context, or its parked bytes copied from the host. Expects the pool's ctx,
    book, open, room and on_forget."""

    def fork(self, src: Sequence, dst: Sequence, n: int) -> None:
        """Open `dst` holding `src`'s first `n` positions, `src` untouched: its cells shared in the
        context when it is resident, else its parked bytes restored into `dst` and cut to `n`."""
        if src.closed or (not src.resident and src.parked is None):
            raise ClosedError("this conversation was dropped from the cache", "start it again")
        src.busy += 1  # not parked to free an id for dst: sharing its cells beats a host copy
        try:
            self.open(dst)
        except MQTEdgeError:
            src.busy -= 1
            self.open(dst)  # src was the only idle sequence: it goes to the host, dst copies from there
        else:
            src.busy -= 1
        try:
            if src.resident:
                self.ctx.seq_cp(src.id, dst.id, dst.n_past, n)
                self.book.share(src, dst, dst.n_past, n)
            else:
                self._fork_parked(src, dst, n)
        except BaseException:
            self.on_forget(dst)
            raise
        dst.n_past = n

    def _fork_parked(self, src: Sequence, dst: Sequence, n: int) -> None:
        self.ctx.seq_rm(dst.id, 0, -1)  # the restored cells replace the shared head's
        if not self.room(src.n_past, keep=dst) or not self.ctx.seq_restore(dst.id, src.parked):
            raise MQTEdgeError("no room in the context to copy the conversation",
                               "send the request again, or raise --cache-mb")
        self.ctx.seq_rm(dst.id, n, -1)
        self.book.restored(dst, n)


class SequencePool(_Forks):
    """The memory side of the scheduler: sequence ids, the context's cells (one pool, unified), and the
    host's parked sequences. Only the loop thread calls it."""

    def __init__(self, ctx: SharedContext, n_ctx: int, n_seq: int, head_len: int, head_ids: list[int],
                 host_bytes: int, on_forget: Callable[[Sequence], None]) -> None:
        self.ctx, self.n_ctx, self.head_len, self.head_ids = ctx, n_ctx, head_len, head_ids
        self.host_bytes, self.on_forget = host_bytes, on_forget
        self.free_ids = list(range(n_seq - 1, 0, -1))  # 0 is the prompt head
        self.seqs: set[Sequence] = set()
        self.book = CellBook()  # cells held by resident sequences beyond the shared head
        self.reserved = 0  # cells promised to admitted jobs, not yet fed
        self.parked_bytes = 0
        self.parks = self.drops = 0

    def place(self, job: Job) -> bool:
        seq = job.seq
        if not seq.resident and not self.make_resident(seq):
            return False
        if job.keep < seq.n_past:
            self.ctx.seq_rm(seq.id, job.keep, -1)
            self.book.cut(seq, job.keep)
            seq.n_past = job.keep
        if not self.room(job.need, keep=seq):
            return False
        job.reserved = job.need
        self.reserved += job.need
        seq.used = next(_order)
        return True

    @property
    def cells(self) -> int:
        return self.book.count

    def room(self, need: int, keep: Sequence | None = None) -> bool:
        while self.head_len + self.cells + self.reserved + need > self.n_ctx - 1:
            if not self.park_one(keep):
                return False
        return True

    def make_resident(self, seq: Sequence) -> bool:
        if not self.free_ids and not self.park_one(seq):
            return False
        if seq.parked is None:  # dropped while parked: the caller must start again
            raise ClosedError("this conversation was dropped from the cache", "start it again")
        if not self.room(seq.n_past, keep=seq):  # restored cells are its own: the head is not shared then
            return False
        seq.id = self.free_ids.pop()
        if not self.ctx.seq_restore(seq.id, seq.parked):
            self.free_ids.append(seq.id)
            seq.id = None
            return False
        self.book.restored(seq, seq.n_past)
        self.parked_bytes -= seq.parked.size
        seq.parked = None
        return True

    def park_one(self, keep: Sequence | None) -> bool:
        """Park the least recently used idle resident sequence on the host; False if none."""
        idle = [s for s in self.seqs if s.resident and not s.busy and s is not keep]
        if not idle:
            return False
        seq = min(idle, key=lambda s: s.used)
        state = self.ctx.seq_save(seq.id, seq.n_past)
        self.release_cells(seq)
        seq.parked = state
        self.parked_bytes += state.size
        self.parks += 1
        self.trim_host()
        return True

    def trim_host(self) -> None:
        while self.parked_bytes > self.host_bytes:
            parked = [s for s in self.seqs if s.parked is not None and s.droppable]
            if not parked:
                return
            self.drop(min(parked, key=lambda s: s.used))

    def drop(self, seq: Sequence) -> None:
        self.on_forget(seq)
        self.drops += 1
        if seq.on_drop is not None:
            seq.on_drop()

    def release_cells(self, seq: Sequence) -> None:
        self.ctx.seq_rm(seq.id, 0, -1)
        self.book.cut(seq, 0)
        self.free_ids.append(seq.id)
        seq.id = None

    def open(self, seq: Sequence) -> None:
        self.seqs.add(seq)
        seq.busy += 1  # not parked before its first job
        try:
            if not self.free_ids and not self.park_one(None):
                raise MQTEdgeError(f"all {self.ctx.n_seq - 1} sequences are in use",
                                   "close sessions you no longer need, or load with a larger parallel")
            seq.id = self.free_ids.pop()
            if self.head_len:
                self.ctx.seq_cp(0, seq.id, 0, self.head_len)
            seq.n_past, seq.spans = self.head_len, []
            if not self.head_len and self.head_ids:  # head cache off: each sequence prefills the head
                seq.n_past = 0
        except BaseException:
            self.seqs.discard(seq)
            raise
        finally:
            seq.busy -= 1

    def discard(self, seq: Sequence) -> None:
        """Free what a closed sequence holds (its cells once no job uses it, its host bytes)."""
        if seq.resident and not seq.busy:
            self.release_cells(seq)
        if seq.parked is not None:
            self.parked_bytes -= seq.parked.size
            seq.parked = None
        if not seq.busy:
            self.seqs.discard(seq)

    def fed(self, job: Job, n: int) -> None:
        """`n` positions of `job` went into its sequence: they leave its reservation for its cells."""
        self.book.grow(job.seq, n)
        job.seq.n_past += n
        n = min(n, job.reserved)
        job.reserved -= n
        self.reserved -= n

    def release(self, job: Job) -> None:
        """What a finished job reserved and did not feed goes back."""
        self.reserved -= job.reserved
        job.reserved = 0


class _Endings:
    """How jobs and sequences end (the Scheduler's half that fails, finishes and forgets them), how
    the loop lets callers take their tokens, and what cores.py asks of the loop. Expects the
    Scheduler's pool, _waiting, _prefill, _decoding, _handed and _commands."""

    def _held_jobs(self) -> list[Job]:
        """Every job the loop holds: waiting, prefilling, decoding."""
        return list(self._waiting) + list(self._prefill) + self._decoding

    def _shutdown(self) -> None:
        exc = ClosedError("the pipeline is closed", "load the bundle again (Pipeline.load)")
        for run in self._commands:
            run()
        for job in self._held_jobs():
            job._fail(exc)

    def _fail_all(self, exc: MQTEdgeError) -> None:
        """Fail every job the loop holds; a job whose own ending fails is still failed."""
        for job in self._held_jobs():
            try:
                if job in self._waiting:
                    self._waiting.remove(job)
                self._finish(job, exc)
            except Exception:  # its books may be what broke
                job._fail(exc)
        self._prefill.clear()
        self._decoding.clear()

    def _settle(self) -> None:
        """Let the readers take this step's tokens before the next step (up to SETTLE_S)."""
        until = time.monotonic() + SETTLE_S
        for job in self._handed:
            job._settle(until)
        self._handed.clear()

    def _urgent(self) -> bool:
        """Whether the next step prefills (a first token waits on it); read from cores.py's wait."""
        return bool(self._waiting or self._prefill)

    def _forget(self, seq: Sequence) -> None:
        seq.closed = True
        if seq not in self.pool.seqs:
            return
        for job in [j for j in self._waiting if j.seq is seq]:
            self._waiting.remove(job)
            self._finish(job, ClosedError("this session is closed", "start a new one"))
        self.pool.discard(seq)

    def _finish(self, job: Job, exc: BaseException | None = None) -> None:
        seq = job.seq
        if job in self._prefill:
            self._prefill.remove(job)
        if job in self._decoding:
            self._decoding.remove(job)
        self.pool.release(job)
        seq.busy -= 1
        seq.used = next(_order)
        if exc is not None:
            job._fail(exc)
        else:
            job.prefilled.set()
            job._put(None)
        if seq.closed and not seq.busy and seq in self.pool.seqs:
            self._forget(seq)


class _Batches(_Endings):
    """How the loop builds each step's batches and hands their logits back (the Scheduler's half that
    talks to llama.cpp every step). Expects the Scheduler's ctx, pool, n_batch, _prefill, _decoding
    and _finish."""

    def _step(self) -> None:
        for job in [j for j in self._decoding if j.cancelled]:
            self._finish(job)
        rows, owners = [], []
        for job in self._decoding:
            if not job.gen.paused:
                rows.append((job.seq.id, job.seq.n_past, job.gen.last, True))
                owners.append((job, 1, True))
        limit = self.n_batch if not rows else min(self.n_batch, len(rows) + PREFILL_WHILE_DECODING)
        self._embed_limit = self.n_batch if not rows else PREFILL_WHILE_DECODING
        for job in list(self._prefill):
            if len(rows) >= limit:
                break
            if job.cancelled:
                self._finish(job)
                continue
            kind, ids = job.parts[0]
            if kind != "ids":
                continue
            take = ids[: limit - len(rows)]
            last = len(take) == len(ids) and len(job.parts) == 1
            for i, t in enumerate(take):
                rows.append((job.seq.id, job.seq.n_past + i, int(t), job.logits and last and i == len(take) - 1))
            owners.append((job, len(take), job.logits and last))
        if rows:
            self._count(len(rows))
            logits = iter(self.ctx.decode_tokens(rows))
            for job, n, want in owners:
                self._advance(job, n, next(logits) if want else None)
        self._embeddings()

    def _prefill_head(self) -> None:
        for start in range(0, len(self.head_ids), self.n_batch):
            chunk = self.head_ids[start:start + self.n_batch]
            self.ctx.decode_tokens([(0, start + i, t, False) for i, t in enumerate(chunk)])

    def _embeddings(self) -> None:
        parts, owners, room = [], [], self._embed_limit
        for job in list(self._prefill):
            if room <= 0:
                break
            kind, emb = job.parts[0] if job.parts else ("", None)
            if kind != "emb" or job.cancelled:
                continue
            take = emb[:room]
            last = len(take) == len(emb) and len(job.parts) == 1
            want = job.logits and last
            parts.append((job.seq.id, job.seq.n_past, take, want))
            owners.append((job, len(take), want))
            room -= len(take)
        if parts:
            self._count(self._embed_limit - room)
            logits = iter(self.ctx.decode_embeddings(parts))
            for job, n, want in owners:
                self._advance(job, n, next(logits) if want else None)

    def _count(self, n: int) -> None:
        self.steps += 1
        self.rows += n
        self.max_rows = max(self.max_rows, n)

    def _advance(self, job: Job, n: int, logits: np.ndarray | None) -> None:
        self.pool.fed(job, n)
        if job in self._decoding:  # one generated token was fed
            self._sample(job, logits)
            return
        kind, data = job.parts[0]
        if n < len(data):
            job.parts[0] = (kind, data[n:])
            return
        job.parts.popleft()
        if job.parts:
            return
        self._prefill.remove(job)
        job.last_logits = logits
        if job.gen is None:
            self._followup = True
            self._finish(job)
            return
        g = job.gen
        g.first = g.last = pick(logits, g.temperature, g.top_p, g.rng)
        g.first_prob = first_prob(logits, g.first)
        self._decoding.append(job)
        job.prefilled.set()  # the caller sees the first token; decoding waits for tokens()
        self._emit(job)

    def _sample(self, job: Job, logits: np.ndarray) -> None:
        g = job.gen
        g.last = pick(logits, g.temperature, g.top_p, g.rng)
        self._emit(job)

    def _emit(self, job: Job) -> None:
        """Hand the last picked token to the caller, or end the generation (the token is not fed)."""
        g = job.gen
        if g.is_eog(g.last) or (job.deadline is not None and time.monotonic() > job.deadline):
            self._finish(job)
            return
        job._put(g.last)
        if job.reader:
            self._handed.append(job)
        g.emitted += 1
        if g.emitted >= g.max_new:
            self._finish(job)


    def _has_work(self) -> bool:
        return bool(self._closing or self._commands or self._waiting or self._prefill
                    or any(not j.gen.paused or j.cancelled for j in self._decoding))


    def _admit(self) -> None:
        """Move waiting jobs to prefill in order, while their sequences fit (parking idle ones)."""
        now = time.monotonic()
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled or (job.deadline is not None and now > job.deadline) or job.seq.closed:
                self._waiting.popleft()
                self._finish(job, InputError("the request was cancelled before it started", "send it again"))
                continue
            if not self.pool.place(job):
                return  # waits for room; later jobs wait behind it (no starvation)
            self._waiting.popleft()
            if job.parts:
                self._prefill.append(job)
            else:  # only a cut back to `keep`
                self._finish(job)


    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()


    def _resume(self, job: Job) -> None:
        with self._cv:
            if job.gen is not None and job.gen.paused:
                job.gen.paused = False
                self._cv.notify_all()

    # -- the loop ------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise ClosedError("the pipeline is closed", "use it inside its `with Pipeline.load(...)` block")


class Scheduler(_Batches):
    """Owns the shared llama.cpp context and its loop thread."""

    def __init__(self, llm: LlamaModel, *, n_ctx: int, n_seq: int, head_ids: list[int], position_bytes: int,
                 host_bytes: int, threads: int | None = None, kv_f32: bool = False, n_batch: int = 512,
                 head_cache: bool = True, cores: CoreShare | None = None) -> None:
        if n_seq < 2:
            raise InputError(f"the scheduler needs at least 2 sequences, not {n_seq}", "use parallel >= 1")
        self.llm = llm
        self.cores = cores or CoreShare(None)  # the CPU's threads, shared with vision (cores.py)
        self.cores.urgent = self._urgent
        self.ctx = SharedContext(llm, n_ctx, n_seq, n_batch, threads, kv_f32)
        self.n_ctx, self.n_batch = min(n_ctx, self.ctx.n_ctx), n_batch  # the budget, not llama.cpp's rounding
        self.head_ids, self.head_cache = list(head_ids), head_cache
        # One budget: the context's cells, then the host's bytes, a quarter of them for encoded images.
        self.images = ImageCache(host_bytes // 4)
        self.conversations = ConversationCache()
        self.position_bytes, self.host_bytes = position_bytes, host_bytes - host_bytes // 4
        self._commands: deque = deque()
        self._waiting: deque[Job] = deque()  # admitted in order when there is room
        self._prefill: deque[Job] = deque()
        self._decoding: list[Job] = []
        self._cv = threading.Condition()
        self._closing = False
        self.steps = self.rows = self.max_rows = 0
        self._followup = False
        self._handed: list[Job] = []  # jobs whose reader was handed a token this step
        self.head_len = 0
        self._thread = threading.Thread(target=self._loop, name="mqt-scheduler", daemon=True)
        self._thread.start()
        # Every llama.cpp call runs on the loop thread, the head's too: a second calling thread gets a
        # libgomp pool of its own, which throttles every barrier's spin (docs/runtime.md, "Threads").
        if head_cache and head_ids:  # the prompt before <image>, computed once
            try:
                self.call(self._prefill_head)
            except BaseException:
                self.close()
                raise
            self.head_len = len(head_ids)
        self.pool = SequencePool(self.ctx, self.n_ctx, n_seq, self.head_len, self.head_ids, self.host_bytes,
                                 self._forget)

    # -- calls from any thread -----------------------------------------------------------------------
    def open(self, droppable: bool = False) -> Sequence:
        """A new sequence holding the prompt head (shared cells), resident."""
        seq = Sequence(self, droppable)
        self.call(lambda: self.pool.open(seq))
        return seq

    def fork(self, src: Sequence, n: int, droppable: bool = False) -> Sequence:
        """A new sequence holding `src`'s first `n` positions (shared cells, nothing prefilled);
        `src` keeps all of its own."""
        if not self.head_len <= n <= src.n_past:
            raise InputError(f"cannot fork {n} positions of a sequence holding {src.n_past}",
                             f"fork {self.head_len}..{src.n_past} positions")
        seq = Sequence(self, droppable)
        self.call(lambda: self.pool.fork(src, seq, n))
        return seq

    def submit(self, seq: Sequence, keep: int, parts: list, *, logits: bool = False, max_new: int = 0,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
               deadline: float | None = None) -> Job:
        """Cut `seq` back to `keep` positions, prefill `parts`, and (max_new > 0) generate."""
        gen = None
        if max_new > 0:
            gen = _Gen(max_new, float(temperature), float(top_p), np.random.default_rng(seed), self.llm.is_eog)
        job = Job(seq, keep, parts, logits, gen, deadline)
        if job.need - (gen.max_new if gen else 0) + keep > self.n_ctx - 1:
            raise InputError(f"{keep} + {job.need} positions exceed the shared context of {self.n_ctx}",
                             "use fewer visual tokens or a smaller max_tokens")
        with self._cv:
            self._check_open()
            seq.busy += 1
            self._waiting.append(job)
            self._cv.notify_all()
        self.cores.wake()  # a step waiting behind vision may now be a prefill, which goes first
        return job

    def call(self, fn: Callable[[], object], wait: bool = True):
        """Run `fn` on the loop thread between steps (memory edits); its result or exception."""
        box: dict = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed to the caller
                box["error"] = exc
            done.set()

        with self._cv:
            if self._closing:
                if not wait:
                    return None
                self._check_open()
            self._commands.append(run)
            self._cv.notify_all()
        if not wait:
            return None
        done.wait()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def stats(self) -> Stats:
        def read() -> Stats:
            pool, seqs = self.pool, list(self.pool.seqs)
            return Stats(self.n_ctx, self.ctx.n_seq, self.position_bytes, self.head_len + pool.cells,
                         sum(s.resident for s in seqs), sum(s.parked is not None for s in seqs),
                         pool.parked_bytes, self.host_bytes, self.steps, self.rows, self.max_rows,
                         pool.parks, pool.drops)
        return self.call(read)

    def close(self) -> None:
        with self._cv:
            if self._closing:
                return
            self._closing = True
            self._cv.notify_all()
        self._thread.join()
        self.ctx.close()

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(self._has_work)
                if self._closing:
                    break
                commands, self._commands = self._commands, deque()
            for run in commands:
                run()
            try:
                with self.cores.llm() as threads:
                    if threads is not None:
                        self.ctx.set_threads(threads)
                    self._admit()
                    self._step()
                if self._followup:  # an image was prefilled: its question comes next, before other vision
                    self._followup = False
                    self.cores.hold(FOLLOWUP_S)
                self._settle()
            except MQTEdgeError as exc:  # llama.cpp refused a batch: fail what was in it, keep serving
                log.error("batch failed: %s", exc)
                for job in list(self._prefill) + self._decoding:
                    self._finish(job, exc)
            except Exception as exc:  # a bug: its callers get an error instead of waiting forever
                log.exception("the scheduler's step failed")
                self._fail_all(MQTEdgeError(f"the scheduler failed: {type(exc).__name__}: {exc}",
                                            "report this with the output of `mqt-edge doctor`"))
        self._shutdown()
