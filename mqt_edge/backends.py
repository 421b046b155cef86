"""The vision backends as data: the names users pass (`--vision-backend`, profiles'
`prefer.vision_backend`), the runner each names, and the facts the planner and the front ends read
(`backend_info(name).on_gpu`, ...) instead of looking inside the name.

On the ground floor so that the planner (profiles/) can read the facts without importing the runtime
layer; `mqt_edge.runtimes` makes the runners from this table. A new backend is one runner module in
runtimes/ plus one row here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError

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
