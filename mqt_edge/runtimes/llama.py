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

Pointer safety: every native call runs inside a `_Gate`, which counts the calls in flight. `close()`
refuses new calls, waits for those in flight, and only then frees the pointer and drops it, so no
thread can reach freed memory: a call after close raises `ClosedError`. Closing a model first closes
the contexts made from it (a context must never outlive its weights).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from functools import lru_cache
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from ..defaults import quiet_waits
from ..device import cpu_info
from ..errors import ClosedError, InputError, MQTEdgeError, require

LLAMA_CPP_PYTHON_VERSION = "0.3.36"


class LlamaError(MQTEdgeError):
    """llama.cpp refused a model or a request."""


def _lib():
    quiet_waits()  # before libgomp loads with llama.cpp (docs/benchmarks.md, "Threads on a busy CPU")
    llama_cpp = require("llama_cpp", "cpu")
    from llama_cpp import _logger  # noqa: F401  (installs the log callback we silence below)

    import logging

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    _quiet_log(llama_cpp)
    have = getattr(llama_cpp, "__version__", "?")
    if have.split(".")[:2] != LLAMA_CPP_PYTHON_VERSION.split(".")[:2]:
        raise MQTEdgeError(
            f"llama-cpp-python {have} is installed; mqt-edge's llama.cpp calls are written against "
            f"{LLAMA_CPP_PYTHON_VERSION}",
            f"pip install llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} (with CMAKE_ARGS for CUDA builds)",
        )
    return llama_cpp


_LOG_CALLBACK = None  # kept alive: llama.cpp holds the pointer


def _quiet_log(llama_cpp) -> None:
    """llama.cpp's own log, silenced: its failures reach the caller as LlamaError's one line, and its
    warnings are not the user's to act on (e.g. the shared context's n_ctx_seq above n_ctx_train:
    each sequence stays within the model's context). llama-cpp-python's own filter maps ggml's levels
    one off (ggml: NONE, DEBUG, INFO, WARN, ERROR, CONT), so its warnings leaked."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        def log(level: int, text: bytes, _user) -> None:
            pass  # every failure reaches the caller as our own one-line error (LlamaError)

        _LOG_CALLBACK = llama_cpp.llama_log_callback(log)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


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


class _Gate:
    """Native calls in flight on one pointer; `close()` waits for them and refuses new ones."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._cv = threading.Condition(threading.Lock())
        self._in_flight = 0
        self.closed = False

    @contextmanager
    def use(self) -> Iterator[None]:
        with self._cv:
            if self.closed:
                raise ClosedError(f"the {self.what} is closed", "load the bundle again (Pipeline.load)")
            self._in_flight += 1
        try:
            yield
        finally:
            with self._cv:
                self._in_flight -= 1
                if not self._in_flight:
                    self._cv.notify_all()

    def close(self) -> bool:
        """True for the one caller that must free the pointer (after every call in flight ended)."""
        with self._cv:
            if self.closed:
                return False
            self.closed = True
            self._cv.wait_for(lambda: not self._in_flight)
            return True


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
        self.eos = lib.llama_vocab_eos(self.vocab)
        self.n_layer = lib.llama_model_n_layer(self.ptr)
        self.n_head = lib.llama_model_n_head(self.ptr)
        self.n_head_kv = lib.llama_model_n_head_kv(self.ptr)
        self.gpu_layers = _offloaded(lib, self.ptr, n_gpu_layers)
        self._gate = _Gate("llama.cpp model")
        self._contexts: weakref.WeakSet[LlamaContext] = weakref.WeakSet()

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        """SentencePiece ids with llama.cpp's leading-space rule (= SentencePiece's dummy prefix)."""
        data = text.encode()
        buf = (ctypes.c_int32 * (len(data) + 8))()
        with self._gate.use():
            n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, len(buf), add_bos, False)
        if n < 0:
            raise LlamaError(f"llama.cpp could not tokenise a {len(data)}-byte text", "shorten the question")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token (control tokens give b"")."""
        buf = ctypes.create_string_buffer(64)
        with self._gate.use():
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        with self._gate.use():
            return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def context(self, n_ctx: int, n_batch: int = 512, threads: int | None = None,
                kv_f32: bool = False) -> LlamaContext:
        with self._gate.use():
            ctx = LlamaContext(self, n_ctx, n_batch, threads, kv_f32)
            self._contexts.add(ctx)
        return ctx

    @property
    def closed(self) -> bool:
        return self._gate.closed

    def close(self) -> None:
        """Free the weights once no call is in flight; contexts made from them are closed first."""
        if not getattr(self, "_gate", None):  # __init__ failed before the gate existed
            return
        if self._gate.close():
            for ctx in list(self._contexts):
                ctx.close()
            ptr, self.ptr, self.vocab = self.ptr, None, None
            if ptr:
                self.lib.llama_model_free(ptr)

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass


class SequenceState:
    """The bytes of one sequence's KV cache (llama_state_seq_get_data) and the positions it holds."""

    def __init__(self, data, size: int, n_past: int) -> None:
        self.data, self.size, self.n_past = data, size, n_past


