"""Matryoshka training of MQT-LLaVA (the paper's recipe) on the PyTorch reference model.

Stage 1 trains with every query (m = M); stage 2 draws m uniformly from {2, 4, ..., M} at each step
and uses only the first m queries, so every prefix of the queries learns to stand on its own. Which
parts train is a choice (the release: stage 1 the MQT only, stage 2 the MQT and the LLM, CLIP
frozen; a model trained from scratch also trains its vision tower). The loss is the LLM's
cross-entropy on the answer tokens and EOS, with the llava_v1 prompt and the visual tokens spliced
in exactly as at inference; with several questions per image (a multi-turn conversation) every
answer is scored. Nothing here is specific to the tiny model: the same loop runs the real
7B on a GPU (device=...), memory permitting.

The release starts from a pretrained CLIP. A model trained from scratch has no such tower, and the
answer loss alone, reaching the vision tower through a random MQT and LLM, barely moves it (our
first attempt stayed at the answer priors). Two steps stand in for CLIP's pretraining:
- stage 0 pretrains the vision tower on dense scene labels: every patch predicts the colour and
  shape of the object under it (or background) and its side, plus scene-wide facts (see LABELS). A
  linear head reads the features the MQT reads; the head is discarded. The same loss can ride
  along in stages 1 and 2 (`aux_weight`); its scene-wide part can also be asked of every visual
  token (`token_aux_weight`, a second discarded head), so the MQT passes each fact on linearly.
- `localize_queries` fits the MQT's (image-independent) attention maps to Gaussians around each
  query's cell of the query grid, so that at the start every visual token summarises one region
  instead of the whole image. Training then reshapes the maps freely.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_dir
from .errors import InputError
from .image import preprocess
from .presets import QUERY_HEADS_KEY
from .model import MQTLlava

PARTS = ("vision", "mqt", "llm")


# The dense label columns: (name, columns, classes each). Local (the object under the patch): colour
# (bg + 4), shape, side; scene-wide (the same on every patch): count, then per (colour, shape) presence,
# the colour of each shape kind, the shape of each colour, the side of each shape kind.
_LAYOUT = (("colour", 1, 5), ("shape", 1, 3), ("count", 1, 3), ("side", 1, 2), ("presence", 12, 2),
           ("colour_of_kind", 3, 4), ("shape_of_colour", 4, 3), ("side_of_kind", 3, 2))
LABELS = tuple(n for _, cols, n in _LAYOUT for _ in range(cols))  # classes of each column
COLUMN = dict(zip((name for name, _, _ in _LAYOUT),
                  np.cumsum([0] + [cols for _, cols, _ in _LAYOUT[:-1]]).tolist()))  # first column of each
SCENE_COLUMNS = (COLUMN["count"], *range(COLUMN["presence"], len(LABELS)))  # the same on every patch


@dataclass(frozen=True)
class StageConfig:
    stage: int  # 0: vision on dense scene labels; 1: m = M; 2: m ~ U{2, 4, ..., M}
    steps: int
    batch_size: int = 16
    lr: float = 1e-3
    train: tuple[str, ...] = ("mqt",)
    weight_decay: float = 0.0
    warmup: int = 20
    aux_weight: float = 0.0  # weight of the dense scene-label loss in stages 1 and 2
    token_aux_weight: float = 0.0  # weight of the scene-wide label loss on the visual tokens (stages 1, 2)
    separate_turns: bool = False  # each question sees only the image and itself, as at inference

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2):
            raise InputError(f"stage {self.stage}",
                             "use stage 0 (vision pretraining), 1 (m = M) or 2 (m drawn from 2, 4, ..., M)")
        bad = [p for p in self.train if p not in PARTS]
        if bad or not self.train:
            raise InputError(f"cannot train {bad or 'nothing'}", f"choose from {', '.join(PARTS)}")
        if self.stage == 0 and self.train != ("vision",):
            raise InputError("stage 0 pretrains the vision tower only", "train=('vision',) in stage 0")


@dataclass
class Example:
    pixel_values: torch.Tensor  # (3, H, W)
    question: str | tuple[str, ...]  # a tuple is a conversation about the image, one question per turn
    answer: str | tuple[str, ...]
    labels: torch.Tensor | None = None  # (P, len(LABELS)) dense scene labels, -100 where undefined

    def turns(self) -> list[tuple[str, str]]:
        if isinstance(self.question, str):
            return [(self.question, self.answer)]
        return list(zip(self.question, self.answer, strict=True))


def synthetic_examples(seed: int, turns: int = 1, twins: bool = False) -> Iterator[tuple[object, object, object, object]]:
    """An endless, seeded stream of (image, question, answer, scene) from the shapes task.

    With turns > 1, question and answer are tuples: a conversation of up to `turns` distinct questions
    about one image, as in LLaVA's multi-turn training data. The first turn is exactly the inference
    prompt; every turn's answer is supervised, so one image (the expensive part of a step) teaches
    several answers.

    With twins, a scene of two or more colours is followed by its colour twin: the same shapes and
    places with the colours permuted among them (at least one shape changes colour), asked the same
    questions. A twin has the same bag of colours and kinds, so only binding each colour to its shape
    tells the two apart.
    """
    from .vqa import conversation, sample

    def example(scene, qs):
        if turns == 1:
            return scene.render(), qs[0][1], qs[0][2], scene
        return scene.render(), tuple(q for _, q, _ in qs), tuple(a for _, _, a in qs), scene

    rng = np.random.default_rng(seed)
    while True:
        if turns == 1:  # the single-question stream of the earlier recorded runs, draw for draw
            scene, qtype, question, answer = sample(rng)
            qs = [(qtype, question, answer)]
        else:
            scene, qs = conversation(rng, turns)
        yield example(scene, qs)
        twin = colour_twin(scene, rng) if twins else None
        if twin is not None:
            answers = {q: a for _, q, a in twin.questions()}  # the same questions stay valid
            yield example(twin, [(t, q, answers[q]) for t, q, _ in qs])


def colour_twin(scene, rng: np.random.Generator):
    """The scene with its colours (and their exact RGB) permuted among its shapes, at least one shape
    changing colour; None when all its shapes share one colour."""
    colours = [s.color for s in scene.shapes]
    if len(set(colours)) < 2:
        return None
    while True:
        order = rng.permutation(len(colours))
        if any(colours[i] != c for i, c in zip(order, colours)):
            break
    return scene.recoloured(order)


def patch_labels(scene, spec, grid: tuple[int, int], sub: int = 3) -> np.ndarray:
    """Dense labels (P, len(LABELS)) of a scene on the vision tower's patch grid, int64, -100 = undefined.

    Each patch looks at sub x sub points mapped back through the preprocessing (pad to a square,
    resize, centre crop); the object covering most of them labels the patch, so shapes smaller
    than a patch still label one.
    """
    from .vqa import COLORS, SHAPES

    gh, gw = grid
    x, y = _sample_points(scene, spec, grid, sub)
    hits = np.zeros((len(scene.shapes), gh, gw), np.int32)
    for i, s in enumerate(scene.shapes):
        hits[i] = _inside(s, x, y).reshape(gh, sub, gw, sub).sum(axis=(1, 3))
    # Only the colour label marks background: the other labels are defined on object patches alone,
    # so the easy object-vs-background split (~90% of patches) does not drown the shape signal.
    labels = np.full((gh * gw, len(LABELS)), -100, np.int64)
    labels[:, COLUMN["colour"]] = 0
    owner = hits.argmax(0).reshape(-1)
    covered = hits.max(0).reshape(-1) > 0
    n = len(scene.shapes)
    colors = list(COLORS)
    for i, s in enumerate(scene.shapes):
        at = covered & (owner == i)
        labels[at, COLUMN["colour"]] = 1 + colors.index(s.color)
        labels[at, COLUMN["shape"]] = SHAPES.index(s.kind)
        if n == 2:
            other = scene.shapes[1 - i]
            labels[at, COLUMN["side"]] = 0 if s.cx < other.cx else 1
    _scene_wide_labels(labels, scene)
    return labels


def _sample_points(scene, spec, grid: tuple[int, int], sub: int) -> tuple[np.ndarray, np.ndarray]:
    """x (1, W*sub) and y (H*sub, 1): the patches' sample points in the scene's original pixels."""
    gh, gw = grid
    ch, cw = spec.crop
    w, h = scene.width, scene.height
    if spec.pad_to_square:  # padded (centred, floor) to a square before the resize
        fw = fh = max(w, h)
        pad_x, pad_y = (fw - w) // 2, (fh - h) // 2
    else:
        fw, fh, pad_x, pad_y = w, h, 0, 0
    scale = min(fw, fh) / spec.size  # original pixels per resized pixel (shorter edge -> spec.size)
    ox = (fw / scale - cw) / 2 * scale - pad_x  # the centre crop's origin in original pixels
    oy = (fh / scale - ch) / 2 * scale - pad_y
    v = (np.arange(gh * sub) + 0.5) * (ch / (gh * sub))  # sample points in crop pixels
    u = (np.arange(gw * sub) + 0.5) * (cw / (gw * sub))
    return u[None, :] * scale + ox, v[:, None] * scale + oy


def _inside(s, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Which of the points (x, y) the shape covers."""
    x0, y0, x1, y1 = s.box()
    if s.kind == "circle":
        return (x - s.cx) ** 2 + (y - s.cy) ** 2 <= (s.size / 2) ** 2
    if s.kind == "square":
        return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    # upward triangle: the half-width grows linearly from the apex
    return (y >= y0) & (y <= y1) & (np.abs(x - s.cx) <= (y - y0) / max(y1 - y0, 1e-6) * s.size / 2)


