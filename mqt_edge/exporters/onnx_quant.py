"""vision-int8.onnx: the vision graph with INT8 weights, for onnxruntime's CPU execution provider.

Two methods, both onnxruntime.quantization's (benchmarks/vision_quant.py measures them):
- "dynamic" (the default): the MatMul weights are stored as int8 (per output channel); each
  activation is quantised to uint8 at run time from its own range. No calibration data, so
  nothing about the images a device will see is baked into the graph.
- "static": QDQ nodes with activation ranges calibrated (min/max) on sample images.

Only MatMuls with a constant weight are quantised: attention's q·kᵀ and softmax·v multiply two
activations, and quantising those costs accuracy for little time. The patch-embedding Conv, the
LayerNorms and the residual adds stay fp32. The source may be the portable vision.onnx or the
ORT-fused vision-ort.onnx (`--optimize`); the interface is unchanged: pixel_values -> image_features.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    import onnx

# onnx and onnxruntime.quantization are imported where used: validate() reads VISION_QUANTS before
# the export's dependencies are checked.


@dataclass(frozen=True)
class QuantMethod:
    name: str
    what: str
    run: Callable  # (src, dst, calibration pixel batches, options) -> None


def _weight_matmuls(proto: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes whose second input is an initializer (a weight)."""
    consts = {t.name for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in consts]


def _named(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node a unique name: the quantiser selects nodes by name."""
    seen: set[str] = set()
    for i, n in enumerate(proto.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
        seen.add(n.name)
    return proto


# The quantiser needs each MatMul output's type; a graph whose shapes onnx cannot infer (optimum's
# fused ops, external data) leaves them unknown, and every tensor here is float32.
_EXTRA = {"MatMulConstBOnly": True, "DefaultTensorType": 1}  # onnx.TensorProto.FLOAT


def _big(proto: onnx.ModelProto) -> bool:
    from .onnx_vision import EXTERNAL_DATA_BYTES

    return sum(t.ByteSize() for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES


def _dynamic(src: Path, dst: Path, calib: Iterable[np.ndarray], per_channel: bool = True,
             reduce_range: bool = False) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = _named(onnx.load(str(src)))
    quantize_dynamic(proto, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     nodes_to_quantize=_weight_matmuls(proto), per_channel=per_channel,
                     reduce_range=reduce_range, use_external_data_format=_big(proto),
                     extra_options=_EXTRA)


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over pixel batches."""

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self._it = iter([{"pixel_values": b} for b in batches])

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - the quantiser reads the data once
        pass


def _static(src: Path, dst: Path, calib: Iterable[np.ndarray], per_channel: bool = True,
            reduce_range: bool = False) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    batches = list(calib)
    if not batches:
        raise InputError("static int8 quantisation needs calibration images", "pass some sample images")
    proto = _named(onnx.load(str(src)))
    with tempfile.TemporaryDirectory() as d:  # the calibrator writes an augmented copy of the graph
        named = Path(d) / "named.onnx"
        onnx.save_model(proto, str(named), save_as_external_data=_big(proto), location="named.onnx.data")
        quantize_static(str(named), str(dst), _Batches(batches), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul"], nodes_to_quantize=_weight_matmuls(proto),
                        per_channel=per_channel, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=_big(proto), extra_options=_EXTRA)


METHODS: dict[str, QuantMethod] = {
    m.name: m
    for m in (
        QuantMethod("dynamic", "int8 MatMul weights, activations quantised at run time", _dynamic),
        QuantMethod("static", "QDQ, activation ranges calibrated on sample images", _static),
    )
}
DEFAULT_METHOD = "dynamic"
VISION_QUANTS = ("fp32", "int8")


def check_vision_quant(name: str) -> None:
    if name not in VISION_QUANTS:
        raise InputError(f"unknown --vision-quant '{name}'", f"choose one of: {', '.join(VISION_QUANTS)}")


def get_method(name: str) -> QuantMethod:
    if name not in METHODS:
        raise InputError(f"unknown int8 method '{name}'", f"choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def quantize_vision(src: Path, dst: Path, method: str = DEFAULT_METHOD,
                    calib: Iterable[np.ndarray] = (), **options) -> dict:
    """Write dst (an int8 copy of the vision graph src); return its description for the manifest."""
    import onnx

    m = get_method(method)
    dst = Path(dst)
    m.run(Path(src), dst, calib, **options)
    proto = onnx.load(str(dst), load_external_data=False)
    return {"method": m.name, "from": Path(src).name, "quantized_matmuls": _count_int8_matmuls(proto),
            "bytes": sum(f.stat().st_size for f in dst.parent.glob(dst.name + "*")), **options}


def _count_int8_matmuls(proto: onnx.ModelProto) -> int:
    """Integer MatMuls (dynamic) plus MatMuls fed by a DequantizeLinear (static QDQ, before
    onnxruntime fuses them at load time)."""
    deq = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(n.op_type == "MatMulInteger" or (n.op_type == "MatMul" and any(i in deq for i in n.input))
               for n in proto.graph.node)
