"""The server's one adapter to the library: it maps a request to the API and the result back.

Every decision about the model is the library's: m from `Pipeline.choose_tokens`, refinement from
`Session.refine_step`, the conversation's turns and its cache from `mqt_edge.conversation`, batching
and memory from the pipeline's scheduler. This module only sizes the cache from the server's limits
at start-up and turns an `Ask` into `Conversation.reply`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..conversation import Conversation, ConversationCache
from ..pipeline import Pipeline
from .config import ServeConfig


@dataclass(frozen=True)
class Startup:
    """What the planner decided when the server started."""

    m: int  # for requests without an `mqt` field
    profile: str
    reason: str
    n_ctx: int  # positions of one conversation at its longest
    conversation_bytes: int  # its KV bytes: the budget of one conversation
    budget_bytes: int  # the scheduler's one budget: context cells and parked conversations
    capacity: int  # conversations at their longest that the budget holds
    max_new_tokens: int  # default answer length


def plan_startup(pipe: Pipeline, cfg: ServeConfig) -> Startup:
    """Run the planner once for the server's limits and size the scheduler's cache from what is left."""
    from ..profiles.planner import PlanError, cache_budget_bytes

    choice = pipe.choose_tokens(None, cfg.max_new_tokens, cfg.ttft_ms, cfg.memory_mb)  # the library's policy
    budget = cache_budget_bytes(pipe, choice.m, cfg.max_new_tokens, cfg.memory_mb, cfg.cache_mb)
    need = (len(pipe.prefix_ids) + cfg.parallel * pipe.conversation_positions(cfg.conversation_tokens))
    if budget < need * pipe.position_bytes:
        raise PlanError(f"--parallel {cfg.parallel} needs {need * pipe.position_bytes / 2**20:,.1f} MB of KV cache, "
                        f"but the cache budget is {budget / 2**20:,.1f} MB",
                        "lower --parallel or --conversation-tokens, or raise --memory-mb / --cache-mb")
    plan = pipe.configure_cache(budget, cfg.conversation_tokens)
    return Startup(choice.m, choice.profile, choice.predicted["reason"], plan.conversation_positions,
                   plan.conversation_bytes, plan.budget_bytes, plan.budget_bytes // plan.conversation_bytes,
                   cfg.max_new_tokens)


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


def accepts(ask: Ask) -> Callable[[Conversation], bool]:
    """Which cached m can serve this request: the m asked for, anything up to the refinement target, or a
    smaller m that refinement (exact) grows to it."""
    top = ask.refine or ask.m
    return lambda c: c.m <= top


def answer(pipe: Pipeline, cache: ConversationCache, start: Startup, ask: Ask, emit: Callable[[str], None],
           cancelled: threading.Event) -> Outcome:
    """Answer one request: continue a cached conversation about its image (or open one), cache it again."""
    t0 = time.perf_counter()
    conv = cache.take(ask.image, ask.turns, accepts(ask))
    hit = conv is not None
    if conv is None:
        reserve = start.n_ctx - len(pipe.prefix_ids) - pipe.max_tokens
        conv = Conversation(pipe.look(ask.load_image(), m=ask.m, reserve=reserve, refinable=True,
                                      droppable=True), ask.image)
    keep = False
    try:
        if conv.m < ask.m:  # a cached smaller m: grow it exactly
            conv.refine(ask.m)
        r = conv.reply(ask.question, ask.turns, refine_to=ask.refine, confidence=ask.confidence,
                       max_new_tokens=ask.max_new_tokens, default_new=start.max_new_tokens,
                       temperature=ask.temperature, top_p=ask.top_p, seed=ask.seed, stop=ask.stop,
                       on_piece=emit, cancelled=cancelled)
        keep = True  # the KV cache is consistent up to the prompt, whatever happened after
    finally:
        if keep:
            cache.put(conv)
        else:
            conv.close()
    a = r.answer
    info = {"m": conv.m, "refined": r.refined_from is not None, "refined_from": r.refined_from,
            "cache_hit": hit, "turns_reused": r.turns_reused if hit else 0, "prefilled": a.prefilled,
            "first_token_prob": a.first_token_prob, "timings_ms": a.timings_ms,
            "decode_tokens_per_s": a.decode_tokens_per_s, "server_ms": round(1000 * (time.perf_counter() - t0), 2)}
    return Outcome(r.text, r.finish, r.prompt_tokens, r.completion_tokens, r.cached_tokens, info)
