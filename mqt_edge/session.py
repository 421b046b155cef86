"""A session: one image's visual prefix held in a sequence of the scheduler's shared context.

    session = pipe.look(image, m=16)   # image encoded once, its prefix kept in the KV cache
    session.ask("Is the door open?")   # prefills only the question
    session.refine(m=64)               # adds queries 16..63 only: exact, see below

Request order in llama.cpp: the prompt tokens before `<image>` (BOS; shared from the scheduler's
prompt head, not prefilled), the m visual tokens as embeddings, the question tokens, then generation.
Refinement is exact because the MQT's tokens are nested (the tokens for m0 are the first m0 of those
for m1) and the LLM is causal, so the KV cache of a prompt with m0 visual tokens is the prefix of the
one with m1: drop the question from the cache, append the visual tokens m0..m1-1 and the question again.

Thread safety: a session's calls serialise on its lock; sessions share the scheduler, which batches
their work into one llama.cpp context (mqt_edge/scheduler.py). Closing may come from any thread: a
call in flight ends or raises ClosedError; later calls raise ClosedError naming the session.

Reading rule: a `Generation` (and `stream()`) is read once. An unread Generation holds its session's
lock until it is read to the end, cancelled, or garbage-collected: another thread's `ask` on the same
session waits for it (`session.busy` says so); the same thread gets an InputError instead of a hang.
"""

from __future__ import annotations

import codecs
import copy
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np

from .checks import DEFAULT_CONFIDENCE, check_confidence, check_sampling
from .errors import ClosedError, InputError, TokensError
from .image import ImageInput

from .costs import QUESTION_RESERVE  # noqa: F401 (defined in costs: the planner sizes the context with it too)


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 2)


@dataclass
class Answer:
    answer: str
    token_ids: list[int]
    m: int  # the number of visual tokens used
    backends: dict
    timings_ms: dict  # preprocess, vision, mqt, prefill, ttft, decode, total
    decode_tokens_per_s: float | None
    first_token_prob: float
    prefilled: int  # positions fed to the LLM for this answer (prompt, visual tokens, question)
    profile: str | None = None
    predicted: dict | None = None
    refined_from: dict | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("profile",)}




@dataclass(frozen=True)
class EncodedImage:
    """An image through vision and the MQT, not yet fed to the LLM (`Pipeline.encode`); a Session
    built from it skips the encoding, so encoding and decoding can run on different threads."""

    features: np.ndarray  # (1, P, C) vision features, kept so the session can refine
    visual: np.ndarray  # (m, hidden) the first m visual tokens
    seconds: tuple[float, float, float]  # preprocess, vision, mqt

    @property
    def m(self) -> int:
        return len(self.visual)


@dataclass
class _Pending:
    """Costs spent on a session since its last answer (image encoding, refinement)."""

    preprocess: float = 0.0
    vision: float = 0.0
    mqt: float = 0.0
    prefill: float = 0.0
    prefilled: int = 0




