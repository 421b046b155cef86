"""`mqt-edge run` / Pipeline: same answers as the reference, image reuse, exact refinement, safety."""

import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import cli, scene, stderr_lines
from mqt_edge.bundle import BundleError
from mqt_edge.errors import ImageError, InputError, MQTEdgeError, TokensError
from mqt_edge.pipeline import Pipeline

Q = "What color is the circle?"


@pytest.fixture(scope="module")
def f32_bundle(tiny_ckpt, tmp_path_factory):
    from mqt_edge.exporters import ExportOptions, export

    return export(ExportOptions(model=str(tiny_ckpt), out=tmp_path_factory.mktemp("rt") / "b", quant="f32")).bundle


@pytest.fixture(scope="module")
def pipe(f32_bundle):
    with Pipeline.load(f32_bundle.root) as p:
        yield p


TIE = 1e-3  # a top-2 logit gap below this is a float tie that llama.cpp and torch may break differently


@pytest.mark.parametrize("m", [1, 16, 256])
def test_same_greedy_ids_as_the_pytorch_reference(pipe, tiny_model, m):
    compared = 0
    for seed in range(3):
        im = scene(seed=seed)
        ref = tiny_model.generate(im, Q, m=m, max_new_tokens=16)
        got = pipe.ask(im, Q, m=m, max_new_tokens=16)
        # Every step before the first tie must agree; at a tie either token is right, and after it
        # the two continue from different prefixes.
        n = next((i for i, gap in enumerate(ref.margins) if gap < TIE), len(ref.token_ids))
        assert got.token_ids[:n] == ref.token_ids[:n], (m, seed, ref.margins[:n])
        if n == len(ref.token_ids):
            assert got.token_ids == ref.token_ids and got.answer == ref.text
        compared += n
    assert compared >= 30  # the check covers most of the 3 x 16 tokens


@pytest.mark.parametrize("question", [Q, "Describe  the\nscene: 3 cats?", "Qué color tiene?"])
def test_llama_cpp_tokenises_like_the_release(pipe, tiny_model, question):
    before, after = tiny_model.prompt_ids(question)
    assert pipe.prefix_ids == before
    assert pipe.question_ids(question) == after


def test_image_reuse_prefills_only_the_question(pipe):
    im = scene(seed=3)
    with pipe.look(im, m=32) as s:
        first = s.ask(Q, max_new_tokens=8)
        second = s.ask("How many shapes are there?", max_new_tokens=8)
        third = s.ask(Q, max_new_tokens=8)
    q_len = len(pipe.question_ids("How many shapes are there?"))
    assert first.prefilled == 32 + len(pipe.question_ids(Q))  # the prompt head is restored, not prefilled
    assert second.prefilled == q_len
    assert second.timings_ms["vision"] == 0 and second.timings_ms["preprocess"] == 0
    assert third.token_ids == first.token_ids  # the KV cache was restored to the image prefix
    assert second.token_ids == pipe.ask(im, "How many shapes are there?", m=32, max_new_tokens=8).token_ids


@pytest.mark.parametrize("m0, m1", [(1, 16), (8, 64), (16, 256)])
def test_refinement_is_exact_and_prefills_only_new_tokens(pipe, m0, m1):
    im = scene(seed=4)
    with pipe.look(im, m=m0) as s:
        s.ask(Q, max_new_tokens=12)
        s.refine(m=m1)
        refined = s.ask(Q, max_new_tokens=12)
    fresh = pipe.ask(im, Q, m=m1, max_new_tokens=12)
    assert refined.token_ids == fresh.token_ids
    assert refined.m == m1
    assert refined.prefilled == (m1 - m0) + len(pipe.question_ids(Q))


def test_refine_must_grow(pipe):
    with pipe.look(scene(), m=16) as s:
        with pytest.raises(TokensError):
            s.refine(m=16)
        with pytest.raises(TokensError, match="maximum of 256"):
            s.refine(m=300)


def test_stream_yields_the_answer(pipe):
    im = scene(seed=5)
    pieces = list(pipe.stream(im, Q, m=16, max_new_tokens=12))
    assert len(pieces) > 1
    assert "".join(pieces).strip() == pipe.ask(im, Q, m=16, max_new_tokens=12).answer


