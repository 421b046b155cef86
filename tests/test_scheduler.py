"""The scheduler: many sequences in one llama.cpp context, one decode per step for all of them, the
prompt head shared, idle sequences parked least recently used first, and answers that do not depend
on what else is in the batch."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import scene
from mqt_edge.conversation import ConversationCache
from mqt_edge.pipeline import Pipeline

Q = "What color is the circle?"
QUESTIONS = [Q, "How many shapes are there?", "What shape is red?", "Is there a square?"]


@pytest.fixture(scope="module")
def tiny4(tiny_f32_bundle):
    """Random tiny weights: answers run to max_new_tokens, so every stream decodes for the whole run."""
    with Pipeline.load(tiny_f32_bundle, threads=1, parallel=4) as pipe:
        yield pipe


def _together(pipe, jobs, n):
    """Run `jobs` (callables) n at a time; their results in order."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda f: f(), jobs))


def test_concurrent_requests_share_each_decode_step(tiny4):
    sched = tiny4.scheduler
    ims = [scene(seed=s) for s in range(4)]
    new = 24
    encoded = [tiny4.encode(im, m=8) for im in ims]  # vision first, so the LLM work starts together
    barrier = threading.Barrier(4)

    def one(enc):
        with tiny4.look(enc, reserve=64) as s:
            barrier.wait()
            return s.ask(Q, max_new_tokens=new).token_ids

    steps0, rows0 = sched.steps, sched.rows
    out = _together(tiny4, [lambda e=e: one(e) for e in encoded], 4)
    assert all(len(ids) == new for ids in out)
    steps, rows = sched.steps - steps0, sched.rows - rows0
    # 4 streams x 24 tokens, one row each per step: alone that is ~4 x 24 decode calls; batched, the
    # decode steps carry several streams' rows each (the first tokens come from the prefill steps).
    assert sched.max_rows >= 4
    assert steps <= 2 * new + 16, f"{steps} steps for {rows} rows: the streams were not batched"


def test_a_request_answers_the_same_alone_and_in_a_batch(tiny4):
    ims = [scene(seed=s) for s in range(8)]
    alone = [tiny4.ask(im, QUESTIONS[i % 4], m=8 + 4 * i, max_new_tokens=12).token_ids for i, im in enumerate(ims)]
    for n in (2, 4, 8):
        jobs = [lambda i=i, im=im: tiny4.ask(im, QUESTIONS[i % 4], m=8 + 4 * i, max_new_tokens=12).token_ids
                for i, im in enumerate(ims)]
        assert _together(tiny4, jobs, n) == alone, f"{n} at a time changed an answer"


def test_the_shipped_model_answers_exactly_the_same_batched(shipped_bundle):
    """50 requests, 1 to 8 at a time: greedy ids identical to each request alone (the issue's check)."""
    with Pipeline.load(shipped_bundle, threads=1, parallel=8) as pipe:
        ims = [scene(seed=100 + s) for s in range(10)]
        reqs = [(ims[k % 10], QUESTIONS[k % 4], (2, 4, 16, 64, 256)[k % 5]) for k in range(50)]
        alone = [pipe.ask(im, q, m=m, max_new_tokens=16).token_ids for im, q, m in reqs]
        start = 0
        for n in (1, 2, 3, 4, 5, 6, 7, 8, 8, 6):  # 50 in all
            batch = reqs[start:start + n]
            jobs = [lambda r=r: pipe.ask(r[0], r[1], m=r[2], max_new_tokens=16).token_ids for r in batch]
            assert _together(pipe, jobs, n) == alone[start:start + n]
            start += n
        assert start == 50


def test_new_sequences_share_the_prompt_head_cells(tiny4):
    sched = tiny4.scheduler
    head = len(tiny4.prefix_ids)
    before = sched.stats().cells_used
    with tiny4.look(scene(seed=1), m=8, reserve=16) as a, tiny4.look(scene(seed=2), m=8, reserve=16) as b:
        # each session holds the head's positions, but the cells are the head's (counted once)
        assert a.n_past == b.n_past == head + 8
        assert sched.stats().cells_used - before == 16


