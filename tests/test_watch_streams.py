"""`Watch` over several named sources: each stream's own frames, drops and question; a failing
source ends its stream only; the streams run at once, so the scheduler can batch them."""

import itertools
import logging
import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mqt_edge.errors import InputError, MQTEdgeError
from mqt_edge.pipeline import Pipeline
from mqt_edge.watch import Latest, Watch

Q = "What color is the circle?"
M, NEW = 16, 6


def circle(color: str) -> np.ndarray:
    im = Image.new("RGB", (336, 336), "white")
    ImageDraw.Draw(im).ellipse((80, 80, 256, 256), fill=color)
    return np.asarray(im)


RED, BLUE = circle("red"), circle("blue")


@pytest.fixture(scope="module")
def pipe(shipped_bundle):
    with Pipeline.load(shipped_bundle, threads=1, parallel=2) as p:
        yield p


@pytest.fixture(scope="module")
def expected(pipe):
    return {name: pipe.ask(im, Q, m=M, max_new_tokens=NEW).token_ids for name, im in (("red", RED), ("blue", BLUE))}


def camera(image: np.ndarray, n: int = 30, dt: float = 0.01):
    for _ in range(n):
        time.sleep(dt)  # faster than answers: the latest-frame policy drops the rest
        yield image


@pytest.mark.parametrize("vision_threads", [None, 2])  # 2: a runner of the watch's own, shared lock-free
def test_each_stream_answers_about_its_own_frames_and_counts_its_own_drops(pipe, expected, vision_threads):
    with Watch(pipe, {"front": camera(RED), "rear": camera(BLUE, n=20)}, Q, m=M, max_new_tokens=NEW,
               vision_threads=vision_threads) as w:
        assert (w._runner is not None) == (vision_threads is not None)
        answers = list(w)
    assert w._runner is None  # the watch's own runner is closed with it
    stats = w.stats
    by = {name: [a for a in answers if a.stream == name] for name in ("front", "rear")}
    assert len(by["front"]) + len(by["rear"]) == len(answers)
    for name, color, n in (("front", "red", 30), ("rear", "blue", 20)):
        got, s = by[name], stats["streams"][name]
        assert got and all(a.answer.token_ids == expected[color] for a in got), name
        assert got[0].answer.answer.split()[0].lower() == color
        assert [a.to_dict()["stream"] for a in got] == [name] * len(got)
        frames = [a.frame for a in got]
        assert frames == sorted(frames) and frames[-1] == n - 1  # indices count within the stream
        assert s["frames"] == n and s["dropped"] > 0, s
        assert s["answered"] + s["dropped"] + s["skipped"] + s["failed"] == n, s
        assert sum(a.dropped for a in got) == s["dropped"]
    assert stats["frames"] == 50 and stats["dropped"] == sum(s["dropped"] for s in stats["streams"].values())
    assert w.errors == {}


def test_a_failing_source_is_reported_once_and_the_other_stream_goes_on(pipe, expected, caplog):
    failed = threading.Event()

    def broken():
        yield RED
        failed.set()
        raise OSError("camera unplugged")

    def steady():
        for _ in range(200):  # ends a while after the failure; stops early only if the watch does
            time.sleep(0.01)
            yield BLUE

    after = []
    with caplog.at_level(logging.WARNING, logger="mqt_edge.watch"):
        with Watch(pipe, {"arm": broken(), "base": steady()}, Q, m=M, max_new_tokens=NEW) as w:
            for a in w:
                if failed.is_set() and a.stream == "base":
                    after.append(a)
    records = [r.getMessage() for r in caplog.records if r.name == "mqt_edge.watch"]
    assert len(records) == 1 and "'arm'" in records[0] and "unplugged" in records[0], records
    assert list(w.errors) == ["arm"] and isinstance(w.errors["arm"], OSError)
    assert "unplugged" in w.stats["streams"]["arm"]["error"]
    assert len(after) >= 2 and all(a.answer.token_ids == expected["blue"] for a in after)
    assert w.stats["streams"]["base"]["frames"] == 200  # the other camera ran to its end


