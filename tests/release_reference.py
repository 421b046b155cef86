"""An independent reference for the released MQT-LLaVA model, and a writer of tiny release-layout checkpoints.

This module deliberately imports nothing from ``mqt_edge``. It re-expresses, from a reading of the public
release (``gordonhu608/MQT-LLaVA``: ``llava/model/multimodal_projector/builder.py``, ``llava_arch.py``,
``multimodal_encoder/clip_encoder.py``, ``mm_utils.py``, ``conversation.py``, ``eval/model_vqa.py``), what the
released model computes, so tests can hold the project's own implementation against it on a checkpoint that
the project did not write.

Two parts:

``write_release_checkpoint(out_dir, ...)``
    Writes a tiny, random-weight checkpoint laid out like ``gordonhu/MQT-LLaVA-7b``: ``config.json``
    (``LlavaLlamaForCausalLM`` / ``llava_llama`` with the ``mm_*`` fields), sharded weights
    (``pytorch_model-0000k-of-0000n.bin`` + index, or ``model-0000k-of-0000n.safetensors`` + index, or a single
    unsharded file), a LLaMA-style SentencePiece ``tokenizer.model``, ``tokenizer_config.json`` and
    ``generation_config.json``. The CLIP vision tower lives next to it in ``<out_dir>-clip`` (named by an
    absolute path in ``mm_vision_tower``), as in the release, where the tower is a separate checkpoint.

    dtype choice: **every tensor in the checkpoint is stored as float16**, as in the released checkpoint
    (``torch_dtype: float16``); in particular ``model.query_abstractor.pos_embed`` is fp16, as the release's
    ``Resampler`` builds it with ``.half()``. The CLIP tower written by ``save_pretrained`` (external case)
    keeps transformers' default float32.

    With ``vision_in_checkpoint=True`` the CLIP weights go into the shards under
    ``model.vision_tower.vision_tower.<CLIPVisionModel key>`` and the ``<out_dir>-clip`` directory holds only
    the CLIP ``config.json`` and ``preprocessor_config.json`` (no weights), so that a consumer that ignores the
    embedded weights fails loudly instead of silently reading a second copy.

    No config field names the query transformer's head count: the release's
    ``build_matryoshka_query_transformer`` passes ``num_heads = 16`` whatever kv_dim is. So the tiny
    checkpoint's kv_dim of ``clip_hidden`` = 128 still has 16 heads (8 wide). ``query_heads=N`` writes a
    ``mm_query_num_heads`` field for a checkpoint trained with another count.

``ReleaseReference(ckpt_dir)``
    Loads such a checkpoint (or any checkpoint in the release layout) with plain torch / transformers /
    sentencepiece and computes visual tokens, prompt ids and greedy answers the release's way, in float32,
    except for the release's fp16 rounding of positions: ``pos_embed`` holds fp16 values, and the
    bicubically resized key positions are rounded to fp16 (the release's ``get_abs_pos`` resizes in fp32
    and casts back to the parameter's dtype, fp16) before the fp32 ``ln_k``.

    Greedy decoding re-runs the whole sequence at every step (``use_cache=False``), takes the argmax of the
    last position's logits, and stops at EOS (id 2) or after ``max_new_tokens``. **The EOS id is not
    included** in the ids that ``greedy_ids`` returns. ``greedy_trace`` also returns each step's gap between
    the top two logits, so a test can tell which argmaxes are robust to another implementation's rounding.

The tiny LLM's weights are drawn with std 0.08 (``config.json`` still says ``initializer_range`` 0.02); at
0.02 its greedy output often collapses to one repeated token.
"""

from __future__ import annotations

import io
import json
import math
import pathlib
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGE_TOKEN_INDEX = -200
BOS_ID = 1
EOS_ID = 2

LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

VISION_PREFIX = "model.vision_tower.vision_tower."
RELEASE_QUERY_HEADS = 16  # builder.py: build_matryoshka_query_transformer(..., num_heads = 16, kv_dim=1024)
MQT_PREFIX = "model.query_abstractor."

__all__ = [
    "IMAGE_TOKEN_INDEX",
    "LLAVA_V1_SYSTEM",
    "ReleaseReference",
    "ReferenceResampler",
    "build_llava_v1_prompt",
    "expand_to_square",
    "sincos_pos_embed_2d",
    "write_release_checkpoint",
]


