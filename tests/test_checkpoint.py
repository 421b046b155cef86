"""Loading checkpoints: layouts, the CLIP tower's location, and every way a checkpoint can be bad."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import scene, stderr_lines
from mqt_edge.errors import CheckpointError, TokensError
from mqt_edge.model import MQTLlava


@pytest.fixture
def ckpt(tiny_ckpt, tmp_path):
    """A private copy of the tiny checkpoint that a test may damage."""
    return shutil.copytree(tiny_ckpt, tmp_path / "ckpt")


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def test_tiny_preset_has_the_release_geometry(tiny_model):
    c = tiny_model.mqt.config
    assert (c.num_queries, c.key_grid, c.kv_dim, c.num_heads) == (256, (24, 24), 128, 2)
    assert tiny_model.mqt.pos_embed.dtype == torch.float16
    # select_layer -2 of a 3-layer tower: only 2 layers are loaded and run
    assert len(tiny_model.vision.vision_model.encoder.layers) == 2


def test_vision_features_are_the_penultimate_layer_without_cls(tiny_model, tiny_ckpt):
    from transformers import CLIPVisionModel

    full = CLIPVisionModel.from_pretrained(tiny_ckpt / "clip-vision").eval()
    px = tiny_model.pixel_values(scene())
    with torch.no_grad():
        expected = full(px, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert torch.allclose(tiny_model.image_features(px), expected, atol=1e-6)


def test_nesting_on_the_full_pipeline(tiny_model):
    im = scene(seed=5)
    full = tiny_model.encode_image(im, m=256)
    for m in (1, 2, 16, 100, 255):
        assert (tiny_model.encode_image(im, m=m) - full[:m]).abs().max().item() <= 1e-6
    assert (tiny_model.encode_image(im, query_ids=range(16, 64)) - full[16:64]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("m", [0, 257])
def test_m_out_of_range(tiny_model, m):
    with pytest.raises(TokensError, match=r"1\.\.256"):
        tiny_model.encode_image(scene(), m=m)
    with pytest.raises(TokensError):
        tiny_model.generate(scene(), "What?", m=m)


def test_generate_greedy_is_deterministic_and_sampling_differs(tiny_model):
    a = tiny_model.generate(scene(), "What is this?", m=4, max_new_tokens=16)
    b = tiny_model.generate(scene(), "What is this?", m=4, max_new_tokens=16)
    assert a == b and len(a.token_ids) == 16
    samples = {tuple(tiny_model.generate(scene(), "What is this?", m=4, max_new_tokens=16,
                                         temperature=1.5, seed=s).token_ids) for s in range(3)}
    assert len(samples) > 1


def test_generate_stops_at_eos_and_keeps_the_prefix(tiny_model, monkeypatch):
    full = tiny_model.generate(scene(), "What is this?", m=4, max_new_tokens=8).token_ids
    # The first position of a token that did not occur before it: stopping there keeps the prefix.
    k = next(i for i in range(1, len(full)) if full[i] not in full[:i])
    monkeypatch.setattr(tiny_model, "eos_ids", frozenset({full[k]}))
    assert tiny_model.generate(scene(), "What is this?", m=4, max_new_tokens=8).token_ids == full[:k]
    monkeypatch.setattr(tiny_model, "eos_ids", frozenset({full[0]}))
    assert tiny_model.generate(scene(), "What is this?", m=4, max_new_tokens=8).token_ids == []


def test_decoding_drops_special_ids_like_the_release(tiny_model):
    tok = tiny_model.tokenizer
    ids = tok.encode("red circle")
    assert tok.decode([1, *ids, 0, 2], skip_special=True) == tok.decode(ids) == "red circle"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_pos_embed_keeps_its_stored_fp16_values_in_every_dtype(tiny_ckpt, dtype):
    from safetensors import safe_open

    with safe_open(str(tiny_ckpt / "model.safetensors"), "pt") as f:
        stored = f.get_tensor("model.query_abstractor.pos_embed")
    model = MQTLlava.from_pretrained(tiny_ckpt, dtype=dtype)
    assert model.mqt.query.dtype == dtype
    assert model.mqt.pos_embed.dtype == torch.float16 and torch.equal(model.mqt.pos_embed, stored)


def test_context_overflow_is_refused(tiny_model):
    from mqt_edge.errors import InputError

    with pytest.raises(InputError, match="exceed the context"):
        tiny_model.generate(scene(), "What?", m=256, max_new_tokens=1000)


def test_vision_tower_override(ckpt, tmp_path):
    moved = shutil.move(ckpt / "clip-vision", tmp_path / "elsewhere-clip")
    with pytest.raises(CheckpointError, match="vision tower not found: clip-vision"):
        MQTLlava.from_pretrained(ckpt)
    model = MQTLlava.from_pretrained(ckpt, vision_tower=moved)
    assert model.encode_image(scene(), m=3).shape == (3, 128)


def test_hub_vision_tower_offline_names_the_fix(ckpt, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    edit_config(ckpt, mm_vision_tower="openai/clip-vit-large-patch14-336")
    with pytest.raises(CheckpointError, match="openai/clip-vit-large-patch14-336.*--vision-tower"):
        MQTLlava.from_pretrained(ckpt)


def test_hub_model_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="gordonhu/MQT-LLaVA-7b.*local directory"):
        MQTLlava.from_pretrained("gordonhu/MQT-LLaVA-7b")


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at .*mqt-edge synth"):
        MQTLlava.from_pretrained(tmp_path / "nope")


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        MQTLlava.from_pretrained(ckpt)


def test_plain_llama_is_not_mqt_llava(ckpt):
    edit_config(ckpt, architectures=["LlamaForCausalLM"], model_type="llama", mm_vision_tower=None)
    with pytest.raises(CheckpointError, match="not an MQT-LLaVA checkpoint"):
        MQTLlava.from_pretrained(ckpt)


def test_llava_without_query_transformer(ckpt):
    from safetensors.torch import load_file, save_file

    sd = {k: v for k, v in load_file(ckpt / "model.safetensors").items() if "query_abstractor" not in k}
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no model.query_abstractor"):
        MQTLlava.from_pretrained(ckpt)


def test_missing_tokenizer(ckpt):
    (ckpt / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.model"):
        MQTLlava.from_pretrained(ckpt)


def test_truncated_weights(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        MQTLlava.from_pretrained(ckpt)


def test_config_that_does_not_match_the_weights(ckpt):
    edit_config(ckpt, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match="incomplete"):
        MQTLlava.from_pretrained(ckpt)
    edit_config(ckpt, num_hidden_layers=2, intermediate_size=300)
    with pytest.raises(CheckpointError, match="has shape"):
        MQTLlava.from_pretrained(ckpt)


def test_missing_shard_of_an_index(tmp_path):
    from release_reference import write_release_checkpoint

    d = write_release_checkpoint(tmp_path / "rel", weight_format="safetensors", num_shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing 1 weight shard"):
        MQTLlava.from_pretrained(d)


def test_bin_files_are_never_fully_unpickled(tmp_path):
    """A pickle that would run code is refused (weights_only=True) and the code never runs."""
    from release_reference import write_release_checkpoint

    d = write_release_checkpoint(tmp_path / "rel", weight_format="bin", num_shards=1)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    sd["model.norm.weight"] = Evil()
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        MQTLlava.from_pretrained(d)
    assert not marker.exists()


def _cfg_edit(**changes):
    return lambda d: edit_config(d, **changes)


def _write(name, text):
    return lambda d: (d / name).write_text(text)


@pytest.mark.parametrize("damage", [
    _cfg_edit(architectures=5, model_type=["llava"]),
    _cfg_edit(mm_vision_select_layer="abc"),
    _cfg_edit(mm_query_num_heads="x"),
    _cfg_edit(eos_token_id=[]),
    _cfg_edit(rope_scaling={"type": "bogus"}),
    _cfg_edit(max_position_embeddings="long"),
    _cfg_edit(mm_vision_select_feature="cls_patch"),
    _write("model.safetensors.index.json", '{"weight_map": ["a"]}'),
    _write("clip-vision/preprocessor_config.json", "[]"),
    _write("clip-vision/preprocessor_config.json", '{"crop_size": 224}'),
    lambda d: os.chmod(d / "config.json", 0),
], ids=["types", "select-layer", "heads", "eos", "rope", "ctx", "cls_patch", "index", "proc-list",
        "proc-crop", "unreadable"])
def test_damaged_checkpoints_fail_with_one_line(ckpt, damage, request):
    if request.node.callspec.id == "unreadable" and os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    damage(ckpt)
    with pytest.raises(CheckpointError) as info:
        MQTLlava.from_pretrained(ckpt)
    assert "\n" not in str(info.value)


def test_16_bit_images_are_refused(tmp_path):
    from mqt_edge.errors import ImageError
    from mqt_edge.image import load_image
    from PIL import Image

    Image.fromarray(np.full((20, 30), 40000, np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(ImageError, match="16-bit or float"):
        load_image(tmp_path / "deep.png")


def test_cli_errors_are_one_line_without_traceback(ckpt, tmp_path):
    scene().save(tmp_path / "img.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    cases = {
        "missing checkpoint": [str(tmp_path / "none"), str(tmp_path / "img.png"), "Q?"],
        "bad image": [str(ckpt), str(tmp_path / "bad.png"), "Q?"],
        "m out of range": [str(ckpt), str(tmp_path / "img.png"), "Q?", "--tokens", "999"],
        "empty question": [str(ckpt), str(tmp_path / "img.png"), " "],
        "not a directory": [str(tmp_path / "img.png"), str(tmp_path / "img.png"), "Q?"],
    }
    for what, args in cases.items():
        r = subprocess.run([sys.executable, "-m", "mqt_edge", "reference", *args], capture_output=True, text=True)
        assert r.returncode != 0, what
        lines = stderr_lines(r)
        assert len(lines) == 1 and lines[0].startswith("error:"), (what, r.stderr)
        assert "Traceback" not in r.stderr + r.stdout


def test_embedded_tower_without_its_config_is_read_off_the_weights(tmp_path):
    """Weights under model.vision_tower.vision_tower.* and mm_vision_tower unreachable: shapes decide.

    Head count is not in the weights; the fallback uses CLIP's 64-wide heads, so the tower here does too.
    """
    from release_reference import ReleaseReference, write_release_checkpoint

    d = write_release_checkpoint(tmp_path / "rel", weight_format="safetensors", num_shards=1,
                                 vision_in_checkpoint=True, clip_heads=2)
    im = scene(seed=4)
    expected = ReleaseReference(d).visual_tokens(im, 7)
    shutil.rmtree(json.loads((d / "config.json").read_text())["mm_vision_tower"])
    model = MQTLlava.from_pretrained(d, dtype=torch.float32)
    assert (model.encode_image(im, m=7) - expected).abs().max().item() <= 1e-5
