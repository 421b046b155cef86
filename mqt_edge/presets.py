"""Model shapes as data, torch-free: the release's query-transformer head count and the synth presets.

The planner sizes a preset before anything is downloaded or exported (`mqt-edge plan --preset …` on a
base install), so the shapes live here and `mqt_edge.model.synth` (which needs torch to write the
weights) imports them.

The head count of the Matryoshka Query Transformer cannot be read from its weights: the packed
`in_proj_weight` (3·kv_dim, kv_dim) looks the same for any split. The release builds
`nn.MultiheadAttention(kv_dim, 16)` whatever kv_dim is (`num_heads = 16` in
`build_matryoshka_query_transformer`), so a checkpoint without `mm_query_num_heads` has 16 heads.
Every checkpoint mqt-edge writes records the field, so none of them depends on this default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .errors import InputError

RELEASE_QUERY_HEADS = 16
QUERY_HEADS_KEY = "mm_query_num_heads"  # the config.json field that overrides the release's 16


LEGACY_MARK = "mqt_edge_synth"  # in every config.json mqt-edge wrote (synth, and train, which copies it)


def query_heads(config: Mapping, kv_dim: int) -> int:
    """The MQT's attention heads for a checkpoint's config.json: its `mm_query_num_heads`, else the
    release's 16.

    The one place the rule lives: the PyTorch reference, the planner's presets and (through the
    loaded model) the exporters all take their head count from here. One exception keeps old files
    answering as they did: a checkpoint mqt-edge wrote before it recorded the field used
    kv_dim // 64 heads.
    """
    if config.get(QUERY_HEADS_KEY) is not None:
        return int(config[QUERY_HEADS_KEY])
    if LEGACY_MARK in config:
        return max(kv_dim // 64, 1)
    return RELEASE_QUERY_HEADS


@dataclass(frozen=True)
class Preset:
    name: str
    about: str
    clip: dict  # CLIPVisionConfig fields
    llm: dict  # LlamaConfig fields
    num_queries: int = 256
    dtype: str = "float16"
    vocab_size: int = 32000  # rows of the embedding; the tokenizer is padded to it
    mqt_heads: int | None = None  # None: the release's count; written to config.json either way

    @property
    def query_heads(self) -> int:
        recorded = {} if self.mqt_heads is None else {QUERY_HEADS_KEY: self.mqt_heads}
        return query_heads(recorded, self.clip["hidden_size"])


_CLIP_L_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "tiny",
            "seconds on a CPU; the test suite's model (release grid: 336 px, 14 px patches, M = 256)",
            clip=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                      image_size=336, patch_size=14, projection_dim=128, hidden_act="quick_gelu"),
            # 2 KV heads for 4 query heads: grouped-query attention (TinyLlama has it) stays tested
            llm=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=1024),
            dtype="float32",
            vocab_size=512,
            mqt_heads=2,  # 64-wide heads, as this preset has always had
        ),
        Preset(
            "shapes",
            "the default model's untrained start: release grid (336 px, 14 px patches, M = 256), ~2M parameters",
            clip=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                      image_size=336, patch_size=14, projection_dim=128, hidden_act="quick_gelu"),
            llm=dict(hidden_size=192, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=4, max_position_embeddings=1024),
            dtype="float32",
            vocab_size=512,
            mqt_heads=2,  # the shipped default model was trained from this preset with 2 heads
        ),
        Preset(
            "bench",
            "CLIP ViT-L/14-336, M = 256 and a 1.1B LLaMA with TinyLlama's shapes, for benchmarks",
            clip=_CLIP_L_336,
            llm=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, max_position_embeddings=2048),
        ),
        Preset(
            "mqt-llava-7b",
            "the released shapes: CLIP ViT-L/14-336, M = 256, Vicuna-7B v1.5 (about 14 GB at fp16)",
            clip=_CLIP_L_336,
            llm=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, max_position_embeddings=4096),
        ),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise InputError(f"unknown preset '{name}'", f"choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
