"""MQTLlava: the PyTorch reference of MQT-LLaVA (CLIP tower -> MQT -> LLaMA), CPU by default.

Every exported artifact is judged against this module. It reproduces the release:
- vision: CLIP's hidden states at `mm_vision_select_layer` (-2), CLS dropped. Layers after the
  selected one never influence the output, so they are not loaded or run;
- MQT: `MatryoshkaQueryTransformer`, loaded from `model.query_abstractor.*`;
- LLM: transformers' LlamaForCausalLM, fed the prompt's embeddings with the m visual tokens
  spliced in where the release puts `<image>`;
- tokeniser: the checkpoint's SentencePiece model, split around `<image>` (mqt_edge.prompt).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import CheckpointError, InputError
from ..image import ImageInput, ImageSpec, preprocess
from ..presets import QUERY_HEADS_KEY, query_heads
from ..prompt import LLAVA_V1, PromptTemplate, split_prompt
from .checkpoint import (
    MQT_PREFIX,
    VISION_PREFIX,
    LlavaConfig,
    WeightReader,
    resolve_model_dir,
    resolve_vision_dir,
)
from .mqt import MatryoshkaQueryTransformer, MQTConfig


@dataclass(frozen=True)
class ReferenceAnswer:
    """What the PyTorch reference answered (`MQTLlava.generate`): the text and the ids behind it.

    A finished record, unlike the device pipeline's `Generation`, which is a live iterator."""

    text: str
    token_ids: list[int]  # generated ids, EOS excluded
    margins: list[float] = field(default_factory=list, compare=False)  # top-1 minus top-2 logit, per step