def _scene_wide_labels(labels: np.ndarray, scene) -> None:
    """Scene-wide facts on every patch, so that any visual token can carry the whole scene."""
    from .vqa import COLORS, SHAPES

    n = len(scene.shapes)
    colors = list(COLORS)
    labels[:, COLUMN["count"]] = n - 1
    present = {(s.color, s.kind) for s in scene.shapes}
    for j, (c, k) in enumerate((c, k) for c in colors for k in SHAPES):
        labels[:, COLUMN["presence"] + j] = int((c, k) in present)
    kinds = [s.kind for s in scene.shapes]
    hues = [s.color for s in scene.shapes]
    for j, k in enumerate(SHAPES):
        if kinds.count(k) == 1:
            s = scene.shapes[kinds.index(k)]
            labels[:, COLUMN["colour_of_kind"] + j] = colors.index(s.color)
            if n == 2:
                labels[:, COLUMN["side_of_kind"] + j] = 0 if s.cx < scene.shapes[1 - kinds.index(k)].cx else 1
    for j, c in enumerate(colors):
        if hues.count(c) == 1:
            labels[:, COLUMN["shape_of_colour"] + j] = SHAPES.index(scene.shapes[hues.index(c)].kind)


def local_vision_init(model: MQTLlava, scale: float = 1.5, edges: bool = True, seed: int = 0) -> None:
    """Give a from-scratch ViT a convolution's head start, without changing its architecture.

    - position embeddings become a 2-D sin-cos code, its frequencies dealt out so that every head
      sees sin and cos of both coordinates (its dot product then peaks at the same place);
    - every layer's query and key projections start near `scale` * I ("mimetic" initialisation,
      Trockman & Kolter 2023), so attention starts local and favours similar patches, which is how
      a shape's patches find each other;
    - with `edges`, part of the patch embedding starts as colour means and oriented edge filters.
    Small ViTs trained from scratch on little data learn far faster from such a start.
    """
    from .model.mqt import sincos_pos_embed_2d

    vision = model.vision.vision_model
    emb = vision.embeddings
    cfg = model.vision.config
    D, H = cfg.hidden_size, cfg.num_attention_heads
    g = cfg.image_size // cfg.patch_size
    gen = torch.Generator().manual_seed(seed)
    code = torch.from_numpy(sincos_pos_embed_2d(D, g))  # (P, D): [sin x, cos x, sin y, cos y] x D/4 freqs
    f = D // 4
    order = [block * f + j for h in range(H) for j in range(h, f, H) for block in range(4)]
    order = order + [c for c in range(D) if c not in set(order)]  # D/4 not divisible by H: keep the rest
    with torch.no_grad():
        pos = emb.position_embedding.weight  # (1 + P, D), row 0 is the class token
        pos[1:] = code[:, order[:D]]
        pos[0] = 0
        eye = torch.eye(D)
        for layer in vision.encoder.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj):
                proj.weight.copy_(scale * eye + 0.02 * torch.randn(D, D, generator=gen))
                proj.bias.zero_()
        if edges:
            w = emb.patch_embedding.weight  # (D, 3, p, p)
            p = cfg.patch_size
            filters = [torch.zeros(3, p, p).index_fill_(0, torch.tensor([c]), 1.0) for c in range(3)]
            yy, xx = torch.meshgrid(torch.arange(p) - (p - 1) / 2, torch.arange(p) - (p - 1) / 2, indexing="ij")
            for angle in torch.arange(8) * math.pi / 8:
                for cy in (-p / 4, 0.0, p / 4):
                    for cx in (-p / 4, 0.0, p / 4):
                        u = (xx - cx) * torch.cos(angle) + (yy - cy) * torch.sin(angle)
                        r2 = (xx - cx) ** 2 + (yy - cy) ** 2
                        k = u * torch.exp(-r2 / (2 * 2.5**2))  # derivative of a Gaussian across the edge
                        filters.append(k.expand(3, p, p) / 3)
            n = min(len(filters), D)
            bank = torch.stack([k / k.norm() for k in filters[:n]])
            w[:n] = bank * w[n:].flatten(1).norm(dim=1).mean()


