"""Forked conversations: a request about a cached image whose turns part from an idle conversation's
starts a new sequence that shares the image's (and the common turns') cells, and the idle one keeps
its turns, so two clients asking different questions about one image both keep their caches."""

from __future__ import annotations

import random
import threading

import pytest

from conftest import scene
from mqt_edge.conversation import ConversationCache
from mqt_edge.pipeline import Pipeline
from mqt_edge.runtimes.llama import SharedContext
from mqt_edge.scheduler import CellBook
from mqt_edge.serve import ServeConfig, policy

Q, Q2, Q3 = "What color is the circle?", "How many shapes are there?", "Is it red?"


@pytest.fixture(scope="module")
def tiny(tiny_f32_bundle):
    with Pipeline.load(tiny_f32_bundle, threads=1) as pipe:
        yield pipe


def ask(pipe, cache, image, turns, question) -> policy.Outcome:
    start = policy.plan_startup(pipe, ServeConfig(bundle=str(pipe.bundle.root), conversation_tokens=256))
    req = policy.Ask(image=f"img-{id(image)}", load_image=lambda: image, turns=turns, question=question, m=8,
                     refine=None, confidence=0.5, max_new_tokens=6, temperature=0.0, top_p=1.0, seed=0)
    return policy.answer(pipe, cache, start, req, lambda _p: None, threading.Event())


def turn_positions(pipe, question: str, answer: str) -> int:
    return len(pipe.question_ids(question)) + len(pipe.llm.tokenize(answer, add_bos=False))


def test_two_clients_with_different_first_questions_about_one_image_both_keep_their_turns(tiny):
    im, cache = scene(seed=6), ConversationCache()
    image = len(tiny.prefix_ids) + 8  # the prompt head and m = 8 visual tokens
    a = ask(tiny, cache, im, [], Q)
    b = ask(tiny, cache, im, [], Q2)  # another client, the same image, its own first question
    assert b.info["cache_hit"] and b.cached_tokens == image and b.info["prefilled"] == len(tiny.question_ids(Q2))
    for q, first in ((Q, a), (Q2, b)):  # each client's second turn continues its own first turn
        out = ask(tiny, cache, im, [(q, first.text)], Q3)
        assert out.info["cache_hit"] and out.info["turns_reused"] == 1, q
        assert out.cached_tokens == image + turn_positions(tiny, q, first.text), q
        fresh = ask(tiny, ConversationCache(), im, [(q, first.text)], Q3)
        assert not fresh.info["cache_hit"] and fresh.text == out.text  # the fork's cells are exact
    assert cache.idle == 2 and cache.forks == 1  # real follow-ups continue: no copy
    cache.clear()


def test_a_fork_shares_the_cells_and_prefills_neither_the_image_nor_the_common_turns(tiny, monkeypatch):
    sched, im = tiny.scheduler, scene(seed=7)
    embedded = []  # visual-token rows the LLM was fed
    real = SharedContext.decode_embeddings
    monkeypatch.setattr(SharedContext, "decode_embeddings",
                        lambda ctx, parts: embedded.append(sum(len(p[2]) for p in parts)) or real(ctx, parts))
    with tiny.conversation(im, m=8, reserve=64) as parent:
        parent.reply(Q, max_new_tokens=4)
        parent.reply(Q2, max_new_tokens=4)
        before, rows, cells = len(embedded), sched.rows, sched.stats().cells_used
        with parent.fork(1) as child:  # the image and the first turn, not the second
            assert sched.rows == rows and len(embedded) == before  # nothing was decoded: the cells are shared
            assert sched.stats().cells_used == cells  # and counted once
            assert child.session.n_past == parent.ends[1] and child.turns == parent.turns[:1]
            r = child.reply(Q3, max_new_tokens=4)
            new_turn, _ = child.turn_ids([], Q3, first=False)
            assert r.answer.prefilled == len(new_turn) and r.cached_tokens == parent.ends[1]
            assert len(embedded) == before  # no visual token was fed again
            assert r.answer.timings_ms["vision"] == 0 and r.answer.timings_ms["mqt"] == 0
            with tiny.conversation(im, m=8, reserve=64) as fresh:
                want = fresh.reply(Q3, history=parent.turns[:1], max_new_tokens=4)
            assert r.answer.token_ids == want.answer.token_ids
        assert parent.turns[1][0] == Q2 and len(parent.turns) == 2  # the parent keeps both turns


