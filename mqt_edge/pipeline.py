"""The device-side Python API: `Pipeline` runs a bundle without torch or transformers.

    with Pipeline.load("mqt-edge-bundle") as pipe:
        print(pipe.ask("frame.jpg", "What is on the table?", m=16).answer)
        session = pipe.look(frame, m=16)              # image encoded once, prefix kept in the KV cache
        session.ask("Is the door open?")              # prefills only the question
        session.refine(m=64)                          # adds queries 16..63 only: exact, see below
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
import contextlib
import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np

from .bundle import DEFAULT_BUNDLE, Bundle
from .errors import ClosedError, InputError, TokensError
from .image import DEFAULT_MAX_PIXELS, ImageInput, ImageSpec, preprocess
from .prompt import PromptTemplate, check_question
from .runtimes import make_vision
from .runtimes.llama import LlamaModel
from .sampling import pick

QUESTION_RESERVE = 512  # context a session keeps for question + answer, beyond its visual prefix


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


def _is_int(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, np.integer))


def _is_real(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float, np.integer, np.floating)) and math.isfinite(x)


SAMPLING = {"max_new_tokens": 128, "temperature": 0.0, "top_p": 1.0, "seed": 0}  # generate()'s defaults
DEFAULT_CONFIDENCE = 0.5
ALWAYS_REFINE = 1.01  # above any probability: the largest confidence, "always refine"


def check_sampling(max_new_tokens, temperature, top_p, seed=0) -> None:
    """The sampling arguments of every generation, or a one-line InputError."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens!r}", "ask for at least one new token (an integer)")
    if not (_is_real(temperature) and temperature >= 0) or not (_is_real(top_p) and 0 < top_p <= 1):
        raise InputError(f"temperature={temperature!r} / top_p={top_p!r}",
                         "use a temperature >= 0 and a top_p in (0, 1] (numbers)")
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise InputError(f"seed={seed!r}", "use an integer seed in 0..2**63-1")


def sampling(kw: dict) -> dict:
    """The keyword arguments a one-shot call passes on to generate(), checked and with the defaults
    filled in, before any work: an old `tokens=` or a typo is one line, not a TypeError after encoding."""
    if "tokens" in kw:
        raise InputError("tokens= is now m= (the visual-token count)", f"pass m={kw['tokens']!r}")
    unknown = sorted(set(kw) - set(SAMPLING))
    if unknown:
        raise InputError(f"unknown argument {unknown[0]}=", f"use m=, refine_to=, confidence= or {', '.join(SAMPLING)}")
    kw = SAMPLING | kw
    check_sampling(**kw)
    return kw


def _shown(name: str, value) -> str:
    # The CLI names its flags (--confidence -1), the API its arguments (confidence=-1).
    return f"{name} {value}" if name.startswith("--") else f"{name}={value!r}"


def check_confidence(confidence, name: str = "confidence") -> float:
    """A first-token probability threshold in 0..1.01 (1.01: always refine), or a one-line InputError."""
    if not _is_real(confidence):
        raise InputError(f"{_shown(name, confidence)} is not a number", "use a probability in 0..1 (1.01: always)")
    if not 0 <= confidence <= ALWAYS_REFINE:
        raise InputError(f"{_shown(name, confidence)} is not a probability", "use 0..1 (1.01: always refine)")
    return float(confidence)


def check_limit(name: str, value) -> float | None:
    """A planner limit (ttft_ms, memory_mb): None or a finite number > 0, or a one-line InputError."""
    if value is not None and not (_is_real(value) and value > 0):
        example = f"{name} 2000" if name.startswith("--") else f"{name}=2000"
        raise InputError(f"{_shown(name, value)} is not a positive number", f"e.g. {example}")
    return value


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