def test_path_pil_and_array_inputs_agree(pipe, tmp_path):
    im = scene(seed=6)
    im.save(tmp_path / "x.png")
    ids = {tuple(pipe.ask(x, Q, m=8, max_new_tokens=6).token_ids)
           for x in (im, np.asarray(im), tmp_path / "x.png", str(tmp_path / "x.png"))}
    assert len(ids) == 1


def test_sampling_is_seeded(pipe):
    kw = dict(m=8, max_new_tokens=12, temperature=1.2, top_p=0.9)
    a = pipe.ask(scene(), Q, seed=1, **kw).token_ids
    assert a == pipe.ask(scene(), Q, seed=1, **kw).token_ids
    assert any(pipe.ask(scene(), Q, seed=s, **kw).token_ids != a for s in range(2, 6))


def test_threads_never_mix_state(pipe):
    jobs = [(scene(seed=i), q, m) for i, (q, m) in enumerate([(Q, 4), ("How many shapes?", 32), (Q, 64), ("Is it red?", 8)])]
    expected = [pipe.ask(im, q, m=m, max_new_tokens=10).token_ids for im, q, m in jobs]
    results = {}

    def work(i, copy):
        im, q, m = jobs[i]
        results[(i, copy)] = pipe.ask(im, q, m=m, max_new_tokens=10).token_ids

    threads = [threading.Thread(target=work, args=(i, c)) for i in range(len(jobs)) for c in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 * len(jobs)
    assert all(results[(i, c)] == expected[i] for i in range(len(jobs)) for c in range(2))

    # two threads on one session serialise: each sees the image prefix, never the other's question
    with pipe.look(scene(seed=9), m=16) as s:
        solo = [s.ask(q, max_new_tokens=8).token_ids for q in (Q, "How many shapes?")]
        out = {}
        ts = [threading.Thread(target=lambda q=q: out.__setitem__(q, s.ask(q, max_new_tokens=8).token_ids))
              for q in (Q, "How many shapes?")]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert [out[Q], out["How many shapes?"]] == solo


def test_an_unread_answer_never_deadlocks_its_session(pipe):
    with pipe.look(scene(), m=8) as s:
        g = s.generate(Q, max_new_tokens=4)
        with pytest.raises(InputError, match="unfinished answer"):
            s.generate(Q)  # same thread, first answer still open: an error, not a hang
        with pytest.raises(InputError, match="unfinished answer"):
            s.refine(m=16)
        g.cancel()
        assert s.ask(Q, max_new_tokens=4).token_ids
        s.generate(Q, max_new_tokens=4)  # left open: closing the session must still work
    it = iter(pipe.look(scene(), m=8).generate(Q, max_new_tokens=4))
    next(it)
    del it  # abandoned mid-answer: the generator's cleanup releases the lock


def test_context_manager_frees_native_resources(f32_bundle):
    p = Pipeline.load(f32_bundle.root)
    with p:
        p.ask(scene(), Q, m=2, max_new_tokens=2)
    assert p.llm.ptr is None and p.vision.vision is None


def test_bad_requests_raise_typed_errors(pipe, tmp_path):
    with pytest.raises(TokensError, match="above the bundle's maximum"):
        pipe.ask(scene(), Q, m=257)
    with pytest.raises(InputError, match="empty"):
        pipe.ask(scene(), "  ")
    with pytest.raises(InputError, match="exceed the context"):
        pipe.ask(scene(), Q, m=256, max_new_tokens=5000)
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(ImageError):
        pipe.ask(tmp_path / "bad.jpg", Q)
    pipe.max_pixels, old = 1000, pipe.max_pixels
    try:
        with pytest.raises(ImageError, match="over the limit"):
            pipe.ask(scene(), Q)
    finally:
        pipe.max_pixels = old
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(InputError, match="no cuda execution provider"):
            Pipeline.load(pipe.bundle.root, vision_backend="onnxruntime/cuda")
    with pytest.raises(InputError, match="temperature"):
        pipe.ask(scene(), Q, temperature=float("nan"))
    with pytest.raises(InputError, match="max_new_tokens"):
        pipe.ask(scene(), Q, max_new_tokens=-10**6)
    assert issubclass(BundleError, MQTEdgeError)


def test_broken_bundles(f32_bundle, tmp_path):
    with pytest.raises(BundleError, match="mqt-edge export"):
        Pipeline.load(tmp_path / "missing")
    b = shutil.copytree(f32_bundle.root, tmp_path / "b")
    manifest = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_text(json.dumps(manifest | {"format_version": 2}))
    with pytest.raises(BundleError, match="upgrade mqt-edge"):
        Pipeline.load(b)
    (b / "manifest.json").write_text(json.dumps(manifest))
    with open(b / manifest["artifacts"]["llm"]["path"], "r+b") as f:
        f.seek(-8, 2)
        f.write(b"12345678")
    with pytest.raises(BundleError, match="sha256"):
        Pipeline.load(b)


def test_cli_json_and_refine(f32_bundle, tmp_path):
    scene().save(tmp_path / "img.png")
    r = cli("run", str(tmp_path / "img.png"), Q, "--bundle", str(f32_bundle.root), "--tokens", "8",
            "--max-new-tokens", "6", "--json", "--refine", "32", "--confidence", "1.01")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("answer", "token_ids", "m", "profile", "backends", "timings_ms", "decode_tokens_per_s"):
        assert key in out
    assert set(out["timings_ms"]) == {"preprocess", "vision", "mqt", "prefill", "ttft", "decode", "total"}
    assert out["m"] == 32 and out["refined_from"]["m"] == 8
    assert out["backends"]["vision"] == "onnxruntime/cpu"


def test_cli_streams_text_and_names_the_backend(f32_bundle, tmp_path):
    scene().save(tmp_path / "img.png")
    r = cli("run", str(tmp_path / "img.png"), Q, "--bundle", str(f32_bundle.root), "-m", "4", "--max-new-tokens", "4")
    assert r.returncode == 0 and r.stdout.strip()
    assert "vision onnxruntime/cpu" in r.stderr and "TTFT" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--bundle", "/nonexistent"], "no bundle at /nonexistent"),
    (["-m", "999"], "above the bundle's maximum"),
    (["--vision-backend", "magic"], "unknown vision backend"),
])
def test_cli_errors_are_one_line(f32_bundle, tmp_path, args, message):
    scene().save(tmp_path / "img.png")
    args = ["--bundle", str(f32_bundle.root)] + args if "--bundle" not in args else args
    r = cli("run", str(tmp_path / "img.png"), Q, *args)
    lines = stderr_lines(r)
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr


