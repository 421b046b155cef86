"""llm-<quant>.gguf: the LLaMA half of the checkpoint as a plain llama.cpp text model.

Written with the `gguf` package (its LLaMA tensor-name map, its SentencePiece vocab and special-token
classes), then quantised by llama.cpp itself through llama-cpp-python. Tensors are streamed: the
writer's header and tensor table are built from shapes alone, then each tensor is read, converted
and written before the next is touched, so a 7B converts in a few hundred MB of RAM.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from ..errors import InputError, require
from ..model.checkpoint import MQT_PREFIX, VISION_PREFIX, WeightReader
from ..quants import QUANTS, Quant, get_quant  # noqa: F401  (re-exported: callers use gguf_llm.QUANTS)


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
    from gguf.vocab import SentencePieceVocab, SpecialVocab

    n_layers = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    hidden = int(config["hidden_size"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    reader = WeightReader(ckpt)
    keys = llm_keys(reader)

    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(name)
    w.add_context_length(int(config.get("max_position_embeddings", 4096)))
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(hidden // n_head)
    w.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if float_type == "f32" else gguf.LlamaFileType.MOSTLY_F16)

    vocab = SentencePieceVocab(ckpt)
    tokens, scores, types = (list(x) for x in zip(*vocab.all_tokens()))
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
    for key, tensor in reader.items("", only=set(keys)):
        arr = tensor.float().numpy()
        if key.endswith("self_attn.q_proj.weight"):
            arr = _permute_rotary(arr, n_head)
        elif key.endswith("self_attn.k_proj.weight"):
            arr = _permute_rotary(arr, n_kv)
        w.write_tensor_data(np.ascontiguousarray(arr.astype(target(key, arr.shape)[1])))
    w.close()
    reader.close()
    return {"params": params, "vocab": len(tokens)}


def quantize(src: Path, dst: Path, quant: Quant, threads: int | None = None) -> None:
    """llama.cpp's own quantiser (llama_model_quantize), as `llama-quantize` runs it."""
    llama_cpp = require("llama_cpp", "cpu")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, quant.ftype)
    params.nthread = threads or os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc} for {src} -> {quant.name}")
