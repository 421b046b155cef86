"""Vision and MQT on onnxruntime, with the best execution provider this machine has.

Loader/runner in Polygraphy's shape: the constructor only stores arguments, `activate()` creates
the sessions, `deactivate()` frees them. onnxruntime is imported lazily so that a TensorRT-only
device can still import mqt_edge.runtimes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bundle import Bundle, BundleError
from ..errors import InputError, require

# What each graph must take: a graph that loads but has other inputs was not exported by mqt-edge.
INPUTS = {"vision": ["pixel_values"], "mqt": ["image_features", "query_ids"]}

# Preference order; only those onnxruntime reports as available are used.
PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
SHORT = {"TensorrtExecutionProvider": "tensorrt-ep", "CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}


def available_providers() -> list[str]:
    ort = require("onnxruntime", "cpu")
    have = set(ort.get_available_providers())
    return [p for p in PROVIDERS if p in have]


def _load(ort, path: Path, so, providers: list[str]):
    """An InferenceSession, or one line naming the artifact (a truncated or foreign file)."""
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as exc:  # onnxruntime raises its own InvalidProtobuf, Fail, NoSuchFile...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"onnxruntime cannot load {path.name} ({type(exc).__name__}: {first[:200]})",
                          "re-export the bundle") from None


class OnnxRuntimeVision:
    """vision.onnx + mqt.onnx on one execution provider (auto: the best available)."""

    def __init__(self, bundle: Bundle, provider: str | None = None, threads: int | None = None) -> None:
        self.bundle, self.requested, self.threads = bundle, provider, threads
        self.vision = self.mqt = None
        self.provider = ""

    @property
    def name(self) -> str:
        return f"onnxruntime/{SHORT.get(self.provider, self.provider)}"

    def activate(self) -> OnnxRuntimeVision:
        ort = require("onnxruntime", "cpu")
        have = available_providers()
        if self.requested:
            full = {v: k for k, v in SHORT.items()}.get(self.requested, self.requested)
            if full not in have:
                raise InputError(
                    f"onnxruntime has no {self.requested} execution provider here (it has: "
                    f"{', '.join(SHORT[p] for p in have)})",
                    "install onnxruntime-gpu (pip install 'mqt-edge[gpu]') or pick another --vision-backend",
                )
            providers = [full, "CPUExecutionProvider"]
        else:
            providers = have
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if self.threads:
            so.intra_op_num_threads = self.threads
        # The ORT-fused vision graph, when the bundle has one, is for onnxruntime only.
        roles = self.bundle.manifest["artifacts"]
        self._vision_path: Path = self.bundle.path("vision_ort" if "vision_ort" in roles else "vision")
        self._session = lambda path: _load(ort, path, so, providers)  # noqa: E731
        self.vision = self._session(self._vision_path)
        self.mqt = self._session(self.bundle.path("mqt"))
        for role, sess in (("vision", self.vision), ("mqt", self.mqt)):
            names = [i.name for i in sess.get_inputs()]
            if names != INPUTS[role]:
                raise BundleError(f"the bundle's {role} graph takes {names}, not {INPUTS[role]}", "re-export the bundle")
        self.provider = self.vision.get_providers()[0]
        return self

    def features(self, pixel_values: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 -> (B, P, C)."""
        if self.vision is None:  # freed by free_vision(): load it again
            self.vision = self._session(self._vision_path)
        return self.vision.run(None, {"pixel_values": pixel_values})[0]

    def free_vision(self) -> None:
        """Drop the vision graph (sequential load); the small MQT graph stays for refinement."""
        self.vision = None

    def tokens(self, features: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
        """(B, P, C), ids (m,) -> (B, m, hidden)."""
        return self.mqt.run(None, {"image_features": features, "query_ids": query_ids.astype(np.int64)})[0]

    def deactivate(self) -> None:
        self.vision = self.mqt = None
