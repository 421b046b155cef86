"""The device-side Python API: `Pipeline` runs a bundle without torch or transformers.

    with Pipeline.load("mqt-edge-bundle") as pipe:
        print(pipe.ask("examples/shapes.png", "What color is the circle?", m=16).answer)
        session = pipe.look("examples/shapes.png", m=16)  # image encoded once, prefix kept in the KV cache
        session.ask("How many shapes are there?")           # prefills only the question
        session.refine(m=64)                                 # adds queries 16..63 only: exact

Every call reaches llama.cpp through the pipeline's scheduler (mqt_edge/scheduler.py): one context,
`parallel` requests decoded in one batch per step. Sessions and Generations live in session.py,
conversations (turns, the template's continuation) in conversation.py, argument checks in checks.py.

`m=None` means one thing everywhere: the planner chooses (`choose_tokens`), for this device and the
request's limits. Pass m to fix it.

Closing: `pipe.close()` and `session.close()` may be called from any thread at any time. A call on a
closed object raises `ClosedError` naming it; native memory is freed only once no call uses it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator

import numpy as np

from .bundle import DEFAULT_BUNDLE, Bundle
from .checks import (ALWAYS_REFINE, DEFAULT_CONFIDENCE, SAMPLING, _is_int, check_confidence,  # noqa: F401
                     check_limit, check_refine, check_sampling, check_threads, sampling)
from .errors import ClosedError, InputError, TokensError
from .image import DEFAULT_MAX_PIXELS, ImageInput, ImageSpec, preprocess
from .prompt import PromptTemplate, check_question
from .cores import CoreShare
from .runtimes import backend_info, make_vision
from .costs import MAX_SEQUENCES, CachePlan, default_cache_budget, plan_cache, position_bytes
from .runtimes.llama import LlamaModel
from .scheduler import Scheduler
from .conversation import Conversation, ConversationCache
from .session import QUESTION_RESERVE, Answer, EncodedImage, Generation, Session  # noqa: F401



@dataclass(frozen=True)
class TokenChoice:
    """The m chosen for a request, the profile that chose it and the planner's prediction."""

    m: int
    profile: str | None = None  # "name (mode)" when a profile was consulted
    predicted: dict | None = None  # memory_mb, ttft_ms, total_ms, reason: when the planner chose m


class _Policy:
    """Which m, and one-shot requests (ask, stream, answer with refinement): every front end calls
    these, none re-implements them. Part of Pipeline (its bundle, profile and sessions)."""

    def device_profile(self):
        """The Profile the planner uses (loaded once): the one given at load, else `auto`."""
        if self._device_profile is None:
            from .profiles import load_profile

            self._device_profile = load_profile(self.profile or "auto", self.mode)
        return self._device_profile

    def choose_tokens(self, m: int | None = None, max_new_tokens: int = 128, ttft_ms: float | None = None,
                      memory_mb: float | None = None, profile: str | None = None,
                      question: str | None = None) -> TokenChoice:
        """m for one request: `m` when given, else the planner's choice for this device
        (`profile` overrides the pipeline's for this call; `question`, when known, is prefilled at its
        own length instead of a typical one)."""
        check_limit("ttft_ms", ttft_ms)
        check_limit("memory_mb", memory_mb)
        check_sampling(max_new_tokens, 0.0, 1.0)
        if m is not None and profile is None and self.profile is None and self._device_profile is None:
            return TokenChoice(self.check_tokens(m))
        from .profiles.planner import PlanError, plan

        prof, name = self._profile(profile)
        if m is not None:
            return TokenChoice(self.check_tokens(m), name)
        facts, options = self._run_facts()
        options = replace(options, parallel=self.parallel,  # the context is sized for `parallel`
                          **self._question_tokens(question))
        result = plan(prof, facts, ttft_ms, memory_mb, max_new_tokens, options)
        if result.chosen_m is None:
            tip = result.suggestions[0]
            raise PlanError(f"{result.reason} on {name}",
                            f"would fit: {tip['change']} (m = {tip['m']}); or pass m (--tokens)")
        c = next(c for c in result.candidates if c.m == result.chosen_m)
        predicted = {"memory_mb": c.memory_mb, "ttft_ms": c.ttft_ms, "total_ms": c.total_ms, "reason": result.reason}
        return TokenChoice(result.chosen_m, name, predicted)

    def _profile(self, profile: str | None) -> tuple:
        """(the profile to plan on, its name as answers show it)."""
        from .profiles import load_profile

        prof = self.device_profile() if profile is None else load_profile(profile, self.mode)
        return prof, prof.name + (f" ({prof.mode})" if prof.mode else "")

    def _run_facts(self) -> tuple:
        """(the bundle's facts, this pipeline's run options) for the planner."""
        from .profiles.planner import ModelFacts, Options

        facts = ModelFacts.from_bundle(self.bundle)
        return facts, Options.for_run(self.vision_backend, self.n_gpu_layers, self.sequential, facts,
                                      self.vision_precision)

    def choose_stream_tokens(self, streams: int, rate_hz: float, answer_tokens: int = 32,
                             profile: str | None = None, question: str | None = None) -> TokenChoice:
        """m for `streams` streams sharing this pipeline, each answered `rate_hz` times a second: the
        planner's `plan_streams` on this device (`profile` overrides the pipeline's; `question` as in
        `choose_tokens`). One m for all streams; `predicted` holds the plan's per-stream rate, cycle and
        memory."""
        from .profiles.planner import PlanError, plan_streams

        (prof, name), (facts, options) = self._profile(profile), self._run_facts()
        options = replace(options, **self._question_tokens(question))
        result = plan_streams(prof, facts, streams, rate_hz, None, answer_tokens, options)
        if result.chosen_m is None:
            raise PlanError(f"{result.reason} on {name}",
                            "ask for a lower rate, fewer streams, or pass m (--tokens)")
        c = next(c for c in result.candidates if c.m == result.chosen_m)
        chosen = self.check_tokens(c.m)  # the candidates never pass the bundle's max_tokens
        predicted = {"streams": streams, "rate_hz": c.rate_hz, "cycle_ms": c.cycle_ms, "memory_mb": c.memory_mb,
                     "target_rate_hz": rate_hz, "answer_tokens": answer_tokens, "reason": result.reason}
        return TokenChoice(chosen, name, predicted)

    def _question_tokens(self, question: str | None) -> dict:
        """The planner's `question_tokens` for a known question (a checked one), else nothing."""
        return {} if question is None else {"question_tokens": len(self.question_ids(question))}

    def resolve_m(self, m: int | None, max_new_tokens: int = 128) -> int:
        """m as given (checked), or the planner's choice when None: the one meaning of m=None."""
        return self.check_tokens(m) if m is not None else self.choose_tokens(None, max_new_tokens).m

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
        check_refine(refine_to, m, self.max_tokens)
        choice = self.choose_tokens(m, gen["max_new_tokens"], ttft_ms, memory_mb, question=question)
        reserve = self.reserve_for(question, gen["max_new_tokens"])
        with self.look(image, m=choice.m, reserve=reserve, refinable=refine_to is not None) as session:
            result = session.answer(question, refine_to=refine_to, confidence=confidence, on_piece=on_piece, **gen)
        result.profile, result.predicted = choice.profile, choice.predicted
        return result

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


