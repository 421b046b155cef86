"""Runtimes: run a bundle without torch. The LLM runs on llama.cpp (`runtimes.llama`); the vision
encoder and MQT run on one of the backends in `BACKENDS`, each a `VisionRunner` (`runtimes.base`).

`BACKENDS` (mqt_edge/backends.py, re-exported here) is the one table of vision backends: names,
runner classes and the facts the planner reads. A runner's module is imported only when that backend
is made, so a machine without TensorRT imports everything else.

A new vision backend is one module here (a class that keeps the `VisionRunner` contract) plus one
row in `BACKENDS`.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from ..backends import BACKENDS, VISION_BACKENDS, Backend, backend_info
from ..errors import InputError
from .base import InactiveRunnerError, VisionRunner, check_active

if TYPE_CHECKING:
    from ..bundle import Bundle

__all__ = ["BACKENDS", "VISION_BACKENDS", "Backend", "InactiveRunnerError", "VisionRunner", "backend_info",
           "check_active", "make_vision", "resolve_backend"]


def _ready(row: Backend, bundle: Bundle, precision: str) -> bool:
    """Can `auto` pick this row for this bundle on this machine?"""
    arts = bundle.manifest.artifacts
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