class Generation:
    """One answer being generated. Creating it prefills the question and picks the first token
    (so `first_token_prob` is known before any text is emitted); iterate it for text pieces."""

    def __init__(self, session: Session, question: str | None, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int, *, ids: list[int] | None = None, keep: int | None = None) -> None:
        session._check_open()
        check_sampling(max_new_tokens, temperature, top_p, seed)
        self.session, self.pipe = session, session.pipe
        self.max_new_tokens = max_new_tokens
        self._started, self.job = True, None  # until the prefill below succeeds, nothing to cancel
        # ids/keep (Session.generate_ids): a prompt given as token ids after the first `keep` positions.
        start = session.n_prefix if keep is None else keep
        ids = self.pipe.question_ids(question) if ids is None else ids
        need = start + len(ids) + max_new_tokens
        if need > session.n_ctx:
            raise InputError(
                f"prompt ({session.n_prefix - session.m} tokens) + m ({session.m}) + question ({len(ids)}) "
                f"+ max new tokens ({max_new_tokens}) = {need} exceed the context of {session.n_ctx}",
                "use fewer visual tokens, a shorter question or a smaller max_new_tokens",
            )
        self._lock = session._lock
        if session._owner == threading.get_ident():
            raise InputError("this thread still has an unfinished answer on this session",
                             "read it to the end or call .cancel() on it before asking again")
        self._lock.acquire()
        session._owner, session._active = threading.get_ident(), self
        try:
            session._check_open()
            pending, session.pending = session.pending, _Pending()
            t0 = time.perf_counter()
            self.job = self.pipe.scheduler.submit(session.seq, start, [("ids", ids)], max_new=max_new_tokens,
                                                  temperature=temperature, top_p=top_p, seed=seed)
            self.job.wait_prefill()
            self.first, self.first_token_prob = self.job.gen.first, self.job.gen.first_prob
            t1 = time.perf_counter()
        except BaseException:
            if self.job is not None:
                self.job.cancel()
            self._release()
            raise
        self.timings = {
            "preprocess": pending.preprocess, "vision": pending.vision, "mqt": pending.mqt,
            "prefill": pending.prefill + (t1 - t0),
        }
        self.timings["ttft"] = sum(self.timings.values())
        self.prefilled = pending.prefilled + len(ids)
        self.token_ids: list[int] = []
        self.text = ""
        self.answer: Answer | None = None
        self.refined_from: dict | None = None  # set by Session.refine_step on the regenerated answer
        self._started = False

    def __iter__(self) -> Iterator[str]:
        self.session._check_open()  # closing a session cancels its unread answer: say why
        if self._started:
            raise InputError("this generation was already consumed", "start a new one with ask()/stream()")
        self._started = True
        llm = self.pipe.llm
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        t_decode = time.perf_counter()
        lead = True
        try:
            for token in self.job.tokens():
                self.token_ids.append(token)
                piece = utf8.decode(llm.piece(token))
                if lead and piece:
                    piece, lead = piece.lstrip(" "), False
                if piece:
                    self.text += piece
                    yield piece
            tail = utf8.decode(b"", final=True)
            if tail:
                self.text += tail
                yield tail
        finally:
            self.job.cancel()  # a reader that stopped early: the loop lets go of the sequence first
            self._finish(time.perf_counter() - t_decode)
            self._release()

    def _release(self) -> None:
        self.session._owner = self.session._active = None
        self._lock.release()

    def __del__(self) -> None:  # an abandoned, never-read generation must not hold its session
        try:
            self.cancel()
        except Exception:
            pass

    def cancel(self) -> None:
        """Give up before reading any text (e.g. the first token was not confident enough)."""
        if not self._started:
            self._started = True
            self.job.cancel()
            self._finish(0.0)
            self._release()

    def _finish(self, decode: float) -> None:
        n = len(self.token_ids)
        t = {k: _ms(v) for k, v in self.timings.items()} | {"decode": _ms(decode)}
        t["total"] = round(t["ttft"] + t["decode"], 2)
        self.answer = Answer(
            answer=self.text.strip(), token_ids=list(self.token_ids), m=self.session.m,
            backends=self.pipe.backends, timings_ms=t,
            decode_tokens_per_s=round((n - 1) / decode, 2) if n > 1 and decode > 0 else None,
            first_token_prob=round(self.first_token_prob, 6), prefilled=self.prefilled,
            refined_from=self.refined_from,
        )