def binding_version() -> str | None:
    """The installed llama-cpp-python's version."""
    return getattr(_lib(), "__version__", None)


def supports_gpu_offload() -> bool:
    """Whether this llama.cpp build can put layers on a GPU (a CUDA, Metal or Vulkan build)."""
    return bool(_lib().llama_supports_gpu_offload())


def _offloaded(lib, model_ptr, requested: int) -> int:
    """Layers llama.cpp really put on a GPU: none on a build without GPU offload, else at most
    every repeating layer plus the output layer (llama.cpp clamps a larger request)."""
    if requested <= 0 or not lib.llama_supports_gpu_offload():
        return 0
    return min(requested, lib.llama_model_n_layer(model_ptr) + 1)


class _Native:
    """A llama.cpp context's lifetime: every call inside `_use` (the model's gate too, so a model
    being closed waits for the call and then closes this context); `close()` frees the context and
    its batches once no call is in flight."""

    @contextmanager
    def _use(self) -> Iterator[None]:
        with self.model._gate.use(), self._gate.use():
            yield

    @property
    def closed(self) -> bool:
        return self._gate.closed

    def close(self) -> None:
        """Free the KV cache once no call is in flight; later calls raise ClosedError."""
        if not getattr(self, "_gate", None) or not self._gate.close():
            return
        ptr, self.ptr = self.ptr, None
        if ptr:
            for batch in self._batches():
                self.lib.llama_batch_free(batch)
            self.lib.llama_free(ptr)

    def __del__(self) -> None:  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass


class LlamaContext(_Native):
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
        self._gate = _Gate("llama.cpp context")
        self.ptr = lib.llama_init_from_model(model.ptr, params)  # the caller holds the model's gate
        if not self.ptr:
            self._gate.closed = True
            raise LlamaError(f"llama.cpp could not create a {n_ctx}-token context", "lower max_new_tokens or m")
        self.n_ctx, self.n_batch = n_ctx, n_batch
        self.n_past = 0  # next position to fill
        self._tok_batch = lib.llama_batch_init(n_batch, 0, 1)
        self._emb_batch = lib.llama_batch_init(n_batch, model.n_embd, 1)

    def _batches(self) -> tuple:
        return self._tok_batch, self._emb_batch


    # -- feeding ------------------------------------------------------------------------------------
    def _decode(self, batch, n: int, want_logits: bool) -> None:
        with self._use():  # the batch's arrays are freed by close(): touch them only while open
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
            with self._use():
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
            with self._use():  # the batch is freed by close(): copy into it only while open
                ctypes.memmove(self._emb_batch.embd, chunk.ctypes.data, chunk.nbytes)
            self._decode(self._emb_batch, len(chunk), logits and start + len(chunk) == n)

    def truncate(self, n_past: int) -> None:
        """Forget every position from n_past on (the KV cache keeps the prefix)."""
        with self._use():
            mem = self.lib.llama_get_memory(self.ptr)
            self.lib.llama_memory_seq_rm(mem, 0, n_past, -1)
        self.n_past = n_past

    def save_sequence(self) -> SequenceState:
        """A copy of this context's KV cache (sequence 0) and its length, for `restore_sequence`."""
        lib = self.lib
        with self._use():
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
        if state.n_past > self.n_ctx:
            ok = False
        else:
            with self._use():
                ok = self.lib.llama_state_seq_set_data(self.ptr, state.data, state.size, 0) != 0
        if not ok:
            raise LlamaError(f"llama.cpp could not restore a {state.n_past}-position KV cache",
                             "report this with `mqt-edge doctor`")
        self.n_past = state.n_past

    def logits(self) -> np.ndarray:
        """Logits of the last position fed with logits on: (n_vocab,) float32, copied."""
        with self._use():
            ptr = self.lib.llama_get_logits_ith(self.ptr, -1)
            if not ptr:
                raise LlamaError("llama.cpp has no logits for the last position", "feed a token with logits on first")
            return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()