def test_the_streams_run_at_once_each_with_its_own_question(pipe):
    """Both streams' question functions must be inside their frame at the same moment: true only
    when each stream has its own thread (what lets the scheduler batch their LLM work)."""
    meet = threading.Barrier(2, timeout=20)
    seen = []

    def asks(text):
        def question(frame):
            meet.wait()
            seen.append((frame.stream, frame.index))
            return text
        return question

    boxes = {"left": Latest(), "right": Latest()}
    questions = {"left": asks(Q), "right": asks("What shape is the object?")}
    with Watch(pipe, boxes, questions, m=M, max_new_tokens=NEW) as w:
        for name, im in (("left", RED), ("right", BLUE)):
            boxes[name].put(im)
            boxes[name].close()
        answers = {a.stream: a for a in w}
    assert w.errors == {} and sorted(seen) == [("left", 0), ("right", 0)]
    assert answers["left"].question == Q and answers["right"].question == "What shape is the object?"
    assert answers["right"].answer.token_ids == pipe.ask(BLUE, answers["right"].question, m=M,
                                                         max_new_tokens=NEW).token_ids


def test_bad_frames_and_bad_arguments(pipe, caplog):
    errors = []
    bad = [RED, np.zeros((4, 4), np.uint8), RED]
    with Watch(pipe, {"a": bad, "b": [BLUE]}, Q, m=M, max_new_tokens=NEW, keep_all=True,
               on_error=lambda f, e: errors.append((f.stream, f.index, type(e).__name__))) as w:
        got = sorted((a.stream, a.frame) for a in w)
    assert got == [("a", 0), ("a", 2), ("b", 0)] and errors == [("a", 1, "ImageError")]
    assert w.stats["streams"]["a"]["failed"] == 1 and w.stats["failed"] == 1
    with caplog.at_level(logging.WARNING, logger="mqt_edge.watch"):
        with Watch(pipe, {"a": bad, "b": [BLUE]}, Q, m=M, max_new_tokens=NEW, keep_all=True) as w:
            got = sorted((a.stream, a.frame) for a in w)  # without on_error the bad frame ends stream a only
    assert got == [("a", 0), ("b", 0)] and list(w.errors) == ["a"]
    for frames, question, kwargs, match in [
        ({}, Q, {}, "no sources"), ({"": [RED]}, Q, {}, "source name"), ({3: [RED]}, Q, {}, "source name"),
        ({"a": [RED]}, {"b": Q}, {}, "one question per source"), ([RED], {"a": Q}, {}, "one question per source"),
        ({"a": [RED]}, {"a": 42}, {}, "question of type int"),
        ({"a": [RED]}, Q, {"overlap": True}, "several sources"), ({"a": [RED]}, Q, {"llm_threads": 1}, "several"),
    ]:
        with pytest.raises(InputError, match=match):
            Watch(pipe, frames, question, m=M, **kwargs)
    with pytest.raises(MQTEdgeError, match="out of range"):
        Watch(pipe, {"a": [RED]}, Q, m=0)


def test_more_streams_than_parallel_warns_in_one_line(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="mqt_edge.watch"):
        Watch(pipe, {"a": [RED], "b": [RED]}, Q, m=M).close()
        assert not caplog.records
        Watch(pipe, {"a": [RED], "b": [RED], "c": [BLUE]}, Q, m=M).close()
    (record,) = caplog.records
    assert "3 streams" in record.getMessage() and "parallel=3" in record.getMessage()
    assert "\n" not in record.getMessage()


def test_leaving_the_loop_stops_every_streams_threads(pipe, expected):
    before = threading.active_count()  # `expected` started the scheduler's own thread
    w = Watch(pipe, {"a": itertools.repeat(RED), "b": itertools.repeat(BLUE)}, Q, m=M, max_new_tokens=NEW)
    for _ in w:  # endless cameras: leaving the loop ends both streams, their readers and answerers
        break
    w.close()
    assert threading.active_count() == before and w.errors == {}
    assert pipe.ask(RED, Q, m=M, max_new_tokens=NEW).answer  # the pipeline still answers
