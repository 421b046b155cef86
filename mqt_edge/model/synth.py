"""Random-weight checkpoints in the MQT-LLaVA release layout, for tests and benchmarks.

Nothing can be downloaded here, so `mqt-edge synth` writes what a download would give: config.json
(`LlavaLlamaForCausalLM`, the `mm_*` fields), safetensors shards with an index, a SentencePiece
tokenizer.model set up like LLaMA's, and a CLIP vision tower directory named by `mm_vision_tower`.

Tensors are generated and written one shard at a time from per-name seeds, so the 7B preset needs
about one shard of RAM (not the model) and the output does not depend on the order of writing.
"""

from __future__ import annotations

import io
import json
import math
import os
import zlib
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..atomic import atomic_dir
from ..errors import InputError
# The presets are data (torch-free, for the planner); re-exported here for existing callers.
from ..presets import PRESETS, QUERY_HEADS_KEY, Preset, get_preset  # noqa: F401
from .mqt import sincos_pos_embed_2d

SHARD_BYTES = 2 * 2**30


# ---- tokenizer ---------------------------------------------------------------------------------
_CORPUS = """A chat between a curious human and an artificial intelligence assistant. The assistant \
gives helpful, detailed, and polite answers to the human's questions.
USER: What is shown in this image? ASSISTANT: The image shows a red circle and a blue square.
USER: What color is the circle? ASSISTANT: red
USER: How many shapes are there? ASSISTANT: three
USER: Is there a green triangle? ASSISTANT: yes
USER: What shape is the yellow object? ASSISTANT: square
USER: Is the square on the left or on the right? ASSISTANT: left
Describe the scene in detail. There are 2 cats, 10 dogs and 345 birds in the park near the river.
The robot arm picks up the cup from the table and places it on the shelf next to the bottle.
Answer the question using a single word or phrase. Please answer yes or no.
"""


def llama_like_tokenizer(vocab_size: int, seed_text: str = _CORPUS) -> bytes:
    """A SentencePiece BPE model with LLaMA's settings, padded with unused pieces to vocab_size.

    LLaMA's settings matter: identity normalisation, a dummy prefix, no whitespace folding and byte
    fallback make "\\n" the byte token <0x0A>, as in the release. Other settings turn it into a
    space, and the ids then differ from llama.cpp's.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    text = "\n".join([seed_text] * 4)
    trained = None
    for size in (min(vocab_size, 700), 600, 500, 400, 320):  # the largest the corpus supports
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(text.splitlines()), model_writer=buf, model_type="bpe",
                vocab_size=size, byte_fallback=True, normalization_rule_name="identity",
                add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
                allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2,
            )
        except RuntimeError:
            continue
        trained = buf.getvalue()
        break
    if trained is None:  # pragma: no cover - the corpus above always supports 320
        raise RuntimeError("sentencepiece could not train the synthetic tokenizer")
    proto = pb.ModelProto()
    proto.ParseFromString(trained)
    if len(proto.pieces) > vocab_size:
        raise InputError(f"vocab_size {vocab_size} is below the tokenizer's {len(proto.pieces)} pieces",
                         "use a larger vocab_size")
    for i in range(len(proto.pieces), vocab_size):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"<unused{i}>", -1e9, pb.ModelProto.SentencePiece.UNUSED
    return proto.SerializeToString()


# ---- weights -----------------------------------------------------------------------------------
def _rng(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _init_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Generic init: norms at 1, biases at 0, everything else N(0, 0.02), as LLaMA and CLIP do."""
    g = _rng(seed, name)
    if name.endswith(("norm.weight", "layrnorm.weight", "layer_norm1.weight", "layer_norm2.weight")):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    return torch.randn(shape, generator=g) * 0.02


