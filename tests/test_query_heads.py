"""The query transformer's head count: the release's 16 unless config.json records another.

The release builds `nn.MultiheadAttention(kv_dim, 16)` for any kv_dim (`num_heads = 16` in
`build_matryoshka_query_transformer`); the packed in_proj weights do not reveal the split, so a wrong
rule (such as kv_dim // 64) gives other attention without any error.
"""

import json
from dataclasses import replace

import pytest
import torch

from release_reference import MQT_PREFIX, ReferenceResampler, _load_checkpoint_tensors, write_release_checkpoint
from mqt_edge.defaults import DEFAULT_MODEL
from mqt_edge.errors import CheckpointError
from mqt_edge.model import MQTLlava
from mqt_edge.presets import PRESETS, QUERY_HEADS_KEY, RELEASE_QUERY_HEADS


@pytest.fixture(scope="module")
def release_128(tmp_path_factory):
    """A release-layout checkpoint around a 128-wide vision tower (kv_dim != 1024), no head field."""
    return write_release_checkpoint(tmp_path_factory.mktemp("heads") / "ckpt", clip_hidden=128)


def _resampler(ckpt, heads: int) -> ReferenceResampler:
    """nn.MultiheadAttention with `heads` heads on the checkpoint's own query_abstractor tensors."""
    w = {k[len(MQT_PREFIX):]: v for k, v in _load_checkpoint_tensors(ckpt).items() if k.startswith(MQT_PREFIX)}
    M, D = w["query"].shape
    ref = ReferenceResampler(M, D, w["proj"].shape[1], num_heads=heads)
    ref.load_state_dict({k: v.half() if k == "pos_embed" else v.float() for k, v in w.items()})
    return ref.eval()


def test_a_checkpoint_without_the_field_has_the_release_16_heads(release_128):
    assert QUERY_HEADS_KEY not in json.loads((release_128 / "config.json").read_text())
    ours = MQTLlava.from_pretrained(release_128, dtype=torch.float32)
    c = ours.mqt.config
    assert (c.kv_dim, c.num_heads) == (128, RELEASE_QUERY_HEADS)
    feats = torch.randn(2, c.key_grid[0] * c.key_grid[1], c.kv_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours.mqt(feats)
        sixteen = _resampler(release_128, 16)(feats, c.num_queries, c.key_grid)
        by_width = _resampler(release_128, 128 // 64)(feats, c.num_queries, c.key_grid)
    assert (got - sixteen).abs().max().item() <= 1e-5
    # The split matters on these weights: the kv_dim // 64 rule would be visibly wrong, not a tie.
    assert (by_width - sixteen).abs().max().item() > 1e-2


def test_the_recorded_count_overrides_the_default(tmp_path):
    from release_reference import ReleaseReference

    ckpt = write_release_checkpoint(tmp_path / "ckpt", clip_hidden=128, query_heads=4)
    ours = MQTLlava.from_pretrained(ckpt, dtype=torch.float32)
    assert ours.mqt.config.num_heads == 4
    ref = ReleaseReference(ckpt)
    from conftest import scene

    im = scene(seed=1)
    assert (ours.encode_image(im, m=9) - ref.visual_tokens(im, 9)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("value, match", [
    (0, "'mm_query_num_heads' is 0"),
    (3, "does not split into 3 heads.*set mm_query_num_heads"),
])
def test_unusable_head_counts_are_one_line_errors(release_128, tmp_path, value, match):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(release_128, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(cfg | {QUERY_HEADS_KEY: value}))
    with pytest.raises(CheckpointError, match=match):
        MQTLlava.from_pretrained(ckpt, dtype=torch.float32)


def test_a_width_the_default_cannot_split_names_the_field(tmp_path):
    ckpt = write_release_checkpoint(tmp_path / "ckpt", clip_hidden=72, query_heads=4)
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg[QUERY_HEADS_KEY]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="72-wide attention does not split into 16 heads.*no mm_query_num_heads"):
        MQTLlava.from_pretrained(ckpt, dtype=torch.float32)


def test_every_checkpoint_the_project_writes_records_its_heads(tiny_ckpt, tiny_model, tmp_path):
    from mqt_edge.train import save_checkpoint

    # synth: tiny keeps the 2 heads it has always had (kv_dim 128), now written down
    assert json.loads((tiny_ckpt / "config.json").read_text())[QUERY_HEADS_KEY] == 2 == tiny_model.mqt.config.num_heads
    assert {p.name: p.query_heads for p in PRESETS.values()} == {
        "tiny": 2, "shapes": 2, "bench": 16, "mqt-llava-7b": 16}
    # train's save_checkpoint
    saved = save_checkpoint(tiny_model, tmp_path / "saved")
    assert json.loads((saved / "config.json").read_text())[QUERY_HEADS_KEY] == 2
    # the shipped model: the count it was trained and answers with (its kv_dim 128 // 64)
    shipped = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert shipped[QUERY_HEADS_KEY] == 2 and shipped["mm_hidden_size"] == 128


def test_checkpoints_mqt_edge_wrote_before_the_field_keep_their_heads(tiny_ckpt, tmp_path):
    """Older synth/train output has no head field but is marked mqt_edge_synth: it used kv_dim // 64."""
    import shutil

    ckpt = tmp_path / "old"
    shutil.copytree(tiny_ckpt, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg[QUERY_HEADS_KEY]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert MQTLlava.from_pretrained(ckpt, dtype=torch.float32).mqt.config.num_heads == 128 // 64
    del cfg["mqt_edge_synth"]  # the same weights, unmarked: read as the release's code would build them
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert MQTLlava.from_pretrained(ckpt, dtype=torch.float32).mqt.config.num_heads == 16


def test_the_exported_graph_and_the_planner_use_the_model_count(release_128, monkeypatch):
    from mqt_edge.exporters.source import _mqt_cost
    from mqt_edge.exporters.onnx_mqt import MQTGraph
    from mqt_edge.profiles.planner import ModelFacts

    ours = MQTLlava.from_pretrained(release_128, dtype=torch.float32)
    graph = MQTGraph(ours.mqt, ours.num_queries)
    assert graph.num_heads == 16 == _mqt_cost(ours.mqt, 36)["heads"]
    feats = torch.randn(1, 64, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (graph(feats, torch.arange(36)) - ours.mqt(feats)).abs().max().item() <= 1e-5

    # The planner sizes mqt.onnx's constant (heads, M, P) attention weights with the preset's count.
    base = ModelFacts.from_preset("tiny", "f32").mqt_bytes
    monkeypatch.setitem(PRESETS, "tiny", replace(PRESETS["tiny"], mqt_heads=8))
    assert ModelFacts.from_preset("tiny", "f32").mqt_bytes - base == 4 * (8 - 2) * 256 * 576
