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
