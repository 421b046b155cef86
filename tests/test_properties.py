"""Property tests: whatever bytes, text or numbers come in, the outcome is an answer or one clean
error (an MQTEdgeError in the API, exit code 2 and one line in the CLI) — never a crash or traceback.

Examples are bounded (a few dozen per property, no deadline) so the file stays within ~60 s."""

import contextlib
import io

import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import scene
from mqt_edge.errors import MQTEdgeError
from mqt_edge.pipeline import Answer, Pipeline

Q = "What color is the circle?"
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def bundle(tiny_ckpt, tmp_path_factory):
    from mqt_edge.exporters import ExportOptions, export

    return export(ExportOptions(model=str(tiny_ckpt), out=tmp_path_factory.mktemp("prop") / "b", quant="f32",
                                max_tokens=16, parity=False)).bundle


@pytest.fixture(scope="module")
def pipe(bundle):
    with Pipeline.load(bundle.root) as p:
        yield p


def png_bytes(wh) -> bytes:
    buf = io.BytesIO()
    scene(*wh).save(buf, "PNG") if min(wh) > 40 else Image.new("RGB", wh, (9, 99, 199)).save(buf, "PNG")
    return buf.getvalue()


# A valid PNG damaged at random places, a PNG header followed by noise, or noise alone.
damaged = st.tuples(st.sampled_from([(64, 48), (3, 200), (200, 3), (1, 1)]),
                    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
                    st.integers(0, 10**6)).map(
    lambda t: bytes(_damage(png_bytes(t[0]), t[1]))[: max(8, t[2])])
image_bytes = st.one_of(damaged, st.binary(max_size=600).map(lambda b: b"\x89PNG\r\n\x1a\n" + b), st.binary(max_size=300))


def _damage(data: bytes, edits) -> bytearray:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return out


@FAST
@given(data=image_bytes)
def test_any_bytes_as_an_image_file(pipe, tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "prop-image.png"
    path.write_bytes(data)
    try:
        answer = pipe.ask(path, Q, m=1, max_new_tokens=1)
    except MQTEdgeError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(answer, Answer) and answer.m == 1


numbers = st.one_of(st.none(), st.booleans(), st.integers(-3, 20), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=3))
# Any code point (surrogates and controls too), weighted towards the awkward ones a uniform draw rarely hits.
awkward = st.sampled_from(["\udcff", "\ud800", "\x00", "\n", " ", "<image>", "é", "猫", "\u202e", "?"])
any_text = st.one_of(st.text(st.characters(codec=None, exclude_categories=()), max_size=60),
                     st.lists(st.one_of(awkward, st.characters()), max_size=12).map("".join))


@FAST
@given(question=any_text, m=numbers, max_new_tokens=numbers, temperature=numbers, top_p=numbers, seed=numbers,
       one_shot=st.booleans(), text_only=st.booleans())
def test_any_text_and_numbers_at_the_api(pipe, question, m, max_new_tokens, temperature, top_p, seed, one_shot,
                                         text_only):
    if text_only:  # valid numbers, so the text reaches the tokenizer (random numbers mostly stop earlier)
        m, max_new_tokens, temperature, top_p, seed = 2, 2, 0.0, 1.0, 0
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if isinstance(kw["max_new_tokens"], int) and not isinstance(kw["max_new_tokens"], bool):
        kw["max_new_tokens"] = min(kw["max_new_tokens"], 3)  # bound the time, keep the out-of-range values
    try:
        if one_shot:
            answer = pipe.ask(scene(), question, m=m, **kw)
        else:
            with pipe.look(scene(), m=m) as s:
                answer = s.ask(question, **kw)
    except MQTEdgeError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(answer, Answer) and isinstance(answer.answer, str)


number_text = st.one_of(st.integers(-5, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                        st.sampled_from(["nan", "inf", "-inf", "1e400", "0", "-0.0"]))
argv_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=0, max_size=40)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(question=argv_text, option=st.sampled_from(["--tokens", "--temperature", "--top-p", "--threads", "--seed",
                                                   "--confidence", "--ttft-ms", "--memory-mb", "--max-new-tokens"]),
       value=number_text)
def test_any_text_and_numbers_at_run(bundle, tmp_path_factory, question, option, value):
    from mqt_edge.cli import main

    image = tmp_path_factory.getbasetemp() / "prop-run.png"
    if not image.exists():
        scene().save(image)
    if option == "--max-new-tokens" and value.lstrip("-").isdigit():
        value = str(min(int(value), 3))
    extra = [] if option in ("--tokens", "--max-new-tokens") else ["--tokens", "2", "--max-new-tokens", "2"]
    argv = ["mqt-edge", "run", str(image), question, "--bundle", str(bundle.root), option, value, *extra]
    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = old
    text = err.getvalue()
    assert "Traceback" not in text
    if code == 0:
        assert "TTFT" in text
    else:
        lines = [line for line in text.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, (argv, code, text)  # parse errors too: one line


def test_the_generated_images_include_valid_ones():
    """The image property is not vacuous: undamaged examples decode (the strategy can give them)."""
    assert np.asarray(Image.open(io.BytesIO(png_bytes((64, 48))))).shape == (48, 64, 3)