def _mqt_tensors(p: Preset, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The query abstractor, initialised like the release (proj ~ hidden^-0.5 N(0,1))."""
    D, hidden, M = p.clip["hidden_size"], p.llm["hidden_size"], p.num_queries
    pre = "model.query_abstractor."
    g = lambda n: _rng(seed, pre + n)  # noqa: E731
    yield pre + "query", torch.nn.init.trunc_normal_(torch.empty(M, D), std=0.02, generator=g("query"))
    yield pre + "pos_embed", torch.from_numpy(sincos_pos_embed_2d(D, math.isqrt(M))).half()
    yield pre + "attn.in_proj_weight", torch.randn(3 * D, D, generator=g("in")) * 0.02
    yield pre + "attn.in_proj_bias", torch.zeros(3 * D)
    yield pre + "attn.out_proj.weight", torch.randn(D, D, generator=g("out")) * 0.02
    yield pre + "attn.out_proj.bias", torch.zeros(D)
    for ln in ("ln_q", "ln_k", "ln_v"):
        yield pre + f"{ln}.weight", torch.ones(D)
        yield pre + f"{ln}.bias", torch.zeros(D)
    yield pre + "proj", torch.randn(D, hidden, generator=g("proj")) * hidden**-0.5


def _meta_shapes(model_cls, config) -> list[tuple[str, tuple[int, ...]]]:
    with torch.device("meta"):
        model = model_cls(config)
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _write_shards(
    out: Path, tensors: Iterator[tuple[str, torch.Tensor]], stem: str, shard_bytes: int
) -> None:
    """safetensors shards of at most `shard_bytes`, plus an index when there are several."""
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    weight_map: dict[str, int] = {}
    total, batch, size = 0, {}, 0

    def flush() -> None:
        nonlocal batch, size
        if batch:
            shards.append(list(batch))
            save_file(batch, str(out / f"{stem}.part{len(shards)}"), metadata={"format": "pt"})
            batch, size = {}, 0

    for name, t in tensors:
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        if batch and size + nbytes > shard_bytes:
            flush()
        batch[name], size, total = t, size + nbytes, total + nbytes
        weight_map[name] = len(shards) + 1
    flush()
    n = len(shards)
    names = {i: (f"{stem}.safetensors" if n == 1 else f"{stem}-{i:05d}-of-{n:05d}.safetensors")
             for i in range(1, n + 1)}
    for i in names:
        os.replace(out / f"{stem}.part{i}", out / names[i])
        os.chmod(out / names[i], 0o644)  # safetensors writes 0600; checkpoints are shared files
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in weight_map.items()}}
        (out / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_checkpoint(
    preset: str | Preset,
    out: str | os.PathLike,
    seed: int = 0,
    force: bool = False,
    shard_bytes: int = SHARD_BYTES,
    on_stage: Callable[[str], None] = lambda _: None,
) -> Path:
    """Write a random-weight checkpoint of `preset` to `out` (atomically: all or nothing)."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out} already exists", "choose another --out or pass --force to replace it")
    # --force: the old directory is swapped out only once the new one is complete
    with atomic_dir(out) as tmp:
        on_stage("tokenizer")
        _write_tokenizer(tmp, p)
        on_stage("vision tower")
        _write_vision_tower(tmp / "clip-vision", p, seed + 1, shard_bytes)
        on_stage("LLM and query transformer")
        lcfg = _write_llm_and_mqt(tmp, p, seed, shard_bytes)
        _write_config(tmp, p, lcfg, seed)
    return out


def _write_tokenizer(tmp: Path, p: Preset) -> None:
    (tmp / "tokenizer.model").write_bytes(llama_like_tokenizer(p.vocab_size))
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "model_max_length": p.llm["max_position_embeddings"], "padding_side": "right",
    }, indent=2))


def _write_vision_tower(clip_dir: Path, p: Preset, seed: int, shard_bytes: int) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    clip_dir.mkdir()
    vcfg = CLIPVisionConfig(**p.clip)
    vcfg.save_pretrained(clip_dir)
    size = p.clip["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(clip_dir)
    clip = ((n, _init_tensor(n, s, seed)) for n, s in _meta_shapes(CLIPVisionModel, vcfg))
    _write_shards(clip_dir, clip, "model", shard_bytes)


def _write_llm_and_mqt(tmp: Path, p: Preset, seed: int, shard_bytes: int):
    """The LLM's and the query transformer's tensors, sharded together; returns the LlamaConfig."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, p.dtype)
    lcfg = LlamaConfig(vocab_size=p.vocab_size, rms_norm_eps=1e-5, rope_theta=10000.0,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                       **p.llm)
    llm = ((n, _init_tensor(n, s, seed).to(dtype)) for n, s in _meta_shapes(LlamaForCausalLM, lcfg))
    mqt = ((n, t if n.endswith("pos_embed") else t.to(dtype)) for n, t in _mqt_tensors(p, seed))

    def all_tensors():
        yield from mqt
        yield from llm

    _write_shards(tmp, all_tensors(), "model", shard_bytes)
    return lcfg


def _write_config(tmp: Path, p: Preset, lcfg, seed: int) -> None:
    config = lcfg.to_dict()
    config.update(
        architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama", torch_dtype=p.dtype,
        mm_vision_tower="clip-vision",  # relative to the checkpoint directory
        mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_hidden_size=p.clip["hidden_size"],
        mm_projector_type="linear", mm_patch_merge_type="flat", image_aspect_ratio="pad",
        mm_use_im_start_end=False, mm_use_im_patch_token=False, query_abstractor_type="matry_query",
        num_visual_tokens=p.num_queries, tokenizer_model_max_length=p.llm["max_position_embeddings"],
        tokenizer_padding_side="right", mqt_edge_synth={"preset": p.name, "seed": seed},
        **{QUERY_HEADS_KEY: p.query_heads},
    )
    for key in ("transformers_version", "_name_or_path", "dtype"):
        config.pop(key, None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
