"""`Watch`: answers about the newest frame of a stream, dropped frames counted, overlap."""

import itertools
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import cli, scene
from mqt_edge.errors import ImageError, InputError, MQTEdgeError
from mqt_edge.pipeline import Pipeline
from mqt_edge.watch import Latest, Watch

Q = "What color is the circle?"
M, NEW = 16, 6
EXAMPLE = np.asarray(Image.open(Path(__file__).parent.parent / "examples" / "shapes.png").convert("RGB"))
SCENES = [EXAMPLE, np.asarray(scene(seed=1)), np.asarray(scene(seed=2))]


@pytest.fixture(scope="module")
def pipe(default_bundle):
    with Pipeline.load(default_bundle, threads=1) as p:  # 2 threads on 2 shared cores: 10x slower here
        yield p


@pytest.fixture(scope="module")
def expected(pipe):
    """pipe.ask's greedy ids for each scene: what every streamed answer about it must equal."""
    return [pipe.ask(im, Q, m=M, max_new_tokens=NEW).token_ids for im in SCENES]


class Camera:
    """30 frames, one every `dt` s (faster than answers); records when each was handed over."""

    def __init__(self, n: int = 30, dt: float = 0.01) -> None:
        self.n, self.dt = n, dt
        self.offered, self.stored = {}, {}

    def __iter__(self):
        for i in range(self.n):
            time.sleep(self.dt)
            self.offered[i] = time.perf_counter()
            yield SCENES[i % 3]
            self.stored[i] = time.perf_counter()  # the reader resumes us only after it put frame i


@pytest.mark.parametrize("overlap", [False, True])
def test_answers_are_about_the_newest_frame_and_drops_add_up(pipe, expected, overlap):
    cam = Camera()
    answers, received = [], []
    with Watch(pipe, cam, Q, m=M, max_new_tokens=NEW, overlap=overlap) as w:
        for a in w:
            answers.append(a)
            received.append(time.perf_counter())
            time.sleep(0.05)  # a consumer that takes its time must not make the encoder run ahead
    stats = w.stats
    assert stats["overlap"] is overlap and stats["frames"] == 30
    assert stats["dropped"] > 0, stats  # frames did arrive faster than answers
    assert stats["answered"] + stats["dropped"] + stats["skipped"] + stats["failed"] == 30, stats
    assert sum(a.dropped for a in answers) == stats["dropped"]
    frames = [a.frame for a in answers]
    assert frames == sorted(frames) and len(set(frames)) == len(frames) and frames[-1] == 29
    previous = -1
    for a in answers:
        assert a.dropped == a.frame - previous - 1  # the frames between two answers are the dropped ones
        previous = a.frame
        assert cam.offered[a.frame] < a.started
        newer = [j for j in range(a.frame + 1, 30) if j in cam.stored and cam.stored[j] < a.started]
        assert not newer, f"frame {a.frame} was answered although {newer} had already arrived"
        assert a.answer.token_ids == expected[a.frame % 3]  # greedy: the same ids as pipe.ask
        assert a.answer.m == M and a.timings_ms["latency"] >= a.timings_ms["llm"] > 0
    # at most one frame is encoded ahead: frame k is taken only after the LLM took frame k-1,
    # which it did only after answer k-2 had been handed to the consumer
    assert all(answers[k].started > received[k - 2] for k in range(2, len(answers)))


def test_a_changing_question_and_skipped_frames(pipe):
    questions = {0: Q, 1: None, 2: "What shape is the red object?", 3: None, 4: Q}
    with Watch(pipe, SCENES[:1] * 5, lambda f: questions[f.index], m=M, max_new_tokens=NEW, keep_all=True) as w:
        answers = list(w)
    assert [(a.frame, a.question) for a in answers] == [(0, Q), (2, questions[2]), (4, Q)]
    assert w.stats["skipped"] == 2 and w.stats["dropped"] == 0
    for a in answers:
        assert a.answer.token_ids == pipe.ask(EXAMPLE, a.question, m=M, max_new_tokens=NEW).token_ids
    assert answers[0].answer.answer.split()[0].lower() == "red"


def test_m_from_the_planner_and_refinement_per_frame(pipe, default_bundle):
    r = cli("plan", "--profile", "cpu", "--bundle", str(default_bundle), "--max-new-tokens", str(NEW), "--json")
    assert r.returncode == 0, r.stderr
    planned = json.loads(r.stdout)["chosen_m"]
    with Watch(pipe, [EXAMPLE], Q, profile="cpu", max_new_tokens=NEW) as w:
        (a,) = list(w)
    assert a.answer.m == planned and a.answer.predicted["profile"] == "cpu"

    with Watch(pipe, [EXAMPLE] * 2, Q, m=4, refine=64, confidence=1.01, max_new_tokens=NEW, keep_all=True) as w:
        answers = list(w)
    fresh = pipe.ask(EXAMPLE, Q, m=64, max_new_tokens=NEW).token_ids
    assert len(answers) == 2
    for a in answers:
        assert a.answer.m == 64 and a.answer.refined_from["m"] == 4
        assert a.answer.token_ids == fresh  # refinement is exact, frame by frame


