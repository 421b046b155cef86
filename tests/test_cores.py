"""CoreShare: vision and the LLM's steps never hold more threads than the CPU has, and vision goes first."""

from __future__ import annotations

import threading
import time

from mqt_edge.cores import CoreShare


def test_unshared_runs_both_at_once():
    share = CoreShare(None)
    with share.vision(2), share.llm() as threads:
        assert threads is None  # a GPU on either side: the context keeps its own threads


def test_full_vision_run_waits_for_the_step_in_flight_and_blocks_the_next():
    share, events = CoreShare(2), []
    step_started, vision_in = threading.Event(), threading.Event()

    def step():
        with share.llm() as threads:
            events.append(("step", threads))
            step_started.set()
            time.sleep(0.2)
            events.append(("step end", None))

    def vision():
        step_started.wait()
        with share.vision(2):
            vision_in.set()
            events.append(("vision", None))
            time.sleep(0.2)
            events.append(("vision end", None))

    threads = [threading.Thread(target=step), threading.Thread(target=vision)]
    for t in threads:
        t.start()
    vision_in.wait(5)
    second = threading.Thread(target=step)
    second.start()
    for t in threads + [second]:
        t.join(5)
    kinds = [k for k, _ in events]
    # vision entered only after the first step ended; the second step only after vision ended
    assert kinds == ["step", "step end", "vision", "vision end", "step", "step end"], kinds
    assert [n for k, n in events if k == "step"] == [2, 2]


def test_a_one_thread_vision_run_leaves_the_other_core_to_the_llm():
    share = CoreShare(2)
    with share.vision(1):
        with share.llm() as threads:
            assert threads == 1
    with share.llm() as threads:
        assert threads == 2


def test_vision_waiting_goes_before_the_next_step():
    share = CoreShare(2)
    order, held = [], threading.Event()

    def busy_steps():
        for _ in range(20):
            with share.llm():
                held.set()
                order.append("step")
                time.sleep(0.01)

    t = threading.Thread(target=busy_steps)
    t.start()
    held.wait(5)
    with share.vision(None):  # None: every core
        order.append("vision")
    t.join(5)
    # the loop re-enters llm() at once after each step; vision still got in within a step or two
    assert order.index("vision") <= 3, order


def test_a_prefill_goes_before_waiting_vision_and_the_next_image_waits_for_it():
    share, order = CoreShare(2), []
    first_done, second_waiting = threading.Event(), threading.Event()
    job = []  # the "scheduler's" queue: the first request's prefill appears right after its image
    share.urgent = lambda: bool(job)

    def first_request():
        with share.vision(2):
            order.append("image 1")
        first_done.set()
        time.sleep(0.01)  # the thread submits its prefill a moment later
        job.append("prefill 1")
        share.wake()

    def second_request():
        first_done.wait()
        second_waiting.set()
        with share.vision(2):
            order.append("image 2")

    def loop():  # the scheduler's loop: steps one after another (decoding other streams)
        second_waiting.wait()
        deadline = time.monotonic() + 3
        while "image 2" not in order and time.monotonic() < deadline:
            with share.llm():
                order.append(job.pop() if job else "decode")
                time.sleep(0.005)

    threads = [threading.Thread(target=f) for f in (first_request, second_request, loop)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    # image 1, then its prefill (first token), then image 2: not image 1, image 2, prefill 1
    assert [o for o in order if o != "decode"] == ["image 1", "prefill 1", "image 2"], order


def test_the_hold_lapses_when_no_prefill_comes():
    share = CoreShare(2)
    with share.vision(2):
        pass
    t0 = time.monotonic()
    with share.vision(2):  # nobody submitted a prefill: this image starts after the hold, not never
        waited = time.monotonic() - t0
    assert 0.02 < waited < 1.0, waited


def test_a_prefill_that_arrives_during_a_step_goes_before_the_waiting_image():
    share, order, job = CoreShare(2), [], []
    share.urgent = lambda: bool(job)
    in_step, vision_waits = threading.Event(), threading.Event()

    def loop():
        for _ in range(2):
            with share.llm():
                order.append(job.pop() if job else "decode")
                in_step.set()
                vision_waits.wait(5)
                time.sleep(0.05)
            time.sleep(0.03)  # between steps (commands, admission): vision must not slip in

    def image():
        in_step.wait(5)
        time.sleep(0.1)  # past any hold: only the urgency can put the prefill first
        vision_waits.set()
        job.append("prefill")
        share.wake()
        with share.vision(2):
            order.append("image")

    threads = [threading.Thread(target=loop), threading.Thread(target=image)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert order == ["decode", "prefill", "image"], order


def test_a_step_that_outlasts_the_follow_up_wait_starts_it_again():
    """After an image, vision waits FOLLOWUP_S for that request's LLM work; a decode step that began
    inside the wait and outlasted it must not let the next image jump ahead of that request, whose
    thread needs the loop between steps. Seen with 4 requests at once: the 3rd request's prefill
    came after the 4th image."""
    from mqt_edge.cores import FOLLOWUP_S

    share, events = CoreShare(2), []
    with share.vision(2):
        pass  # an image: the follow-up wait starts
    started = threading.Event()

    def next_image():
        started.wait()
        with share.vision(2):
            events.append(("vision", time.monotonic()))

    t = threading.Thread(target=next_image)
    t.start()
    with share.llm():  # a decode step inside the wait, longer than it
        started.set()
        time.sleep(3 * FOLLOWUP_S)
    step_end = time.monotonic()
    time.sleep(FOLLOWUP_S / 5)  # the request's thread, back after the step: its prefill is urgent now
    share.urgent = lambda: True
    share.wake()
    with share.llm():
        events.append(("prefill", time.monotonic()))
    share.urgent = lambda: False
    share.wake()
    t.join(5)
    assert [k for k, _ in events] == ["prefill", "vision"], events
    assert events[0][1] - step_end < 2 * FOLLOWUP_S
