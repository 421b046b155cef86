"""The only module that calls llama.cpp's C API (through llama-cpp-python's raw bindings).

Written against llama-cpp-python 0.3.36 (pinned in pyproject.toml): `llama_batch` with an `embd`
array for visual tokens, `llama_memory_seq_rm` to cut the KV cache back to a position, and
`llama_get_logits_ith`. Everything above this module works with numpy arrays and token ids.

One `LlamaModel` (the weights, shared) gives any number of `LlamaContext`s (a KV cache each), so
sessions never share state.

Every GGUF this project loads goes through `model_params()`, which holds the AMX guard: pip builds
llama.cpp with GGML_NATIVE, so on an Intel CPU with AMX it compiles ggml's AMX kernels and repacks
q4/q8 weights into an AMX buffer, and the first `llama_decode` then crashes (SIGSEGV in
ggml_backend_amx_mul_mat; llama.cpp issue 20824). When the build reports AMX_INT8 and the CPU has AMX,
the model is loaded with `use_extra_bufts = false`, which keeps the weights in plain CPU buffers
(docs/runtime.md has the measurements). `MQT_EDGE_EXTRA_BUFFERS=on|off` overrides the decision.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..device import cpu_info
from ..errors import InputError, MQTEdgeError, require

LLAMA_CPP_PYTHON_VERSION = "0.3.36"


class LlamaError(MQTEdgeError):
    """llama.cpp refused a model or a request."""


def _lib():
    llama_cpp = require("llama_cpp", "cpu")
    from llama_cpp import _logger  # noqa: F401  (installs the log callback we silence below)

    import logging

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    have = getattr(llama_cpp, "__version__", "?")
    if have.split(".")[:2] != LLAMA_CPP_PYTHON_VERSION.split(".")[:2]:
        raise MQTEdgeError(
            f"llama-cpp-python {have} is installed; mqt-edge's llama.cpp calls are written against "
            f"{LLAMA_CPP_PYTHON_VERSION}",
            f"pip install llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} (with CMAKE_ARGS for CUDA builds)",
        )
    return llama_cpp


EXTRA_BUFFERS_ENV = "MQT_EDGE_EXTRA_BUFFERS"  # auto (default) | on | off


@lru_cache(maxsize=1)
def system_info() -> str:
    """llama.cpp's own account of its build: `CPU : SSE3 = 1 | AVX2 = 1 | ... | AMX_INT8 = 1 | ...`."""
    lib = _lib()
    lib.llama_backend_init()
    return lib.llama_print_system_info().decode(errors="replace").strip()


def build_has_amx() -> bool:
    return "AMX_INT8 = 1" in system_info()


def amx_guard() -> tuple[bool, str]:
    """(load without extra buffer types?, why). Costs a /proc/cpuinfo read; no llama.cpp call on
    CPUs without AMX, since only an AMX CPU can reach the AMX kernels."""
    choice = os.environ.get(EXTRA_BUFFERS_ENV, "auto").strip().lower()
    if choice not in ("auto", "on", "off"):
        raise InputError(f"{EXTRA_BUFFERS_ENV}={choice!r} is not auto, on or off",
                         f"unset {EXTRA_BUFFERS_ENV} or set it to auto, on or off")
    if choice != "auto":
        return choice == "off", f"{EXTRA_BUFFERS_ENV}={choice}"
    if not cpu_info().has_amx:
        return False, "CPU without AMX"
    if not build_has_amx():
        return False, "llama.cpp built without AMX"
    return True, "AMX CPU and a llama.cpp build with AMX_INT8: extra buffer types off"


def model_params(n_gpu_layers: int = 0, defaults=None):
    """llama_model_params with the AMX guard applied: the one way this project loads a GGUF."""
    params = (defaults or _lib().llama_model_default_params)()
    params.n_gpu_layers = n_gpu_layers
    if amx_guard()[0]:
        params.use_extra_bufts = False
    return params


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def guarded_llama_defaults():
    """For llama-cpp-python's high-level `Llama` (benchmarks, tests), which builds its own model
    params: while inside, its defaults carry the AMX guard. Serialised, since it swaps a module
    attribute."""
    raw = require("llama_cpp.llama_cpp", "cpu")
    with _PATCH_LOCK:
        original = raw.llama_model_default_params
        raw.llama_model_default_params = lambda: model_params(0, original)
        try:
            yield
        finally:
            raw.llama_model_default_params = original


def plain_llama(path: str | os.PathLike, **kwargs):
    """`llama_cpp.Llama(path, **kwargs)` loaded through the AMX guard."""
    from llama_cpp import Llama

    with guarded_llama_defaults():
        return Llama(str(path), **kwargs)


