"""`mqt-edge export`: bundles that match an independent reference, atomic writes, bad input."""

import json
from pathlib import Path
import subprocess
import sys
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import cli, scene, stderr_lines
from mqt_edge.bundle import Bundle, BundleError
from mqt_edge.errors import MQTEdgeError
from mqt_edge.exporters import ExportError, ExportOptions, export


def one_line_error(r):
    lines = stderr_lines(r)
    return r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A release-layout checkpoint this project did not write (M = 256, 16x16 -> 24x24 keys), exported at f32."""
    from release_reference import ReleaseReference, write_release_checkpoint

    root = tmp_path_factory.mktemp("release")
    ckpt = write_release_checkpoint(root / "ckpt", num_queries=256, clip_image_size=336, num_shards=2)
    result = export(ExportOptions(model=str(ckpt), out=root / "bundle", quant="f32"))
    return ReleaseReference(ckpt), result.bundle


def sessions(bundle):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return [ort.InferenceSession(str(bundle.path(r)), so, providers=["CPUExecutionProvider"]) for r in ("vision", "mqt")]


def onnx_tokens(bundle, image, ids, pixel_values):
    vision, mqt = sessions(bundle)
    feats = vision.run(None, {"pixel_values": pixel_values})[0]
    return mqt.run(None, {"image_features": feats, "query_ids": np.asarray(ids, np.int64)})[0]


def test_onnx_tokens_match_the_independent_reference(release):
    ref, bundle = release
    for seed in range(2):
        im = scene(320, 200, seed=seed)
        px = ref.pixel_values(im).numpy()
        for m in (1, 7, 256):
            got = onnx_tokens(bundle, im, range(m), px)[0]
            assert np.abs(got - ref.visual_tokens(im, m).numpy()).max() <= 1e-4, (seed, m)
        full = ref.visual_tokens(im, 256).numpy()
        for lo, hi in ((0, 5), (7, 16), (100, 256)):
            got = onnx_tokens(bundle, im, range(lo, hi), px)[0]
            assert np.abs(got - full[lo:hi]).max() <= 1e-4, (lo, hi)


def test_graphs_have_the_documented_interface(release):
    _, bundle = release
    vision, mqt = sessions(bundle)
    assert [i.name for i in vision.get_inputs()] == ["pixel_values"]
    assert vision.get_inputs()[0].shape == ["batch", 3, 336, 336]
    assert [o.name for o in vision.get_outputs()] == ["image_features"]
    assert [i.name for i in mqt.get_inputs()] == ["image_features", "query_ids"]
    assert mqt.get_inputs()[1].shape == ["m"]
    assert mqt.get_outputs()[0].shape == ["batch", "m", 96]
    for role in ("vision", "mqt"):
        assert onnx.load(str(bundle.path(role)), load_external_data=False).opset_import[0].version >= 17
    # dynamic batch: two images at once
    px = np.concatenate([np.zeros((1, 3, 336, 336), np.float32), np.ones((1, 3, 336, 336), np.float32)])
    assert vision.run(None, {"pixel_values": px})[0].shape == (2, 576, 128)


def test_the_manifest_records_each_graphs_interface_and_tensorrt_profiles_follow_it(release):
    """manifest.graphs (typed Graph records) says what the ONNX files really take; the TensorRT
    optimisation profiles are built from it (pure arithmetic: no TensorRT needed)."""
    from mqt_edge.exporters.tensorrt import engine_shapes

    _, bundle = release
    graphs = bundle.manifest.graphs
    for role, sess in zip(("vision", "mqt"), sessions(bundle)):
        assert {i.name: tuple(i.shape) for i in sess.get_inputs()} == dict(graphs[role].inputs)
        assert {o.name: tuple(o.shape) for o in sess.get_outputs()} == dict(graphs[role].outputs)
    shapes = engine_shapes(graphs, bundle.max_tokens, opt_tokens=64, max_batch=4)
    assert shapes["vision"]["pixel_values"] == ((1, 3, 336, 336), (1, 3, 336, 336), (4, 3, 336, 336))
    assert shapes["mqt"]["image_features"] == ((1, 576, 128), (1, 576, 128), (4, 576, 128))
    assert shapes["mqt"]["query_ids"] == ((1,), (64,), (256,))


def test_gguf_logits_match_transformers(release):
    from mqt_edge.exporters.parity import gguf_logits

    ref, bundle = release
    ids = [i for i in ref.prompt_ids("What color is the circle?") if i >= 0]
    with torch.no_grad():
        expected = ref.llm(torch.tensor([ids])).logits[0].numpy()
    got = gguf_logits(bundle.path("llm"), ids)
    diff = np.abs(got - expected).max()
    assert diff / np.abs(expected).max() <= 2e-3
    # Same argmax wherever the reference's top-2 gap exceeds the numeric error (2x max diff);
    # a smaller gap is a float tie that either engine may break either way.
    top2 = np.sort(expected, -1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 2 * diff
    assert decided.mean() >= 0.9
    assert (got.argmax(-1) == expected.argmax(-1))[decided].all()


def test_manifest_describes_the_bundle(release):
    ref, bundle = release
    m = bundle.manifest.to_json()
    assert m["format_version"] == 1 and m["max_tokens"] == 256
    assert set(m["artifacts"]) == {"vision", "mqt", "llm"}
    assert all(len(a["sha256"]) == 64 for a in m["artifacts"].values())
    assert m["preprocess"]["pad_color"] == [122, 116, 104] and m["preprocess"]["size"] == 336
    assert m["prompt"]["name"] == "llava_v1"
    llm = m["llm"]
    assert (llm["layers"], llm["hidden"], llm["kv_heads"], llm["head_dim"], llm["vocab"]) == (3, 96, 4, 24, 400)
    assert m["vision"]["flops"] > 0 and m["vision"]["params"] > 0 and m["mqt"]["flops_per_token"] > 0
    assert m["mqt"]["heads"] == 16  # kv_dim 128 and no mm_query_num_heads: the release's 16, not 128 // 64
    assert m["parity"]["onnx"]["pass"] and m["parity"]["gguf_f32"]["pass"]
    assert m["export"]["quant"] == "f32"
    Bundle.open(bundle.root)  # verifies every sha256


@pytest.fixture(scope="module")
def q4_bundle(tiny_ckpt, tmp_path_factory):
    return export(ExportOptions(model=str(tiny_ckpt), out=tmp_path_factory.mktemp("q4") / "b",
                                max_tokens=16)).bundle


def test_q4_k_m_loads_and_generates(q4_bundle):
    from mqt_edge.runtimes.llama import plain_llama

    m = q4_bundle.manifest.to_json()
    assert m["llm"]["quant"] == "q4_k_m" and q4_bundle.path("llm").name == "llm-q4_k_m.gguf"
    assert m["parity"]["gguf_f32"]["pass"]  # the conversion is gated before quantisation
    assert "kl" in m["parity"]["gguf_q4_k_m"] and "top1" in m["parity"]["gguf_q4_k_m"]
    tensors = m["llm"]["tensor_bytes"]  # the GGUF's bytes by type, for the planner's repacked copy
    assert "F32" in tensors and 0 < sum(tensors.values()) < m["llm"]["bytes"], tensors  # the header is the rest
    llm = plain_llama(q4_bundle.path("llm"), n_ctx=128, verbose=False)
    out = llm.create_completion("What color is", max_tokens=6, temperature=0)
    assert out["usage"]["completion_tokens"] > 0
    llm.close()


def test_max_tokens_drops_unused_queries(q4_bundle):
    proto = onnx.load(str(q4_bundle.path("mqt")))
    attn = next(i for i in proto.graph.initializer if list(i.dims)[:1] == [2] and len(i.dims) == 3)
    assert list(attn.dims) == [2, 16, 576]  # (heads, max_tokens, patches): tiny records 2 heads
    _, mqt = sessions(q4_bundle)
    feats = np.zeros((1, 576, 128), np.float32)
    assert mqt.run(None, {"image_features": feats, "query_ids": np.arange(16)})[0].shape == (1, 16, 128)
    with pytest.raises(Exception):
        mqt.run(None, {"image_features": feats, "query_ids": np.array([16], np.int64)})


def test_optimized_vision_is_an_extra_checked_artifact(tiny_ckpt, tmp_path):
    b = export(ExportOptions(model=str(tiny_ckpt), out=tmp_path / "b", quant="f16", optimize=2)).bundle
    assert b.path("vision_ort").is_file() and b.path("vision").is_file()
    assert b.manifest.parity["onnx"]["vision_ort"]["pass"]
    assert b.manifest.export["optimize"] == 2


def test_interrupted_export_leaves_nothing(tiny_ckpt, tmp_path):
    def boom(stage):
        if stage.startswith("gguf"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export(ExportOptions(model=str(tiny_ckpt), out=tmp_path / "b"), on_stage=boom)
    assert list(tmp_path.iterdir()) == []


def test_failed_parity_fails_the_export_and_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    from mqt_edge.exporters import gguf_llm

    strict = gguf_llm.Quant("f32", "LLAMA_FTYPE_ALL_F32", 32.0, max_rel_err=1e-12, min_top1=1.0)
    monkeypatch.setitem(gguf_llm.QUANTS, "f32", strict)
    with pytest.raises(ExportError, match="parity failed for gguf_f32"):
        export(ExportOptions(model=str(tiny_ckpt), out=tmp_path / "b", quant="f32"))
    assert list(tmp_path.iterdir()) == []


def test_a_foreign_manifest_is_not_a_bundle(tiny_ckpt, tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "manifest.json").write_text('{"name": "my-pwa"}')
    (tmp_path / "site" / "index.html").write_text("<html>")
    r = cli("export", str(tiny_ckpt), "--out", str(tmp_path / "site"))
    assert one_line_error(r) and "not an mqt-edge bundle" in r.stderr
    assert (tmp_path / "site" / "index.html").read_text() == "<html>"


def test_a_failed_reexport_keeps_the_old_bundle(tiny_ckpt, tmp_path, monkeypatch):
    from mqt_edge.exporters import gguf_llm

    out = tmp_path / "b"
    export(ExportOptions(model=str(tiny_ckpt), out=out, quant="f32", max_tokens=8))
    before = (out / "manifest.json").read_text()
    strict = gguf_llm.Quant("f32", "LLAMA_FTYPE_ALL_F32", 32.0, max_rel_err=1e-12, min_top1=1.0)
    monkeypatch.setitem(gguf_llm.QUANTS, "f32", strict)
    with pytest.raises(ExportError):
        export(ExportOptions(model=str(tiny_ckpt), out=out, quant="f32", max_tokens=4))
    assert (out / "manifest.json").read_text() == before and Bundle.open(out).max_tokens == 8
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_reexport_replaces_a_bundle(tiny_ckpt, tmp_path):
    out = tmp_path / "b"
    export(ExportOptions(model=str(tiny_ckpt), out=out, quant="f32", max_tokens=8))
    export(ExportOptions(model=str(tiny_ckpt), out=out, quant="f32", max_tokens=4))
    assert Bundle.open(out).max_tokens == 4
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_no_disk_space(tiny_ckpt, tmp_path, monkeypatch):
    import mqt_edge.exporters.source as ex

    monkeypatch.setattr(ex, "_free_bytes", lambda p: 1000)
    with pytest.raises(ExportError, match="not enough disk space"):
        export(ExportOptions(model=str(tiny_ckpt), out=tmp_path / "b"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--quant", "q3"], "unknown quant 'q3'"),
    (["--max-tokens", "0"], "below 1"),
    (["--max-tokens", "257"], "above the model's 256"),
])
def test_bad_options_are_one_line_errors(tiny_ckpt, tmp_path, args, message):
    r = cli("export", str(tiny_ckpt), "--out", str(tmp_path / "b"), *args)
    assert one_line_error(r) and message in r.stderr, r.stderr
    assert not (tmp_path / "b").exists()


def test_output_that_is_not_a_bundle_is_refused(tiny_ckpt, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep me")
    r = cli("export", str(tiny_ckpt), "--out", str(tmp_path / "docs"))
    assert one_line_error(r) and "not an mqt-edge bundle" in r.stderr
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep me"


def test_checkpoint_without_tokenizer(tiny_ckpt, tmp_path):
    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    (ckpt / "tokenizer.model").unlink()
    r = cli("export", str(ckpt), "--out", str(tmp_path / "b"))
    assert one_line_error(r) and "no tokenizer.model" in r.stderr


def test_tensorrt_without_tensorrt(tiny_ckpt, tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here; this checks the message on machines without it")
    except ImportError:
        pass
    r = cli("export", str(tiny_ckpt), "--out", str(tmp_path / "b"), "--tensorrt")
    assert one_line_error(r) and "TensorRT is not installed" in r.stderr and "mqt-edge[tensorrt]" in r.stderr


def test_tensorrt_engines_build_on_a_gpu(tiny_ckpt, tmp_path):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (Jetson/GPU only)")
    from mqt_edge.runtimes.tensorrt import TensorRTUnavailable, load_tensorrt

    try:
        load_tensorrt()
    except TensorRTUnavailable as exc:
        pytest.skip(str(exc))
    b = export(ExportOptions(model=str(tiny_ckpt), out=tmp_path / "b", quant="f16", tensorrt=True,
                             opt_tokens=16)).bundle
    for role in ("vision_trt", "mqt_trt"):
        entry = b.manifest.artifacts[role]
        assert entry.tensorrt == trt.__version__ and entry.gpu and b.path(role).stat().st_size > 0


def test_bundle_open_rejects_bad_bundles(q4_bundle, tmp_path):
    b = shutil.copytree(q4_bundle.root, tmp_path / "b")
    with pytest.raises(BundleError, match="no bundle at .*mqt-edge export"):
        Bundle.open(tmp_path / "nothing")
    manifest = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_text(json.dumps(manifest | {"format_version": 99}))
    with pytest.raises(BundleError, match="format 99"):
        Bundle.open(b)
    (b / "manifest.json").write_text(json.dumps(manifest))
    with open(b / "mqt.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\0\1\2\3")
    with pytest.raises(BundleError, match="does not match its sha256"):
        Bundle.open(b)
    (b / "manifest.json").write_text("{")
    with pytest.raises(BundleError, match="corrupt"):
        Bundle.open(b)


def test_engine_command_without_tensorrt(q4_bundle):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here; this checks the message on machines without it")
    except ImportError:
        pass
    r = cli("engine", "--bundle", str(q4_bundle.root))
    assert one_line_error(r) and "TensorRT is not installed" in r.stderr
    assert "vision_trt" not in Bundle.open(q4_bundle.root).manifest.artifacts


def test_engine_builds_stage_per_process_and_leave_nothing(q4_bundle, tmp_path, monkeypatch):
    """`mqt-edge engine` (engine build faked: no TensorRT here) stages in this process's own directory."""
    import dataclasses
    import os

    import mqt_edge.runtimes.engines as engines
    from mqt_edge.bundle import artifact_entry

    b = shutil.copytree(q4_bundle.root, tmp_path / "b")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (b / f".engines.partial-{dead.pid}").mkdir()  # a killed build's leftovers
    staged = []

    def fake_build(src, dst, graphs, max_tokens, opt_tokens, max_batch):
        staged.append(dst)
        for name in ("vision.engine", "mqt.engine"):
            (dst / name).write_bytes(b"engine")
        return {role: dataclasses.replace(artifact_entry(dst, name), tensorrt="0", gpu="fake", opt_tokens=opt_tokens)
                for role, name in (("vision_trt", "vision.engine"), ("mqt_trt", "mqt.engine"))}

    monkeypatch.setattr(engines, "load_tensorrt", lambda: None)  # no TensorRT here
    monkeypatch.setattr(engines, "build_engines", fake_build)
    built = engines.build_engines_in_bundle(b, opt_tokens=8)
    assert staged == [b / f".engines.partial-{os.getpid()}"]
    assert built.manifest.artifacts["mqt_trt"].gpu == "fake" and (b / "mqt.engine").read_bytes() == b"engine"
    assert not [p.name for p in b.iterdir() if ".partial-" in p.name]


def test_export_without_model_says_how_to_get_one(tmp_path):
    """An install without the shipped model (e.g. its assets removed) says how to get a checkpoint."""
    code = ("import sys, pathlib, mqt_edge.defaults as d; d.DEFAULT_MODEL = pathlib.Path(sys.argv[1]); "
            "from mqt_edge.cli import main; sys.argv = ['mqt-edge', 'export', '--out', sys.argv[2]]; main()")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "nothing"), str(tmp_path / "b")],
                       capture_output=True, text=True)
    assert one_line_error(r) and "mqt-edge synth" in r.stderr
    assert not (tmp_path / "b").exists()


# -- re-export keeps the user's files; unusable --out; stale staging; Ctrl-C --------------------------

def test_reexport_replaces_only_what_the_bundle_owns(tiny_ckpt, tmp_path):
    out = tmp_path / "bp"
    export(ExportOptions(model=str(tiny_ckpt), out=out, quant="f32", max_tokens=8, parity=False))
    (out / "my_notes.txt").write_text("notes")
    (out / "eval").mkdir()
    (out / "eval" / "run1.json").write_text("{}")
    r = cli("export", str(tiny_ckpt), "--out", str(out), "--quant", "f16", "--max-tokens", "4", "--no-parity")
    assert r.returncode == 0, r.stderr
    assert (out / "my_notes.txt").read_text() == "notes" and (out / "eval" / "run1.json").read_text() == "{}"
    b = Bundle.open(out)
    assert b.max_tokens == 4 and b.path("llm").name == "llm-f16.gguf"
    assert not (out / "llm-f32.gguf").exists()  # the old bundle's own file, not in the new one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bp"]  # no staging left beside it
    assert not (out / ".mqt-edge-replacing.json").exists()