class _Refinement:
    """The one refinement decision (part of Session): answer at m, and when the first token is unsure,
    grow to a larger m exactly and answer again."""

    def answer(self, question: str, *, refine_to: int | None = None, confidence: float = DEFAULT_CONFIDENCE,
               on_piece: Callable[[str], None] | None = None, max_new_tokens: int = 128,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> Answer:
        """Answer `question` with the library's refinement policy (`refine_step`): with `refine_to`,
        an answer whose first token's probability is below `confidence` is dropped before any text,
        this session grows to m = `refine_to` and answers again (its `refined_from` says so).
        `on_piece(text)` receives the text as it is decoded."""
        check_sampling(max_new_tokens, temperature, top_p, seed)
        gen = self.refine_step(lambda: self.generate(question, max_new_tokens, temperature, top_p, seed),
                               refine_to, confidence)
        for piece in gen:
            if on_piece is not None:
                on_piece(piece)
        return gen.answer

    def refine_step(self, start: Callable[[], Generation], refine_to: int | None,
                    confidence: float = DEFAULT_CONFIDENCE) -> Generation:
        """The one refinement decision, for front ends that build their own prompts (a server's
        conversation turns): `start()` begins a generation on this session; when refine_to > m and its
        first token's probability is below `confidence`, it is cancelled, the session refines to
        `refine_to` and `start()` runs again on the grown prefix. Returns the generation to read; its
        `refined_from` (and its answer's) records the dropped attempt: m, first_token_prob, timings_ms
        and prefilled."""
        if refine_to is not None:
            refine_to = self.pipe.check_tokens(refine_to)
        confidence = check_confidence(confidence)
        gen = start()
        if refine_to is None or refine_to <= self.m or gen.first_token_prob >= confidence:
            return gen
        gen.cancel()
        first = gen.answer
        self.refine(refine_to)
        gen = start()
        gen.refined_from = {"m": first.m, "first_token_prob": first.first_token_prob,
                            "timings_ms": first.timings_ms, "prefilled": first.prefilled}
        return gen


class Session(_Refinement):
    """An image encoded once, its prompt prefix kept in a sequence of the shared context.

    droppable: the session belongs to a cache (a server's conversations), which may drop it when
    the host budget is spent; a session a caller holds is parked, never dropped."""

    def __init__(self, pipe, image: ImageInput | EncodedImage, m: int | None, reserve: int,
                 refinable: bool = True, droppable: bool = False) -> None:
        self.pipe = pipe
        self._closed = False
        pipe._check_open()
        if isinstance(image, EncodedImage) and m is not None and pipe.check_tokens(m) != image.m:
            raise TokensError(f"m={m} differs from the encoded image's m = {image.m}",
                              "pass m=None with an EncodedImage, or encode it again at that m")
        # A plain Lock (not RLock): a generation abandoned by its thread may be released by the GC.
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread holding the lock through an unfinished Generation
        self._active: Generation | None = None
        self.pending = _Pending()
        enc = image if isinstance(image, EncodedImage) else pipe.encode(image, pipe.resolve_m(m))
        m, self.features = enc.m, enc.features
        t3 = time.perf_counter()
        visual_room = pipe.max_tokens if refinable else m
        self.n_ctx = min(pipe.context_length, len(pipe.prefix_ids) + visual_room + reserve)
        sched = pipe.scheduler
        self.seq = sched.open(droppable)  # shares the prompt head's cells: not recomputed
        head = [] if sched.head_len else [("ids", pipe.prefix_ids)]
        try:
            sched.submit(self.seq, self.seq.n_past, head + [("emb", enc.visual)]).wait_prefill()
        except BaseException:
            self.seq.close()
            raise
        t4 = time.perf_counter()
        self.m, self.n_prefix = m, self.seq.n_past
        self.pending = _Pending(*enc.seconds, t4 - t3, m + (len(pipe.prefix_ids) if head else 0))

    def generate(self, question: str, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0) -> Generation:
        return Generation(self, question, max_new_tokens, temperature, top_p, seed)

    def generate_ids(self, ids: list[int], keep: int | None = None, max_new_tokens: int = 128,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> Generation:
        """Generate after the KV cache's first `keep` positions (default: the image prefix) and the
        prompt `ids` (token ids). Multi-turn front ends keep earlier turns in the cache this way and
        prefill only the new turn's ids."""
        n_vocab = self.pipe.llm.n_vocab
        ids = [int(i) for i in ids]
        if not ids or any(not 0 <= i < n_vocab for i in ids):  # llama.cpp aborts on an unknown id
            raise InputError("generate_ids needs a non-empty list of token ids", f"use ids in 0..{n_vocab - 1}")
        keep = self.n_prefix if keep is None else int(keep)
        if not self.n_prefix <= keep <= self.n_past:
            raise InputError(f"keep={keep} is outside the cached {self.n_prefix}..{self.n_past}",
                             "keep at least the image prefix and at most what the cache holds")
        return Generation(self, None, max_new_tokens, temperature, top_p, seed, ids=ids, keep=keep)

    def stream(self, question: str, **kw) -> Iterator[str]:
        yield from self.generate(question, **kw)

    def ask(self, question: str, **kw) -> Answer:
        g = self.generate(question, **kw)
        for _ in g:
            pass
        return g.answer

    def refine(self, m: int) -> None:
        """Grow the visual prefix from self.m to `m` by computing only the new queries."""
        self._check_open()
        m1 = self.pipe.check_tokens(m)
        if self._owner == threading.get_ident():
            raise InputError("this thread still has an unfinished answer on this session",
                             "read it to the end or call .cancel() on it before refining")
        with self._lock:
            if m1 <= self.m:
                raise TokensError(f"refine(m={m1}) does not grow m={self.m}",
                                  f"choose {self.m + 1}..{self.pipe.max_tokens}")
            t0 = time.perf_counter()
            with self.pipe._vision():
                new = self.pipe.vision.tokens(self.features, np.arange(self.m, m1))[0]
            t1 = time.perf_counter()
            # drop the last question and answer, then append the new visual tokens
            self.pipe.scheduler.submit(self.seq, self.n_prefix, [("emb", new)]).wait_prefill()
            t2 = time.perf_counter()
            self.pending.mqt += t1 - t0
            self.pending.prefill += t2 - t1
            self.pending.prefilled += m1 - self.m
            self.m, self.n_prefix = m1, self.seq.n_past

    def fork(self, keep: int, droppable: bool = False) -> Session:
        """A second session about the same image holding this one's first `keep` positions (the image
        prefix and the turns before `keep`): the scheduler shares their cells, so nothing is encoded or
        prefilled again, and this session keeps all of its own."""
        if self._owner == threading.get_ident():
            raise InputError("this thread still has an unfinished answer on this session",
                             "read it to the end or call .cancel() on it before forking")
        with self._lock:
            self._check_open()
            if not self.n_prefix <= keep <= self.n_past:
                raise InputError(f"keep={keep} is outside the cached {self.n_prefix}..{self.n_past}",
                                 "fork at least the image prefix and at most what the cache holds")
            t0 = time.perf_counter()
            seq = self.pipe.scheduler.fork(self.seq, keep, droppable)
        child = copy.copy(self)  # the same image, m and features; its own lock and sequence
        child._lock, child._owner, child._active, child._closed = threading.Lock(), None, None, False
        child.seq, child.pending = seq, _Pending(prefill=time.perf_counter() - t0)
        return child

    @property
    def n_past(self) -> int:
        """Positions the session's sequence holds (prompt head, visual tokens, turns)."""
        return self.seq.n_past

    def cut(self, keep: int, ids: list[int] = ()) -> None:
        """Keep the first `keep` positions and append `ids` without logits (a conversation settling
        its cache to the text it returned)."""
        with self._lock:
            self._check_open()
            self.pipe.scheduler.submit(self.seq, keep, [("ids", list(ids))]).wait_prefill()

    @property
    def busy(self) -> bool:
        """True while an answer (possibly an unread Generation) holds this session."""
        return self._lock.locked()

    @property
    def closed(self) -> bool:
        return self._closed or self.pipe._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this session is closed", "start a new one with pipe.look(image)")
        self.pipe._check_open("this session's pipeline is closed")

    def close(self) -> None:
        """Free the KV cache. Safe from any thread: an answer in flight elsewhere ends with ClosedError."""
        self._closed = True
        if self._active is not None and self._owner == threading.get_ident():
            self._active.cancel()  # an unread answer of this thread must not block closing
        seq = getattr(self, "seq", None)  # absent when __init__ failed
        if seq is not None:
            seq.close()  # the scheduler frees its cells between steps, never waiting for the session lock

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


