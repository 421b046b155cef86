"""The source checkpoint of an export: loaded into the ExportJob every format row shares, with the
cost facts the manifest records and the disk space the bundle will need, checked before a file is
written. The first stop of `export()` after validation; the torch model is imported here, lazily."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..costs import llm_param_count, mqt_flops, vision_cost
from ..device import available_ram_bytes
from ..errors import TokensError
from ..quants import get_quant
from .job import ExportError, ExportJob, PromptFacts

if TYPE_CHECKING:
    from . import ExportOptions


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _llm_params(cfg: dict) -> int:
    heads = cfg["num_attention_heads"]
    return llm_param_count(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                           cfg["vocab_size"], heads, cfg.get("num_key_value_heads") or heads)


def _vision_cost(model) -> dict:
    v = model.vision.config
    layers = len(model.vision.vision_model.encoder.layers)
    cost = vision_cost(v.hidden_size, v.intermediate_size, layers, v.image_size, v.patch_size)
    params = sum(p.numel() for p in model.vision.parameters())
    return cost | {"params": int(params), "layers_run": layers, "feature_dim": v.hidden_size,
                   "image_size": v.image_size}


def _mqt_cost(mqt, max_tokens: int) -> dict:
    c = mqt.config
    flops = mqt_flops(c.key_grid[0] * c.key_grid[1], c.kv_dim, c.hidden_size)
    return {
        "params": int(sum(p.numel() for p in mqt.parameters())),
        "flops_per_image": flops["flops_per_image"],
        "flops_per_token": flops["flops_per_token"],
        "num_queries": c.num_queries,
        "max_tokens": max_tokens,
        "heads": c.num_heads,
        "hidden": c.hidden_size,
    }


def load_job(opts: ExportOptions, on_stage: Callable[[str], None], seconds: dict[str, float]) -> ExportJob:
    """The checkpoint as a torch model, and the job around it."""
    import torch

    from ..model import MQTLlava
    from ..model.checkpoint import LlavaConfig, resolve_model_dir
    from .gguf_llm import intermediate

    ckpt = resolve_model_dir(opts.model)
    raw = LlavaConfig.read(ckpt).raw
    stored = str(raw.get("torch_dtype") or raw.get("dtype") or "float32").removeprefix("torch.")
    # The LLM only serves the logits check; at fp32 a 7B would not fit in RAM, so keep it as stored.
    llm_dtype = "float32" if _llm_params(raw) * 4 < 0.45 * (available_ram_bytes() or 0) else stored
    model = MQTLlava.from_pretrained(ckpt, vision_tower=opts.vision_tower, dtype=torch.float32,
                                     llm_dtype=llm_dtype)
    M = model.num_queries
    max_tokens = M if opts.max_tokens is None else opts.max_tokens
    if max_tokens > M:
        raise TokensError(f"--max-tokens {max_tokens} is above the model's {M} queries", f"choose 1..{M}")
    quant = get_quant(opts.quant)
    prompt = PromptFacts(preprocess=model.image_spec.to_dict(),
                         prompt=model.template.to_dict() | {"prefix_tokens": len(model.prompt_ids("?")[0])},
                         bos=model.bos_id, eos=sorted(model.eos_ids))
    return ExportJob(opts=opts, quant=quant, ckpt=ckpt, raw=raw, model=model, max_tokens=max_tokens,
                     inter=intermediate(quant, stored), llm_dtype=llm_dtype, prompt=prompt,
                     vision_cost=_vision_cost(model), mqt_cost=_mqt_cost(model.mqt, max_tokens),
                     on_stage=on_stage, seconds=seconds)


def check_disk(job: ExportJob) -> None:
    """Refuse before any file is written when the bundle would not fit (5% margin)."""
    opts, quant, llm_params = job.opts, job.quant, _llm_params(job.raw)
    out = Path(opts.out)
    vision_bytes = job.vision_cost["params"] * 4
    need = vision_bytes * (2 if opts.optimize else 1) + (vision_bytes // 4 if opts.vision_quant == "int8" else 0)
    need += llm_params * (4 if job.inter == "f32" else 2)
    need += 0 if quant.name == job.inter else int(llm_params * quant.bits / 8)
    free = _free_bytes(out.parent.resolve())
    if need * 1.05 > free:
        raise ExportError(
            f"not enough disk space for the export: need about {need / 2**30:.1f} GiB under {out.parent.resolve()}, "
            f"{free / 2**30:.1f} GiB free",
            "free some space or choose another --out",
        )