# ---------------------------------------------------------------------------------------------------------
# Shared pieces: the positional embedding, the padding of the image, the prompt
# ---------------------------------------------------------------------------------------------------------


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[len(positions), dim]: sin of position * frequency in the first half, cos in the second (float32)."""
    half = dim // 2
    freqs = np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = (np.float32(1.0) / (np.float32(10000.0) ** freqs)).astype(np.float32)
    angles = np.outer(positions.reshape(-1).astype(np.float32), freqs).astype(np.float32)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """MAE-style 2-D sin-cos embedding of a ``grid`` x ``grid`` grid, row-major over (row, column).

    As in the release (and MAE), the first half of the channels encodes the *column* (width) coordinate and
    the second half the row coordinate. Computed in float32; the release stores the result as fp16.
    """
    if dim % 4 != 0:
        raise ValueError(f"embedding dim must be a multiple of 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32), indexing="ij")
    col_part = _sincos_1d(dim // 2, cols)
    row_part = _sincos_1d(dim // 2, rows)
    return np.concatenate([col_part, row_part], axis=1)


def expand_to_square(image, background: Tuple[int, ...]):
    """Pad a PIL image to a square canvas of its longer side, the image centred (release's ``expand2square``)."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def build_llava_v1_prompt(question: str) -> str:
    """The ``llava_v1`` template with one user turn carrying the image (no ``<im_start>`` tokens)."""
    return f"{LLAVA_V1_SYSTEM} USER: <image>\n{question} ASSISTANT:"


# ---------------------------------------------------------------------------------------------------------
# (a) Writer of a tiny checkpoint in the release layout
# ---------------------------------------------------------------------------------------------------------

_TOKENIZER_CORPUS = [
    LLAVA_V1_SYSTEM,
    "USER: What colour is the square? ASSISTANT: The square is red.",
    "USER: What color is the circle in the image? ASSISTANT: The circle is blue.",
    "USER: How many shapes are there? ASSISTANT: There are 3 shapes: 2 circles and 1 triangle.",
    "USER: Count the dots. ASSISTANT: I can see 7 dots, 4 green and 3 yellow.",
    "USER: Is the triangle above the square? ASSISTANT: Yes, it is.",
    "USER: Describe the picture in detail. ASSISTANT: A white background with a black line and an orange box.",
    "USER: Which shape is the largest? ASSISTANT: The big purple rectangle on the left.",
    "USER: Answer the question using a single word or phrase. ASSISTANT: Red",
    "What is shown in this image? Please answer briefly.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 25 100 256 576 1024 2048 4096",
    "Colours: red, green, blue, yellow, orange, purple, pink, brown, black, white, grey, gray.",
    "Shapes: square, circle, triangle, rectangle, star, hexagon, line, dot, box, ring.",
    "Punctuation: . , ; : ! ? ' \" ( ) [ ] { } - _ / \\ + = * & % $ # @ < > | ~ ^ `",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!",
    "ASSISTANT: There is one cat and two dogs. USER: Where are they? ASSISTANT: On the grass, near a tree.",
    "Question: how many red squares? Answer: 2.",
    "  Indented line with two spaces, and\ttab separated words.",
    "A person is holding a green umbrella while walking in the rain.",
    "The image shows a kitchen with a table, four chairs, a window and a plant.",
]


def _train_tokenizer(vocab_size: int) -> bytes:
    """A SentencePiece BPE model set up like LLaMA's; returns the serialised model."""
    import sentencepiece as spm

    # One sentence per line: newlines are sentence boundaries, so "\n" never becomes a character piece and
    # encodes through byte fallback as <0x0A>, as in LLaMA's tokenizer.
    sentences: List[str] = []
    for text in _TOKENIZER_CORPUS:
        sentences.extend(part for part in text.split("\n") if part)
    sentences = sentences * 4  # a little more frequency signal for the merges

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        hard_vocab_limit=True,
        minloglevel=2,
    )
    data = model.getvalue()

    sp = spm.SentencePieceProcessor(model_proto=data)
    pieces = sp.encode("\nWhat", out_type=str)
    if pieces[:2] != ["\u2581", "<0x0A>"]:
        raise RuntimeError(f"tokenizer does not encode a newline like LLaMA's: {pieces}")
    if (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) != (0, 1, 2, -1):
        raise RuntimeError("tokenizer special ids differ from LLaMA's")
    if sp.get_piece_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {sp.get_piece_size()} pieces, wanted {vocab_size}")
    return data