@dataclass(frozen=True)
class TokenChoice:
    """The m chosen for a request, the profile that chose it and the planner's prediction."""

    m: int
    profile: str | None = None  # "name (mode)" when a profile was consulted
    predicted: dict | None = None  # memory_mb, ttft_ms, total_ms, reason: when the planner chose m


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
        self.temperature, self.top_p = temperature, top_p
        self.rng = np.random.default_rng(seed)
        self.max_new_tokens = max_new_tokens
        # ids/keep (Session.generate_ids): a prompt given as token ids after the first `keep` positions.
        start = session.n_prefix if keep is None else keep
        ids = self.pipe.question_ids(question) if ids is None else ids
        need = start + len(ids) + max_new_tokens
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
            session.ctx.truncate(start)
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
        self.refined_from: dict | None = None  # set by Session.refine_step on the regenerated answer
        self._started = False

    def _pick(self, logits: np.ndarray) -> int:
        return pick(logits, self.temperature, self.top_p, self.rng)  # never NaN, for any accepted value

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
            answer=self.text.strip(), token_ids=list(self.token_ids), m=self.session.m,
            backends=self.pipe.backends, timings_ms=t,
            decode_tokens_per_s=round((n - 1) / decode, 2) if n > 1 and decode > 0 else None,
            first_token_prob=round(self.first_token_prob, 6), prefilled=self.prefilled,
            refined_from=self.refined_from,
        )