class SentencePieceTokenizer:
    """The checkpoint's tokenizer.model, used the way the release's slow LlamaTokenizer uses it."""

    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        if not path.is_file():
            raise CheckpointError(
                f"{path.parent} has no tokenizer.model",
                "copy the SentencePiece tokenizer.model of the original checkpoint into it",
            )
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromFile(str(path))
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{path} is not a SentencePiece model ({exc})", "re-download it") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """skip_special drops control and unknown ids, as batch_decode(skip_special_tokens=True)."""
        if skip_special:
            ids = [i for i in ids if not (self.sp.is_control(i) or self.sp.is_unknown(i))]
        return self.sp.decode(list(ids))

    def __len__(self) -> int:
        return self.sp.get_piece_size()


def _resolve_dtype(dtype: torch.dtype | str | None, raw: dict) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    source = "dtype"
    if dtype in (None, "auto"):
        dtype, source = raw.get("torch_dtype") or raw.get("dtype") or "float32", "torch_dtype in config.json"
    try:
        out = getattr(torch, str(dtype).removeprefix("torch."))
    except AttributeError:
        out = None
    if not isinstance(out, torch.dtype) or not out.is_floating_point:
        raise InputError(f"unknown {source} {dtype!r}", "use float32, float16 or bfloat16")
    return out


def _load_into(
    module: nn.Module,
    reader: WeightReader,
    prefix: str,
    dtype: torch.dtype,
    what: str,
    ckpt: Path,
    optional: frozenset[str] = frozenset(),
    fixed_dtypes: dict[str, torch.dtype] | None = None,
) -> None:
    """Fill a meta-device module from `prefix + name` weights, one tensor at a time.

    Only the weights the module has are read (a truncated CLIP tower skips its unused layers), and
    assign=True means no second copy of the model is ever made. `fixed_dtypes` keeps a weight at
    its own dtype whatever the model's (the MQT's pos_embed stays fp16, as released).
    """
    fixed_dtypes = fixed_dtypes or {}
    expected = module.state_dict()
    missing = [k for k in expected if prefix + k not in reader.weight_map and k not in optional]
    if missing:
        raise CheckpointError(
            f"{what} weights are incomplete: {len(missing)} missing, e.g. {prefix}{missing[0]}",
            f"the checkpoint in {ckpt} is truncated or of another model; re-download it",
        )
    state = {}
    for key, tensor in reader.items(prefix, only={prefix + k for k in expected}):
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{what} weight {prefix}{key} has shape {tuple(tensor.shape)}, config says {tuple(expected[key].shape)}",
                f"config.json in {ckpt} does not match its weights; re-download the checkpoint",
            )
        state[key] = tensor.to(fixed_dtypes.get(key, dtype)) if tensor.is_floating_point() else tensor
    module.load_state_dict(state, assign=True, strict=False)


class MQTLlava(nn.Module):
    def __init__(
        self,
        config: LlavaConfig,
        vision: nn.Module,
        feature_layer: int,
        mqt: MatryoshkaQueryTransformer,
        llm: nn.Module,
        tokenizer: SentencePieceTokenizer,
        image_spec: ImageSpec,
        template: PromptTemplate = LLAVA_V1,
    ) -> None:
        super().__init__()
        self.config, self.vision, self.mqt, self.llm = config, vision, mqt, llm
        self.feature_layer = feature_layer  # index into CLIP's hidden_states (0 = embeddings)
        self.tokenizer, self.image_spec, self.template = tokenizer, image_spec, template
        self.eos_ids = frozenset(config.eos_ids)
        self.bos_id = tokenizer.bos_id if tokenizer.bos_id >= 0 else 1

    @property
    def num_queries(self) -> int:
        return self.mqt.config.num_queries

    @property
    def device(self) -> torch.device:
        return self.mqt.query.device

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        vision_tower: str | os.PathLike | None = None,
        dtype: torch.dtype | str | None = "auto",
        device: str | torch.device = "cpu",
        llm_dtype: torch.dtype | str | None = None,
    ) -> MQTLlava:
        """Load a checkpoint in the MQT-LLaVA layout.

        vision_tower: a CLIP directory or hub id that overrides both the weights inside the
            checkpoint and config.json's `mm_vision_tower`.
        dtype: "auto" keeps the checkpoint's `torch_dtype`; parity checks pass torch.float32.
        llm_dtype: the LLM's dtype when it should differ (a 7B LLM does not fit in RAM at fp32).
        """
        ckpt = resolve_model_dir(path_or_hub_id)
        cfg = LlavaConfig.read(ckpt)
        tokenizer = SentencePieceTokenizer(ckpt / "tokenizer.model")
        dtype = _resolve_dtype(dtype, cfg.raw)
        llm_dtype = dtype if llm_dtype is None else _resolve_dtype(llm_dtype, cfg.raw)
        weights = WeightReader(ckpt)
        vision, layer, image_spec = _load_vision(cfg, ckpt, weights, vision_tower, dtype)
        mqt = _load_mqt(cfg, ckpt, weights, vision.config, dtype)
        llm = _load_llm(cfg, ckpt, weights, llm_dtype, mqt.config.hidden_size)
        weights.close()

        model = cls(cfg, vision, layer, mqt, llm, tokenizer, image_spec)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        assert not left, f"tensors left on the meta device: {left[:5]}"
        return model.to(device).eval()

    # ---- the pipeline --------------------------------------------------------------------------
    def pixel_values(self, image: ImageInput) -> torch.Tensor:
        return torch.from_numpy(preprocess(image, self.image_spec))  # (1, 3, H, W)

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> CLIP features at the selected layer, (B, P, C) (patches only)."""
        out = self.vision(pixel_values.to(self.device, self.mqt.query.dtype))
        feats = out.last_hidden_state  # = hidden_states[feature_layer] of the full tower
        return feats[:, 1:]  # mm_vision_select_feature = "patch": CLS dropped

    @torch.no_grad()
    def encode_image(
        self,
        image: ImageInput,
        m: int | None = None,
        query_ids: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The visual tokens of one image in the LLM's embedding space: (m, hidden)."""
        ids = self.mqt.query_ids(m, query_ids)  # validate before any work
        return self.mqt(self.image_features(self.pixel_values(image)), query_ids=ids)[0]

    def prompt_ids(self, question: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the visual tokens (the release's tokenizer_image_token)."""
        return split_prompt(question, self.tokenizer.encode, self.bos_id, self.template)

    @torch.no_grad()
    def prompt_embeds(self, question: str, visual: torch.Tensor) -> torch.Tensor:
        """The LLM's input for a question: the prompt's embeddings with the visual tokens (m, hidden)
        spliced in where the release puts the image, (T, hidden)."""
        before, after = self.prompt_ids(question)
        embed = self.llm.get_input_embeddings()
        ids = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        return torch.cat([embed(ids(before)), visual.to(embed.weight.dtype), embed(ids(after))])

    @torch.no_grad()
    def generate(
        self,
        image: ImageInput,
        question: str,
        m: int | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> ReferenceAnswer:
        """Answer a question about an image; greedy when temperature is 0 (the release's eval)."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens={max_new_tokens}", "ask for at least one new token")
        if temperature < 0 or not 0 < top_p <= 1:
            raise InputError("temperature must be >= 0 and top_p in (0, 1]", "fix the sampling settings")
        prompt = self.prompt_embeds(question, self.encode_image(image, m=m))
        embed = self.llm.get_input_embeddings()
        ids = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        ctx = int(self.llm.config.max_position_embeddings)
        if prompt.shape[0] + max_new_tokens > ctx:
            raise InputError(
                f"prompt ({prompt.shape[0]} tokens) + {max_new_tokens} new tokens exceed the context of {ctx}",
                "use fewer visual tokens or a smaller max_new_tokens",
            )
        gen = torch.Generator(device="cpu").manual_seed(seed)
        out_ids: list[int] = []
        margins: list[float] = []
        from transformers import DynamicCache

        cache = DynamicCache()
        step_input = prompt[None]  # (1, T, hidden)
        for _ in range(max_new_tokens):
            out = self.llm(inputs_embeds=step_input, past_key_values=cache, use_cache=True)
            logits = out.logits[0, -1].float()
            top2 = torch.topk(logits, 2).values
            margins.append(float(top2[0] - top2[1]))
            next_id = _pick(logits, temperature, top_p, gen)
            if next_id in self.eos_ids:
                break
            out_ids.append(next_id)
            step_input = embed(ids([next_id]))[None]
        return ReferenceAnswer(self.tokenizer.decode(out_ids, skip_special=True).strip(), out_ids, margins)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def _load_vision(cfg: LlavaConfig, ckpt: Path, weights: WeightReader, vision_tower, dtype):
    """The CLIP tower cut at the selected layer, its layer index and its ImageSpec.

    Weights: the --vision-tower override > weights inside the checkpoint > mm_vision_tower."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    embedded = bool(weights.with_prefix(VISION_PREFIX)) and vision_tower is None
    if embedded:
        # The config still comes from mm_vision_tower when that resolves; otherwise from shapes.
        try:
            tower_dir = resolve_vision_dir(cfg.vision_tower, ckpt, configs_only=True)
        except CheckpointError:
            tower_dir = None
    else:
        tower_dir = resolve_vision_dir(str(vision_tower or cfg.vision_tower), ckpt)
    vcfg = (
        _read_clip_config(tower_dir, CLIPVisionConfig)
        if tower_dir is not None
        else _clip_config_from_shapes(weights, CLIPVisionConfig)
    )
    n_hidden = vcfg.num_hidden_layers + 1  # hidden_states = embeddings + one per layer
    layer = cfg.select_layer if cfg.select_layer >= 0 else n_hidden + cfg.select_layer
    if not 0 <= layer < n_hidden:
        raise CheckpointError(
            f"mm_vision_select_layer {cfg.select_layer} is outside a {vcfg.num_hidden_layers}-layer tower",
            "fix config.json or pass the right --vision-tower",
        )
    vcfg.num_hidden_layers = layer  # run only the layers the selected feature depends on
    with torch.device("meta"):
        vision = CLIPVisionModel(vcfg)
    if embedded:
        _load_into(vision, weights, VISION_PREFIX, dtype, "vision tower", ckpt)
    else:
        _load_into(vision, WeightReader(tower_dir), "", dtype, "vision tower", tower_dir)
    emb = vision.vision_model.embeddings  # non-persistent buffer, still on the meta device
    emb.register_buffer("position_ids", torch.arange(emb.num_positions)[None], persistent=False)
    return vision, layer, _image_spec(tower_dir, vcfg, cfg.pad_to_square)


def _image_spec(tower_dir: Path | None, vcfg, pad_to_square: bool) -> ImageSpec:
    proc = tower_dir / "preprocessor_config.json" if tower_dir else None
    try:
        image_spec = ImageSpec.from_processor_config(proc, vcfg.image_size, pad_to_square)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{proc} is unusable ({type(exc).__name__}: {exc})",
                              "fix it or pass another --vision-tower") from None
    if image_spec.crop != (vcfg.image_size, vcfg.image_size):
        raise CheckpointError(
            f"{proc} crops to {image_spec.crop} but the vision tower takes {vcfg.image_size} px",
            "fix crop_size in preprocessor_config.json or pass the matching --vision-tower",
        )
    return image_spec


def _load_mqt(cfg: LlavaConfig, ckpt: Path, weights: WeightReader, vcfg, dtype) -> MatryoshkaQueryTransformer:
    """The Matryoshka Query Transformer, its dimensions read from its weights."""
    if not weights.with_prefix(MQT_PREFIX):
        raise CheckpointError(
            f"{ckpt} has no {MQT_PREFIX}* weights (a LLaVA checkpoint without the Matryoshka Query Transformer?)",
            "point at an MQT-LLaVA checkpoint",
        )
    q_shape, p_shape = weights.shape(MQT_PREFIX + "query"), weights.shape(MQT_PREFIX + "proj")
    if len(q_shape) != 2 or len(p_shape) != 2:
        raise CheckpointError(
            f"query_abstractor.query {q_shape} / proj {p_shape} are not matrices", "re-download the checkpoint"
        )
    M, kv_dim = q_shape
    grid = vcfg.image_size // vcfg.patch_size
    if kv_dim != vcfg.hidden_size:
        raise CheckpointError(
            f"the MQT expects {kv_dim}-wide features but the vision tower gives {vcfg.hidden_size}",
            "pass the vision tower this checkpoint was trained with (--vision-tower)",
        )
    heads = query_heads(cfg.raw, kv_dim)
    if kv_dim % heads:
        raise CheckpointError(
            f"the query transformer's {kv_dim}-wide attention does not split into {heads} heads"
            + ("" if cfg.mqt_num_heads else f" (the release's count; config.json has no {QUERY_HEADS_KEY})"),
            f"set {QUERY_HEADS_KEY} in config.json to the head count the checkpoint was trained with",
        )
    mqt_cfg = MQTConfig(
        num_queries=M,
        kv_dim=kv_dim,
        hidden_size=p_shape[1],
        num_heads=heads,
        key_grid=(grid, grid),
    )
    try:
        with torch.device("meta"):
            mqt = MatryoshkaQueryTransformer(mqt_cfg)
    except ValueError as exc:
        raise CheckpointError(f"unusable query_abstractor weights: {exc}", "re-download the checkpoint") from None
    _load_into(mqt, weights, MQT_PREFIX, dtype, "query_abstractor", ckpt,
               fixed_dtypes={"pos_embed": torch.float16})
    mqt.pos_embed.requires_grad_(False)
    return mqt


def _load_llm(cfg: LlavaConfig, ckpt: Path, weights: WeightReader, llm_dtype, mqt_hidden: int):
    """The LLaMA LLM from config.json's non-mm_ fields; `mqt_hidden` is the width it must take."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llm_fields = {k: v for k, v in cfg.raw.items() if not k.startswith("mm_")}
    llm_fields.pop("architectures", None)
    llm_fields["model_type"] = "llama"
    try:
        lcfg = LlamaConfig(**llm_fields)
        lcfg._attn_implementation = "sdpa"
        with torch.device("meta"):
            llm = LlamaForCausalLM(lcfg)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"config.json in {ckpt} is not a valid LLaMA config ({type(exc).__name__}: {exc})",
                              "fix config.json or re-download the checkpoint") from None
    if mqt_hidden != lcfg.hidden_size:
        raise CheckpointError(
            f"the MQT projects to {mqt_hidden} but the LLM is {lcfg.hidden_size} wide",
            "the checkpoint mixes two models; re-download it",
        )
    tied = frozenset({"lm_head.weight"} if lcfg.tie_word_embeddings else ())
    _load_into(llm, weights, "", llm_dtype, "LLM", ckpt, optional=tied)
    if tied:
        llm.lm_head.weight = llm.model.embed_tokens.weight
    # Non-persistent buffers (rotary inv_freq) were created on the meta device: rebuild them.
    llm.model.rotary_emb = type(llm.model.rotary_emb)(config=lcfg)
    return llm


def _read_clip_config(tower_dir: Path, CLIPVisionConfig):
    try:
        return CLIPVisionConfig.from_pretrained(str(tower_dir))
    except Exception as exc:
        raise CheckpointError(
            f"cannot read the CLIP config in {tower_dir} ({type(exc).__name__})",
            "point --vision-tower at a CLIP checkpoint such as openai/clip-vit-large-patch14-336",
        ) from None


def _clip_config_from_shapes(weights: WeightReader, CLIPVisionConfig):
    """A CLIP vision config read off the embedded weights (heads follow CLIP's 64-wide rule)."""
    p = VISION_PREFIX + "vision_model."
    patch = weights.get(p + "embeddings.patch_embedding.weight")  # (C, 3, k, k)
    positions = weights.get(p + "embeddings.position_embedding.weight").shape[0]  # 1 + grid²
    fc1 = weights.get(p + "encoder.layers.0.mlp.fc1.weight")
    layer_prefix = p + "encoder.layers."
    layers = {k[len(layer_prefix):].split(".")[0] for k in weights.with_prefix(layer_prefix)}
    hidden, k = patch.shape[0], patch.shape[-1]
    grid = round((positions - 1) ** 0.5)
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=fc1.shape[0],
        num_hidden_layers=len(layers),
        num_attention_heads=max(hidden // 64, 1),
        image_size=grid * k,
        patch_size=k,
        hidden_act="quick_gelu",
    )