def test_run_never_imports_torch_or_transformers(f32_bundle, tmp_path):
    scene().save(tmp_path / "img.png")
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # any import of torch or transformers now fails loudly
        "sys.modules['transformers'] = None\n"
        "from mqt_edge.cli import main\n"
        f"sys.argv = ['mqt-edge', 'run', {str(tmp_path / 'img.png')!r}, 'Q?', '--bundle', {str(f32_bundle.root)!r},"
        " '-m', '2', '--max-new-tokens', '2', '--json']\n"
        "main()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["m"] == 2


def test_tensorrt_backend(f32_bundle):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (Jetson/GPU only)")
    with pytest.raises(BundleError, match="mqt-edge engine"):
        Pipeline.load(f32_bundle.root, vision_backend="tensorrt")


def test_api_answer_refines_exactly_like_a_fresh_request(pipe):
    """The policy lives in the API: refine_to with a confidence no first token reaches always refines,
    and the refined answer is the fresh request's at that m."""
    img = scene(seed=11)
    fresh = pipe.ask(img, Q, m=32, max_new_tokens=8)
    pieces: list[str] = []
    got = pipe.answer(img, Q, m=8, refine_to=32, confidence=1.01, max_new_tokens=8, on_piece=pieces.append)
    assert got.token_ids == fresh.token_ids and got.m == 32
    assert got.refined_from["m"] == 8 and "".join(pieces).strip() == got.answer
    kept = pipe.answer(img, Q, m=8, refine_to=32, confidence=0.0, max_new_tokens=8)
    assert kept.m == 8 and kept.refined_from is None