def _query_abstractor_weights(
    gen: torch.Generator, num_queries: int, kv_dim: int, llm_hidden: int
) -> Dict[str, torch.Tensor]:
    grid = math.isqrt(num_queries)
    if grid * grid != num_queries:
        raise ValueError(f"num_queries must be a perfect square, got {num_queries}")

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    query = torch.empty(num_queries, kv_dim)
    with torch.no_grad():
        # trunc-normal std 0.02 (truncated at +-2, i.e. +-100 std, as timm's default: effectively normal)
        query.copy_(torch.clamp(randn(num_queries, kv_dim) * 0.02, -2.0, 2.0))
    w = {
        "query": query,
        "pos_embed": torch.from_numpy(sincos_pos_embed_2d(kv_dim, grid)).to(torch.float16),
        "attn.in_proj_weight": randn(3 * kv_dim, kv_dim) * (kv_dim**-0.5),
        "attn.in_proj_bias": randn(3 * kv_dim) * 0.1,
        "attn.out_proj.weight": randn(kv_dim, kv_dim) * (kv_dim**-0.5),
        "attn.out_proj.bias": randn(kv_dim) * 0.1,
        "proj": (llm_hidden**-0.5) * randn(kv_dim, llm_hidden),
    }
    for ln in ("ln_q", "ln_k", "ln_v"):
        w[f"{ln}.weight"] = 1.0 + 0.1 * randn(kv_dim)
        w[f"{ln}.bias"] = 0.1 * randn(kv_dim)
    return {MQT_PREFIX + k: v for k, v in w.items()}


_LLM_INIT_STD = 0.08


def _llm_config_fields(llm_hidden, llm_layers, llm_heads, llm_intermediate, vocab_size) -> dict:
    return {
        "hidden_size": llm_hidden,
        "intermediate_size": llm_intermediate,
        "num_attention_heads": llm_heads,
        "num_hidden_layers": llm_layers,
        "num_key_value_heads": llm_heads,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "vocab_size": vocab_size,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "use_cache": True,
    }


