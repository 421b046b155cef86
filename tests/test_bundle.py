"""Bundle.open trusts nothing: a strict manifest schema, artifacts inside the bundle, clean load failures."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import cli, scene, stderr_lines
from mqt_edge.bundle import Bundle, BundleError, schema_errors, sha256_file
from mqt_edge.errors import MQTEdgeError
from mqt_edge.pipeline import Pipeline


@pytest.fixture(scope="module")
def bundle(tiny_ckpt, tmp_path_factory):
    from mqt_edge.exporters import ExportOptions, export

    return export(ExportOptions(model=str(tiny_ckpt), out=tmp_path_factory.mktemp("bd") / "b", quant="f32",
                                max_tokens=16, parity=False)).bundle


def edited(bundle, tmp_path, edit) -> "Path":  # noqa: F821
    b = shutil.copytree(bundle.root, tmp_path / "b")
    manifest = json.loads((b / "manifest.json").read_text())
    edit(manifest, b)
    (b / "manifest.json").write_text(json.dumps(manifest))
    return b


def test_the_exported_manifest_conforms(bundle):
    assert schema_errors(bundle.manifest.to_json()) == []


ROW = {"tokens": 2, "accuracy": 0.5, "ttft_ms": 12.0, "total_ms": 30.0, "n": 6}  # as `mqt-edge eval --save` writes it
BREAKAGES = {
    "no sha256": (lambda m, b: m["artifacts"]["llm"].pop("sha256"), "artifacts.llm.sha256: missing"),
    "text max_tokens": (lambda m, b: m.update(max_tokens="16"), "max_tokens: '16' is not an integer"),
    "empty preprocess": (lambda m, b: m.update(preprocess={}), "preprocess.size: missing"),
    "unknown key": (lambda m, b: m.update(max_tokenz=16), "max_tokenz: unknown key"),
    "unknown role": (lambda m, b: m["artifacts"].update(extra=m["artifacts"]["mqt"]), "artifacts.extra: unknown key"),
    "bool as int": (lambda m, b: m["llm"].update(layers=True), "llm.layers: True is not an integer"),
    "text tensor bytes": (lambda m, b: m["llm"].update(tensor_bytes={"Q4_K": "12", "F32": None}),
                          "llm.tensor_bytes: {'Q4_K': '12', 'F32': None} is not an object of integers >= 0"),
    "nan rescale": (lambda m, b: m["preprocess"].update(rescale=float("nan")), "preprocess.rescale"),
    "short crop": (lambda m, b: m["preprocess"].update(crop=[336]), "preprocess.crop"),
    "not an object": (lambda m, b: m["artifacts"].update(llm="llm.gguf"), "artifacts.llm: not an object"),
    "path outside": (lambda m, b: m["artifacts"]["llm"].update(path="../outside.gguf"), "points outside"),
    "absolute path": (lambda m, b: m["artifacts"]["mqt"].update(path="/etc/passwd"), "points outside"),
    "graph opset": (lambda m, b: m["graphs"]["vision"].update(opset="18"), "graphs.vision.opset: '18' is not"),
    "graph role": (lambda m, b: m["graphs"].update(extra=m["graphs"]["mqt"]), "graphs.extra: unknown key"),
    "accuracy row key": (lambda m, b: m.update(accuracy=[{**ROW, "m": 2}]), "accuracy[0].m: unknown key"),
    "accuracy row type": (lambda m, b: m.update(accuracy=[{**ROW, "tokens": "2"}]), "accuracy[0].tokens"),
    "input shape 5": (lambda m, b: m["graphs"]["vision"]["inputs"].update(pixel_values=5),
                      "graphs.vision.inputs.pixel_values: 5 is not a shape"),
    "text shape": (lambda m, b: m["graphs"]["vision"]["inputs"].update(pixel_values="oops"),
                   "graphs.vision.inputs.pixel_values: 'oops' is not a shape"),
    "negative axis": (lambda m, b: m["graphs"]["mqt"]["outputs"].update(visual_tokens=["batch", "m", -1]),
                      "graphs.mqt.outputs.visual_tokens: ['batch', 'm', -1] is not a shape"),
    "null axis": (lambda m, b: m["graphs"]["mqt"]["inputs"].update(query_ids=[None]),
                  "graphs.mqt.inputs.query_ids: [None] is not a shape"),
    "outputs not a map": (lambda m, b: m["graphs"]["vision"].update(outputs=[576]),
                          "graphs.vision.outputs: [576] is not an object"),
    "eos [None]": (lambda m, b: m["special_tokens"].update(eos=[None]), "special_tokens.eos: [None] is not a list of"),
    "eos [object]": (lambda m, b: m["special_tokens"].update(eos=[{"a": 1}]), "special_tokens.eos: [{'a': 1}] is not"),
    "eos not a list": (lambda m, b: m["special_tokens"].update(eos=2), "special_tokens.eos: 2 is not a list"),
}


def test_accuracy_rows_are_records_and_keep_their_file_key(bundle, tmp_path):
    from mqt_edge.bundle import AccuracyRow

    b = edited(bundle, tmp_path, lambda m, b: m.update(accuracy=[ROW, ROW | {"tokens": 16, "accuracy": 0.75}]))
    manifest = Bundle.open(b, verify=False).manifest
    assert manifest.accuracy == (AccuracyRow(2, 0.5, 12.0, 30.0, 6), AccuracyRow(16, 0.75, 12.0, 30.0, 6))
    assert manifest.to_json()["accuracy"][0] == ROW  # format 1 on disk: m stays under "tokens"


@pytest.mark.parametrize("name", BREAKAGES)
def test_a_bad_manifest_is_one_bundle_error(bundle, tmp_path, name):
    edit, message = BREAKAGES[name]
    b = edited(bundle, tmp_path, edit)
    with pytest.raises(BundleError, match="re-export") as exc:
        Bundle.open(b, verify=False)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_a_symlink_out_of_the_bundle_is_refused(bundle, tmp_path):
    outside = tmp_path / "elsewhere.gguf"
    shutil.copy(bundle.path("llm"), outside)

    def link(m, b):
        (b / "llm-f32.gguf").unlink()
        (b / "llm-f32.gguf").symlink_to(outside)

    with pytest.raises(BundleError, match="points outside"):
        Bundle.open(edited(bundle, tmp_path, link))


@pytest.mark.parametrize("role", ["mqt", "vision", "llm"])
def test_a_truncated_artifact_whose_sha256_matches_is_one_line(bundle, tmp_path, role):
    def truncate(m, b):
        path = b / m["artifacts"][role]["path"]
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
        m["artifacts"][role].update(sha256=sha256_file(path), bytes=path.stat().st_size)

    b = edited(bundle, tmp_path, truncate)
    name = bundle.manifest.artifacts[role].path
    with pytest.raises(MQTEdgeError, match=name) as exc:
        Pipeline.load(b)
    assert "re-export" in str(exc.value)
    scene().save(tmp_path / "img.png")
    r = cli("run", str(tmp_path / "img.png"), "What is it?", "--bundle", str(b), "-m", "2")
    lines = stderr_lines(r)
    assert r.returncode == 2 and len(lines) == 1 and name in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_a_graph_with_the_wrong_inputs_is_refused(bundle, tmp_path):
    def swap(m, b):  # vision.onnx where mqt.onnx should be
        shutil.copy(b / "vision.onnx", b / "mqt.onnx")
        m["artifacts"]["mqt"].update(sha256=sha256_file(b / "mqt.onnx"), bytes=(b / "mqt.onnx").stat().st_size)

    with pytest.raises(BundleError, match="mqt graph takes"):
        Pipeline.load(edited(bundle, tmp_path, swap))


# manifest.json as the format-1 exporter wrote it (tiny, f32, m <= 16, no parity run), kept verbatim so
# that a later layout change cannot quietly stop reading the bundles already on devices.
FORMAT_1 = Path(__file__).parent / "data" / "manifest-format1.json"


def test_a_format_1_bundle_loads_and_answers(bundle, tmp_path):
    def use_format_1(m, b):  # the recorded manifest over this export's files (their sizes and hashes)
        recorded = json.loads(FORMAT_1.read_text())
        for role, entry in recorded["artifacts"].items():
            entry.update({k: m["artifacts"][role][k] for k in ("path", "sha256", "bytes")})
        m.clear()
        m.update(recorded)

    b = edited(bundle, tmp_path, use_format_1)
    recorded = json.loads((b / "manifest.json").read_text())
    assert recorded["format_version"] == 1
    assert Bundle.open(b).manifest.to_json() == recorded  # every field read, nothing lost
    with Pipeline.load(b, threads=1) as pipe:
        a = pipe.ask(scene(), "What is it?", m=2, max_new_tokens=3)
    assert a.m == 2 and len(a.token_ids) > 0 and isinstance(a.answer, str)


UNREADABLE = {  # manifests of layouts this version does not read: one line, saying to re-export
    "format 0": (lambda m, b: m.update(format_version=0, model=m.pop("llm")), "has bundle format 0"),
    "no format": (lambda m, b: m.pop("format_version"), "has no bundle format_version"),
}


# Each goes through `mqt-edge run`: a manifest of another layout, or one whose shapes or eos break the
# schema, is one line saying to re-export, never a traceback.
THROUGH_THE_CLI = UNREADABLE | {name: BREAKAGES[name] for name in ("input shape 5", "text shape", "eos [None]")}


@pytest.mark.parametrize("name", THROUGH_THE_CLI)
def test_an_unreadable_or_malformed_manifest_is_one_line_through_the_cli(bundle, tmp_path, name):
    edit, message = THROUGH_THE_CLI[name]
    b = edited(bundle, tmp_path, edit)
    scene().save(tmp_path / "img.png")
    r = cli("run", str(tmp_path / "img.png"), "What is it?", "--bundle", str(b), "-m", "2")
    lines = stderr_lines(r)
    assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message in lines[0] and "re-export" in lines[0], lines[0]
