"""The server's one adapter to the library: which m, when to refine, how big the session cache is,
and how a conversation's turns become token ids in a cached KV cache.

Everything the server decides about the model goes through here; the decisions themselves are the
library's: m from `Pipeline.choose_tokens`, refinement from `Session.refine_step`.

Multi-turn prompts follow the llava_v1 template as the release (and our training, `train.py`'s
`conversation_ids`) build them, piece by piece:

    <prefix ids> <m visual tokens> tok("\\n{q1} ASSISTANT:") tok(a1) </s> tok("USER: {q2} ASSISTANT:") ...

Each piece is tokenised on its own (SentencePiece dummy prefix), and `</s>` is the EOS id. A cached
entry's KV cache holds exactly these ids up to the end of its last answer (the EOS is fed with the
next turn), whether it was built turn by turn or from scratch: after generating, `settle` replaces
whatever generated ids differ from tok(answer) (a stop sequence cut, the unfed last token at the
length limit), so a continued conversation prefills only the new turn and answers as a fresh one would.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import InputError
from .cache import Entry, SessionCache
from .config import ServeConfig

SESSION_CAP = 64  # most cached sessions, whatever the budget (each is a llama.cpp context)


@dataclass(frozen=True)
class Startup:
    """What the planner decided when the server started."""

    m: int  # for requests without an `mqt` field
    profile: str
    reason: str
    n_ctx: int  # every session's context (positions)
    session_bytes: int
    budget_bytes: int
    capacity: int  # sessions the cache may hold, in use or idle
    max_new_tokens: int  # default answer length


def plan_startup(pipe, cfg: ServeConfig) -> Startup:
    """Run the planner once for the server's limits and size the session cache from what is left."""
    from ..profiles.planner import ModelFacts, Options, memory_breakdown

    choice = pipe.choose_tokens(None, cfg.max_new_tokens, cfg.ttft_ms, cfg.memory_mb)  # the library's policy
    prof, facts = pipe.device_profile(), ModelFacts.from_bundle(pipe.bundle)
    opts = Options.for_run(pipe.vision_backend, pipe.n_gpu_layers, pipe.sequential, facts)
    m, label = choice.m, choice.profile
    memory_limit_mb = cfg.memory_mb if cfg.memory_mb is not None else prof.limits.memory_mb
    n_ctx = min(pipe.context_length, len(pipe.prefix_ids) + pipe.max_tokens + cfg.conversation_tokens)
    kv_bytes = 4 if pipe.kv_f32 else 2  # pipeline.Session: f32 K/V for f32 bundles
    # A llama.cpp context: its KV cache, its compute buffers (the planner's estimate) and two batches.
    per_session = (n_ctx * facts.layers * 2 * facts.kv_heads * facts.head_dim * kv_bytes
                   + 4 * 512 * (facts.vocab + 8 * facts.hidden) + 2 * 512 * facts.hidden * 4)
    if cfg.cache_mb is not None:
        budget = int(cfg.cache_mb * 2**20)
    else:  # the memory limit less everything but the contexts (weights, vision, runtime overhead)
        parts = memory_breakdown(prof, facts, m, replace_tokens(opts, cfg.max_new_tokens))
        fixed_mb = parts["total_mb"] - parts["kv_cache"] - parts["compute_buffers"]
        budget = int((memory_limit_mb - fixed_mb) * 2**20)
    capacity = min(SESSION_CAP, max(0, budget // per_session))
    if capacity < cfg.parallel:
        from ..profiles.planner import PlanError

        raise PlanError(f"--parallel {cfg.parallel} needs {cfg.parallel} sessions of {per_session / 2**20:,.1f} MB, "
                        f"but the session budget is {budget / 2**20:,.1f} MB",
                        "lower --parallel or --conversation-tokens, or raise --memory-mb / --cache-mb")
    return Startup(m, label, choice.predicted["reason"], n_ctx, per_session, budget, capacity, cfg.max_new_tokens)


def replace_tokens(opts, max_new_tokens: int):
    from dataclasses import replace

    return replace(opts, max_new_tokens=max_new_tokens)


# -- one request ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ask:
    """A request as the adapter needs it."""

    image: str  # content hash
    load_image: Callable[[], object]  # decodes the image (only on a cache miss)
    turns: list[tuple[str, str]]
    question: str
    m: int  # to start from
    refine: int | None  # refine to this m when the first token's probability is below confidence
    confidence: float
    max_new_tokens: int | None  # None: what the context has left, up to the server's default
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...] = ()


@dataclass
class Outcome:
    text: str = ""
    finish: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    info: dict = field(default_factory=dict)  # the response's `mqt` field


def _eos(pipe) -> int:
    return int(pipe.llm.lib.llama_vocab_eos(pipe.llm.vocab))


def answer_ids(pipe, text: str) -> list[int]:
    return pipe.llm.tokenize(text, add_bos=False) if text else []


def turn_ids(pipe, turns: list[tuple[str, str]], question: str, first: bool) -> tuple[list[int], list[int]]:
    """Token ids of `turns` then `question` as llava_v1 continues after the image (first=True) or after an
    earlier answer, and the offsets within them where each of `turns` ends (after its answer)."""
    from ..prompt import check_question

    tpl, eos, ids, ends = pipe.template, _eos(pipe), [], []
    for k, q in enumerate([t[0] for t in turns] + [question]):
        check_question(q)
        if first and k == 0:
            ids += pipe.question_ids(q)  # "\n{q} ASSISTANT:", exactly the one-shot prompt
        else:
            ids += [eos] + pipe.llm.tokenize(f"{tpl.user}: {q}{tpl.sep}{tpl.assistant}:", add_bos=False)
        if k < len(turns):
            ids += answer_ids(pipe, turns[k][1])
            ends.append(len(ids))
    return ids, ends


def accepts(ask: Ask) -> Callable[[Entry], bool]:
    """Which cached m can serve this request: the m asked for, anything up to the refinement target, or a
    smaller m that refinement (exact) grows to it."""
    top = ask.refine or ask.m
    return lambda e: e.m <= top


def settle(entry: Entry, gen, base: int, text: str) -> bool:
    """Make the KV cache after `base` hold exactly tok(text), the answer as the next turn will quote it.
    False, leaving the cache as it is, when tok(text) does not fit the context (an answer that ran to its
    end can re-tokenise longer): no next turn would fit either."""
    ctx, pipe = entry.session.ctx, entry.session.pipe
    fed = gen.token_ids[: max(0, ctx.n_past - base)]
    want = answer_ids(pipe, text)
    if base + len(want) > ctx.n_ctx:
        return False
    same = 0
    while same < len(fed) and same < len(want) and fed[same] == want[same]:
        same += 1
    ctx.truncate(base + same)
    if want[same:]:
        ctx.feed_tokens(want[same:], logits=False)
    return True


class StopScan:
    """Finds stop sequences across pieces; holds back text that may be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops, self.held, self.hold = stops, "", max((len(s) for s in stops), default=1) - 1

    def feed(self, piece: str) -> tuple[str, bool]:
        text = self.held + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return text[:cut], True
        keep = len(text) - self.hold if self.hold else len(text)
        self.held = text[max(keep, 0):]
        return text[: max(keep, 0)], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def _open_session(pipe, cache: SessionCache, start: Startup, ask: Ask) -> Entry:
    cache.reserve()
    try:
        reserve = start.n_ctx - len(pipe.prefix_ids) - pipe.max_tokens
        return Entry(pipe.look(ask.load_image(), m=ask.m, reserve=reserve, refinable=True), ask.image)
    except BaseException:
        cache.give_back(None)
        raise


def _generate(entry: Entry, ask: Ask, default_new: int):
    """Generation for the request's new turn on this entry; returns (gen, base, ids, used turns)."""
    s, pipe = entry.session, entry.session.pipe
    n = entry.common(ask.turns)
    ids, ends = turn_ids(pipe, ask.turns[n:], ask.question, first=n == 0)
    keep = entry.ends[n]
    room = s.ctx.n_ctx - keep - len(ids)
    # max_tokens is a ceiling, clamped to the room left (llama-server's choice; docs/serve.md says why)
    new = min(default_new if ask.max_new_tokens is None else ask.max_new_tokens, room)
    if new < 1:
        raise InputError(f"the conversation ({keep + len(ids)} positions) fills the session's context of "
                         f"{s.ctx.n_ctx}", "start a new conversation or restart the server with more "
                         "--conversation-tokens")
    gen = s.generate_ids(ids, keep=keep, max_new_tokens=new, temperature=ask.temperature,
                         top_p=ask.top_p, seed=ask.seed)
    entry.turns, entry.ends = entry.turns[:n] + ask.turns[n:], entry.ends[: n + 1] + [keep + e for e in ends]
    return gen, keep + len(ids), n


def answer(pipe, cache: SessionCache, start: Startup, ask: Ask, emit: Callable[[str], None],
           cancelled: threading.Event) -> Outcome:
    """Answer one request on a slot thread: take or open a session, generate, settle, cache it again."""
    t0 = time.perf_counter()
    entry = cache.take(ask.image, ask.turns, accepts(ask))
    hit = entry is not None
    if entry is None:
        entry = _open_session(pipe, cache, start, ask)
    keep_entry = False
    try:
        if entry.m < ask.m:  # a cached smaller m: grow it exactly
            entry.session.refine(ask.m)
            entry.reset()
        made: list = []  # (base, reused) of the generation started last

        def begin():
            if entry.ends[0] != entry.session.n_prefix:  # refined: the cache holds the image prefix only
                entry.reset()
            gen, *rest = _generate(entry, ask, start.max_new_tokens)
            made[:] = rest
            return gen

        gen = entry.session.refine_step(begin, ask.refine, ask.confidence)
        (base, reused), refined_from = made, gen.refined_from
        out = _decode(gen, ask, emit, cancelled)
        keep_entry = True  # the KV cache is consistent up to `base`, whatever happened after
        if out.finish != "cancelled" and settle(entry, gen, base, out.text):
            entry.turns, entry.ends = entry.turns + [(ask.question, out.text)], entry.ends + [entry.session.ctx.n_past]
        else:  # an abandoned answer, or one too long to quote: keep the conversation before it
            entry.turns, entry.ends = entry.turns[: len(ask.turns)], entry.ends[: len(ask.turns) + 1]
        a = gen.answer
        out.prompt_tokens = base
        out.cached_tokens = base - a.prefilled
        out.info = {"m": entry.m, "refined": refined_from is not None, "refined_from": refined_from,
                    "cache_hit": hit, "turns_reused": reused if hit else 0, "prefilled": a.prefilled,
                    "first_token_prob": a.first_token_prob, "timings_ms": a.timings_ms,
                    "decode_tokens_per_s": a.decode_tokens_per_s, "server_ms": round(1000 * (time.perf_counter() - t0), 2)}
        return out
    finally:
        cache.give_back(entry, keep=keep_entry)


def _decode(gen, ask: Ask, emit: Callable[[str], None], cancelled: threading.Event) -> Outcome:
    out, scan = Outcome(), StopScan(ask.stop)
    pieces = iter(gen)
    try:
        for piece in pieces:
            if cancelled.is_set():
                out.finish = "cancelled"
                break
            text, stopped = scan.feed(piece) if ask.stop else (piece, False)
            if text:
                out.text += text
                emit(text)
            if stopped:
                break
        else:
            tail = scan.flush()
            if tail:
                out.text += tail
                emit(tail)
            if len(gen.token_ids) >= gen.max_new_tokens:
                out.finish = "length"
    finally:
        pieces.close()  # runs the generation's cleanup here, on this thread: the session is free again
    out.completion_tokens = len(gen.token_ids)
    stripped = out.text.strip()
    out.text = stripped if out.finish != "cancelled" else out.text
    return out