class LlamaModel:
    """A GGUF loaded once; `n_gpu_layers` layers offloaded when llama.cpp was built with CUDA."""

    def __init__(self, path: Path, n_gpu_layers: int = 0) -> None:
        self.lib = lib = _lib()
        lib.llama_backend_init()
        params = model_params(n_gpu_layers)
        self.extra_buffers = bool(params.use_extra_bufts)
        self.ptr = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise LlamaError(f"llama.cpp cannot load {path}", "re-export the bundle (the GGUF may be corrupt)")
        self.vocab = lib.llama_model_get_vocab(self.ptr)
        self.n_embd = lib.llama_model_n_embd(self.ptr)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.bos = lib.llama_vocab_bos(self.vocab)
        self.gpu_layers = n_gpu_layers

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        """SentencePiece ids with llama.cpp's leading-space rule (= SentencePiece's dummy prefix)."""
        data = text.encode()
        buf = (ctypes.c_int32 * (len(data) + 8))()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, len(buf), add_bos, False)
        if n < 0:
            raise LlamaError(f"llama.cpp could not tokenise a {len(data)}-byte text", "shorten the question")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token (control tokens give b"")."""
        buf = ctypes.create_string_buffer(64)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def context(self, n_ctx: int, n_batch: int = 512, threads: int | None = None,
                kv_f32: bool = False) -> LlamaContext:
        return LlamaContext(self, n_ctx, n_batch, threads, kv_f32)

    def close(self) -> None:
        if self.ptr:
            self.lib.llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass


class SequenceState:
    """The bytes of one sequence's KV cache (llama_state_seq_get_data) and the positions it holds."""

    def __init__(self, data, size: int, n_past: int) -> None:
        self.data, self.size, self.n_past = data, size, n_past


class LlamaContext:
    """A KV cache on one sequence, fed tokens or embeddings at explicit positions."""

    def __init__(self, model: LlamaModel, n_ctx: int, n_batch: int, threads: int | None,
                 kv_f32: bool = False) -> None:
        lib = self.lib = model.lib
        self.model = model
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = 1
        threads = threads or max(1, os.cpu_count() or 1)
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        if kv_f32:  # f32 bundles promise the reference's numbers; llama.cpp's default f16 K/V drift ~1e-3
            params.type_k = params.type_v = 0  # GGML_TYPE_F32
            params.flash_attn_type = 0  # disabled: the CPU flash-attention path rounds K/V to f16
        self.ptr = lib.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise LlamaError(f"llama.cpp could not create a {n_ctx}-token context", "lower max_new_tokens or m")
        self.n_ctx, self.n_batch = n_ctx, n_batch
        self.n_past = 0  # next position to fill
        self._tok_batch = lib.llama_batch_init(n_batch, 0, 1)
        self._emb_batch = lib.llama_batch_init(n_batch, model.n_embd, 1)

    # -- feeding ------------------------------------------------------------------------------------
    def _decode(self, batch, n: int, want_logits: bool) -> None:
        for i in range(n):
            batch.pos[i] = self.n_past + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = want_logits and i == n - 1
        batch.n_tokens = n
        rc = self.lib.llama_decode(self.ptr, batch)
        if rc != 0:
            raise LlamaError(f"llama_decode failed ({rc}) at position {self.n_past}", "the context may be full")
        self.n_past += n

    def _check_room(self, n: int) -> None:
        if self.n_past + n > self.n_ctx:
            raise LlamaError(
                f"{self.n_past} + {n} tokens exceed the {self.n_ctx}-token context",
                "use fewer visual tokens or a smaller max_new_tokens",
            )

    def feed_tokens(self, ids: list[int], logits: bool = True) -> None:
        """Append token ids; logits of the last one are kept when asked for."""
        self._check_room(len(ids))
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start : start + self.n_batch]
            for i, t in enumerate(chunk):
                self._tok_batch.token[i] = t
            self._decode(self._tok_batch, len(chunk), logits and start + len(chunk) == len(ids))

    def feed_embeddings(self, embeddings: np.ndarray, logits: bool = False) -> None:
        """Append rows of input embeddings (n, n_embd) — the visual tokens."""
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        n, d = emb.shape
        if d != self.model.n_embd:
            raise LlamaError(f"visual tokens are {d} wide, the LLM takes {self.model.n_embd}", "re-export the bundle")
        self._check_room(n)
        for start in range(0, n, self.n_batch):
            chunk = emb[start : start + self.n_batch]
            ctypes.memmove(self._emb_batch.embd, chunk.ctypes.data, chunk.nbytes)
            self._decode(self._emb_batch, len(chunk), logits and start + len(chunk) == n)

    def truncate(self, n_past: int) -> None:
        """Forget every position from n_past on (the KV cache keeps the prefix)."""
        mem = self.lib.llama_get_memory(self.ptr)
        self.lib.llama_memory_seq_rm(mem, 0, n_past, -1)
        self.n_past = n_past

    def save_sequence(self) -> SequenceState:
        """A copy of this context's KV cache (sequence 0) and its length, for `restore_sequence`."""
        lib = self.lib
        size = lib.llama_state_seq_get_size(self.ptr, 0)
        buf = (ctypes.c_uint8 * size)()
        got = lib.llama_state_seq_get_data(self.ptr, buf, size, 0)
        if got == 0:
            raise LlamaError("llama.cpp could not save the KV cache", "report this with `mqt-edge doctor`")
        return SequenceState(buf, got, self.n_past)

    def restore_sequence(self, state: SequenceState) -> None:
        """Replace the KV cache with a saved one: the same values, not recomputed. The context
        must have the saving context's K/V types (the same model and kv_f32)."""
        self.truncate(0)
        if state.n_past > self.n_ctx or self.lib.llama_state_seq_set_data(self.ptr, state.data, state.size, 0) == 0:
            raise LlamaError(f"llama.cpp could not restore a {state.n_past}-position KV cache",
                             "report this with `mqt-edge doctor`")
        self.n_past = state.n_past

    def logits(self) -> np.ndarray:
        """Logits of the last position fed with logits on: (n_vocab,) float32, copied."""
        ptr = self.lib.llama_get_logits_ith(self.ptr, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    def close(self) -> None:
        if self.ptr:
            self.lib.llama_batch_free(self._tok_batch)
            self.lib.llama_batch_free(self._emb_batch)
            self.lib.llama_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass
