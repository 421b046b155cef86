"""The server's adapter and the API's conversations without HTTP: a continued conversation's KV cache
holds exactly the ids a fresh one would, and stop sequences cut across pieces."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import scene
from mqt_edge.pipeline import Pipeline
from mqt_edge.conversation import ConversationCache, StopScan
from mqt_edge.runtimes.llama import SharedContext
from mqt_edge.serve import ServeConfig, policy

Q = "What color is the circle?"


@pytest.fixture(scope="module")
def tiny(tiny_f32_bundle):
    with Pipeline.load(tiny_f32_bundle, threads=1) as pipe:
        yield pipe


@pytest.fixture
def mirrored(monkeypatch):
    """The shared context keeps `mirror[seq]`: what each sequence holds, position by position (ids, a
    visual token's bytes, or the prompt head's shared cells)."""
    real = {k: getattr(SharedContext, k) for k in ("decode_tokens", "decode_embeddings", "seq_rm", "seq_cp",
                                                   "seq_save", "seq_restore")}

    def mirror(ctx, seq):
        return ctx.__dict__.setdefault("mirror", {}).setdefault(seq, [])

    def put(ctx, seq, pos, item):
        m = mirror(ctx, seq)
        del m[pos:]
        assert len(m) == pos, "a position fed out of order"
        m.append(item)

    def decode_tokens(self, rows):
        out = real["decode_tokens"](self, rows)
        for seq, pos, tok, _ in rows:
            put(self, seq, pos, int(tok))
        return out

    def decode_embeddings(self, parts):
        out = real["decode_embeddings"](self, parts)
        for seq, pos, emb, _ in parts:
            for i, row in enumerate(emb):
                put(self, seq, pos + i, ("v", np.asarray(row, np.float32).tobytes()))
        return out

    def seq_rm(self, seq, p0=0, p1=-1):
        real["seq_rm"](self, seq, p0, p1)
        del mirror(self, seq)[p0:]

    def seq_cp(self, src, dst, p0=0, p1=-1):
        real["seq_cp"](self, src, dst, p0, p1)
        # the prompt head's cells (seq 0) are named; a fork shares another sequence's items
        given = [("head", i) for i in range(p0, p1)] if src == 0 else list(mirror(self, src)[p0:p1])
        self.__dict__.setdefault("mirror", {})[dst] = mirror(self, dst)[:p0] + given

    def seq_save(self, seq, n_past):
        state = real["seq_save"](self, seq, n_past)
        state.mirror = list(mirror(self, seq))
        return state

    def seq_restore(self, seq, state):
        ok = real["seq_restore"](self, seq, state)
        self.__dict__.setdefault("mirror", {})[seq] = list(state.mirror)
        return ok

    for k, fn in dict(decode_tokens=decode_tokens, decode_embeddings=decode_embeddings, seq_rm=seq_rm,
                      seq_cp=seq_cp, seq_save=seq_save, seq_restore=seq_restore).items():
        monkeypatch.setattr(SharedContext, k, fn)


def held(conv) -> list:
    """What a conversation's sequence holds, up to the end of its last turn."""
    ctx = conv.session.pipe.scheduler.ctx
    return list(ctx.mirror[conv.session.seq.id][: conv.ends[-1]])


def setup(pipe):
    start = policy.plan_startup(pipe, ServeConfig(bundle=str(pipe.bundle.root), conversation_tokens=256))
    return start, ConversationCache()


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
    continued = held(entry)

    _, fresh_cache = setup(tiny)
    last = run(tiny, fresh_cache, start, request(im, turns[:-1], QUESTIONS[-1], stop=stop))
    (fresh,) = fresh_cache._idle.values()
    assert not last.info["cache_hit"] and last.text == turns[-1][1]
    assert fresh.ends == entry.ends
    assert held(fresh) == continued  # the same ids at the same positions

    ids, _ = fresh.turn_ids(turns[:-1], QUESTIONS[-1], first=True)
    n0 = len(tiny.prefix_ids) + 8
    head = [("head", i) for i in range(len(tiny.prefix_ids))]  # the head's cells, shared, not re-fed
    assert continued[:len(tiny.prefix_ids)] == head and continued[n0:n0 + len(ids)] == ids
    eos = tiny.llm.eos
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
    assert held(a) == held(b)
    cache.clear()
    fresh_cache.clear()


def test_the_cache_budget_follows_the_memory_limit(tiny_f32_bundle):
    base = ServeConfig(bundle=str(tiny_f32_bundle), conversation_tokens=128)
    with Pipeline.load(tiny_f32_bundle, threads=1) as one:
        start = policy.plan_startup(one, base)
        f = one.bundle.manifest.llm  # f32 K/V here: 4 bytes
        assert one.position_bytes == f.layers * 2 * f.kv_heads * f.head_dim * 4
        assert start.conversation_bytes == one.conversation_positions(128) * one.position_bytes
        plan = one._cache_plan  # llama.cpp may round its context up (to 256 cells); the plan is the budget
        assert start.budget_bytes == plan.n_ctx * one.position_bytes + plan.host_bytes
        assert one.scheduler.ctx.n_ctx >= plan.n_ctx
    with Pipeline.load(tiny_f32_bundle, threads=1, parallel=4) as four:
        small = base.with_(cache_mb=3 * start.conversation_bytes / 2**20, parallel=4)
        with pytest.raises(Exception, match="--parallel 4 needs"):
            policy.plan_startup(four, small)
        fits = policy.plan_startup(four, base.with_(cache_mb=5 * start.conversation_bytes / 2**20, parallel=4))
        assert fits.capacity == 5  # conversations at their longest that the budget holds


@pytest.mark.parametrize("pieces, stops, want", [
    (["Hel", "lo wor", "ld"], ("o w",), ("Hell", True)),
    (["ab", "c"], ("x",), ("abc", False)),
    (["a", "bc", "d"], ("bcd",), ("a", True)),
])
def test_stop_scan_cuts_across_pieces(pieces, stops, want):
    scan, text, stopped = StopScan(stops), "", False
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
            s.generate_ids([1], keep=s.n_ctx + 1)
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