def _idle_conversations(pipe, cache, seeds, m=8):
    convs = []
    for s in seeds:
        c = pipe.conversation(scene(seed=s), m=m, reserve=32)
        c.key = f"img-{s}"
        c.reply(Q, max_new_tokens=4)
        cache.put(c)
        convs.append(c)
    return convs


def test_idle_sequences_are_parked_least_recently_used_first_and_come_back_exact(tiny_f32_bundle):
    with Pipeline.load(tiny_f32_bundle, threads=1, parallel=1) as pipe:
        cache = ConversationCache()
        ids = pipe.scheduler.ctx.n_seq - 1  # sequence ids beside the prompt head's
        convs = _idle_conversations(pipe, cache, range(1, ids + 1))
        assert all(c.session.seq.resident for c in convs) and pipe.scheduler.stats().parks == 0
        first, second = convs[0], convs[1]
        first.reply("Is it red?", max_new_tokens=4)  # used again: now the most recently used
        want = second.reply("Is it red?", max_new_tokens=4).answer.token_ids
        second.session.cut(second.ends[-2])  # back to before that turn, to ask it again once parked
        second.turns, second.ends = second.turns[:-1], second.ends[:-1]
        lru = convs[2]  # untouched since it was made: the least recently used
        extra = _idle_conversations(pipe, cache, (99,))[0]  # needs an id: one idle sequence goes to the host
        st = pipe.scheduler.stats()
        assert st.parks == 1 and st.parked == 1 and st.parked_bytes > 0
        assert not lru.session.seq.resident and lru.session.seq.parked is not None
        assert all(c.session.seq.resident for c in convs if c is not lru) and extra.session.seq.resident
        # parked conversations come back with the same cache: the same answers as before parking
        for c in convs[3:] + [extra, first]:
            c.reply("Is it red?", max_new_tokens=4)  # second is now the least recently used resident one
        lru.reply("Is it red?", max_new_tokens=4)  # back from the host: second goes there for its id
        assert lru.session.seq.resident and not second.session.seq.resident
        again = second.reply("Is it red?", max_new_tokens=4)
        assert again.answer.token_ids == want and again.turns_reused == 1
        assert again.cached_tokens == again.prompt_tokens - again.answer.prefilled
        cache.clear()


def test_a_full_host_budget_drops_the_least_recently_used_cached_conversation(tiny_f32_bundle):
    with Pipeline.load(tiny_f32_bundle, threads=1, parallel=1) as pipe:
        conv = pipe.conversation_positions(32)
        ctx = len(pipe.prefix_ids) + 2 * conv
        state = (len(pipe.prefix_ids) + 8 + 24) * pipe.position_bytes  # about one parked conversation
        # room on the host for one and a half of them (a quarter of the host's share caches images)
        pipe.configure_cache(ctx * pipe.position_bytes + int(4 / 3 * 1.5 * state), reserve=32)
        cache = ConversationCache()
        convs = _idle_conversations(pipe, cache, range(1, pipe.scheduler.ctx.n_seq + 3))  # 3 more than ids
        st = pipe.scheduler.stats()
        assert st.parks >= 3 and st.drops >= 1 and st.parked_bytes <= pipe.scheduler.host_bytes
        dropped = [c for c in convs if c.session.seq.closed]
        kept = [c for c in convs if not c.session.seq.closed]
        assert dropped and kept
        assert max(convs.index(c) for c in dropped) < min(convs.index(c) for c in kept)  # oldest first
        assert cache.idle == len(kept) and cache.evictions == len(dropped)
        assert cache.take(dropped[0].key, [], lambda c: True) is None  # gone from the cache as well
        cache.clear()


def test_closing_the_pipeline_while_streams_decode_ends_them_with_closed_error(tiny_f32_bundle):
    from mqt_edge.errors import ClosedError

    pipe = Pipeline.load(tiny_f32_bundle, threads=1, parallel=2)
    errors, started = [], threading.Event()

    def reader():
        try:
            for _ in pipe.stream(scene(seed=9), Q, m=8, max_new_tokens=200):
                started.set()
        except ClosedError as exc:
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    assert started.wait(30)
    pipe.close()
    t.join(30)
    assert not t.is_alive() and errors