def localize_queries(model: MQTLlava, sigma: float = 1.0, steps: int = 300, lr: float = 0.05) -> float:
    """Fit the MQT's attention maps to a Gaussian (sigma in key-grid patches) around each query's cell.

    Only the parameters that shape the maps move (queries, the q/k projections, ln_q, ln_k); the
    value path is untouched. Returns the final mean KL divergence (nats).
    """
    mqt = model.mqt
    c = mqt.config
    g, (gh, gw) = c.query_grid, c.key_grid
    qy, qx = np.divmod(np.arange(c.num_queries), g)
    cy, cx = (qy + 0.5) * gh / g - 0.5, (qx + 0.5) * gw / g - 0.5  # query cell centres in key patches
    ky, kx = np.divmod(np.arange(gh * gw), gw)
    d2 = (cy[:, None] - ky[None]) ** 2 + (cx[:, None] - kx[None]) ** 2
    target = torch.softmax(torch.from_numpy(-d2 / (2 * sigma**2)).float(), dim=-1)  # (M, P)
    D = c.kv_dim
    w, b = mqt.attn.in_proj_weight, mqt.attn.in_proj_bias
    params = [mqt.query, mqt.ln_q.weight, mqt.ln_q.bias, mqt.ln_k.weight, mqt.ln_k.bias, w, b]
    opt = torch.optim.Adam(params, lr=lr)
    for p in params:
        p.requires_grad_(True)
    ids = torch.arange(c.num_queries)
    kl = torch.tensor(0.0)
    for _ in range(steps):
        logp = torch.log_softmax(mqt.attention_logits(ids).float(), dim=-1)  # (H, M, P)
        kl = (target * (target.clamp_min(1e-12).log() - logp)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        kl.backward()
        w.grad[2 * D:] = 0  # the value rows stay as they are (Adam moves nothing with no gradient)
        b.grad[2 * D:] = 0
        opt.step()
    for p in params:
        p.requires_grad_(False)
    return float(kl.detach())


def reset_llm(model: MQTLlava, seed: int, visual_norm: float | None = None, images: int = 16) -> float:
    """Re-initialise the LLM (transformers' LLaMA init, seeded), keeping the vision tower, the MQT and
    the tokenizer; with visual_norm, then scale the MQT's output projection so that the visual tokens
    (m = M) of `images` generator scenes have that mean norm. Returns their mean norm before.

    Why: a long run from scratch can leave the visual tokens a thousand times the norm of the text
    embeddings. The LLM then grows outputs that size, the question words drown in them, and its answer
    stops depending on them (docs/training.md: the word-blind LLM). A fresh LLM on visual tokens of the
    text embeddings' scale learns to read the question from the start.
    """
    from transformers import LlamaForCausalLM

    if visual_norm is not None and not visual_norm > 0:
        raise InputError(f"visual norm {visual_norm}", "give a positive norm, such as 1.0")
    torch.manual_seed(seed)
    fresh = LlamaForCausalLM(model.llm.config)
    model.llm.load_state_dict(fresh.state_dict())
    data = synthetic_examples(seed)
    pixels = torch.stack([torch.from_numpy(preprocess(next(data)[0], model.image_spec)[0]) for _ in range(images)])
    with torch.no_grad():
        before = float(model.mqt(model.image_features(pixels), m=model.num_queries).norm(dim=-1).mean())
        if visual_norm is not None:
            model.mqt.proj.mul_(visual_norm / before)
    return before


def _set_trainable(model: MQTLlava, parts: tuple[str, ...]) -> list[torch.nn.Parameter]:
    modules = {"vision": model.vision, "mqt": model.mqt, "llm": model.llm}
    params = []
    for name, module in modules.items():
        for pname, p in module.named_parameters():
            p.requires_grad_(name in parts and not pname.endswith("pos_embed"))  # pos_embed is fixed
            if p.requires_grad:
                params.append(p)
    return params


def _aux_head(model: MQTLlava, tokens: bool = False) -> torch.nn.Module:
    """A training-only linear head (never saved): the dense labels from the vision features, or
    (tokens=True) the scene-wide labels from the visual tokens, normalised first as each LLaMA layer
    normalises its input (the tokens' scale is the LLM's embedding scale, far from 1)."""
    name = "_token_head" if tokens else "_scene_head"
    head = getattr(model, name, None)
    if head is None:
        if tokens:
            head = torch.nn.Sequential(torch.nn.LayerNorm(model.mqt.config.hidden_size, elementwise_affine=False),
                                       torch.nn.Linear(model.mqt.config.hidden_size,
                                                       sum(LABELS[j] for j in SCENE_COLUMNS)))
        else:
            head = torch.nn.Linear(model.vision.config.hidden_size, sum(LABELS))
        head = head.to(model.device)
        object.__setattr__(model, name, head)  # not a submodule: stays out of the checkpoint
    return head


def _aux_loss(model: MQTLlava, x: torch.Tensor, batch: list[Example], tokens: bool = False) -> torch.Tensor:
    """Sum (not mean) of the cross-entropies of the label columns; the recorded runs used this scale.

    x is the vision features (B, P, C), every dense column scored on its patch; or, with tokens=True,
    the visual tokens (B, m, hidden), each asked every scene-wide column.
    """
    logits = _aux_head(model, tokens)(x.float())  # (B, N, classes)
    labels = torch.stack([e.labels for e in batch]).to(x.device)  # (B, P, len(LABELS))
    columns = SCENE_COLUMNS if tokens else range(len(LABELS))
    if tokens:  # scene-wide: any patch's row, for every token
        labels = labels[:, :1].expand(-1, x.shape[1], -1)
    loss, start = x.new_zeros(()), 0
    for j in columns:
        n = LABELS[j]
        y = labels[..., j].reshape(-1)
        if (y != -100).any():
            loss = loss + F.cross_entropy(logits[..., start:start + n].reshape(-1, n), y, ignore_index=-100)
        start += n
    return loss


def _features(model: MQTLlava, batch: list[Example]) -> torch.Tensor:
    pixels = torch.stack([e.pixel_values for e in batch]).to(model.device)
    return model.vision(pixels.to(model.mqt.query.dtype)).last_hidden_state[:, 1:]  # (B, P, C)


def conversation_ids(model: MQTLlava, turns: list[tuple[str, str]]) -> tuple[list[int], list[int], list[int]]:
    """(ids before the visual tokens, ids after them, the targets of the latter: -100 where not scored).

    The first turn is exactly the inference prompt; a later turn continues the llava_v1 conversation
    as "</s>USER: {q} ASSISTANT:". Each answer and its EOS is scored, as in the release ("answer</s>").
    """
    tpl, eos = model.template, min(model.eos_ids)
    before, text = model.prompt_ids(turns[0][0])
    target = [-100] * len(text)
    for k, (question, answer) in enumerate(turns):
        if k:
            asked = model.tokenizer.encode(f"{tpl.user}: {question}{tpl.sep}{tpl.assistant}:")
            text, target = text + asked, target + [-100] * len(asked)
        said = model.tokenizer.encode(answer) + [eos]
        text, target = text + said, target + said
    return before, text, target


def separate_turn_ids(model: MQTLlava, turns: list[tuple[str, str]]) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """(ids before the visual tokens, one (ids, targets) segment per turn) for separate turns: each
    segment is the inference prompt's text after the image, then the answer and EOS (scored)."""
    eos = min(model.eos_ids)
    before, segments = [], []
    for question, answer in turns:
        before, text = model.prompt_ids(question)  # the same `before` for every question
        said = model.tokenizer.encode(answer) + [eos]
        segments.append((text + said, [-100] * len(text) + said))
    return before, segments


def _batch_loss(model: MQTLlava, batch: list[Example], m: int, aux_weight: float = 0.0,
                token_aux_weight: float = 0.0, separate_turns: bool = False) -> torch.Tensor:
    """The answer loss (plus the weighted dense label losses). With separate_turns, every question of an
    image sees the system prompt, the visual tokens and itself only (a block attention mask, positions
    restarting after the image), exactly as at inference; otherwise the turns form one conversation."""
    dev = model.device
    feats = _features(model, batch)
    aux = aux_weight * _aux_loss(model, feats, batch) if aux_weight else 0.0
    visual = model.mqt(feats, m=m)  # (B, m, hidden)
    if token_aux_weight:
        aux = aux + token_aux_weight * _aux_loss(model, visual, batch, tokens=True)
    embed = model.llm.get_input_embeddings()
    seqs, labels, spans = [], [], []
    for e, vis in zip(batch, visual):
        if separate_turns:
            before, segments = separate_turn_ids(model, e.turns())
        else:
            before, text, target = conversation_ids(model, e.turns())
            segments = [(text, target)]
        text = [t for ids, _ in segments for t in ids]
        ids = torch.tensor(before + text, dtype=torch.long, device=dev)
        seqs.append(torch.cat([embed(ids[: len(before)]), vis, embed(ids[len(before):])]))
        target = [t for _, tgt in segments for t in tgt]
        labels.append(torch.tensor([-100] * (len(before) + m) + target, dtype=torch.long, device=dev))
        spans.append((len(before) + m, [len(ids) for ids, _ in segments]))
    T = max(s.shape[0] for s in seqs)
    x = torch.zeros(len(seqs), T, seqs[0].shape[1], device=dev, dtype=seqs[0].dtype)
    y = torch.full((len(seqs), T), -100, dtype=torch.long, device=dev)
    mask = torch.zeros(len(seqs), T, dtype=torch.long, device=dev)
    for i, (s, lab) in enumerate(zip(seqs, labels)):
        x[i, : len(s)], y[i, : len(s)], mask[i, : len(s)] = s, lab, 1
    if separate_turns:
        block = torch.eye(T, dtype=torch.bool, device=dev).repeat(len(seqs), 1, 1)  # padding sees itself
        pos = torch.zeros(len(seqs), T, dtype=torch.long, device=dev)
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        for i, (prefix, lengths) in enumerate(spans):
            block[i, :prefix, :prefix] = causal[:prefix, :prefix]
            pos[i, :prefix] = torch.arange(prefix)
            start = prefix
            for n in lengths:
                block[i, start:start + n, :prefix] = True
                block[i, start:start + n, start:start + n] = causal[:n, :n]
                pos[i, start:start + n] = torch.arange(prefix, prefix + n)
                start += n
        hidden = model.llm.model(inputs_embeds=x, attention_mask=block[:, None], position_ids=pos).last_hidden_state
    else:
        hidden = model.llm.model(inputs_embeds=x, attention_mask=mask).last_hidden_state
    scored = y[:, 1:] != -100  # the LM head runs only where a token is predicted
    logits = model.llm.lm_head(hidden[:, :-1][scored])
    return F.cross_entropy(logits.float(), y[:, 1:][scored]) + aux


def train_stage(model: MQTLlava, cfg: StageConfig, data: Iterator[tuple], seed: int = 0,
                on_step: Callable[[int, float, int], None] = lambda step, loss, m: None) -> list[float]:
    """Run one stage; returns the loss of every step."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    M = model.num_queries
    params = _set_trainable(model, cfg.train)
    dense = cfg.stage == 0 or cfg.aux_weight > 0 or cfg.token_aux_weight > 0
    if cfg.stage == 0 or cfg.aux_weight > 0:
        params += list(_aux_head(model).parameters())
    if cfg.token_aux_weight > 0 and cfg.stage:
        params += list(_aux_head(model, tokens=True).parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)) * 0.5 * (1 + np.cos(np.pi * s / max(1, cfg.steps))))
    model.train()
    losses = []
    for step in range(cfg.steps):
        batch = []
        for _ in range(cfg.batch_size):
            image, question, answer, *scene = next(data)  # question, answer: str, or tuples (turns)
            if dense and not scene:
                raise InputError("dense scene labels need scenes in the data stream",
                                 "use synthetic_examples(), or no aux weights and no stage 0")
            labels = torch.from_numpy(patch_labels(scene[0], model.image_spec, model.mqt.config.key_grid)) \
                if dense else None
            batch.append(Example(torch.from_numpy(preprocess(image, model.image_spec)[0]), question, answer, labels))
        m = M if cfg.stage in (0, 1) else int(rng.choice(np.arange(2, M + 1, 2)))
        if cfg.stage == 0:
            loss = _aux_loss(model, _features(model, batch), batch)
        else:
            loss = _batch_loss(model, batch, m, cfg.aux_weight, cfg.token_aux_weight, cfg.separate_turns)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        on_step(step, losses[-1], m)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return losses


def save_checkpoint(model: MQTLlava, out: Path, extra_config: dict | None = None) -> Path:
    """Write the model in the MQT-LLaVA release layout (config.json, safetensors, tokenizer, CLIP dir).

    The reference loads only the CLIP layers up to the selected one, so the saved tower has exactly
    those layers and selects its last hidden state (mm_vision_select_layer = -1): the same features.
    """
    from safetensors.torch import save_file

    out = Path(out)
    with atomic_dir(out) as tmp:
        (tmp / "clip-vision").mkdir()
        src = model.config.path
        shutil.copy(src / "tokenizer.model", tmp / "tokenizer.model")
        for name in ("tokenizer_config.json", "generation_config.json"):
            if (src / name).is_file():
                shutil.copy(src / name, tmp / name)
        state = {f"model.query_abstractor.{k}": v for k, v in model.mqt.state_dict().items()}
        state |= dict(model.llm.state_dict())
        state = {k: v.detach().contiguous().clone() for k, v in state.items()}
        state["model.query_abstractor.pos_embed"] = state["model.query_abstractor.pos_embed"].half()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        vcfg = model.vision.config
        vcfg.save_pretrained(tmp / "clip-vision")
        vision_state = {k: v.detach().contiguous().clone() for k, v in model.vision.state_dict().items()
                        if not k.endswith("position_ids")}
        save_file(vision_state, str(tmp / "clip-vision" / "model.safetensors"), metadata={"format": "pt"})
        proc = {"crop_size": {"height": model.image_spec.crop[0], "width": model.image_spec.crop[1]},
                "do_center_crop": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                "image_mean": list(model.image_spec.mean), "image_std": list(model.image_spec.std),
                "image_processor_type": "CLIPImageProcessor", "resample": 3,
                "rescale_factor": model.image_spec.rescale, "size": {"shortest_edge": model.image_spec.size}}
        (tmp / "clip-vision" / "preprocessor_config.json").write_text(json.dumps(proc, indent=2))
        # The head count is recorded so the saved model never falls back on the release's default.
        config = dict(model.config.raw) | {"mm_vision_tower": "clip-vision", "mm_vision_select_layer": -1,
                                           "torch_dtype": "float32", QUERY_HEADS_KEY: model.mqt.config.num_heads,
                                           } | (extra_config or {})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


@dataclass(frozen=True)
class TrainRecipe:
    """What `mqt-edge train` runs: three stages and the init steps before them (see the module doc).
    Recorded whole in the saved config.json (`mqt_edge_train`), so a checkpoint says how it was made."""

    stage0_steps: int = 0
    stage1_steps: int = 600
    stage2_steps: int = 1200
    batch_size: int = 16
    lr: float = 1e-3
    parts: tuple[str, ...] = ("vision", "mqt", "llm")  # trained in stages 1 and 2
    aux_weight: float = 0.0
    token_aux_weight: float = 0.0
    separate_turns: bool = False
    colour_twins: bool = False
    reset_llm: bool = False
    visual_norm: float | None = None  # with reset_llm: the visual tokens' mean norm
    stage0_lr: float | None = None  # None: lr
    localize: bool = False
    local_init: bool = False
    turns: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.visual_norm is not None and not self.reset_llm:
            raise InputError("--visual-norm rescales the visual tokens for a fresh LLM", "add --reset-llm")
        self.stages()  # a bad stage is refused before any model loads

    def stages(self) -> list[StageConfig]:
        later = dict(aux_weight=self.aux_weight, token_aux_weight=self.token_aux_weight,
                     separate_turns=self.separate_turns)
        return [StageConfig(0, self.stage0_steps, self.batch_size, self.stage0_lr or self.lr, ("vision",)),
                StageConfig(1, self.stage1_steps, self.batch_size, self.lr, self.parts, **later),
                StageConfig(2, self.stage2_steps, self.batch_size, self.lr, self.parts, **later)]


OnStage = Callable[[StageConfig], Callable[[int, float, int], None]]  # a stage starts -> its on_step


def train_checkpoint(out: Path, recipe: TrainRecipe, model: str | None = None, init: str = "shapes",
                     keep_stages: bool = False, on_stage: OnStage = lambda cfg: lambda s, loss, m: None) -> dict:
    """Train from `model` (or a fresh `init` synth preset) and save to `out` with OUT/train_log.json;
    with keep_stages also OUT-stageN after each stage. Returns the final loss of each stage."""
    import tempfile
    import time

    from .model.synth import write_checkpoint

    r, started = recipe, time.time()
    with tempfile.TemporaryDirectory() as tmp:
        start = model or str(write_checkpoint(init, Path(tmp) / "init", seed=r.seed))
        net = MQTLlava.from_pretrained(start, dtype="float32")
        torch.manual_seed(r.seed)
        history = _prepare(net, r)
        data = synthetic_examples(r.seed, r.turns, r.colour_twins)
        for cfg in r.stages():
            if not cfg.steps:
                continue
            history[f"stage{cfg.stage}"] = train_stage(net, cfg, data, r.seed + cfg.stage, on_step=on_stage(cfg))
            if keep_stages and cfg.stage:
                save_checkpoint(net, out.with_name(f"{out.name}-stage{cfg.stage}"))
        final = {k: float(np.mean(v[-50:])) for k, v in history.items() if k.startswith("stage")}
        record = asdict(r) | {"parts": list(r.parts), "stage0_lr": r.stage0_lr or r.lr, "init": model or init,
                              "examples_seen": r.batch_size * (r.stage0_steps + r.stage1_steps + r.stage2_steps),
                              "train_seconds": round(time.time() - started), "final_loss": final}
        save_checkpoint(net, out, {"mqt_edge_train": record})
    (Path(out) / "train_log.json").write_text(json.dumps(history))
    return final


def _prepare(net: MQTLlava, r: TrainRecipe) -> dict[str, list[float]]:
    """The init steps the recipe asks for, before stage 0; returns their measurements for the log."""
    history: dict[str, list[float]] = {}
    if r.local_init:
        local_vision_init(net, seed=r.seed)
    if r.localize:
        history["localize_kl"] = [localize_queries(net)]
    if r.reset_llm:
        history["visual_norm_before"] = [reset_llm(net, r.seed, r.visual_norm)]
    return history