def test_a_user_file_named_like_an_artifact_is_never_overwritten(tiny_ckpt, tmp_path):
    out = tmp_path / "bp"
    export(ExportOptions(model=str(tiny_ckpt), out=out, quant="f32", max_tokens=4, parity=False))
    (out / "llm-f16.gguf").write_text("mine")
    stages = []
    with pytest.raises(MQTEdgeError, match="llm-f16.gguf is not part of the bundle"):
        export(ExportOptions(model=str(tiny_ckpt), out=out, quant="f16"), on_stage=stages.append)
    assert stages == [] and (out / "llm-f16.gguf").read_text() == "mine"


def _immutable(tmp_path):
    d = tmp_path / "immutable"
    d.mkdir()
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode:
        pytest.skip("chattr +i is not permitted here")
    return d, lambda: subprocess.run(["chattr", "-i", str(d)])


def _read_only_fs(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("mounting a read-only tmpfs is not permitted here")
    return d, lambda: subprocess.run(["umount", str(d)])


@pytest.mark.parametrize("where, message", [
    ("file", "which is a file"),
    ("proc", "cannot write to /proc"),
    ("immutable", "Operation not permitted"),
    ("ro", "Read-only file system"),
])
def test_an_unusable_out_is_one_line_before_any_model_loads(tiny_ckpt, tmp_path, where, message):
    undo = None
    if where == "file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "b"
    elif where == "proc":
        out = Path("/proc/b")
    else:
        parent, undo = (_immutable if where == "immutable" else _read_only_fs)(tmp_path)
        out = parent / "b"
    try:
        stages = []
        with pytest.raises(MQTEdgeError, match=message):
            export(ExportOptions(model=str(tiny_ckpt), out=out), on_stage=stages.append)
        assert stages == []  # refused before the "load" stage
        r = cli("export", str(tiny_ckpt), "--out", str(out))
        assert one_line_error(r) and message in r.stderr and r.returncode == 2, r.stderr
    finally:
        if undo:
            undo()


def test_stale_staging_is_removed_only_for_dead_exports(tiny_ckpt, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (f".other.partial-{dead.pid}", f".b.partial-{dead.pid}", f".x.partial-{alive.pid}"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "llm-f32.gguf").write_bytes(b"\0" * 1000)
        (tmp_path / ".notes.partial-backup").mkdir()  # not a staging name (no pid): not ours

        def stop(stage):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            export(ExportOptions(model=str(tiny_ckpt), out=tmp_path / "b"), on_stage=stop)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.partial-backup", f".x.partial-{alive.pid}"]
    finally:
        alive.kill()
        alive.wait()


def test_ctrl_c_during_export_says_nothing_was_written(tiny_ckpt, tmp_path):
    import signal
    import time

    out = tmp_path / "b"
    p = subprocess.Popen([sys.executable, "-m", "mqt_edge", "export", str(tiny_ckpt), "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    staged = tmp_path / f".b.partial-{p.pid}"
    deadline = time.time() + 120
    while not staged.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert staged.exists(), "the export never started staging"
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert p.returncode == 130 and len(lines) == 1 and "nothing was written" in lines[0], stderr
    assert list(tmp_path.iterdir()) == []


def test_every_format_row_names_functions_that_exist():
    from mqt_edge.exporters import FORMATS, Step, enabled

    steps = [s for f in FORMATS.values() for s in (f.build, f.check) if isinstance(s, Step)]
    assert len(steps) == 10 and all(callable(s.resolve()) for s in steps)
    names = lambda **kw: [f.name for f in enabled(ExportOptions(model="m", **kw))]  # noqa: E731
    assert names(quant="f16") == ["onnx", "gguf"]
    assert names(vision_quant="int8", tensorrt=True) == ["onnx", "vision_int8", "gguf", "quantize", "int8_answers",
                                                         "tensorrt"]


def test_the_gguf_pass_rules_sit_with_their_thresholds():
    from mqt_edge.quants import QUANTS

    conv = {"positions": 10, "rel_err": 1e-3, "top1": 1.0, "decided_positions": 5, "top1_decided": 1.0, "kl": 0.0}
    assert QUANTS["f32"].judge(dict(conv))["pass"]
    assert not QUANTS["f32"].judge(dict(conv, rel_err=3e-3))["pass"]
    assert not QUANTS["f32"].judge(dict(conv, decided_positions=4))["pass"]  # under half the positions decided
    q = dict(conv, kl=0.2, top1=0.9)
    assert not QUANTS["q4_k_m"].judge(dict(q))["pass"]
    r = QUANTS["q4_k_m"].judge(dict(q), enforced=False)
    assert r["pass"] and r["enforced"] is False and r["thresholds"] == {"max_kl": 0.1, "min_top1": 0.7}


def test_every_quant_names_a_llama_cpp_file_type():
    import llama_cpp

    from mqt_edge.quants import QUANTS

    assert "q4_0" in QUANTS  # the CPU quant that batches best (docs/export.md)
    for q in QUANTS.values():
        assert isinstance(getattr(llama_cpp, q.ftype, None), int), q.ftype