def test_api_choose_tokens_is_the_planners_choice(f32_bundle):
    from mqt_edge.profiles import load_profile
    from mqt_edge.profiles.planner import ModelFacts, Options, plan

    with Pipeline.load(f32_bundle.root, profile="cpu") as p:
        facts = ModelFacts.from_bundle(p.bundle)
        options = Options.for_run("auto", 0, False, facts)
        unlimited = plan(load_profile("cpu"), facts, None, None, 16, options)
        limit = next(c.ttft_ms for c in unlimited.candidates if c.m == 16)  # m = 16 just fits
        want = plan(load_profile("cpu"), facts, limit, None, 16, options)
        assert want.chosen_m < p.max_tokens  # the limit bites, so a wrong m cannot pass
        choice = p.choose_tokens(max_new_tokens=16, ttft_ms=limit)
        assert choice.m == want.chosen_m and choice.profile == "cpu"
        assert choice.predicted["ttft_ms"] == next(c.ttft_ms for c in want.candidates if c.m == choice.m)
        assert p.choose_tokens(4) == type(choice)(4, "cpu")  # a given m is kept, the profile still named
        # `answer` knows its question: the planner prefills Q's own ids, not a typical 16
        own = p.choose_tokens(max_new_tokens=16, ttft_ms=limit, question=Q)
        assert len(p.question_ids(Q)) < 16 and own.m >= choice.m
        assert p.answer(scene(), Q, max_new_tokens=2, ttft_ms=limit).m == own.m


@pytest.mark.parametrize("kw, message", [
    (dict(m=16, refine_to=8), "refine_to=8 is not above m=16"),
    (dict(m=4, refine_to=8, confidence=float("nan")), "confidence=nan is not a number"),
    (dict(m=4, refine_to=999), "above the bundle's maximum"),
])
def test_api_answer_refuses_bad_policy_arguments(pipe, kw, message):
    from mqt_edge.errors import MQTEdgeError

    with pytest.raises(MQTEdgeError, match=message):
        pipe.answer(scene(), Q, max_new_tokens=2, **kw)


@pytest.fixture(scope="module")
def pipe_no_head(f32_bundle):
    with Pipeline.load(f32_bundle.root, head_cache=False) as p:
        yield p


@pytest.mark.parametrize("m", [1, 16, 256])
def test_prompt_head_cache_gives_the_prefill_paths_ids(pipe, pipe_no_head, m):
    """The head's KV is restored, not recomputed: greedy ids identical to prefilling it, and a fresh
    request prefills only m + the question with the template's tail."""
    img = scene(seed=m)
    cached, prefilled = pipe.ask(img, Q, m=m, max_new_tokens=10), pipe_no_head.ask(img, Q, m=m, max_new_tokens=10)
    assert cached.token_ids == prefilled.token_ids
    assert cached.first_token_prob == prefilled.first_token_prob
    assert cached.prefilled == m + len(pipe.question_ids(Q))
    assert prefilled.prefilled == len(pipe.prefix_ids) + m + len(pipe.question_ids(Q))


def test_prompt_head_cache_is_exact_after_refine(pipe, pipe_no_head):
    img = scene(seed=5)
    with pipe.look(img, m=16) as s, pipe_no_head.look(img, m=16) as t:
        s.refine(m=64)
        t.refine(m=64)
        assert s.ask(Q, max_new_tokens=10).token_ids == t.ask(Q, max_new_tokens=10).token_ids
    # computed once per pipeline, in the shared context's sequence 0; sessions share its cells
    assert pipe.scheduler.head_len == len(pipe.prefix_ids) and pipe_no_head.scheduler.head_len == 0


# -- use after close: a clean ClosedError, never a signal (each case in a fresh interpreter) ---------

