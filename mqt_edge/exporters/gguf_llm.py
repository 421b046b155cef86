"""llm-<quant>.gguf: the LLaMA half of the checkpoint as a plain llama.cpp text model.

Written with the `gguf` package (its LLaMA tensor-name map, its SentencePiece vocab and special-token
classes), then quantised by llama.cpp itself through llama-cpp-python. Tensors are streamed: the
writer's header and tensor table are built from shapes alone, then each tensor is read, converted
and written before the next is touched, so a 7B converts in a few hundred MB of RAM.

As export formats: "gguf" takes the PyTorch reference logits, frees the torch model and writes the
f32/f16 file, checked as a conversion; "quantize" turns it into llm-<quant>.gguf, checked by KL and
top-1 (the rules and thresholds: quants.py).
"""

from __future__ import annotations

import ctypes
import gc
import os
from pathlib import Path

import numpy as np

from ..bundle import gguf_parity_key
from ..errors import InputError, require
from ..model.checkpoint import MQT_PREFIX, VISION_PREFIX, WeightReader
from ..quants import QUANTS, Quant, get_quant  # noqa: F401  (re-exported: callers use gguf_llm.QUANTS)
from .job import ExportJob, Reference


def _permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from Hugging Face's rotate-half layout to llama.cpp's interleaved pairs."""
    out, cols = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, cols).swapaxes(1, 2).reshape(out, cols)


def llm_keys(reader: WeightReader) -> list[str]:
    # rotary inv_freq buffers (saved by some old checkpoints) are recomputed by llama.cpp
    keys = [k for k in reader.keys()
            if not k.startswith((VISION_PREFIX, MQT_PREFIX)) and not k.endswith("rotary_emb.inv_freq")]
    return sorted(keys, key=lambda k: (reader.weight_map[k], k))  # one shard open at a time


def write_gguf(ckpt: Path, config: dict, path: Path, float_type: str, name: str) -> dict:
    """Write an unquantised GGUF (float_type "f32" or "f16"); return parameter counts."""
    gguf = require("gguf", "export")

    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_hparams(w, gguf, config, float_type, name)
    n_vocab = _add_vocab(w, gguf, ckpt, config)
    reader = WeightReader(ckpt)
    try:
        params = _add_tensors(w, gguf, reader, config, float_type)
    finally:
        reader.close()
    return {"params": params, "vocab": n_vocab}


def _add_hparams(w, gguf, config: dict, float_type: str, name: str) -> None:
    n_head = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    w.add_name(name)
    w.add_context_length(int(config.get("max_position_embeddings", 4096)))
    w.add_embedding_length(hidden)
    w.add_block_count(int(config["num_hidden_layers"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))
    w.add_rope_dimension_count(hidden // n_head)
    w.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if float_type == "f32" else gguf.LlamaFileType.MOSTLY_F16)


def _add_vocab(w, gguf, ckpt: Path, config: dict) -> int:
    """The SentencePiece vocabulary and special tokens; returns the token count (embedding rows)."""
    from gguf.vocab import SentencePieceVocab, SpecialVocab

    tokens, scores, types = (list(x) for x in zip(*SentencePieceVocab(ckpt).all_tokens()))
    n_embd_rows = int(config.get("vocab_size") or len(tokens))
    for i in range(len(tokens), n_embd_rows):  # embedding rows beyond the tokenizer: unused tokens
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(list(tokens))
    w.add_token_scores(list(scores))
    w.add_token_types(list(types))
    special = SpecialVocab(ckpt, n_vocab=len(tokens))
    # LLaMA adds BOS and not EOS; tokenizer_config.json may say so already (then it wins).
    special.add_special_token.setdefault("bos", True)
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(w, quiet=True)
    return len(tokens)


def _add_tensors(w, gguf, reader: WeightReader, config: dict, float_type: str) -> int:
    """Header and tensor table from shapes alone, then each tensor streamed; returns the parameter count."""
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))
    keys = llm_keys(reader)

    def target(key: str, shape: tuple[int, ...]) -> tuple[str, np.dtype]:
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise InputError(f"the LLM weight '{key}' has no llama.cpp name", "is this a LLaMA checkpoint?")
        # llama.cpp keeps 1-D tensors (norms) in f32 whatever the file type.
        dtype = np.float16 if float_type == "f16" and len(shape) > 1 else np.float32
        return gname, np.dtype(dtype)

    params = 0
    for key in keys:
        shape = tuple(reader.shape(key))
        gname, dtype = target(key, shape)
        w.add_tensor_info(gname, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        params += int(np.prod(shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    heads = {"self_attn.q_proj.weight": n_head, "self_attn.k_proj.weight": n_kv}  # rotary rows to reorder
    for key, tensor in reader.items("", only=set(keys)):
        arr = tensor.float().numpy()
        n = next((h for suffix, h in heads.items() if key.endswith(suffix)), None)
        if n is not None:
            arr = _permute_rotary(arr, n)
        w.write_tensor_data(np.ascontiguousarray(arr.astype(target(key, arr.shape)[1])))
    w.close()
    return params


def tensor_bytes(path: Path) -> dict[str, int]:
    """The GGUF's tensor bytes by ggml type name, for the manifest (the planner counts the CPU's
    repacked copy from them)."""
    gguf = require("gguf", "export")
    out: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + int(t.n_bytes)
    return out


def quantize(src: Path, dst: Path, quant: Quant, threads: int | None = None) -> None:
    """llama.cpp's own quantiser (llama_model_quantize), as `llama-quantize` runs it."""
    llama_cpp = require("llama_cpp", "cpu")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, quant.ftype)
    params.nthread = threads or os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc} for {src} -> {quant.name}")


