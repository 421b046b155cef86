"""The device-side Python API: `Pipeline` runs a bundle without torch or transformers.

    with Pipeline.load("mqt-edge-bundle") as pipe:
        print(pipe.ask("frame.jpg", "What is on the table?", tokens=16).answer)
        session = pipe.look(frame, tokens=16)         # image encoded once, prefix kept in the KV cache
        session.ask("Is the door open?")              # prefills only the question
        session.refine(tokens=64)                     # adds queries 16..63 only: exact, see below
        session.ask("Is the door open?")

Request order in llama.cpp: the prompt tokens before `<image>` (with BOS), the m visual tokens as
embeddings, the question tokens, then generation. Refinement is exact because the MQT's tokens are
nested (the tokens for m0 are the first m0 of those for m1) and the LLM is causal, so the KV cache of
a prompt with m0 visual tokens is the prefix of the one with m1: drop the question from the cache,
append the visual tokens m0..m1-1 and the question again.

Thread safety: each Session owns its llama.cpp context (its own KV cache) and a lock, so calls on
one session serialise and sessions never share state; vision calls are serialised by the pipeline.

Closing: `pipe.close()` and `session.close()` may be called from any thread at any time. A call on a
closed object raises `ClosedError` naming it; a call in flight on another thread either finishes or
fails with `ClosedError` at its next llama.cpp step; native memory is freed only once no call uses
it (runtimes/llama.py). A session used after its `with Pipeline.load(...)` block raises the same.

Reading rule: a `Generation` (and `stream()`) is read once. An unread Generation holds its session's
lock until it is read to the end, cancelled, or garbage-collected: another thread's `ask` on the same
session waits for it (`session.busy` says so); the same thread gets an InputError instead of a hang.
"""

from __future__ import annotations

import codecs
import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np

from .bundle import DEFAULT_BUNDLE, Bundle
from .errors import ClosedError, InputError, TokensError
from .image import DEFAULT_MAX_PIXELS, ImageInput, ImageSpec, preprocess
from .prompt import PromptTemplate, check_question
from .runtimes import make_vision
from .runtimes.llama import LlamaModel

QUESTION_RESERVE = 512  # context a session keeps for question + answer, beyond its visual prefix


@dataclass
class Answer:
    answer: str
    token_ids: list[int]
    tokens: int  # the m used
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


def _is_int(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, np.integer))


def _is_real(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float, np.integer, np.floating)) and math.isfinite(x)


def _check_sampling(max_new_tokens, temperature, top_p, seed=0) -> None:
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens!r}", "ask for at least one new token (an integer)")
    if not (_is_real(temperature) and temperature >= 0) or not (_is_real(top_p) and 0 < top_p <= 1):
        raise InputError(f"temperature={temperature!r} / top_p={top_p!r}",
                         "use a temperature >= 0 and a top_p in (0, 1] (numbers)")
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise InputError(f"seed={seed!r}", "use an integer seed in 0..2**63-1")