CLOSE_MISUSE = r'''
import sys, threading, time
from PIL import Image
from mqt_edge.errors import ClosedError
from mqt_edge.pipeline import Pipeline

bundle, Q = sys.argv[1], "What color is the circle?"
im = Image.new("RGB", (64, 48), (200, 30, 30))

def expect_closed(name, fn):
    try:
        fn()
        print(name, "no error", flush=True)
    except ClosedError as exc:
        print(name, "ClosedError:", exc, flush=True)

p = Pipeline.load(bundle)
p.close()
expect_closed("pipe.ask after pipe.close", lambda: p.ask(im, Q, m=2, max_new_tokens=2))
expect_closed("pipe.look after pipe.close", lambda: p.look(im, m=2))
p.close()  # twice is harmless

with Pipeline.load(bundle) as p:
    s = p.look(im, m=4)
expect_closed("session.ask after its pipeline closed", lambda: s.ask(Q, max_new_tokens=2))
expect_closed("session.refine after its pipeline closed", lambda: s.refine(8))
expect_closed("session.generate after its pipeline closed", lambda: s.generate(Q))

with Pipeline.load(bundle) as p:
    s = p.look(im, m=4)
    s.close()
    expect_closed("session.ask after session.close", lambda: s.ask(Q, max_new_tokens=2))
    expect_closed("session.refine after session.close", lambda: s.refine(64))
    s.close()
    g = p.look(im, m=4).generate(Q, max_new_tokens=8)
    g.session.close()  # closing a session with this thread's unread answer
    expect_closed("reading an answer of a closed session", lambda: list(g))

def hammer(p, out, started, one_shot):
    try:
        s = None if one_shot else p.look(im, m=16)
        started.set()
        for _ in range(200):
            if one_shot:
                p.ask(im, Q, m=8, max_new_tokens=32)
            else:
                for piece in s.stream(Q, max_new_tokens=64):
                    pass
        out.append("finished")
    except ClosedError:
        out.append("ClosedError")

for run in range(3):  # close the pipeline while other threads are inside ask / stream
    p = Pipeline.load(bundle)
    out, started = [], threading.Event()
    ts = [threading.Thread(target=hammer, args=(p, out, started, k % 2 == 0)) for k in range(3)]
    for t in ts:
        t.start()
    started.wait()
    time.sleep(0.2)
    p.close()
    for t in ts:
        t.join()
    print("pipe.close during ask", run, sorted(out), flush=True)

with Pipeline.load(bundle) as p:  # close a session while another thread streams from it
    s = p.look(im, m=16)
    out, started = [], threading.Event()
    def reader():
        try:
            started.set()
            for _ in range(200):
                for piece in s.stream(Q, max_new_tokens=64):
                    pass
            out.append("finished")
        except ClosedError:
            out.append("ClosedError")
    t = threading.Thread(target=reader)
    t.start()
    started.wait()
    time.sleep(0.2)
    s.close()
    t.join()
    print("session.close during stream", out, flush=True)
print("done", flush=True)
'''