def test_a_push_source_feeds_the_mailbox(pipe, expected):
    box = Latest()
    with Watch(pipe, box, Q, m=M, max_new_tokens=NEW) as w:
        for im in SCENES:
            box.put(im, meta={"stamp": 7})
        box.close()
        answers = list(w)
    assert answers[-1].frame == 2 and answers[-1].meta == {"stamp": 7}
    assert answers[-1].answer.token_ids == expected[2]


@pytest.mark.parametrize("overlap", [False, True])
def test_errors_end_the_watch_cleanly(pipe, overlap):
    bad = [EXAMPLE, np.zeros((4, 4), np.uint8)]
    with pytest.raises(ImageError, match="HxWx3"):
        list(Watch(pipe, bad, Q, m=M, max_new_tokens=NEW, overlap=overlap, keep_all=True))
    errors = []
    with Watch(pipe, bad + [EXAMPLE], Q, m=M, max_new_tokens=NEW, overlap=overlap, keep_all=True,
               on_error=lambda f, e: errors.append((f.index, type(e).__name__))) as w:
        assert [a.frame for a in w] == [0, 2]  # with on_error a bad frame is reported and skipped
    assert errors == [(1, "ImageError")] and w.stats["failed"] == 1

    def broken():
        yield EXAMPLE
        raise OSError("camera unplugged")

    with pytest.raises(OSError, match="unplugged"):
        list(Watch(pipe, broken(), Q, m=M, max_new_tokens=NEW, overlap=overlap, keep_all=True))
    for kwargs, match in [(dict(m=0), "out of range"), (dict(m=M, refine=M), "not above"),
                          (dict(m=M, max_new_tokens=0), "max_new_tokens")]:
        with pytest.raises(MQTEdgeError, match=match):
            Watch(pipe, [EXAMPLE], Q, **kwargs)
    with pytest.raises(InputError, match="question"):
        Watch(pipe, [EXAMPLE], 42, m=M)
    before = threading.active_count()
    w = Watch(pipe, itertools.repeat(EXAMPLE), Q, m=M, max_new_tokens=NEW, overlap=overlap)
    for _ in w:  # an endless camera: leaving the loop stops the watch's threads
        break
    w.close()
    assert threading.active_count() == before
    assert pipe.ask(EXAMPLE, Q, m=M, max_new_tokens=NEW).answer  # the pipeline still answers


def test_a_session_from_an_encoded_image_is_the_same_as_from_the_image(pipe):
    enc = pipe.encode(EXAMPLE, m=M)
    assert enc.m == M and enc.visual.shape[0] == M and len(enc.seconds) == 3
    with pipe.look(enc) as s, pipe.look(EXAMPLE, m=M) as ref:
        a, b = s.ask(Q, max_new_tokens=NEW), ref.ask(Q, max_new_tokens=NEW)
        assert a.token_ids == b.token_ids and a.prefilled == b.prefilled
        s.refine(64)  # the features travel with the encoding, so it can refine
        ref.refine(64)
        assert s.ask(Q, max_new_tokens=NEW).token_ids == ref.ask(Q, max_new_tokens=NEW).token_ids
    with pytest.raises(MQTEdgeError, match="differs from the encoded image"):
        pipe.look(enc, m=M + 1)


def test_watch_refines_through_the_librarys_step_and_checks_its_arguments(pipe):
    """The per-frame refinement is Session.answer's: the API's refined_from record."""
    with Watch(pipe, [EXAMPLE], Q, m=4, refine=16, confidence=1.01, max_new_tokens=NEW) as w:
        (a,) = list(w)
    assert a.answer.m == 16 and set(a.answer.refined_from) == {"m", "first_token_prob", "timings_ms", "prefilled"}
    for bad, message in ((dict(confidence=-1), "confidence=-1"), (dict(seed=-1), "seed=-1")):
        with pytest.raises(InputError, match=message):
            Watch(pipe, [EXAMPLE], Q, m=4, **bad)


def test_answers_per_s_is_the_steady_rate_between_the_first_and_last_answer():
    from mqt_edge.stream import Stream

    s = Stream(None, None, [], Q, None, False, None)
    assert s.stats()["answers_per_s"] is None  # nothing answered yet
    # first frame taken at 100 s, answers done at 105, 107, 109, 111: one every 2 s once running
    s.started_at, s.first_at, s.last_at, s.answered = 100.0, 105.0, 111.0, 4
    stats = s.stats()
    assert stats["answers_per_s"] == 0.5 and stats["seconds"] == 11.0, stats
    s.first_at, s.answered = 111.0, 1  # one answer: no rate yet
    assert s.stats()["answers_per_s"] is None