def _cells(pipe) -> int:
    return pipe.scheduler.stats().cells_used


def _park(pipe, keep) -> None:
    sched = pipe.scheduler
    assert sched.call(lambda: sched.pool.park_one(keep.session.seq))


def _same_as_fresh(pipe, conv, im, question: str) -> None:
    history = list(conv.turns)
    got = conv.reply(question, max_new_tokens=4).answer.token_ids
    with pipe.conversation(im, m=8, reserve=64) as fresh:
        assert got == fresh.reply(question, history=history, max_new_tokens=4).answer.token_ids


def test_shared_cells_are_counted_once_and_outlive_either_holder(tiny_f32_bundle):
    with Pipeline.load(tiny_f32_bundle, threads=1, parallel=1) as pipe:
        im, head = scene(seed=8), len(pipe.prefix_ids)
        base = _cells(pipe)
        parent = pipe.conversation(im, m=8, reserve=64)
        parent.reply(Q, max_new_tokens=4)
        assert _cells(pipe) - base == parent.session.n_past - head
        child = parent.fork(1)
        child.reply(Q2, max_new_tokens=4)
        shared, mine = parent.ends[1] - head, child.session.n_past - parent.ends[1]
        assert _cells(pipe) - base == shared + mine  # the parent's turn is counted once
        parent.session.cut(head + 8)  # the parent lets go of its turn: the child still holds those cells
        parent.reset()
        assert _cells(pipe) - base == shared + mine
        parent.reply(Q3, max_new_tokens=4)
        mine_p = parent.session.n_past - (head + 8)
        assert _cells(pipe) - base == shared + mine + mine_p
        _park(pipe, keep=child)  # the parent goes to the host while the child is live
        assert not parent.session.seq.resident and _cells(pipe) - base == shared + mine
        _same_as_fresh(pipe, child, im, Q3)
        _same_as_fresh(pipe, parent, im, Q)  # back from the host, its own cells
        parent.close()  # evicted: the child outlives it
        assert _cells(pipe) - base == child.session.n_past - head
        _same_as_fresh(pipe, child, im, Q)
        child.close()
        assert _cells(pipe) == base


def test_a_parked_conversation_forks_from_its_host_copy_and_stays_parked(tiny_f32_bundle):
    with Pipeline.load(tiny_f32_bundle, threads=1, parallel=1) as pipe:
        im, base = scene(seed=9), _cells(pipe)
        parent = pipe.conversation(im, m=8, reserve=64)
        parent.reply(Q, max_new_tokens=4)
        other = pipe.conversation(scene(seed=10), m=8, reserve=64)
        _park(pipe, keep=other)
        held = _cells(pipe)
        child = parent.fork(1)  # the host copy, cut to the image and the first turn: its own cells
        assert not parent.session.seq.resident and _cells(pipe) - held == parent.ends[1]
        _same_as_fresh(pipe, child, im, Q2)
        _same_as_fresh(pipe, parent, im, Q2)
        for c in (parent, child, other):
            c.close()
        assert _cells(pipe) == base


class _Seq:
    def __init__(self) -> None:
        self.spans, self.n_past = [], 0


def test_the_cell_book_counts_what_a_brute_force_model_holds():
    """Random grows, cuts and forks: the book's count equals the distinct cells the sequences hold."""
    rng, book = random.Random(0), CellBook()
    seqs: dict[_Seq, list[object]] = {}  # sequence -> its cells by position (unique objects)
    for _ in range(600):
        op = rng.choice("ggcfn") if seqs else "n"
        if op == "n" or len(seqs) < 2:
            seqs[_Seq()] = []
            continue
        s = rng.choice(list(seqs))
        if op == "g":
            n = rng.randint(1, 5)
            book.grow(s, n)
            s.n_past += n
            seqs[s] += [object() for _ in range(n)]
        elif op == "c":
            keep = rng.randint(0, s.n_past)
            book.cut(s, keep)
            s.n_past = keep
            del seqs[s][keep:]
        else:
            dst = _Seq()
            n = rng.randint(0, s.n_past)
            book.share(s, dst, 0, n)
            dst.n_past = n
            seqs[dst] = seqs[s][:n]
        assert book.count == len({id(c) for cells in seqs.values() for c in cells})
        for q, cells in seqs.items():
            assert sum(sp.end - sp.start for sp in q.spans) == len(cells) == q.n_past