def test_a_reply_signals_its_first_token_before_any_text(tiny4):
    # a stream's first chunk goes out at the first token (the server's TTFT), even when the first
    # tokens are not yet whole text: reply() calls on_piece("") once, before reading the generation
    calls = []
    with tiny4.conversation(scene(seed=3), m=8, reserve=32) as c:
        out = c.reply(Q, max_new_tokens=6, on_piece=calls.append)
    assert calls[0] == "" and "" not in calls[1:]
    assert "".join(calls).strip() == out.text


def test_a_failing_step_fails_its_requests_and_the_loop_serves_the_next(tiny_f32_bundle, monkeypatch):
    """A bug in a step (here: the context raising something unexpected) reaches the waiting caller as
    an MQTEdgeError instead of leaving it waiting on a dead loop thread."""
    from mqt_edge.errors import MQTEdgeError

    with Pipeline.load(tiny_f32_bundle, threads=1, parallel=2) as pipe:
        sched, im = pipe.scheduler, scene(seed=3)
        good = sched.ctx.decode_tokens
        calls = {"n": 0}

        def broken(rows):
            calls["n"] += 1
            raise RuntimeError("boom")

        monkeypatch.setattr(sched.ctx, "decode_tokens", broken)
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("r", _try(lambda: pipe.ask(im, Q, m=4, max_new_tokens=4))))
        t.start()
        t.join(60)
        assert not t.is_alive(), "the caller is still waiting on a failed step"
        assert isinstance(box["r"], MQTEdgeError) and "boom" in str(box["r"]) and calls["n"] >= 1
        monkeypatch.setattr(sched.ctx, "decode_tokens", good)
        assert len(pipe.ask(scene(seed=4), Q, m=4, max_new_tokens=4).token_ids) == 4


def _try(fn):
    try:
        return fn()
    except Exception as exc:  # the test looks at it
        return exc


def test_every_llama_cpp_decode_runs_on_the_loop_thread(tiny_f32_bundle, monkeypatch):
    """libgomp keeps a worker pool per calling thread; a second one throttles every barrier's spin
    (a lone decode 1.4x slower on the bench preset), so the prompt head, requests and the calibration's
    batched decode all run on the scheduler's thread."""
    from mqt_edge.calibrate import measure_batched
    from mqt_edge.runtimes.llama import SharedContext

    seen = []
    for name in ("decode_tokens", "decode_embeddings"):
        real = getattr(SharedContext, name)
        monkeypatch.setattr(SharedContext, name, lambda self, rows, _real=real: (
            seen.append(threading.current_thread().name), _real(self, rows))[1])
    with Pipeline.load(tiny_f32_bundle, threads=1, parallel=2) as pipe:
        pipe.ask(scene(seed=5), Q, m=4, max_new_tokens=3)
        pipe.scheduler.call(lambda: measure_batched(pipe.llm, 1, steps=2))
    assert seen and set(seen) == {"mqt-scheduler"}, sorted(set(seen))


def test_the_next_step_waits_for_a_caller_taking_its_token(tiny_f32_bundle, monkeypatch):
    """A caller's own work per token runs between steps, not on the cores of the next decode: the
    loop starts a step only once the callers that were waiting have taken their tokens (up to
    SETTLE_S; raised here so a loaded machine cannot make the test flaky)."""
    import time

    from mqt_edge import scheduler as sched_mod

    monkeypatch.setattr(sched_mod, "SETTLE_S", 0.25)
    with Pipeline.load(tiny_f32_bundle, threads=1, parallel=2) as pipe:
        sched = pipe.scheduler
        starts = []
        real = sched.ctx.decode_tokens
        monkeypatch.setattr(sched.ctx, "decode_tokens", lambda rows: (starts.append(time.monotonic()), real(rows))[1])
        seq = sched.open()
        job = sched.submit(seq, sched.head_len, [("ids", pipe.llm.tokenize("Hello there", False))], max_new=12)
        job.wait_prefill()
        taken = []
        for _ in job.tokens():
            time.sleep(0.01)  # the caller's work on this token (the GIL is free meanwhile)
            taken.append(time.monotonic())
        seq.close()
    # step k feeds token k (the 12th is not fed); token 0 came with the prefill, before the caller waited
    feeds = starts[-(len(taken) - 1):]
    waited = sum(feeds[k] >= taken[k] for k in range(1, len(taken) - 1))
    assert len(taken) == 12 and waited >= len(taken) - 3, (waited, len(taken))
