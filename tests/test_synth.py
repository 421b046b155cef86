"""`mqt-edge synth`: the release layout, determinism, atomic writes."""

import hashlib
import json
import subprocess
import sys

import pytest

from mqt_edge.errors import InputError
from mqt_edge.model.synth import PRESETS, write_checkpoint


def digest(d):
    h = hashlib.sha256()
    for f in sorted(p for p in d.rglob("*") if p.is_file()):
        h.update(f.relative_to(d).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def test_layout_is_the_release_layout(tiny_ckpt):
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaLlamaForCausalLM"] and cfg["model_type"] == "llava_llama"
    assert cfg["mm_vision_select_layer"] == -2 and cfg["image_aspect_ratio"] == "pad"
    assert (tiny_ckpt / cfg["mm_vision_tower"] / "preprocessor_config.json").is_file()
    assert (tiny_ckpt / "tokenizer.model").is_file()
    from safetensors import safe_open

    with safe_open(str(tiny_ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.query_abstractor.pos_embed").dtype.is_floating_point
        assert str(f.get_tensor("model.query_abstractor.pos_embed").dtype) == "torch.float16"
    assert {"model.query_abstractor.query", "model.query_abstractor.attn.in_proj_weight",
            "model.query_abstractor.proj", "model.embed_tokens.weight", "lm_head.weight"} <= keys


def test_sharding_with_index_and_determinism(tmp_path):
    a = write_checkpoint("tiny", tmp_path / "a", shard_bytes=1_000_000)
    b = write_checkpoint("tiny", tmp_path / "b", shard_bytes=1_000_000)
    index = json.loads((a / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2 and all((a / s).is_file() for s in shards)
    assert digest(a) == digest(b)
    c = write_checkpoint("tiny", tmp_path / "c", seed=1, shard_bytes=1_000_000)
    assert digest(a) != digest(c)


def test_tokenizer_has_llama_settings(tiny_model):
    sp = tiny_model.tokenizer.sp
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id()) == (1, 2, 0)
    assert len(tiny_model.tokenizer) == PRESETS["tiny"].vocab_size
    assert [sp.id_to_piece(i) for i in sp.encode("\nHi")][:2] == ["▁", "<0x0A>"]
    assert sp.decode(sp.encode("a  b\n\tc")) == "a  b\n\tc"  # no whitespace folding


def test_existing_output_is_refused_then_replaced_with_force(tmp_path):
    out = write_checkpoint("tiny", tmp_path / "x")
    with pytest.raises(InputError, match="already exists"):
        write_checkpoint("tiny", out)
    write_checkpoint("tiny", out, seed=3, force=True)
    assert json.loads((out / "config.json").read_text())["mqt_edge_synth"]["seed"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no temporary directories left


def test_interrupted_write_leaves_nothing(tmp_path):
    def boom(stage):
        if stage == "LLM and query transformer":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint("tiny", tmp_path / "y", on_stage=boom)
    assert list(tmp_path.iterdir()) == []


def test_unknown_preset():
    with pytest.raises(InputError, match="choose one of: tiny, shapes, bench, mqt-llava-7b"):
        write_checkpoint("huge", "/tmp/never")


def test_cli_help_lists_the_commands():
    r = subprocess.run([sys.executable, "-m", "mqt_edge", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("synth", "reference"):
        assert cmd in r.stdout


def test_cli_synth_and_reference_answer(tmp_path):
    from conftest import scene

    scene().save(tmp_path / "img.png")
    run = lambda *a: subprocess.run([sys.executable, "-m", "mqt_edge", *a], capture_output=True, text=True)  # noqa: E731
    r = run("synth", "--preset", "tiny", "--out", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    r = run("reference", str(tmp_path / "m"), str(tmp_path / "img.png"), "What is it?", "-m", "8",
            "--max-new-tokens", "5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["m"] == 8 and len(out["token_ids"]) == 5


def test_importing_the_package_does_not_import_torch():
    code = ("import mqt_edge, mqt_edge.cli, mqt_edge.image, mqt_edge.prompt, mqt_edge.bundle, sys; "
            "from mqt_edge import Pipeline; print('torch' in sys.modules or 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stderr
