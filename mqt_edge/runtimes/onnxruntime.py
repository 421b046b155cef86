"""Vision and MQT on onnxruntime, with the best execution provider this machine has.

A `VisionRunner` (runtimes/base.py): the constructor only stores arguments, `activate()` creates
the sessions, `deactivate()` frees them. onnxruntime is imported lazily so that a TensorRT-only
device can still import mqt_edge.runtimes. Its execution providers are rows of `BACKENDS`.
"""

from __future__ import annotations


from pathlib import Path

import numpy as np

from ..bundle import Bundle, BundleError
from ..defaults import spinning
from ..errors import InputError, require
from ..quants import check_vision_precision
from . import BACKENDS, backend_info
from .base import check_active

# What each graph must take: a graph that loads but has other inputs was not exported by mqt-edge.
INPUTS = {"vision": ["pixel_values"], "mqt": ["image_features", "query_ids"]}

# Preference order; only those onnxruntime reports as available are used. A new execution
# provider is its row in BACKENDS plus its place here.
PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
NAMES = {row.provider: name for name, row in BACKENDS.items() if row.provider}  # -> e.g. onnxruntime/cpu
# auto: the int8 graph (when the bundle has one) on the CPU execution provider, where it was measured
# to win (docs/export.md); fp32 on GPU providers, which run onnxruntime's integer MatMuls poorly.


def available_providers() -> list[str]:
    ort = require("onnxruntime", "cpu")
    have = set(ort.get_available_providers())
    return [p for p in PROVIDERS if p in have]


def _short(provider: str) -> str:
    """How messages name a provider: cpu, cuda, tensorrt-ep."""
    return NAMES.get(provider, provider).removeprefix("onnxruntime/")


def _load(ort, path: Path, so, providers: list[str]):
    """An InferenceSession, or one line naming the artifact (a truncated or foreign file)."""
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as exc:  # onnxruntime raises its own InvalidProtobuf, Fail, NoSuchFile...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"onnxruntime cannot load {path.name} ({type(exc).__name__}: {first[:200]})",
                          "re-export the bundle") from None


class OnnxRuntimeVision:
    """vision.onnx + mqt.onnx on one execution provider (None: the best available)."""

    def __init__(self, bundle: Bundle, provider: str | None = None, threads: int | None = None,
                 precision: str | None = None) -> None:
        # provider: onnxruntime's name for it (CPUExecutionProvider), as the BACKENDS row gives it.
        self.bundle, self.requested, self.threads = bundle, provider, threads
        self.requested_precision = check_precision(bundle, precision)
        self.vision = self.mqt = None
        self.provider = ""
        self.precision = ""  # of the vision graph in use: fp32 | int8, once active

    @property
    def name(self) -> str:
        """The vision graph's backend, e.g. `onnxruntime/cpu int8`."""
        return self.mqt_name + (" int8" if self.precision == "int8" else "")

    @property
    def mqt_name(self) -> str:
        return NAMES.get(self.provider, f"onnxruntime/{self.provider}")

    @property
    def backend(self) -> str:
        """The BACKENDS row: the provider in use once active, else the one asked for."""
        return NAMES.get(self.provider or self.requested, "onnxruntime")

    @property
    def is_active(self) -> bool:
        return self.mqt is not None

    def activate(self) -> OnnxRuntimeVision:
        ort = require("onnxruntime", "cpu")
        have = available_providers()
        if self.requested:
            if self.requested not in have:
                raise InputError(
                    f"onnxruntime has no {_short(self.requested)} execution provider here (it has: "
                    f"{', '.join(_short(p) for p in have)})",
                    "install onnxruntime-gpu (pip install 'mqt-edge[gpu]') or pick another --vision-backend",
                )
            providers = list(dict.fromkeys([self.requested, "CPUExecutionProvider"]))  # the CPU one once
        else:
            providers = have
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if self.threads:
            so.intra_op_num_threads = self.threads
        if not spinning():  # a spinning worker waits on cores other processes hold (defaults.py)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = lambda path: _load(ort, path, so, providers)  # noqa: E731
        self.mqt = self._session(self.bundle.path("mqt"))
        self.provider = self.mqt.get_providers()[0]
        self.precision = self._pick_precision()
        # The ORT-fused vision graph, when the bundle has one, is for onnxruntime only.
        has = self.bundle.manifest.has
        role = "vision_int8" if self.precision == "int8" else ("vision_ort" if has("vision_ort") else "vision")
        self._vision_path: Path = self.bundle.path(role)
        self.vision = self._session(self._vision_path)
        for role, sess in (("vision", self.vision), ("mqt", self.mqt)):
            names = [i.name for i in sess.get_inputs()]
            if names != INPUTS[role]:
                raise BundleError(f"the bundle's {role} graph takes {names}, not {INPUTS[role]}", "re-export the bundle")
        return self

    def _pick_precision(self) -> str:
        if self.requested_precision != "auto":
            return self.requested_precision
        has_int8 = self.bundle.manifest.has("vision_int8")
        return "int8" if has_int8 and backend_info(self.backend).on_gpu is False else "fp32"

    def features(self, pixel_values: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 -> (B, P, C)."""
        check_active(self)
        if self.vision is None:  # freed by free_vision(): load it again
            self.vision = self._session(self._vision_path)
        return self.vision.run(None, {"pixel_values": pixel_values})[0]

    def free_vision(self) -> None:
        """Drop the vision graph (sequential load); the small MQT graph stays for refinement."""
        self.vision = None

    def tokens(self, features: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
        """(B, P, C), ids (m,) -> (B, m, hidden)."""
        check_active(self)
        return self.mqt.run(None, {"image_features": features, "query_ids": query_ids.astype(np.int64)})[0]

    def deactivate(self) -> None:
        self.vision = self.mqt = None


def check_precision(bundle: Bundle, precision: str | None) -> str:
    """auto | fp32 | int8, refusing int8 for a bundle exported without it."""
    precision = check_vision_precision(precision or "auto")
    if precision == "int8" and not bundle.manifest.has("vision_int8"):
        raise InputError(f"the bundle {bundle.root} has no int8 vision graph",
                         "re-export it with --vision-quant int8, or use --vision-precision fp32")
    return precision
