"""Runtimes: run a bundle without torch. Vision backends share one shape (activate / features /
tokens / deactivate, Polygraphy-style); the LLM runs on llama.cpp (`runtimes.llama`)."""

from __future__ import annotations

import importlib.util

from ..bundle import Bundle
from ..errors import InputError

VISION_BACKENDS = ("auto", "tensorrt", "onnxruntime", "onnxruntime/cpu", "onnxruntime/cuda", "onnxruntime/tensorrt-ep")


def make_vision(bundle: Bundle, choice: str | None = None, threads: int | None = None,
                precision: str | None = None):
    """A not-yet-activated vision runner. auto: the bundle's TensorRT engines when TensorRT is
    importable, else onnxruntime with its best execution provider. precision (auto | fp32 | int8)
    picks onnxruntime's vision graph; auto takes the int8 one on the CPU when the bundle has it."""
    from .onnxruntime import check_precision

    choice = choice or "auto"
    if choice not in VISION_BACKENDS:
        raise InputError(f"unknown vision backend '{choice}'", f"choose one of: {', '.join(VISION_BACKENDS)}")
    precision = check_precision(bundle, precision)
    has_engines = bundle.manifest.has("vision_trt")
    trt_ready = has_engines and importlib.util.find_spec("tensorrt") and importlib.util.find_spec("cuda")
    # An explicit int8 request means onnxruntime: TensorRT engines are built from the fp32 graph.
    if choice == "tensorrt" or (choice == "auto" and trt_ready and precision != "int8"):
        if precision == "int8":
            raise InputError("int8 vision runs on onnxruntime, not TensorRT",
                             "use --vision-backend onnxruntime/cpu with --vision-precision int8")
        from .tensorrt import TensorRTVision

        return TensorRTVision(bundle)
    from .onnxruntime import OnnxRuntimeVision

    provider = choice.split("/", 1)[1] if "/" in choice else None
    return OnnxRuntimeVision(bundle, provider, threads, precision)
