"""Vision and MQT on the bundle's native TensorRT engines (`mqt-edge engine` builds them).

Loader and runner: `load_tensorrt` imports TensorRT and checks for a GPU (the engine builder on the
build host uses it too); `TensorRTVision` is a `VisionRunner` (runtimes/base.py). TensorRT and
cuda-python are imported in `activate()` only; on a machine without them every other backend still
works. Engines are tied to the GPU and TensorRT version they were built with, which the manifest
records, so a mismatch is reported before anything runs.
"""

from __future__ import annotations

import numpy as np

from ..bundle import Bundle, BundleError
from ..errors import MissingDependencyError, MQTEdgeError
from .base import check_active


class TensorRTUnavailable(MQTEdgeError):
    """TensorRT is installed but cannot run here (no GPU)."""


def load_tensorrt():
    """(tensorrt module, logger, builder), after making sure a GPU is visible, or one line saying what to do."""
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError(
            "TensorRT is not installed",
            "on Jetson use JetPack's (sudo apt install nvidia-jetpack, venv with --system-site-packages); "
            "elsewhere pip install 'mqt-edge[tensorrt]'",
        ) from None
    logger = trt.Logger(trt.Logger.ERROR)
    try:
        builder = trt.Builder(logger)
    except Exception:  # TensorRT raises a bare error when CUDA finds no device
        builder = None
    if builder is None:
        raise TensorRTUnavailable(
            "TensorRT found no CUDA GPU on this machine",
            "build engines on the target device: mqt-edge engine --bundle DIR",
        )
    return trt, logger, builder


def _cuda_runtime():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            raise MissingDependencyError(
                "cuda-python is not installed (the TensorRT backend moves tensors with it)",
                "pip install cuda-python, or use --vision-backend onnxruntime",
            ) from None
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA runtime error {err}")
    return rest[0] if len(rest) == 1 else rest


class TensorRTVision:
    name = backend = mqt_name = "tensorrt"
    precision = "fp32"  # the FP16 engines are built from the fp32 graph, never from the int8 one

    def __init__(self, bundle: Bundle, provider: str | None = None, threads: int | None = None,
                 precision: str | None = None) -> None:
        # provider, threads and precision are the contract's; engines are fp16 and run on the GPU.
        self.bundle, self.threads = bundle, threads
        self.engines: dict = {}

    @property
    def is_active(self) -> bool:
        return "mqt" in self.engines  # free_vision() drops the vision engine only

    def activate(self) -> TensorRTVision:
        m = self.bundle.manifest
        if not (m.has("vision_trt") and m.has("mqt_trt")):
            raise BundleError(f"the bundle at {self.bundle.root} has no TensorRT engines",
                              "build them on this device: mqt-edge engine --bundle " + str(self.bundle.root))
        trt, logger, _ = load_tensorrt()
        built = m.artifacts["vision_trt"].tensorrt
        if built != trt.__version__:
            raise BundleError(f"the engines were built with TensorRT {built}, this device has {trt.__version__}",
                              "rebuild them: mqt-edge engine --bundle " + str(self.bundle.root))
        self.cudart = _cuda_runtime()
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.runtime = trt.Runtime(logger)
        for role in ("vision", "mqt"):
            self._load(role)
        return self

    def _load(self, role: str) -> None:
        engine = self.runtime.deserialize_cuda_engine(self.bundle.path(f"{role}_trt").read_bytes())
        if engine is None:
            raise BundleError(f"TensorRT cannot load {role}.engine (built for another GPU?)",
                              "rebuild it: mqt-edge engine --bundle " + str(self.bundle.root))
        self.engines[role] = (engine, engine.create_execution_context())

    def free_vision(self) -> None:
        self.engines.pop("vision", None)

    def _run(self, role: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
        cudart = self.cudart
        engine, ctx = self.engines[role]
        buffers = []
        try:
            for name, arr in inputs.items():
                arr = np.ascontiguousarray(arr)
                ctx.set_input_shape(name, arr.shape)
                ptr = _check(cudart.cudaMalloc(arr.nbytes))
                buffers.append(ptr)
                _check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
                ctx.set_tensor_address(name, ptr)
            out = np.empty(tuple(ctx.get_tensor_shape(output)), np.float32)
            optr = _check(cudart.cudaMalloc(out.nbytes))
            buffers.append(optr)
            ctx.set_tensor_address(output, optr)
            if not ctx.execute_async_v3(self.stream):
                raise RuntimeError(f"TensorRT failed to run {role}.engine")
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, optr, out.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
            _check(cudart.cudaStreamSynchronize(self.stream))
            return out
        finally:
            for ptr in buffers:
                cudart.cudaFree(ptr)

    def features(self, pixel_values: np.ndarray) -> np.ndarray:
        check_active(self)
        if "vision" not in self.engines:
            self._load("vision")
        return self._run("vision", {"pixel_values": pixel_values.astype(np.float32)}, "image_features")

    def tokens(self, features: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
        check_active(self)
        return self._run("mqt", {"image_features": features.astype(np.float32),
                                 "query_ids": query_ids.astype(np.int64)}, "visual_tokens")

    def deactivate(self) -> None:
        self.engines.clear()
        if getattr(self, "stream", None) is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None
