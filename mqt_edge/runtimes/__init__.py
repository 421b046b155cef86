"""Runtimes: run a bundle without torch. The LLM runs on llama.cpp (`runtimes.llama`); the vision
encoder and MQT run on one of the backends in `BACKENDS`, each a `VisionRunner` (`runtimes.base`).

`BACKENDS` is the one table of vision backends: the name users pass (`--vision-backend`, profiles'
`prefer.vision_backend`), the runner class, and the facts the planner and the front ends read
(`backend_info(name).on_gpu` and so on) instead of looking inside the name. A runner's module is
imported only when that backend is made, so a machine without TensorRT imports everything else.

A new vision backend is one module here (a class that keeps the `VisionRunner` contract) plus one
row in `BACKENDS`.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InputError
from .base import InactiveRunnerError, VisionRunner, check_active

if TYPE_CHECKING:
    from ..bundle import Bundle

__all__ = ["BACKENDS", "VISION_BACKENDS", "Backend", "InactiveRunnerError", "VisionRunner", "backend_info",
           "check_active", "make_vision", "resolve_backend"]


@dataclass(frozen=True)
class Backend:
    """One `--vision-backend` choice."""

    module: str = ""  # runner module in mqt_edge.runtimes; "" for a choice that picks another row
    runner: str = ""  # the VisionRunner class in that module
    on_gpu: bool | None = None  # None: decided on the machine (the best provider found at activate)
    provider: str | None = None  # onnxruntime execution provider; None: the best available, or native
    int8: bool = True  # can run the bundle's int8 vision graph
    fp16: bool = False  # runs fp16 engines built on the device (2 bytes a weight), never the int8 graph
    threads: bool = True  # takes a CPU thread budget (onnxruntime's intra-op threads)
    needs: tuple[str, ...] = ()  # modules that must be importable for `auto` to pick it
    artifacts: tuple[str, ...] = ()  # bundle roles it needs beyond the ONNX graphs
    picks: tuple[str, ...] = ()  # for a choice like auto: the rows it tries, first ready one wins

    @property
    def concrete(self) -> bool:
        return not self.picks


_ORT = dict(module="onnxruntime", runner="OnnxRuntimeVision")
BACKENDS: dict[str, Backend] = {
    # auto: the bundle's TensorRT engines when TensorRT and cuda-python import, else onnxruntime.
    "auto": Backend(picks=("tensorrt", "onnxruntime")),
    "tensorrt": Backend("tensorrt", "TensorRTVision", on_gpu=True, int8=False, fp16=True, threads=False,
                        needs=("tensorrt", "cuda"), artifacts=("vision_trt", "mqt_trt")),
    "onnxruntime": Backend(**_ORT),  # the best execution provider onnxruntime reports
    "onnxruntime/cpu": Backend(**_ORT, on_gpu=False, provider="CPUExecutionProvider"),
    "onnxruntime/cuda": Backend(**_ORT, on_gpu=True, provider="CUDAExecutionProvider"),
    "onnxruntime/tensorrt-ep": Backend(**_ORT, on_gpu=True, provider="TensorrtExecutionProvider"),
}
VISION_BACKENDS = tuple(BACKENDS)


def backend_info(name: str | None) -> Backend:
    """The row for a backend name (None: auto), or one line listing the known ones."""
    row = BACKENDS.get(name or "auto")
    if row is None:
        raise InputError(f"unknown vision backend '{name}'", f"choose one of: {', '.join(VISION_BACKENDS)}")
    return row


def _ready(row: Backend, bundle: Bundle, precision: str) -> bool:
    """Can `auto` pick this row for this bundle on this machine?"""
    arts = bundle.manifest["artifacts"]
    return ((row.int8 or precision != "int8") and all(role in arts for role in row.artifacts)
            and all(importlib.util.find_spec(m) for m in row.needs))


def resolve_backend(bundle: Bundle, choice: str | None, precision: str) -> str:
    """The concrete row a choice runs as: itself, or the first ready row that `auto` picks."""
    row = backend_info(choice)
    name = choice or "auto"
    while not row.concrete:
        # The last pick is the fallback: it is taken even when not ready, so its own error is raised.
        name = next((p for p in row.picks if _ready(BACKENDS[p], bundle, precision)), row.picks[-1])
        row = BACKENDS[name]
    if precision == "int8" and not row.int8:
        raise InputError(f"int8 vision runs on onnxruntime, not {name}",
                         "use --vision-backend onnxruntime/cpu with --vision-precision int8")
    return name


def make_vision(bundle: Bundle, choice: str | None = None, threads: int | None = None,
                precision: str | None = None) -> VisionRunner:
    """A not-yet-activated vision runner for a `BACKENDS` name. precision (auto | fp32 | int8)
    picks onnxruntime's vision graph; auto takes the int8 one on the CPU when the bundle has it.
    An explicit int8 request means onnxruntime: TensorRT engines are built from the fp32 graph."""
    from .onnxruntime import check_precision

    backend_info(choice)  # an unknown name is refused before the precision is looked at
    precision = check_precision(bundle, precision)
    row = BACKENDS[resolve_backend(bundle, choice, precision)]
    cls = getattr(importlib.import_module(f".{row.module}", __name__), row.runner)
    return cls(bundle, row.provider, threads, precision)