def test_use_after_close_raises_closed_error_and_never_crashes(f32_bundle):
    r = subprocess.run([sys.executable, "-c", CLOSE_MISUSE, str(f32_bundle.root)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"exit {r.returncode} (a negative code is a signal)\n{r.stdout}\n{r.stderr[-2000:]}"
    lines = r.stdout.splitlines()
    assert lines[-1] == "done"
    single = [line for line in lines if "during" not in line and line != "done"]
    assert len(single) == 8 and all("ClosedError:" in line and "closed" in line.split(":", 1)[1] for line in single), lines
    assert any("pipeline" in line for line in single) and any("this session is closed" in line for line in single)
    races = [line for line in lines if "during" in line]
    assert len(races) == 4 and all("ClosedError" in line for line in races), races  # 200 asks outlast the close


# -- text that is not UTF-8, numbers without bounds, None where a number goes ------------------------

def test_a_question_that_is_not_utf8_is_one_line(pipe, f32_bundle, tmp_path):
    with pytest.raises(InputError, match="not valid UTF-8"):
        pipe.ask(scene(), "What \udcff\udcfe color?")  # what a shell's bytes \xff\xfe decode to
    with pytest.raises(InputError, match="not valid UTF-8"):
        pipe.look(scene(), m=2).ask("lone \ud800 surrogate")
    scene().save(tmp_path / "img.png")
    r = subprocess.run([sys.executable, "-m", "mqt_edge", "run", str(tmp_path / "img.png"), b"What \xff\xfe color?",
                        "--bundle", str(f32_bundle.root), "-m", "2"], capture_output=True, text=True)
    lines = stderr_lines(r)
    assert r.returncode == 2 and len(lines) == 1 and "not valid UTF-8" in lines[0], r.stderr


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=None), "temperature=None"),
    (dict(top_p=None), "top_p=None"),
    (dict(temperature="0.5"), "temperature='0.5'"),
    (dict(max_new_tokens=2.5), "max_new_tokens=2.5"),
    (dict(seed=-1), "seed=-1"),
    (dict(seed=None), "seed=None"),
])
def test_wrong_typed_sampling_arguments_are_input_errors(pipe, kw, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        pipe.ask(scene(), Q, m=2, **kw)
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        pipe.look(scene(), m=2).generate(Q, **kw)


def test_threads_are_bounded_by_the_cores(f32_bundle):
    import os

    cores = os.cpu_count()
    for bad in (0, cores + 1, 100000, 2.0, True):
        with pytest.raises(InputError, match="CPU cores"):
            Pipeline.load(f32_bundle.root, threads=bad)
    with pytest.raises(InputError, match="n_gpu_layers"):
        Pipeline.load(f32_bundle.root, n_gpu_layers=-1)


@pytest.mark.parametrize("args, message", [
    (["--threads", "100000"], "CPU cores"),
    (["--confidence", "nan", "--refine", "16"], "--confidence nan"),
    (["--confidence", "-1"], "--confidence -1"),
    (["--ttft-ms", "nan"], "--ttft-ms nan"),
    (["--temperature", "inf"], "temperature=inf"),
    (["--seed", "-3"], "seed=-3"),
])
def test_cli_numbers_out_of_bounds_are_one_line(f32_bundle, tmp_path, args, message):
    scene().save(tmp_path / "img.png")
    r = cli("run", str(tmp_path / "img.png"), Q, "--bundle", str(f32_bundle.root), "-m", "2", *args)
    lines = stderr_lines(r)
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr


def test_gpu_layers_reported_are_those_llama_cpp_offloaded(f32_bundle):
    import llama_cpp

    with Pipeline.load(f32_bundle.root, n_gpu_layers=99) as p:
        if llama_cpp.llama_supports_gpu_offload():
            layers = f32_bundle.manifest.llm.layers
            assert p.backends["llm"] == f"llama.cpp/gpu:{min(99, layers + 1)} layers"
        else:
            assert p.backends["llm"] == "llama.cpp/cpu"  # was "gpu:99 layers" on a CPU-only build
        assert p.ask(scene(), Q, m=2, max_new_tokens=2).backends["llm"] == p.backends["llm"]


def test_the_read_once_rule(pipe):
    with pipe.look(scene(), m=4) as s:
        g = s.generate(Q, max_new_tokens=3)
        assert s.busy  # another thread's ask would wait: this is how it learns why
        text = "".join(g)
        assert not s.busy and g.answer.answer == text.strip()
        with pytest.raises(InputError, match="already consumed"):
            list(g)
        g = s.generate(Q, max_new_tokens=3)
        g.cancel()
        assert not s.busy
    stream = pipe.stream(scene(), Q, m=2, max_new_tokens=3)
    assert "".join(stream) and list(stream) == []  # documented: a generator is read once


def test_every_backend_keeps_the_runner_contract(f32_bundle):
    """Each BACKENDS row names a class that is a VisionRunner (built without activating: the
    constructor only stores), and running before activate() or after deactivate() is one clear error."""
    import importlib

    from mqt_edge.runtimes import (BACKENDS, InactiveRunnerError, VisionRunner, backend_info, make_vision,
                                   resolve_backend)
    from mqt_edge.runtimes.onnxruntime import OnnxRuntimeVision
    from mqt_edge.runtimes.tensorrt import TensorRTVision

    classes = {getattr(importlib.import_module(f"mqt_edge.runtimes.{row.module}"), row.runner)
               for row in BACKENDS.values() if row.concrete}
    assert classes == {OnnxRuntimeVision, TensorRTVision}
    pixels = np.zeros((1, 3, 8, 8), np.float32)
    for cls in classes:
        runner = cls(f32_bundle, None, None, "auto")
        assert isinstance(runner, VisionRunner) and not runner.is_active and runner.backend in BACKENDS
        for call in (lambda: runner.features(pixels), lambda: runner.tokens(pixels, np.arange(2))):
            with pytest.raises(InactiveRunnerError, match="not active; call activate"):
                call()
    runner = make_vision(f32_bundle, "onnxruntime/cpu").activate()
    assert runner.is_active and runner.backend == "onnxruntime/cpu" and backend_info(runner.backend).on_gpu is False
    runner.deactivate()
    with pytest.raises(InactiveRunnerError):
        runner.tokens(np.zeros((1, 4, 8), np.float32), np.arange(2))
    assert resolve_backend(f32_bundle, "auto", "auto") == "onnxruntime"  # no engines in the bundle
    with pytest.raises(InputError, match="unknown vision backend 'magic'"):
        backend_info("magic")


REFINED_FROM = {"m", "first_token_prob", "timings_ms", "prefilled"}  # one record, whichever front end


def test_session_answer_is_the_one_refinement_step(pipe):
    """Session.answer refines (exactly) when the first token is unsure and records the dropped attempt;
    refine_step does the same for a prompt the caller builds (here: the same question's ids)."""
    img = scene(seed=12)
    fresh = pipe.ask(img, Q, m=32, max_new_tokens=6)
    with pipe.look(img, m=8) as s:
        kept = s.answer(Q, refine_to=32, confidence=0.0, max_new_tokens=6)
        assert kept.m == 8 and kept.refined_from is None
        pieces: list[str] = []
        got = s.answer(Q, refine_to=32, confidence=1.01, max_new_tokens=6, on_piece=pieces.append)
        assert got.m == 32 and got.token_ids == fresh.token_ids and "".join(pieces).strip() == got.answer
        assert set(got.refined_from) == REFINED_FROM and got.refined_from["m"] == 8
        assert s.answer(Q, refine_to=32, confidence=1.01, max_new_tokens=6).refined_from is None  # m is 32 now
    with pipe.look(img, m=8) as s:
        ids = pipe.question_ids(Q)
        gen = s.refine_step(lambda: s.generate_ids(ids, max_new_tokens=6), 32, 1.01)
        assert "".join(gen).strip() == fresh.answer and gen.answer.refined_from == gen.refined_from
        assert gen.refined_from["m"] == 8 and s.m == 32


def test_reserve_for_sizes_a_one_shot_context(pipe):
    from mqt_edge.pipeline import check_sampling

    assert pipe.reserve_for(Q, 10) == len(pipe.question_ids(Q)) + 10
    with pytest.raises(InputError, match="max_new_tokens=0"):
        pipe.reserve_for(Q, 0)
    with pytest.raises(InputError, match="top_p"):
        check_sampling(4, 0.0, 2.0)


@pytest.mark.parametrize("call, message", [
    (lambda p: p.answer("no-such.png", Q, m=4, confidence=-1), "confidence=-1 is not a probability"),
    (lambda p: p.answer("no-such.png", Q, m=4, confidence="high"), "confidence='high' is not a number"),
    (lambda p: p.answer("no-such.png", Q, m=4, confidence=2), "confidence=2 is not a probability"),
    (lambda p: p.answer("no-such.png", Q, ttft_ms="x"), "ttft_ms='x' is not a positive number"),
    (lambda p: p.answer("no-such.png", Q, memory_mb=0), "memory_mb=0 is not a positive number"),
    (lambda p: p.choose_tokens(ttft_ms=float("inf")), "ttft_ms=inf is not a positive number"),
    (lambda p: p.ask("no-such.png", Q, tokens=16), "tokens= is now m= \\(the visual-token count\\)"),
    (lambda p: p.stream("no-such.png", Q, tokens=16), "tokens= is now m="),
    (lambda p: p.answer("no-such.png", Q, tokens=16), "tokens= is now m="),
    (lambda p: p.ask("no-such.png", Q, m=4, max_tokens=3), "unknown argument max_tokens="),
])
def test_api_arguments_are_checked_before_any_work(pipe, call, message):
    """One line, before the image is opened (a missing file would be an ImageError instead)."""
    with pytest.raises(InputError, match=message) as info:
        call(pipe)
    assert "\n" not in str(info.value)
