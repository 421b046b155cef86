"""The server's adapter without HTTP: a continued conversation's KV cache holds exactly the ids a fresh
one would, the session cache evicts least recently used first, and stop sequences cut across pieces."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import scene
from mqt_edge.pipeline import Pipeline
from mqt_edge.runtimes.llama import LlamaContext
from mqt_edge.serve import ServeConfig, policy
from mqt_edge.serve.cache import SessionCache

Q = "What color is the circle?"


@pytest.fixture(scope="module")
def tiny(tiny_f32_bundle):
    with Pipeline.load(tiny_f32_bundle, threads=1) as pipe:
        yield pipe


@pytest.fixture
def mirrored(monkeypatch):
    """Each LlamaContext keeps `mirror`: what its KV cache holds, position by position (ids, or a visual
    token's bytes)."""
    feed_t, feed_e, cut = LlamaContext.feed_tokens, LlamaContext.feed_embeddings, LlamaContext.truncate
    restore_seq = LlamaContext.restore_sequence

    def tokens(self, ids, logits=True):
        feed_t(self, ids, logits)
        self.__dict__.setdefault("mirror", []).extend(int(i) for i in ids)

    def embeddings(self, emb, logits=False):
        feed_e(self, emb, logits)
        self.__dict__.setdefault("mirror", []).extend(("v", bytes(np.asarray(row, np.float32).tobytes())) for row in emb)

    def truncate(self, n):
        cut(self, n)
        del self.__dict__.setdefault("mirror", [])[n:]

    def restore(self, state):  # the pipeline's prompt head, copied in: one saved state for every session
        restore_seq(self, state)
        self.__dict__["mirror"] = [("head", id(state), i) for i in range(state.n_past)]

    monkeypatch.setattr(LlamaContext, "feed_tokens", tokens)
    monkeypatch.setattr(LlamaContext, "feed_embeddings", embeddings)
    monkeypatch.setattr(LlamaContext, "truncate", truncate)
    monkeypatch.setattr(LlamaContext, "restore_sequence", restore)


def setup(pipe, capacity=4):
    start = policy.plan_startup(pipe, ServeConfig(bundle=str(pipe.bundle.root), conversation_tokens=256))
    return start, SessionCache(capacity, start.session_bytes)


def request(im, turns, question, **kw) -> policy.Ask:
    args = dict(image="img-" + str(id(im)), load_image=lambda: im, turns=turns, question=question, m=8,
                refine=None, confidence=0.5, max_new_tokens=6, temperature=0.0, top_p=1.0, seed=0)
    return policy.Ask(**(args | kw))


def run(pipe, cache, start, ask):
    return policy.answer(pipe, cache, start, ask, lambda _p: None, threading.Event())


QUESTIONS = [Q, "How many shapes are there?", "Is it red?"]


@pytest.mark.parametrize("stop", [(), ("e",)])
def test_a_continued_conversation_holds_the_ids_of_a_fresh_one(tiny, mirrored, stop):
    im = scene(seed=2)
    start, cache = setup(tiny)
    turns: list[tuple[str, str]] = []
    kept_end = None  # where the previous answer ended in the KV cache
    for k, q in enumerate(QUESTIONS):  # turn by turn: each continues the cached session
        out = run(tiny, cache, start, request(im, list(turns), q, stop=stop))
        assert out.info["cache_hit"] == (k > 0) and out.info["turns_reused"] == k
        if k:
            assert out.cached_tokens == kept_end  # every position before the new turn was reused
        (entry,) = cache._idle.values()
        kept_end = entry.ends[-1]
        turns.append((q, out.text))
    continued = list(entry.session.ctx.mirror[: entry.ends[-1]])

    _, fresh_cache = setup(tiny)
    last = run(tiny, fresh_cache, start, request(im, turns[:-1], QUESTIONS[-1], stop=stop))
    (fresh,) = fresh_cache._idle.values()
    assert not last.info["cache_hit"] and last.text == turns[-1][1]
    assert fresh.ends == entry.ends
    assert fresh.session.ctx.mirror[: fresh.ends[-1]] == continued  # the same ids at the same positions

    ids, _ = policy.turn_ids(tiny, turns[:-1], QUESTIONS[-1], first=True)
    n0 = len(tiny.prefix_ids) + 8
    head = [("head", id(tiny.prompt_head()), i) for i in range(len(tiny.prefix_ids))]  # restored, not re-fed
    assert continued[:len(tiny.prefix_ids)] == head and continued[n0:n0 + len(ids)] == ids
    eos = policy._eos(tiny)
    assert continued.count(eos) == 2  # one </s> closes each earlier answer, as in training
    cache.clear()
    fresh_cache.clear()


def test_refining_a_continued_conversation_refeeds_its_turns(tiny, mirrored):
    im = scene(seed=3)
    start, cache = setup(tiny)
    a1 = run(tiny, cache, start, request(im, [], Q)).text
    out = run(tiny, cache, start, request(im, [(Q, a1)], "Is it red?", refine=32, confidence=1.01))
    assert out.info["refined"] and out.info["m"] == 32
    _, fresh_cache = setup(tiny)
    same = run(tiny, fresh_cache, start, request(im, [(Q, a1)], "Is it red?", m=32))
    assert same.text == out.text
    (a,), (b,) = cache._idle.values(), fresh_cache._idle.values()
    assert a.session.ctx.mirror[: a.ends[-1]] == b.session.ctx.mirror[: b.ends[-1]]
    cache.clear()
    fresh_cache.clear()


def test_the_cache_evicts_least_recently_used_and_counts_it(tiny):
    evicted = []
    start = policy.plan_startup(tiny, ServeConfig(bundle=str(tiny.bundle.root), conversation_tokens=64))
    cache = SessionCache(2, start.session_bytes, on_evict=lambda: evicted.append(1))
    ims = [scene(seed=s) for s in (10, 11, 12)]
    for im in ims[:2]:
        run(tiny, cache, start, request(im, [], Q))
    run(tiny, cache, start, request(ims[0], [], Q))  # ims[0] is now the most recent
    run(tiny, cache, start, request(ims[2], [], Q))  # room for it: ims[1] goes
    assert len(evicted) == 1 and cache.idle == 2 and cache.busy == 0
    assert {e.image for e in cache._idle.values()} == {"img-" + str(id(ims[0])), "img-" + str(id(ims[2]))}
    assert run(tiny, cache, start, request(ims[0], [], Q)).info["cache_hit"]
    assert not run(tiny, cache, start, request(ims[1], [], Q)).info["cache_hit"]
    cache.clear()


def test_the_session_budget_follows_the_memory_limit(tiny):
    base = ServeConfig(bundle=str(tiny.bundle.root), conversation_tokens=128)
    start = policy.plan_startup(tiny, base)
    small = policy.plan_startup(tiny, base.with_(cache_mb=3 * start.session_bytes / 2**20))
    assert small.capacity == 3
    with pytest.raises(Exception, match="--parallel 4 needs 4 sessions"):
        policy.plan_startup(tiny, base.with_(cache_mb=3 * start.session_bytes / 2**20, parallel=4))
    # a context's bytes: KV of n_ctx positions (f32 here) + buffers
    f = tiny.bundle.manifest.llm
    assert start.session_bytes >= start.n_ctx * f.layers * 2 * f.kv_heads * f.head_dim * 4


@pytest.mark.parametrize("pieces, stops, want", [
    (["Hel", "lo wor", "ld"], ("o w",), ("Hell", True)),
    (["ab", "c"], ("x",), ("abc", False)),
    (["a", "bc", "d"], ("bcd",), ("a", True)),
])
def test_stop_scan_cuts_across_pieces(pieces, stops, want):
    scan, text, stopped = policy.StopScan(stops), "", False
    for p in pieces:
        t, stopped = scan.feed(p)
        text += t
        if stopped:
            break
    if not stopped:
        text += scan.flush()
    assert (text, stopped) == want


def test_a_different_earlier_answer_reuses_the_image_but_not_the_turn(tiny, mirrored):
    im = scene(seed=4)
    start, cache = setup(tiny)
    a1 = run(tiny, cache, start, request(im, [], Q)).text
    other = [(Q, a1 + " not quite")]  # the client edited the answer: the cached turn no longer applies
    out = run(tiny, cache, start, request(im, other, "Is it red?"))
    assert out.info["cache_hit"] and out.info["turns_reused"] == 0
    assert out.cached_tokens == len(tiny.prefix_ids) + 8  # the image prefix only
    _, fresh_cache = setup(tiny)
    assert run(tiny, fresh_cache, start, request(im, other, "Is it red?")).text == out.text
    cache.clear()
    fresh_cache.clear()


def test_generate_ids_continues_the_cache_and_refuses_misuse(tiny):
    from mqt_edge.errors import InputError

    with tiny.look(scene(seed=5), m=8) as s:
        plain = s.ask(Q, max_new_tokens=5)
        g = s.generate_ids(tiny.question_ids(Q), max_new_tokens=5)  # keep defaults to the image prefix
        for _ in g:
            pass
        assert g.answer.token_ids == plain.token_ids and g.answer.prefilled == len(tiny.question_ids(Q))
        for bad in ([], [tiny.llm.n_vocab], [-1]):
            with pytest.raises(InputError, match="token ids"):
                s.generate_ids(bad)
        with pytest.raises(InputError, match="outside the cached"):
            s.generate_ids([1], keep=s.n_prefix - 1)
        with pytest.raises(InputError, match="outside the cached"):
            s.generate_ids([1], keep=s.ctx.n_ctx + 1)
        assert s.ask(Q, max_new_tokens=5).token_ids == plain.token_ids  # still usable after the refusals


def test_the_server_refines_through_the_librarys_step(tiny):
    """policy.answer takes its refinement from Session.refine_step: the same record as the API's, and the
    refined answer is a fresh request's at that m."""
    im = scene(seed=4)
    start, cache = setup(tiny)
    out = run(tiny, cache, start, request(im, [], Q, m=4, refine=32, confidence=1.01))
    assert out.info["refined"] and out.info["m"] == 32
    assert set(out.info["refined_from"]) == {"m", "first_token_prob", "timings_ms", "prefilled"}
    assert out.info["refined_from"]["m"] == 4
    _, fresh_cache = setup(tiny)
    assert run(tiny, fresh_cache, start, request(im, [], Q, m=32)).text == out.text
    kept = run(tiny, fresh_cache, start, request(scene(seed=5), [], Q, m=4, refine=32, confidence=0.0))
    assert not kept.info["refined"] and kept.info["refined_from"] is None and kept.info["m"] == 4
    cache.clear()
    fresh_cache.clear()