def check_threads(threads) -> int | None:
    """None (all cores) or 1..cores: more threads than cores only make llama.cpp and onnxruntime
    contend (measured: 512 threads turned a 1 s answer into 65 s)."""
    cores = os.cpu_count() or 1
    if threads is not None and (not _is_int(threads) or not 1 <= threads <= cores):
        raise InputError(f"threads={threads!r} is outside 1..{cores} (this machine's CPU cores)",
                         f"use 1..{cores}, or leave it unset for all cores")
    return threads


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 2)


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

    def __init__(self, session: Session, question: str, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int) -> None:
        session._check_open()
        _check_sampling(max_new_tokens, temperature, top_p, seed)
        self.session, self.pipe = session, session.pipe
        self.temperature, self.top_p = temperature, top_p
        self.rng = np.random.default_rng(seed)
        self.max_new_tokens = max_new_tokens
        ids = self.pipe._question_ids(question)
        need = session.n_prefix + len(ids) + max_new_tokens
        if need > session.ctx.n_ctx:
            raise InputError(
                f"prompt ({session.n_prefix - session.m} tokens) + m ({session.m}) + question ({len(ids)}) "
                f"+ max new tokens ({max_new_tokens}) = {need} exceed the context of {session.ctx.n_ctx}",
                "use fewer visual tokens, a shorter question or a smaller max_new_tokens",
            )
        self._lock = session._lock
        if session._owner == threading.get_ident():
            raise InputError("this thread still has an unfinished answer on this session",
                             "read it to the end or call .cancel() on it before asking again")
        self._lock.acquire()
        session._owner, session._active = threading.get_ident(), self
        try:
            pending, session.pending = session.pending, _Pending()
            t0 = time.perf_counter()
            session.ctx.truncate(session.n_prefix)
            session.ctx.feed_tokens(ids)
            logits = session.ctx.logits()
            self.first = self._pick(logits)
            shifted = logits - logits.max()
            self.first_token_prob = float(np.exp(shifted[self.first]) / np.exp(shifted).sum())
            t1 = time.perf_counter()
        except BaseException:
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
        self._started = False

    def _pick(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = (logits - logits.max()) / self.temperature
        p = np.exp(z)
        p /= p.sum()
        if self.top_p < 1:
            order = np.argsort(-p)
            keep = np.cumsum(p[order]) - p[order] < self.top_p
            mask = np.zeros_like(p)
            mask[order[keep]] = p[order[keep]]
            p = mask / mask.sum()
        return int(self.rng.choice(len(p), p=p))

    def __iter__(self) -> Iterator[str]:
        self.session._check_open()  # closing a session cancels its unread answer: say why
        if self._started:
            raise InputError("this generation was already consumed", "start a new one with ask()/stream()")
        self._started = True
        llm, ctx = self.pipe.llm, self.session.ctx
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        t_decode = time.perf_counter()
        token, lead = self.first, True
        try:
            for step in range(self.max_new_tokens):
                if llm.is_eog(token):
                    break
                self.token_ids.append(token)
                piece = utf8.decode(llm.piece(token))
                if lead and piece:
                    piece, lead = piece.lstrip(" "), False
                if piece:
                    self.text += piece
                    yield piece
                if step + 1 < self.max_new_tokens:
                    ctx.feed_tokens([token])
                    token = self._pick(ctx.logits())
            tail = utf8.decode(b"", final=True)
            if tail:
                self.text += tail
                yield tail
        finally:
            decode = time.perf_counter() - t_decode
            self._finish(decode)
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
            self._finish(0.0)
            self._release()

    def _finish(self, decode: float) -> None:
        n = len(self.token_ids)
        t = {k: _ms(v) for k, v in self.timings.items()} | {"decode": _ms(decode)}
        t["total"] = round(t["ttft"] + t["decode"], 2)
        self.answer = Answer(
            answer=self.text.strip(), token_ids=list(self.token_ids), tokens=self.session.m,
            backends=self.pipe.backends, timings_ms=t,
            decode_tokens_per_s=round((n - 1) / decode, 2) if n > 1 and decode > 0 else None,
            first_token_prob=round(self.first_token_prob, 6), prefilled=self.prefilled,
        )


class Session:
    """An image encoded once, its prompt prefix kept in a llama.cpp KV cache of its own."""

    def __init__(self, pipe: Pipeline, image: ImageInput, tokens: int | None, reserve: int,
                 refinable: bool = True) -> None:
        self.pipe = pipe
        self._closed = False
        pipe._check_open()
        m = pipe._check_tokens(tokens)
        # A plain Lock (not RLock): a generation abandoned by its thread may be released by the GC.
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread holding the lock through an unfinished Generation
        self._active: Generation | None = None
        self.pending = _Pending()
        t0 = time.perf_counter()
        pixels = preprocess(image, pipe.image_spec, pipe.max_pixels)
        t1 = time.perf_counter()
        with pipe._vision():
            self.features = pipe.vision.features(pixels)
            t2 = time.perf_counter()
            visual = pipe.vision.tokens(self.features, np.arange(m))[0]
            if pipe.sequential:  # free the vision graph before the LLM allocates its context
                pipe.vision.free_vision()
        t3 = time.perf_counter()
        visual_room = pipe.max_tokens if refinable else m
        n_ctx = min(pipe.context_length, len(pipe.prefix_ids) + visual_room + reserve)
        # An f32 bundle promises the reference's numbers: f32 K/V and no f16 flash-attention path
        # (measured: logits within 4e-7 of PyTorch instead of 5e-3 at m = 256).
        self.ctx = pipe.llm.context(n_ctx, threads=pipe.threads, kv_f32=pipe.bundle.manifest["llm"]["quant"] == "f32")
        self.ctx.feed_tokens(pipe.prefix_ids, logits=False)
        self.ctx.feed_embeddings(visual)
        t4 = time.perf_counter()
        self.m, self.n_prefix = m, self.ctx.n_past
        self.pending = _Pending(t1 - t0, t2 - t1, t3 - t2, t4 - t3, len(pipe.prefix_ids) + m)

    def generate(self, question: str, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0) -> Generation:
        return Generation(self, question, max_new_tokens, temperature, top_p, seed)

    def stream(self, question: str, **kw) -> Iterator[str]:
        yield from self.generate(question, **kw)

    def ask(self, question: str, **kw) -> Answer:
        g = self.generate(question, **kw)
        for _ in g:
            pass
        return g.answer

    def refine(self, tokens: int) -> None:
        """Grow the visual prefix from m to `tokens` by computing only the new queries."""
        self._check_open()
        m1 = self.pipe._check_tokens(tokens)
        if self._owner == threading.get_ident():
            raise InputError("this thread still has an unfinished answer on this session",
                             "read it to the end or call .cancel() on it before refining")
        with self._lock:
            if m1 <= self.m:
                raise TokensError(f"refine(tokens={m1}) does not add tokens to m={self.m}",
                                  f"choose {self.m + 1}..{self.pipe.max_tokens}")
            t0 = time.perf_counter()
            with self.pipe._vision():
                new = self.pipe.vision.tokens(self.features, np.arange(self.m, m1))[0]
            t1 = time.perf_counter()
            self.ctx.truncate(self.n_prefix)  # drop the last question and answer
            self.ctx.feed_embeddings(new)
            t2 = time.perf_counter()
            self.pending.mqt += t1 - t0
            self.pending.prefill += t2 - t1
            self.pending.prefilled += m1 - self.m
            self.m, self.n_prefix = m1, self.ctx.n_past

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
        ctx = getattr(self, "ctx", None)  # absent when __init__ failed
        if ctx is not None:
            ctx.close()  # waits for a llama.cpp call in flight, never for the session lock

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Pipeline:
    bundle: Bundle
    vision: object
    llm: LlamaModel
    image_spec: ImageSpec
    template: PromptTemplate
    threads: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    profile: str | None = None
    sequential: bool = False  # free the vision graph after each encoding (memory-tight devices)
    prefix_ids: list[int] = field(default_factory=list)  # BOS + the prompt before <image>
    _vision_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def load(cls, bundle: str | os.PathLike = DEFAULT_BUNDLE, profile: str | None = None,
             vision_backend: str | None = None, n_gpu_layers: int = 0, threads: int | None = None,
             max_pixels: int = DEFAULT_MAX_PIXELS, verify: bool = True, sequential: bool = False) -> Pipeline:
        """Open a bundle (checking every sha256 unless verify=False) and start its backends."""
        check_threads(threads)
        if not _is_int(n_gpu_layers) or n_gpu_layers < 0:
            raise InputError(f"n_gpu_layers={n_gpu_layers!r}", "use an integer >= 0")
        if not _is_int(max_pixels) or max_pixels < 1:
            raise InputError(f"max_pixels={max_pixels!r}", "use a positive integer")
        b = Bundle.open(bundle, verify=verify)
        vision = make_vision(b, vision_backend, threads).activate()
        llm = LlamaModel(b.path("llm"), n_gpu_layers)
        fields = PromptTemplate.__dataclass_fields__
        template = PromptTemplate(**{k: v for k, v in b.manifest["prompt"].items() if k in fields})
        pipe = cls(b, vision, llm, ImageSpec.from_dict(b.manifest["preprocess"]), template, threads,
                   max_pixels, profile, sequential)
        before, _ = pipe.template.split("?")
        pipe.prefix_ids = llm.tokenize(before, add_bos=True)
        return pipe

    @property
    def max_tokens(self) -> int:
        return self.bundle.max_tokens

    @property
    def context_length(self) -> int:
        return int(self.bundle.manifest["llm"]["context_length"])

    @property
    def backends(self) -> dict:
        gpu = self.llm.gpu_layers
        return {"vision": self.vision.name, "mqt": self.vision.name,
                "llm": f"llama.cpp/{'gpu:' + str(gpu) + ' layers' if gpu else 'cpu'}"}

    def _check_tokens(self, tokens: int | None) -> int:
        m = self.max_tokens if tokens is None else tokens
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise TokensError(f"tokens={m!r} is out of range", f"choose an integer in 1..{self.max_tokens}")
        if m > self.max_tokens:
            raise TokensError(f"tokens={m} is above the bundle's maximum of {self.max_tokens}",
                              f"choose 1..{self.max_tokens}, or re-export with --max-tokens {m}")
        return int(m)

    def _check_open(self, what: str = "the pipeline is closed") -> None:
        if self._closed:
            raise ClosedError(what, "use it inside its `with Pipeline.load(...)` block, or load the bundle again")

    @contextmanager
    def _vision(self) -> Iterator[None]:
        """The vision lock, on an open pipeline (close() deactivates the runner under this lock)."""
        with self._vision_lock:
            self._check_open()
            yield

    def _question_ids(self, question: str) -> list[int]:
        self._check_open()
        _, after = self.template.split(check_question(question))
        return self.llm.tokenize(after, add_bos=False)

    def look(self, image: ImageInput, tokens: int | None = None, reserve: int = QUESTION_RESERVE,
             refinable: bool = True) -> Session:
        """Encode an image once; its session answers many questions and can refine.

        reserve: context kept for each question + answer beyond the visual prefix.
        refinable: keep room for the bundle's largest m (else exactly m)."""
        return Session(self, image, tokens, reserve, refinable)

    def stream(self, image: ImageInput, question: str, tokens: int | None = None, **kw) -> Iterator[str]:
        check_question(question)
        with Session(self, image, tokens, self._reserve(question, kw), refinable=False) as s:
            yield from s.stream(question, **kw)

    def ask(self, image: ImageInput, question: str, tokens: int | None = None, **kw) -> Answer:
        check_question(question)
        with Session(self, image, tokens, self._reserve(question, kw), refinable=False) as s:
            return s.ask(question, **kw)

    def _reserve(self, question: str, kw: dict) -> int:
        # A one-shot request sizes its context to exactly what it needs.
        _check_sampling(kw.get("max_new_tokens", 128), kw.get("temperature", 0.0), kw.get("top_p", 1.0),
                        kw.get("seed", 0))
        return len(self._question_ids(question)) + kw.get("max_new_tokens", 128)

    def close(self) -> None:
        """Free the backends. Calls in flight on other threads finish or raise ClosedError; later
        calls on this pipeline or its sessions raise ClosedError."""
        self._closed = True
        with self._vision_lock:
            self.vision.deactivate()
        self.llm.close()  # waits for llama.cpp calls in flight, then closes every session's context

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
