"""Matryoshka training of MQT-LLaVA (the paper's recipe) on the PyTorch reference model.

Stage 1 trains with every query (m = M); stage 2 draws m uniformly from {2, 4, ..., M} at each step
and uses only the first m queries, so every prefix of the queries learns to stand on its own. Which
parts train is a choice (the release: stage 1 the MQT only, stage 2 the MQT and the LLM, CLIP
frozen; a model trained from scratch also trains its vision tower). The loss is the LLM's
cross-entropy on the answer tokens and EOS, with the llava_v1 prompt and the visual tokens spliced
in exactly as at inference. Nothing here is specific to the tiny model: the same loop runs the real
7B on a GPU (device=...), memory permitting.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .image import preprocess
from .model import MQTLlava

PARTS = ("vision", "mqt", "llm")


@dataclass(frozen=True)
class StageConfig:
    stage: int  # 1: m = M; 2: m ~ U{2, 4, ..., M}
    steps: int
    batch_size: int = 16
    lr: float = 1e-3
    train: tuple[str, ...] = ("mqt",)
    weight_decay: float = 0.0
    warmup: int = 20

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise InputError(f"stage {self.stage}", "use stage 1 (m = M) or 2 (m drawn from 2, 4, ..., M)")
        bad = [p for p in self.train if p not in PARTS]
        if bad or not self.train:
            raise InputError(f"cannot train {bad or 'nothing'}", f"choose from {', '.join(PARTS)}")


@dataclass
class Example:
    pixel_values: torch.Tensor  # (3, H, W)
    question: str
    answer: str


def synthetic_examples(seed: int) -> Iterator[tuple[object, str, str]]:
    """An endless, seeded stream of (image, question, answer) from the shapes task."""
    from .vqa import sample

    rng = np.random.default_rng(seed)
    while True:
        scene, _, question, answer = sample(rng)
        yield scene.render(), question, answer


def _set_trainable(model: MQTLlava, parts: tuple[str, ...]) -> list[torch.nn.Parameter]:
    modules = {"vision": model.vision, "mqt": model.mqt, "llm": model.llm}
    params = []
    for name, module in modules.items():
        for pname, p in module.named_parameters():
            p.requires_grad_(name in parts and not pname.endswith("pos_embed"))  # pos_embed is fixed
            if p.requires_grad:
                params.append(p)
    return params


def _batch_loss(model: MQTLlava, batch: list[Example], m: int) -> torch.Tensor:
    dev = model.device
    pixels = torch.stack([e.pixel_values for e in batch]).to(dev)
    feats = model.vision(pixels.to(model.mqt.query.dtype)).last_hidden_state[:, 1:]  # (B, P, C)
    visual = model.mqt(feats, tokens=m)  # (B, m, hidden)
    embed = model.llm.get_input_embeddings()
    seqs, labels = [], []
    for e, vis in zip(batch, visual):
        before, after = model.prompt_ids(e.question)
        answer = model.tokenizer.encode(e.answer) + [min(model.eos_ids)]  # as the release: "answer</s>"
        ids = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
        seqs.append(torch.cat([embed(ids(before)), vis, embed(ids(after + answer))]))
        n_prompt = len(before) + m + len(after)
        labels.append(torch.tensor([-100] * n_prompt + answer, device=dev))
    T = max(s.shape[0] for s in seqs)
    x = torch.zeros(len(seqs), T, seqs[0].shape[1], device=dev, dtype=seqs[0].dtype)
    y = torch.full((len(seqs), T), -100, dtype=torch.long, device=dev)
    mask = torch.zeros(len(seqs), T, dtype=torch.long, device=dev)
    for i, (s, lab) in enumerate(zip(seqs, labels)):
        x[i, : len(s)], y[i, : len(s)], mask[i, : len(s)] = s, lab, 1
    logits = model.llm(inputs_embeds=x, attention_mask=mask).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), y[:, 1:].reshape(-1),
                           ignore_index=-100)


def train_stage(model: MQTLlava, cfg: StageConfig, data: Iterator[tuple[object, str, str]], seed: int = 0,
                on_step: Callable[[int, float, int], None] = lambda step, loss, m: None) -> list[float]:
    """Run one stage; returns the loss of every step."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    M = model.num_queries
    params = _set_trainable(model, cfg.train)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)) * 0.5 * (1 + np.cos(np.pi * s / max(1, cfg.steps))))
    model.train()
    losses = []
    for step in range(cfg.steps):
        batch = []
        for _ in range(cfg.batch_size):
            image, question, answer = next(data)
            batch.append(Example(torch.from_numpy(preprocess(image, model.image_spec)[0]), question, answer))
        m = M if cfg.stage == 1 else int(rng.choice(np.arange(2, M + 1, 2)))
        loss = _batch_loss(model, batch, m)
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
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "clip-vision").mkdir(parents=True)
    try:
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
        config = dict(model.config.raw) | {"mm_vision_tower": "clip-vision", "mm_vision_select_layer": -1,
                                           "torch_dtype": "float32"} | (extra_config or {})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