class _Caches:
    """The scheduler and its one byte budget (KV cells, parked conversations, encoded images), and
    encoding through the image cache. Part of Pipeline."""

    @property
    def position_bytes(self) -> int:
        """KV bytes of one position of this bundle's LLM (costs.position_bytes)."""
        llm = self.llm
        return position_bytes(llm.n_layer, llm.n_head_kv, llm.n_embd // llm.n_head, self.kv_f32)

    def conversation_positions(self, reserve: int = QUESTION_RESERVE) -> int:
        """Positions of one conversation at its longest: the prompt head, the largest m, `reserve`."""
        return min(self.context_length, len(self.prefix_ids) + self.max_tokens + reserve)

    def configure_cache(self, budget_bytes: int | None = None, reserve: int = QUESTION_RESERVE) -> CachePlan:
        """Size the scheduler's caches (before its first use): `budget_bytes` for the KV cells of the
        shared context and the host's parked conversations; None: room for four times `parallel`
        conversations of `reserve` positions each beyond the visual prefix, half of it on the host."""
        conv = self.conversation_positions(reserve)
        if budget_bytes is None:  # the context holds twice `parallel` conversations, the host as much again
            budget_bytes = default_cache_budget(self.position_bytes, len(self.prefix_ids), conv, self.parallel)
        plan = plan_cache(int(budget_bytes), self.position_bytes, conv, self.parallel, len(self.prefix_ids))
        with self._sched_lock:
            if self._scheduler is not None and plan != self._cache_plan:
                raise InputError("the cache is already in use with another size",
                                 "configure it right after Pipeline.load, before the first request")
            self._cache_plan = plan
            return plan

    @property
    def conversations(self) -> ConversationCache:
        """Idle conversations kept for front ends that receive whole histories (the server)."""
        return self.scheduler.conversations

    @property
    def scheduler(self) -> Scheduler:
        """The one llama.cpp context every request of this pipeline goes through (made on first use)."""
        if self._cache_plan is None and self._scheduler is None:
            self.configure_cache()  # the default budget (idempotent: the same plan twice)
        with self._sched_lock:
            self._check_open()
            if self._scheduler is None:
                plan = self._cache_plan
                self._scheduler = Scheduler(self.llm, n_ctx=plan.n_ctx, n_seq=plan.n_seq, head_ids=self.prefix_ids,
                                            position_bytes=plan.position_bytes, host_bytes=plan.host_bytes,
                                            threads=self.threads, kv_f32=self.kv_f32, head_cache=self.head_cache,
                                            cores=self.cores)
            return self._scheduler

    def encode(self, image: ImageInput, m: int | None = None, runner: object | None = None) -> EncodedImage:
        """Vision and MQT only (what look() does before the LLM); look() or a Session takes the result.
        Encoded images are cached by content: the same image again costs its preprocessing only, and a
        cached larger m covers a smaller one (the tokens are nested).

        runner: another activated vision runner of this bundle (one with its own thread budget), used
        without the pipeline's vision lock by the one thread that owns it."""
        m = self.resolve_m(m)
        t0 = time.perf_counter()
        pixels = preprocess(image, self.image_spec, self.max_pixels)
        t1 = time.perf_counter()
        images = self.scheduler.images
        key = images.key(pixels)
        features, visual = images.get(key)
        if visual is not None and len(visual) >= m:
            return EncodedImage(features, visual[:m], (t1 - t0, 0.0, 0.0))
        vision = runner or self.vision
        with self._vision() if runner is None else contextlib.nullcontext(), self.cores.vision(getattr(vision, "threads", None)):
            if features is None:
                features = vision.features(pixels)
            t2 = time.perf_counter()
            have = 0 if visual is None else len(visual)
            new = vision.tokens(features, np.arange(have, m))[0]  # only the queries not cached yet
            visual = new if visual is None else np.concatenate([visual, new])
            if self.sequential and runner is None:  # free the vision graph before the LLM allocates its context
                self.vision.free_vision()
        images.put(key, features, visual)
        return EncodedImage(features, visual, (t1 - t0, t2 - t1, time.perf_counter() - t2))


@dataclass
class Pipeline(_Policy, _Caches):
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
    head_cache: bool = True  # share the prompt head's KV cells (False: prefill it on every request)
    parallel: int = 1  # requests decoded together in one batch
    _vision_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _sched_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _scheduler: object = field(default=None, repr=False)
    _cache_plan: object = field(default=None, repr=False)
    _device_profile: object = field(default=None, repr=False)  # the loaded Profile, once asked for
    cores: CoreShare = field(default_factory=lambda: CoreShare(None), repr=False)
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def load(cls, bundle: str | os.PathLike = DEFAULT_BUNDLE, profile=None,
             vision_backend: str | None = None, n_gpu_layers: int = 0, threads: int | None = None,
             max_pixels: int = DEFAULT_MAX_PIXELS, verify: bool = True, sequential: bool = False,
             mode: str | None = None, head_cache: bool = True, vision_precision: str | None = None,
             parallel: int = 1) -> Pipeline:
        """Open a bundle (checking every sha256 unless verify=False) and start its backends.

        profile: a device profile (name, alias, .toml path or a loaded Profile) for the planner;
        None plans with `auto` whenever a request leaves m to the planner.
        vision_precision: auto (int8 on the CPU when the bundle has it) | fp32 | int8.
        parallel: requests answered at once; their tokens share each llama.cpp decode step."""
        check_threads(threads)
        if not _is_int(parallel) or not 1 <= parallel <= MAX_SEQUENCES - 2:
            raise InputError(f"parallel={parallel!r}", f"use an integer in 1..{MAX_SEQUENCES - 2}")
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
                   vision_precision=vision_precision or "auto", parallel=int(parallel))
        if profile is not None and not isinstance(profile, str):
            pipe._device_profile = profile
        if backend_info(vision.backend).on_gpu is False and not llm.gpu_layers:  # both on the CPU
            pipe.cores = CoreShare(threads or os.cpu_count() or 1)
        before, _ = pipe.template.split("?")
        pipe.prefix_ids = llm.tokenize(before, add_bos=True)
        return pipe

    @property
    def kv_f32(self) -> bool:
        # An f32 bundle promises the reference's numbers: f32 K/V and no f16 flash-attention path
        # (measured: logits within 4e-7 of PyTorch instead of 5e-3 at m = 256).
        return self.bundle.manifest.llm.quant == "f32"

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
    def look(self, image: ImageInput | EncodedImage, m: int | None = None, reserve: int = QUESTION_RESERVE,
             refinable: bool = True, droppable: bool = False) -> Session:
        """Encode an image once; its session answers many questions and can refine.

        m: visual tokens; None: the planner's choice (an EncodedImage keeps its own m).
        reserve: context kept for each question + answer beyond the visual prefix.
        refinable: keep room for the bundle's largest m (else exactly m).
        droppable: a cache holds the session and lets the scheduler drop it when memory is short."""
        return Session(self, image, m, reserve, refinable, droppable)

    def conversation(self, image: ImageInput | EncodedImage, m: int | None = None,
                     reserve: int = QUESTION_RESERVE) -> Conversation:
        """A multi-turn conversation about one image: each turn prefills only itself."""
        return Conversation(self.look(image, m=m, reserve=reserve, refinable=True))

    def close(self) -> None:
        """Free the backends. Calls in flight on other threads finish or raise ClosedError; later
        calls on this pipeline or its sessions raise ClosedError."""
        self._closed = True
        with self._vision_lock:
            self.vision.deactivate()
        with self._sched_lock:
            scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.conversations.clear()
            scheduler.close()  # fails what waits, lets the step in flight end, frees the context
        self.llm.close()  # waits for llama.cpp calls in flight, then closes every session's context

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