def _write_shards(out_dir: pathlib.Path, state: Dict[str, torch.Tensor], weight_format: str, num_shards: int):
    if weight_format not in ("bin", "safetensors"):
        raise ValueError(f"weight_format must be 'bin' or 'safetensors', got {weight_format!r}")
    keys = list(state)
    if num_shards < 1 or num_shards > len(keys):
        raise ValueError(f"num_shards must be in 1..{len(keys)}, got {num_shards}")

    def save(tensors: Dict[str, torch.Tensor], path: pathlib.Path):
        if weight_format == "bin":
            torch.save(tensors, path)
        else:
            from safetensors.torch import save_file

            save_file(tensors, str(path), metadata={"format": "pt"})

    if num_shards == 1:
        save(state, out_dir / ("pytorch_model.bin" if weight_format == "bin" else "model.safetensors"))
        return

    # Split keys, in order, into num_shards groups of roughly equal byte size (each non-empty).
    sizes = [state[k].numel() * state[k].element_size() for k in keys]
    total = sum(sizes)
    groups: List[List[str]] = [[] for _ in range(num_shards)]
    acc = 0
    for i, (k, s) in enumerate(zip(keys, sizes)):
        g = min(num_shards - 1, int(acc * num_shards // total))
        remaining_keys = len(keys) - i
        empty_after = sum(1 for j in range(g + 1, num_shards) if not groups[j])
        if remaining_keys <= empty_after:  # keep enough keys for the empty groups that follow
            g = next(j for j in range(g + 1, num_shards) if not groups[j])
        groups[g].append(k)
        acc += s
    # Empty groups can only remain at the front if one tensor dominates; move keys forward then.
    for j in range(num_shards):
        if not groups[j]:
            donor = next(d for d in range(num_shards) if len(groups[d]) > 1)
            groups[j].append(groups[donor].pop())
    stem, ext = ("pytorch_model", "bin") if weight_format == "bin" else ("model", "safetensors")
    weight_map = {}
    for j, group in enumerate(groups):
        name = f"{stem}-{j + 1:05d}-of-{num_shards:05d}.{ext}"
        save({k: state[k] for k in group}, out_dir / name)
        for k in group:
            weight_map[k] = name
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_release_checkpoint(
    out_dir,
    *,
    seed: int = 0,
    weight_format: str = "bin",
    num_shards: int = 2,
    vision_in_checkpoint: bool = False,
    num_queries: int = 36,
    clip_image_size: int = 112,
    clip_patch: int = 14,
    clip_hidden: int = 128,
    clip_layers: int = 3,
    clip_heads: int = 4,
    llm_hidden: int = 96,
    llm_layers: int = 3,
    llm_heads: int = 4,
    llm_intermediate: int = 192,
    vocab_size: int = 400,
    query_heads: int | None = None,
) -> pathlib.Path:
    """Write a tiny random MQT-LLaVA checkpoint in the release's layout; return ``out_dir`` as a Path.

    The CLIP tower goes to ``<out_dir>-clip`` (full model, or config + preprocessor only when
    ``vision_in_checkpoint``), and ``mm_vision_tower`` names it by absolute path. All checkpoint tensors are
    float16. The query transformer's kv_dim is ``clip_hidden``; its head count is the release's 16, or
    ``query_heads`` (then recorded in config.json as ``mm_query_num_heads``).
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    if clip_hidden % (query_heads or RELEASE_QUERY_HEADS) or clip_hidden % 4:
        raise ValueError("clip_hidden must split into the query transformer's heads (and be a multiple of 4)")
    out_dir = pathlib.Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    clip_dir = out_dir.parent / (out_dir.name + "-clip")
    clip_dir.mkdir(parents=True, exist_ok=True)

    # --- vision tower -------------------------------------------------------------------------------
    torch.manual_seed(seed)
    vcfg = CLIPVisionConfig(
        hidden_size=clip_hidden,
        intermediate_size=4 * clip_hidden,
        num_hidden_layers=clip_layers,
        num_attention_heads=clip_heads,
        image_size=clip_image_size,
        patch_size=clip_patch,
        hidden_act="quick_gelu",
        projection_dim=clip_hidden,
    )
    clip = CLIPVisionModel(vcfg).eval()
    processor = CLIPImageProcessor(
        size={"shortest_edge": clip_image_size},
        crop_size={"height": clip_image_size, "width": clip_image_size},
    )
    if vision_in_checkpoint:
        vcfg.save_pretrained(clip_dir)
    else:
        clip.save_pretrained(clip_dir)
    processor.save_pretrained(clip_dir)

    # --- query transformer --------------------------------------------------------------------------
    gen = torch.Generator().manual_seed(seed + 1)
    mqt = _query_abstractor_weights(gen, num_queries, clip_hidden, llm_hidden)

    # --- LLM ----------------------------------------------------------------------------------------
    llm_fields = _llm_config_fields(llm_hidden, llm_layers, llm_heads, llm_intermediate, vocab_size)
    torch.manual_seed(seed + 2)
    # Weights drawn with std 0.08 (config keeps the release's initializer_range 0.02): at std 0.02 the tiny
    # model's greedy output often collapses to one repeated token; at 0.08 it varies with image and m.
    lcfg = LlamaConfig(**{**llm_fields, "initializer_range": _LLM_INIT_STD})
    lcfg._attn_implementation = "eager"
    llm = LlamaForCausalLM(lcfg).eval()
    llm_state = {k: v.detach().clone() for k, v in llm.state_dict().items()}
    with torch.no_grad():
        # Non-trivial RMSNorm weights, so an implementation that skips one would show.
        for k, v in llm_state.items():
            if k.endswith("layernorm.weight") or k == "model.norm.weight":
                llm_state[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=gen)

    # --- the checkpoint ------------------------------------------------------------------------------
    state: Dict[str, torch.Tensor] = {}
    for k, v in llm_state.items():
        if k.startswith("model.") and not k.startswith("model.norm"):
            state[k] = v
    if vision_in_checkpoint:
        for k, v in clip.state_dict().items():
            state[VISION_PREFIX + k] = v.detach().clone()
    state.update(mqt)
    state["model.norm.weight"] = llm_state["model.norm.weight"]
    state["lm_head.weight"] = llm_state["lm_head.weight"]
    state = {k: v.to(torch.float16).contiguous() for k, v in state.items()}
    _write_shards(out_dir, state, weight_format, num_shards)

    import transformers

    config = {
        "_name_or_path": str(out_dir),
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        **llm_fields,
        "torch_dtype": "float16",
        "transformers_version": transformers.__version__,
        "mm_vision_tower": str(clip_dir),
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_hidden_size": clip_hidden,
        "image_aspect_ratio": "pad",
        "mm_patch_merge_type": "flat",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "use_mm_proj": True,
        "query_abstractor_type": "matry_query",
        "mm_query_abstractor_type": "matry_query",
        "num_visual_tokens": num_queries,
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": 2048,
    }
    if query_heads is not None:
        config["mm_query_num_heads"] = query_heads
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    # --- tokenizer and generation config ---------------------------------------------------------------
    (out_dir / "tokenizer.model").write_bytes(_train_tokenizer(vocab_size))
    tok_cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "model_max_length": 2048,
        "padding_side": "right",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    gen_cfg = {
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": 0,
        "max_length": 4096,
        "transformers_version": transformers.__version__,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    return out_dir


# ---------------------------------------------------------------------------------------------------------
# (b) The independent reference
# ---------------------------------------------------------------------------------------------------------


def _load_checkpoint_tensors(ckpt_dir: pathlib.Path) -> Dict[str, torch.Tensor]:
    """All tensors of a release-layout checkpoint (sharded or single file, .bin or .safetensors)."""

    def load_file(path: pathlib.Path) -> Dict[str, torch.Tensor]:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file as st_load

            return st_load(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)

    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = ckpt_dir / index_name
        if index_path.exists():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            tensors: Dict[str, torch.Tensor] = {}
            for name in sorted(set(weight_map.values())):
                tensors.update(load_file(ckpt_dir / name))
            missing = set(weight_map) - set(tensors)
            if missing:
                raise KeyError(f"keys in the index but not in the shards: {sorted(missing)[:5]}")
            return tensors
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (ckpt_dir / single).exists():
            return load_file(ckpt_dir / single)
    raise FileNotFoundError(f"no weights found in {ckpt_dir}")


class ReferenceResampler(nn.Module):
    """The release's single cross-attention ``Resampler``, re-expressed for reference use (float32).

    ``pos_embed`` is held as an fp16 buffer. Keys are the positions alone: ``pos_embed`` resized bicubically
    (fp32, ``align_corners=False``) from its sqrt(M) grid to the patch grid, rounded to fp16, then ``ln_k``.
    Sequence-first ``nn.MultiheadAttention(kv_dim, num_heads)`` (the release: 16); LayerNorm eps 1e-6;
    output ``@ proj``.
    """

    def __init__(self, num_queries: int, kv_dim: int, out_dim: int, num_heads: int = RELEASE_QUERY_HEADS):
        super().__init__()
        self.num_queries = num_queries
        self.kv_dim = kv_dim
        self.query = nn.Parameter(torch.zeros(num_queries, kv_dim))
        self.register_buffer("pos_embed", torch.zeros(num_queries, kv_dim, dtype=torch.float16))
        self.attn = nn.MultiheadAttention(kv_dim, num_heads)
        self.ln_q = nn.LayerNorm(kv_dim, eps=1e-6)
        self.ln_k = nn.LayerNorm(kv_dim, eps=1e-6)
        self.ln_v = nn.LayerNorm(kv_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.zeros(kv_dim, out_dim))

    def key_positions(self, grid_hw: Tuple[int, int]) -> torch.Tensor:
        """[H*W, kv_dim] float32 holding fp16-rounded values (the release's ``get_abs_pos`` in fp16)."""
        src = math.isqrt(self.pos_embed.shape[0])
        img = self.pos_embed.float().reshape(1, src, src, self.kv_dim).permute(0, 3, 1, 2)
        out = F.interpolate(img, size=tuple(grid_hw), mode="bicubic", align_corners=False)
        out = out.permute(0, 2, 3, 1).reshape(-1, self.kv_dim)
        return out.to(torch.float16).float()

    def forward(self, features: torch.Tensor, m: int, grid_hw: Tuple[int, int]) -> torch.Tensor:
        """features [B, patches, kv_dim] -> [B, m, out_dim]."""
        if not 1 <= m <= self.num_queries:
            raise ValueError(f"m must be in 1..{self.num_queries}, got {m}")
        batch = features.shape[0]
        q = self.ln_q(self.query[:m] + self.pos_embed[:m].float())  # [m, C]
        k = self.ln_k(self.key_positions(grid_hw))  # [P, C]
        v = self.ln_v(features.float().transpose(0, 1))  # [P, B, C]
        q = q.unsqueeze(1).expand(m, batch, self.kv_dim)
        k = k.unsqueeze(1).expand(k.shape[0], batch, self.kv_dim)
        out, _ = self.attn(q, k, v, need_weights=False)  # [m, B, C]
        return out.transpose(0, 1) @ self.proj


class ReleaseReference:
    """The released MQT-LLaVA's semantics, computed independently in float32 (see the module docstring).

    Attributes: ``config`` (dict), ``clip`` (CLIPVisionModel), ``processor`` (CLIPImageProcessor),
    ``resampler`` (ReferenceResampler), ``llm`` (LlamaForCausalLM), ``sp`` (SentencePieceProcessor),
    ``grid`` ((H, W) patch grid), ``num_queries``.
    """

    def __init__(self, ckpt_dir):
        import sentencepiece as spm
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

        self.ckpt_dir = pathlib.Path(ckpt_dir)
        self.config = json.loads((self.ckpt_dir / "config.json").read_text())
        tensors = _load_checkpoint_tensors(self.ckpt_dir)

        # Vision tower and image processor.
        vt_path = self.config["mm_vision_tower"]
        self.processor = CLIPImageProcessor.from_pretrained(vt_path)
        embedded = {k[len(VISION_PREFIX):]: v for k, v in tensors.items() if k.startswith(VISION_PREFIX)}
        if embedded:
            vcfg = CLIPVisionConfig.from_pretrained(vt_path)
            vcfg._attn_implementation = "eager"
            self.clip = CLIPVisionModel(vcfg)
            result = self.clip.load_state_dict({k: v.float() for k, v in embedded.items()}, strict=False)
            unexpected = [k for k in result.unexpected_keys if not k.endswith("position_ids")]
            missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
            if unexpected or missing:
                raise KeyError(f"embedded vision weights do not fit: missing {missing}, unexpected {unexpected}")
        else:
            self.clip = CLIPVisionModel.from_pretrained(vt_path, attn_implementation="eager")
        self.clip = self.clip.float().eval()
        vc = self.clip.config
        side = vc.image_size // vc.patch_size
        self.grid = (side, side)
        self.select_layer = int(self.config.get("mm_vision_select_layer", -2))
        self.select_feature = self.config.get("mm_vision_select_feature", "patch")

        # Query transformer.
        mqt = {k[len(MQT_PREFIX):]: v for k, v in tensors.items() if k.startswith(MQT_PREFIX)}
        num_queries, kv_dim = mqt["query"].shape
        out_dim = mqt["proj"].shape[1]
        self.num_queries = int(num_queries)
        heads = int(self.config.get("mm_query_num_heads", RELEASE_QUERY_HEADS))
        self.resampler = ReferenceResampler(num_queries, kv_dim, out_dim, heads)
        state = {k: (v.to(torch.float16) if k == "pos_embed" else v.float()) for k, v in mqt.items()}
        self.resampler.load_state_dict(state, strict=True)
        self.resampler.eval()

        # LLM.
        llm_keys = {"hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                    "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "rope_theta",
                    "rope_scaling", "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id",
                    "hidden_act", "tie_word_embeddings", "attention_bias", "pretraining_tp"}
        lcfg = LlamaConfig(**{k: v for k, v in self.config.items() if k in llm_keys})
        lcfg._attn_implementation = "eager"
        self.llm = LlamaForCausalLM(lcfg)
        llm_state = {
            k: v.float()
            for k, v in tensors.items()
            if (k.startswith("model.") and not k.startswith((VISION_PREFIX, MQT_PREFIX, "model.vision_tower.")))
            or k == "lm_head.weight"
        }
        result = self.llm.load_state_dict(llm_state, strict=False)
        missing = [k for k in result.missing_keys if "rotary_emb" not in k]
        if missing or result.unexpected_keys:
            raise KeyError(f"LLM weights do not fit: missing {missing}, unexpected {result.unexpected_keys}")
        self.llm = self.llm.float().eval()
        self.eos_id = int(self.config.get("eos_token_id", EOS_ID))

        # Tokenizer.
        self.sp = spm.SentencePieceProcessor(model_file=str(self.ckpt_dir / "tokenizer.model"))

    # --- image -------------------------------------------------------------------------------------
    def pixel_values(self, image) -> torch.Tensor:
        """[1, 3, H, W] float32: RGB, padded to a square with the mean colour, CLIP preprocessing."""
        image = image.convert("RGB")
        background = tuple(int(x * 255) for x in self.processor.image_mean)
        image = expand_to_square(image, background)
        return self.processor.preprocess(image, return_tensors="pt")["pixel_values"].float()

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[1, patches, clip_hidden]: hidden states of ``mm_vision_select_layer`` (-2), CLS dropped."""
        out = self.clip(pixel_values.float(), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        if self.select_feature == "patch":
            feats = feats[:, 1:]
        elif self.select_feature != "cls_patch":
            raise ValueError(f"unexpected mm_vision_select_feature {self.select_feature!r}")
        return feats

    @torch.no_grad()
    def visual_tokens(self, image, m: int) -> torch.Tensor:
        """[m, llm_hidden] float32: the first m visual tokens of the image."""
        feats = self.image_features(self.pixel_values(image))
        return self.resampler(feats, m, self.grid)[0]

    # --- text --------------------------------------------------------------------------------------
    def prompt_ids(self, question: str) -> List[int]:
        """Token ids of the llava_v1 prompt, ``IMAGE_TOKEN_INDEX`` (-200) where the image goes."""
        chunks = [[BOS_ID] + self.sp.encode(chunk) for chunk in build_llava_v1_prompt(question).split("<image>")]
        ids = [BOS_ID]
        for i, chunk in enumerate(chunks):
            if i > 0:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(chunk[1:])  # BOS only once, at the very start
        return ids

    @torch.no_grad()
    def prompt_embeds(self, image, question: str, m: int) -> torch.Tensor:
        """[seq, llm_hidden] float32 input embeddings with the m visual tokens spliced in at the image."""
        ids = self.prompt_ids(question)
        vis = self.visual_tokens(image, m)
        embed = self.llm.get_input_embeddings()
        parts: List[torch.Tensor] = []
        run: List[int] = []
        for t in ids:
            if t == IMAGE_TOKEN_INDEX:
                if run:
                    parts.append(embed(torch.tensor(run)))
                    run = []
                parts.append(vis)
            else:
                run.append(t)
        if run:
            parts.append(embed(torch.tensor(run)))
        return torch.cat(parts, dim=0)

    @torch.no_grad()
    def greedy_trace(
        self, image, question: str, m: int, max_new_tokens: int = 12
    ) -> Tuple[List[int], List[float]]:
        """Greedy ids (EOS excluded) and, per step, the gap between the top two logits.

        The gaps tell a test how robust each argmax is: a comparison against an implementation with other
        rounding (fp16, llama.cpp) is only meaningful up to the first step whose gap is below its error.
        """
        embeds = self.prompt_embeds(image, question, m)
        embed = self.llm.get_input_embeddings()
        ids: List[int] = []
        gaps: List[float] = []
        for _ in range(max_new_tokens):
            logits = self.llm(inputs_embeds=embeds.unsqueeze(0), use_cache=False).logits[0, -1]
            top2 = torch.topk(logits, 2).values
            gaps.append(float(top2[0] - top2[1]))
            nxt = int(torch.argmax(logits))
            if nxt == self.eos_id:
                break
            ids.append(nxt)
            embeds = torch.cat([embeds, embed(torch.tensor([nxt]))], dim=0)
        return ids, gaps

    def greedy_ids(self, image, question: str, m: int, max_new_tokens: int = 12) -> List[int]:
        """Greedy answer ids, no KV cache (full re-run per step); stops at EOS, which is NOT included."""
        return self.greedy_trace(image, question, m, max_new_tokens)[0]

    def answer(self, image, question: str, m: int, max_new_tokens: int = 12) -> str:
        """The decoded greedy answer, stripped."""
        return self.sp.decode(self.greedy_ids(image, question, m, max_new_tokens)).strip()
