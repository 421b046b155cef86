"""The synthetic shapes VQA task and `mqt-edge eval`."""

import json

import numpy as np
import pytest

from conftest import cli, stderr_lines

from mqt_edge.errors import InputError
from mqt_edge.evaluate import first_word, load_items
from mqt_edge.vqa import COLORS, Scene, Shape, random_scene, sample, write_dataset


def test_scenes_follow_the_spec():
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(300):
        s = random_scene(rng)
        assert 64 <= s.width <= 512 and 64 <= s.height <= 512
        assert all(200 <= c <= 255 for c in s.background)
        assert 1 <= len(s.shapes) <= 3
        counts.add(len(s.shapes))
        short = min(s.width, s.height)
        pairs = [(x.kind, x.color) for x in s.shapes]
        assert len(set(pairs)) == len(pairs)
        for a in s.shapes:
            assert 0.15 * short - 1e-6 <= a.size <= 0.30 * short + 1e-6
            assert all(abs(v - c) <= 20 for v, c in zip(a.rgb, COLORS[a.color]))
            x0, y0, x1, y1 = a.box()
            assert x0 >= 0 and y0 >= 0 and x1 <= s.width and y1 <= s.height
            for b in s.shapes:
                if a is not b:
                    bx0, by0, bx1, by1 = b.box()
                    assert x1 <= bx0 or bx1 <= x0 or y1 <= by0 or by1 <= y0  # no overlap
    assert counts == {1, 2, 3}


def test_questions_and_answers():
    red_circle = Shape("circle", "red", (220, 40, 40), 30, 50, 20)
    blue_square = Shape("square", "blue", (40, 80, 220), 90, 50, 20)
    qs = {q: a for _, q, a in Scene(128, 100, (230, 230, 230), (red_circle, blue_square)).questions()}
    assert qs["How many shapes are there?"] == "two"
    assert qs["What color is the circle?"] == "red"
    assert qs["What shape is the blue object?"] == "square"
    assert qs["Is the circle on the left or on the right?"] == "left"
    assert qs["Is the square on the left or on the right?"] == "right"
    assert qs["Is there a red circle?"] == "yes" and qs["Is there a red square?"] == "no"
    blue_circle = Shape("circle", "blue", (40, 80, 220), 90, 50, 20)
    qs = {q: a for _, q, a in Scene(128, 100, (230, 230, 230), (red_circle, blue_circle)).questions()}
    assert "What color is the circle?" not in qs  # two circles: ambiguous, never asked
    assert "Is the circle on the left or on the right?" not in qs
    assert qs["What shape is the red object?"] == "circle"


def test_rendered_pixels_match_the_scene():
    s = Scene(100, 80, (210, 220, 230), (Shape("square", "green", (40, 180, 60), 50, 40, 20),))
    arr = np.asarray(s.render())
    assert tuple(arr[40, 50]) == (40, 180, 60) and tuple(arr[2, 2]) == (210, 220, 230)
    tri = Scene(100, 80, (210, 220, 230), (Shape("triangle", "red", (220, 40, 40), 50, 40, 30),))
    arr = np.asarray(tri.render())
    assert tuple(arr[52, 50]) == (220, 40, 40)  # near the base: inside
    assert tuple(arr[27, 37]) == (210, 220, 230)  # top-left corner of the box: outside (it points up)


def test_every_question_type_occurs_and_yes_no_is_balanced():
    rng = np.random.default_rng(1)
    draws = [sample(rng) for _ in range(600)]
    types = {t for _, t, _, _ in draws}
    assert types == {"color", "count", "exists", "shape", "side"}
    exists = [a for _, t, _, a in draws if t == "exists"]
    assert 0.35 < exists.count("yes") / len(exists) < 0.65