def intermediate(quant: Quant, stored_dtype: str) -> str:
    """The unquantised GGUF llama.cpp converts from: f32 unless f16 is asked for or is what the
    checkpoint stores (an f16 checkpoint gains nothing from an f32 file)."""
    return "f32" if quant.name == "f32" or (quant.name != "f16" and stored_dtype == "float32") else "f16"


# -- the "gguf" and "quantize" formats (FORMATS in __init__.py) --------------------------------------

def build(job: ExportJob) -> None:
    """The reference logits (while the torch LLM is loaded), then free it, then the f32/f16 GGUF."""
    if job.opts.parity:
        with job.stage("parity: reference logits"):
            job.reference = _reference(job.model)
    job.model = None  # the torch model is gone before llama.cpp loads a GGUF: both would not fit a 7B
    gc.collect()
    rel = f"llm-{job.inter}.gguf"
    with job.stage(f"gguf ({job.inter})"):
        job.gguf = write_gguf(job.ckpt, job.raw, job.tmp / rel, job.inter, job.ckpt.name)
    job.artifacts["llm"] = rel


def check(job: ExportJob) -> None:
    """The conversion itself: logits within QUANTS[f32|f16]'s thresholds, and the same tokenisation."""
    from . import parity

    ref, path = job.reference, job.path("llm")
    with job.stage(f"parity: gguf {job.inter}"):
        r = parity.logits_report(parity.gguf_logits(path, ref.ids, job.opts.threads), ref.logits)
        QUANTS[job.inter].judge(r)
        job.report["tokenizer"] = parity.tokenizer_report(path, ref.pieces, ref.before, ref.after)
        job.report[gguf_parity_key(job.inter)] = r
    job.gate("tokenizer")
    job.gate(gguf_parity_key(job.inter))


def build_quantised(job: ExportJob) -> None:
    src, dst = job.path("llm"), job.tmp / f"llm-{job.quant.name}.gguf"
    with job.stage(f"quantize ({job.quant.name})"):
        quantize(src, dst, job.quant, job.opts.threads)
        src.unlink()
    job.artifacts["llm"] = dst.name


def check_quantised(job: ExportJob) -> None:
    """KL and top-1 against the reference; reported, not enforced, for a synth checkpoint."""
    from . import parity

    ref, key = job.reference, gguf_parity_key(job.quant.name)
    with job.stage(f"parity: gguf {job.quant.name}"):
        r = parity.logits_report(parity.gguf_logits(job.path("llm"), ref.ids, job.opts.threads), ref.logits)
        job.report[key] = job.quant.judge(r, enforced=not job.is_synth)
    job.gate(key)


def _reference(model) -> Reference:
    import torch

    from . import parity

    question = "What is shown in this image?"
    before, after = model.prompt_ids(question)
    ids = before + after
    with torch.no_grad():
        logits = model.llm(torch.tensor([ids])).logits[0].float().numpy()  # (T, vocab)
    return Reference(ids=ids, logits=logits, before=before, after=after, pieces=model.template.split(question),
                     questions=[model.prompt_ids(q)[1] for q in parity.SAMPLE_QUESTIONS])