class Session:
    """An image encoded once, its prompt prefix kept in a llama.cpp KV cache of its own."""

    def __init__(self, pipe: Pipeline, image: ImageInput | EncodedImage, m: int | None, reserve: int,
                 refinable: bool = True, threads: int | None = None) -> None:
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
        enc = image if isinstance(image, EncodedImage) else pipe.encode(image, m)
        m, self.features = enc.m, enc.features
        t3 = time.perf_counter()
        visual_room = pipe.max_tokens if refinable else m
        n_ctx = min(pipe.context_length, len(pipe.prefix_ids) + visual_room + reserve)
        self.ctx = pipe.llm.context(n_ctx, threads=threads or pipe.threads, kv_f32=pipe.kv_f32)
        head = pipe.prompt_head()
        if head is None:
            self.ctx.feed_tokens(pipe.prefix_ids, logits=False)
        else:  # the prompt before <image> never changes: its KV is copied in, not recomputed
            self.ctx.restore_sequence(head)
        self.ctx.feed_embeddings(enc.visual)
        t4 = time.perf_counter()
        self.m, self.n_prefix = m, self.ctx.n_past
        self.pending = _Pending(*enc.seconds, t4 - t3, m + (len(pipe.prefix_ids) if head is None else 0))

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
        if not self.n_prefix <= keep <= self.ctx.n_past:
            raise InputError(f"keep={keep} is outside the cached {self.n_prefix}..{self.ctx.n_past}",
                             "keep at least the image prefix and at most what the cache holds")
        return Generation(self, None, max_new_tokens, temperature, top_p, seed, ids=ids, keep=keep)

    def stream(self, question: str, **kw) -> Iterator[str]:
        yield from self.generate(question, **kw)

    def ask(self, question: str, **kw) -> Answer:
        g = self.generate(question, **kw)
        for _ in g:
            pass
        return g.answer

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
    vision_backend: str = "auto"  # as asked at load: the planner's view of where vision runs
    n_gpu_layers: int = 0
    mode: str | None = None  # the profile's power mode, e.g. super
    vision_precision: str = "auto"
    head_cache: bool = True  # reuse the prompt head's KV (False: prefill it on every request)
    _vision_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _head_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _head: object = field(default=None, repr=False)
    _device_profile: object = field(default=None, repr=False)  # the loaded Profile, once asked for
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def load(cls, bundle: str | os.PathLike = DEFAULT_BUNDLE, profile=None,
             vision_backend: str | None = None, n_gpu_layers: int = 0, threads: int | None = None,
             max_pixels: int = DEFAULT_MAX_PIXELS, verify: bool = True, sequential: bool = False,
             mode: str | None = None, head_cache: bool = True, vision_precision: str | None = None) -> Pipeline:
        """Open a bundle (checking every sha256 unless verify=False) and start its backends.

        profile: a device profile (name, alias, .toml path or a loaded Profile) for the planner;
        None plans with `auto` whenever a request leaves m to the planner.
        vision_precision: auto (int8 on the CPU when the bundle has it) | fp32 | int8."""
        check_threads(threads)
        if not _is_int(n_gpu_layers) or n_gpu_layers < 0:
            raise InputError(f"n_gpu_layers={n_gpu_layers!r}", "use an integer >= 0")
        if not _is_int(max_pixels) or max_pixels < 1:
            raise InputError(f"max_pixels={max_pixels!r}", "use a positive integer")
        b = Bundle.open(bundle, verify=verify)
        vision = make_vision(b, vision_backend, threads, vision_precision).activate()
        llm = LlamaModel(b.path("llm"), n_gpu_layers)
        template = PromptTemplate(**{k: getattr(b.manifest.prompt, k) for k in PromptTemplate.__dataclass_fields__})
        name = profile if profile is None or isinstance(profile, str) else profile.name
        pipe = cls(b, vision, llm, ImageSpec.from_dict(asdict(b.manifest.preprocess)), template, threads,
                   max_pixels, name, sequential, vision_backend=vision_backend or "auto",
                   n_gpu_layers=n_gpu_layers, mode=mode, head_cache=head_cache,
                   vision_precision=vision_precision or "auto")
        if profile is not None and not isinstance(profile, str):
            pipe._device_profile = profile
        before, _ = pipe.template.split("?")
        pipe.prefix_ids = llm.tokenize(before, add_bos=True)
        return pipe

    @property
    def kv_f32(self) -> bool:
        # An f32 bundle promises the reference's numbers: f32 K/V and no f16 flash-attention path
        # (measured: logits within 4e-7 of PyTorch instead of 5e-3 at m = 256).
        return self.bundle.manifest.llm.quant == "f32"

    def prompt_head(self):
        """The KV cache of BOS + the prompt before <image>, computed once per pipeline (None when
        head_cache is off). Every session restores it instead of prefilling those positions; the
        values are the ones a prefill computes, so answers are unchanged (tests/test_runtime.py)."""
        if not self.head_cache:
            return None
        with self._head_lock:
            if self._head is None:
                ctx = self.llm.context(len(self.prefix_ids) + 1, threads=self.threads, kv_f32=self.kv_f32)
                try:
                    ctx.feed_tokens(self.prefix_ids, logits=False)
                    self._head = ctx.save_sequence()
                finally:
                    ctx.close()
            return self._head

    @property
    def max_tokens(self) -> int:
        return self.bundle.max_tokens

    @property
    def context_length(self) -> int:
        return self.bundle.manifest.llm.context_length

    @property
    def backends(self) -> dict:
        gpu = self.llm.gpu_layers
        return {"vision": self.vision.name, "mqt": self.vision.mqt_name,
                "llm": f"llama.cpp/{'gpu:' + str(gpu) + ' layers' if gpu else 'cpu'}"}

    def check_tokens(self, m: int | None) -> int:
        """m as an int in 1..max_tokens (None: the bundle's largest), or a one-line TokensError."""
        m = self.max_tokens if m is None else m
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise TokensError(f"m={m!r} is out of range", f"choose an integer in 1..{self.max_tokens}")
        if m > self.max_tokens:
            raise TokensError(f"m={m} is above the bundle's maximum of {self.max_tokens}",
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

    def question_ids(self, question: str) -> list[int]:
        """The ids prefilled after the visual tokens: the question and the template's tail."""
        self._check_open()
        _, after = self.template.split(check_question(question))
        return self.llm.tokenize(after, add_bos=False)


    # -- policy: which m, when to refine (every front end calls these, none re-implements them) ----
    def device_profile(self):
        """The Profile the planner uses (loaded once): the one given at load, else `auto`."""
        if self._device_profile is None:
            from .profiles import load_profile

            self._device_profile = load_profile(self.profile or "auto", self.mode)
        return self._device_profile

    def choose_tokens(self, m: int | None = None, max_new_tokens: int = 128, ttft_ms: float | None = None,
                      memory_mb: float | None = None, profile: str | None = None) -> TokenChoice:
        """m for one request: `m` when given, else the planner's choice for this device
        (`profile` overrides the pipeline's for this call)."""
        check_limit("ttft_ms", ttft_ms)
        check_limit("memory_mb", memory_mb)
        check_sampling(max_new_tokens, 0.0, 1.0)
        if m is not None and profile is None and self.profile is None and self._device_profile is None:
            return TokenChoice(self.check_tokens(m))
        from .profiles import load_profile
        from .profiles.planner import ModelFacts, Options, PlanError, plan

        prof = self.device_profile() if profile is None else load_profile(profile, self.mode)
        name = prof.name + (f" ({prof.mode})" if prof.mode else "")
        if m is not None:
            return TokenChoice(self.check_tokens(m), name)
        facts = ModelFacts.from_bundle(self.bundle)
        options = Options.for_run(self.vision_backend, self.n_gpu_layers, self.sequential, facts, self.vision_precision)
        result = plan(prof, facts, ttft_ms, memory_mb, max_new_tokens, options)
        if result.chosen_m is None:
            tip = result.suggestions[0]
            raise PlanError(f"{result.reason} on {name}",
                            f"would fit: {tip['change']} (m = {tip['m']}); or pass m (--tokens)")
        c = next(c for c in result.candidates if c.m == result.chosen_m)
        predicted = {"memory_mb": c.memory_mb, "ttft_ms": c.ttft_ms, "total_ms": c.total_ms, "reason": result.reason}
        return TokenChoice(result.chosen_m, name, predicted)

    def answer(self, image: ImageInput, question: str, m: int | None = None, refine_to: int | None = None,
               confidence: float = DEFAULT_CONFIDENCE, ttft_ms: float | None = None,
               memory_mb: float | None = None, on_piece: Callable[[str], None] | None = None, **gen) -> Answer:
        """One request with the library's policy: m given or from the planner (within `ttft_ms` /
        `memory_mb`); with `refine_to`, `Session.answer`'s refinement, whose refined answer is the one
        a fresh request at m = `refine_to` gives. `on_piece(text)` receives the text as it is decoded.
        gen: max_new_tokens, temperature, top_p, seed."""
        gen = sampling(gen)
        confidence = check_confidence(confidence)
        check_question(question)
        if refine_to is not None:
            self.check_tokens(refine_to)
            if m is not None and refine_to <= m:
                raise InputError(f"refine_to={refine_to} is not above m={m}",
                                 f"refine to a larger m, e.g. refine_to={min(4 * m, self.max_tokens)}")
        choice = self.choose_tokens(m, gen["max_new_tokens"], ttft_ms, memory_mb)
        reserve = self.reserve_for(question, gen["max_new_tokens"])
        with self.look(image, m=choice.m, reserve=reserve, refinable=refine_to is not None) as session:
            result = session.answer(question, refine_to=refine_to, confidence=confidence, on_piece=on_piece, **gen)
        result.profile, result.predicted = choice.profile, choice.predicted
        return result

    def encode(self, image: ImageInput, m: int | None = None, runner: object | None = None) -> EncodedImage:
        """Vision and MQT only (what look() does before the LLM); look() or a Session takes the result.

        runner: another activated vision runner of this bundle (one with its own thread budget), used
        without the pipeline's vision lock by the one thread that owns it."""
        m = self.check_tokens(m)
        t0 = time.perf_counter()
        pixels = preprocess(image, self.image_spec, self.max_pixels)
        t1 = time.perf_counter()
        with self._vision() if runner is None else contextlib.nullcontext():
            vision = runner or self.vision
            features = vision.features(pixels)
            t2 = time.perf_counter()
            visual = vision.tokens(features, np.arange(m))[0]
            if self.sequential and runner is None:  # free the vision graph before the LLM allocates its context
                self.vision.free_vision()
        return EncodedImage(features, visual, (t1 - t0, t2 - t1, time.perf_counter() - t2))

    def look(self, image: ImageInput | EncodedImage, m: int | None = None, reserve: int = QUESTION_RESERVE,
             refinable: bool = True) -> Session:
        """Encode an image once; its session answers many questions and can refine.

        reserve: context kept for each question + answer beyond the visual prefix.
        refinable: keep room for the bundle's largest m (else exactly m)."""
        return Session(self, image, m, reserve, refinable)

    def stream(self, image: ImageInput, question: str, m: int | None = None, **kw) -> Iterator[str]:
        kw = sampling(kw)  # checked at the call, before the first piece is asked for
        check_question(question)
        return self._stream(image, question, m, kw)

    def _stream(self, image: ImageInput, question: str, m: int | None, kw: dict) -> Iterator[str]:
        with Session(self, image, m, self.reserve_for(question, kw["max_new_tokens"]), refinable=False) as s:
            yield from s.stream(question, **kw)

    def ask(self, image: ImageInput, question: str, m: int | None = None, **kw) -> Answer:
        kw = sampling(kw)
        check_question(question)
        with Session(self, image, m, self.reserve_for(question, kw["max_new_tokens"]), refinable=False) as s:
            return s.ask(question, **kw)

    def reserve_for(self, question: str, max_new_tokens: int = 128) -> int:
        """Context a one-shot session needs beyond its visual prefix: the question's ids (with the
        template's tail) and the answer. Front ends that open sessions themselves size them with it."""
        check_sampling(max_new_tokens, 0.0, 1.0)
        return len(self.question_ids(question)) + max_new_tokens

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