class SharedContext(_Native):
    """One llama.cpp context whose KV cache holds many sequences (`n_seq` ids, unified cells).

    Unified cells matter twice: a sequence may use any free cell, so the budget is one pool of
    `n_ctx` positions, and `seq_cp` shares cells instead of copying them (the prompt head costs its
    positions once, whatever the number of sequences). Not thread-safe by design: one thread (the
    scheduler's loop) makes every call; `close()` may come from any thread and waits for a call in
    flight (the same gates as LlamaContext)."""

    def __init__(self, model: LlamaModel, n_ctx: int, n_seq: int, n_batch: int = 512,
                 threads: int | None = None, kv_f32: bool = False) -> None:
        lib = self.lib = model.lib
        self.model = model
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        params.kv_unified = True
        threads = threads or max(1, os.cpu_count() or 1)
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        if kv_f32:  # as LlamaContext: an f32 bundle keeps f32 K/V and no f16 flash-attention path
            params.type_k = params.type_v = 0
            params.flash_attn_type = 0
        self._gate = _Gate("llama.cpp context")
        with model._gate.use():
            self.ptr = lib.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            self._gate.closed = True
            raise LlamaError(f"llama.cpp could not create a {n_ctx}-position context for {n_seq} sequences",
                             "lower --parallel or the cache budget (--cache-mb)")
        model._contexts.add(self)
        self.n_ctx, self.n_seq, self.n_batch, self.threads = lib.llama_n_ctx(self.ptr), n_seq, n_batch, threads
        self._tok = lib.llama_batch_init(n_batch, 0, 1)
        self._emb = lib.llama_batch_init(n_batch, model.n_embd, 1)

    def _batches(self) -> tuple:
        return self._tok, self._emb

    def set_threads(self, threads: int) -> None:
        """The threads the next decode calls use (vision may hold the others; cores.py)."""
        if threads != self.threads:
            with self._use():
                self.lib.llama_set_n_threads(self.ptr, threads, threads)
            self.threads = threads

    def _run(self, batch, rows: list[tuple[int, int, bool]]) -> None:
        """rows: (seq, pos, logits) per batch row, already filled with tokens or embeddings."""
        for i, (seq, pos, want) in enumerate(rows):
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = want
        batch.n_tokens = len(rows)
        rc = self.lib.llama_decode(self.ptr, batch)
        if rc == 1:  # no room for the batch in the KV cache
            raise LlamaError(f"the shared context has no room for a batch of {len(rows)} positions",
                             "lower --parallel or raise the cache budget (--cache-mb)")
        if rc != 0:
            raise LlamaError(f"llama_decode refused a batch of {len(rows)} positions ({rc})",
                             "report this with `mqt-edge doctor`")

    def _logits(self, rows: list[tuple[int, int, bool]]) -> list[np.ndarray]:
        out = []
        for i, (_, _, want) in enumerate(rows):
            if want:
                ptr = self.lib.llama_get_logits_ith(self.ptr, i)
                out.append(np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy())
        return out

    def decode_tokens(self, rows: list[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        """One llama_decode over (seq, pos, token, logits) rows of any sequences; the logits rows
        asked for, in order, each (n_vocab,) float32."""
        if not 0 < len(rows) <= self.n_batch:
            raise ValueError(f"a batch holds 1..{self.n_batch} rows, not {len(rows)}")
        meta = [(s, p, w) for s, p, _, w in rows]
        with self._use():
            for i, (_, _, t, _) in enumerate(rows):
                self._tok.token[i] = t
            self._run(self._tok, meta)
            return self._logits(meta)

    def decode_embeddings(self, parts: list[tuple[int, int, np.ndarray, bool]]) -> list[np.ndarray]:
        """One llama_decode over embedding rows: parts of (seq, first pos, (n, n_embd) rows, logits
        of the last row?)."""
        meta: list[tuple[int, int, bool]] = []
        with self._use():
            for seq, pos, emb, want in parts:
                emb = np.ascontiguousarray(emb, dtype=np.float32)
                if emb.ndim != 2 or emb.shape[1] != self.model.n_embd:
                    raise LlamaError(f"visual tokens are {emb.shape[-1]} wide, the LLM takes {self.model.n_embd}",
                                     "re-export the bundle")
                if len(meta) + len(emb) > self.n_batch:
                    raise ValueError(f"a batch holds at most {self.n_batch} rows")
                dst = ctypes.cast(self._emb.embd, ctypes.c_void_p).value + 4 * self.model.n_embd * len(meta)
                ctypes.memmove(dst, emb.ctypes.data, emb.nbytes)
                meta += [(seq, pos + i, want and i == len(emb) - 1) for i in range(len(emb))]
            self._run(self._emb, meta)
            return self._logits(meta)

    # -- the KV cache's sequences ------------------------------------------------------------------
    def seq_rm(self, seq: int, p0: int = 0, p1: int = -1) -> None:
        """Forget positions p0..p1-1 of a sequence (-1: to the end)."""
        with self._use():
            self.lib.llama_memory_seq_rm(self.lib.llama_get_memory(self.ptr), seq, p0, p1)

    def seq_cp(self, src: int, dst: int, p0: int = 0, p1: int = -1) -> None:
        """Give `dst` the cells of `src` at p0..p1-1: shared cells, no data copied (unified cache)."""
        with self._use():
            self.lib.llama_memory_seq_cp(self.lib.llama_get_memory(self.ptr), src, dst, p0, p1)

    def seq_pos_max(self, seq: int) -> int:
        with self._use():
            return int(self.lib.llama_memory_seq_pos_max(self.lib.llama_get_memory(self.ptr), seq))

    def seq_save(self, seq: int, n_past: int) -> SequenceState:
        """The bytes of one sequence's cells (shared ones included), for `seq_restore`."""
        lib = self.lib
        with self._use():
            size = lib.llama_state_seq_get_size(self.ptr, seq)
            buf = (ctypes.c_uint8 * size)()
            got = lib.llama_state_seq_get_data(self.ptr, buf, size, seq)
        if got == 0:
            raise LlamaError("llama.cpp could not save a sequence's KV cache", "report this with `mqt-edge doctor`")
        return SequenceState(buf, got, n_past)

    def seq_restore(self, seq: int, state: SequenceState) -> bool:
        """Write a saved sequence back under id `seq`; False when the cache has no room for it."""
        with self._use():
            return self.lib.llama_state_seq_set_data(self.ptr, state.data, state.size, seq) != 0