def test_dataset_is_reproducible_and_loadable(tmp_path):
    a = write_dataset(tmp_path / "a", 12, seed=5)
    b = write_dataset(tmp_path / "b", 12, seed=5)
    assert a.read_text() == b.read_text()
    assert (tmp_path / "a" / "images" / "000011.png").read_bytes() == (tmp_path / "b" / "images" / "000011.png").read_bytes()
    items = load_items(a)
    assert len(items) == 12 and items[0].image.is_file()
    with pytest.raises(InputError, match="already exists"):
        write_dataset(tmp_path / "a", 3, seed=1)


def test_scoring_is_first_word_without_case_or_punctuation():
    assert first_word("Red.") == "red" and first_word("  yes, there is") == "yes" and first_word("") == ""


def test_bad_jsonl_names_the_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"image": "a.png", "text": "Q?", "answer": "red"}\n{"image": "b.png"}\n')
    with pytest.raises(InputError, match="line 2"):
        load_items(tmp_path / "d.jsonl")
    with pytest.raises(InputError, match="synth-vqa"):
        load_items(tmp_path / "none.jsonl")


@pytest.fixture(scope="module")
def bundle(tiny_ckpt, tmp_path_factory):
    from mqt_edge.exporters import ExportOptions, export

    return export(ExportOptions(model=str(tiny_ckpt), out=tmp_path_factory.mktemp("ev") / "b", quant="f32")).bundle


def test_eval_cli_table_json_plot_and_save(bundle, tmp_path):
    from mqt_edge.bundle import Bundle
    from mqt_edge.profiles import load_profile
    from mqt_edge.profiles.planner import ModelFacts, plan

    assert cli("synth-vqa", "--n", "6", "--seed", "2", "--out", str(tmp_path / "set")).returncode == 0
    data = tmp_path / "set" / "data.jsonl"
    r = cli("eval", "--bundle", str(bundle.root), "--data", str(data), "--tokens", "2,16,64", "--json",
            "--plot", str(tmp_path / "curve.png"), "--save", "--timing-samples", "1")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["results"]
    assert [row["m"] for row in rows] == [2, 16, 64]
    assert all(row["n"] == 6 and 0 <= row["accuracy"] <= 1 and row["ttft_ms"] > 0 for row in rows)
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    saved = Bundle.open(bundle.root)  # still verifies: the table lives in the manifest only
    assert [row.m for row in saved.manifest.accuracy] == [2, 16, 64]
    assert ModelFacts.from_bundle(saved).accuracy  # the planner sees the table
    result = plan(load_profile("cpu"), ModelFacts.from_bundle(saved))
    assert "smallest m within" in result.reason  # ... and switches to the accuracy policy


def test_eval_scores_the_same_answers_as_fresh_requests(bundle, tmp_path):
    """Eval refines one session per image; a set whose answers are the fresh requests' own first
    words must then score 100% at every m (the random model's answers are noise, not 'red')."""
    from dataclasses import replace

    from mqt_edge.evaluate import evaluate, first_word
    from mqt_edge.pipeline import Pipeline

    items = load_items(write_dataset(tmp_path / "set", 4, seed=9))
    with Pipeline.load(bundle.root) as pipe:
        for m in (4, 32):
            own = [replace(it, answer=first_word(pipe.ask(it.image, it.text, m=m, max_new_tokens=8).answer) or "-")
                   for it in items]
            row = evaluate(pipe, own, [2, m], timing_samples=1)[-1]  # m reached by refining from 2
            assert row.accuracy == 1.0, m


@pytest.mark.parametrize("args, match", [
    (["--tokens", "2,x"], "comma-separated list"),
    (["--tokens", "999"], "above the bundle's maximum"),
])
def test_eval_errors_are_one_line(bundle, tmp_path, args, match):
    write_dataset(tmp_path / "set", 2, seed=1)
    r = cli("eval", "--bundle", str(bundle.root), "--data", str(tmp_path / "set" / "data.jsonl"), *args)
    lines = stderr_lines(r)
    assert r.returncode == 2 and len(lines) == 1 and match in lines[0], r.stderr
