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

As export formats: "vision_int8" writes the graph and checks its visual tokens while the torch
model is loaded; "int8_answers" checks greedy answers through the bundle's final GGUF, so its row
comes after the LLM's.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from ..errors import InputError
from ..image import sample_images
from .job import ExportError, ExportJob

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


# -- the "vision_int8" and "int8_answers" formats (FORMATS in __init__.py) -------------------------

def build(job: ExportJob) -> None:
    """vision-int8.onnx from the graph onnxruntime would otherwise run (the fused one with --optimize)."""

    with job.stage("vision int8"):
        src = job.artifacts.get("vision_ort", job.artifacts["vision"])
        calib = [job.model.pixel_values(im).numpy() for im in sample_images(8, seed=7)]
        info = quantize_vision(job.tmp / src, job.tmp / "vision-int8.onnx", DEFAULT_METHOD,
                               calib if DEFAULT_METHOD == "static" else ())
        job.artifacts["vision_int8"] = "vision-int8.onnx"
        job.vision_cost["int8"] = info


def check(job: ExportJob) -> None:
    """Token parity now, while the torch model is loaded; the answers wait for the final GGUF."""
    with job.stage("parity: vision int8"):
        job.report["vision_int8"], job.int8_tokens = _int8_parity(job)


def check_answers(job: ExportJob) -> None:
    from . import parity

    with job.stage("parity: int8 answers"):
        r = job.reference
        job.report["vision_int8"] = _int8_answers(job.report["vision_int8"], job.path("llm"), r.before, r.questions,
                                                  job.int8_tokens, job.opts.threads, parity)


def _int8_parity(job: ExportJob) -> tuple[dict, dict]:
    """vision-int8.onnx -> mqt.onnx against the PyTorch reference: token errors per m; also the
    fp32 and int8 graphs' visual tokens for the answer-agreement check once the GGUF exists."""
    import torch

    from . import parity
    from .onnx_graphs import cpu_session

    model, M, random_weights = job.model, job.max_tokens, job.random_weights
    mqt = cpu_session(job.path("mqt"))
    px = np.concatenate([model.pixel_values(im).numpy() for im in sample_images(3)])
    ms = sorted({1, max(1, M // 2 - 1), M})
    with torch.no_grad():
        ref_feats = model.image_features(torch.from_numpy(px))
        ref = {m: model.mqt(ref_feats, m=m).numpy() for m in ms}
    feats = {k: cpu_session(job.path(role)).run(None, {"pixel_values": px})[0]
             for k, role in (("fp32", "vision"), ("int8", "vision_int8"))}
    run = lambda f, m: mqt.run(None, {"image_features": f, "query_ids": np.arange(m, dtype=np.int64)})[0]  # noqa: E731
    tokens = {k: {m: run(f, m) for m in ms} for k, f in feats.items()}
    out = {"images": len(px), "tokens": ms, "features": parity.int8_token_report(feats["int8"], ref_feats.numpy())}
    out |= {f"m={m}": parity.int8_token_report(tokens["int8"][m], ref[m]) for m in ms}
    out["min_token_cosine"] = min(out[f"m={m}"]["min_cosine"] for m in ms)
    out["thresholds"] = {"min_token_cosine": parity.INT8_MIN_COSINE, "min_agreement": parity.INT8_MIN_AGREEMENT}
    out["enforced"] = not random_weights
    out["pass"] = out["min_token_cosine"] >= parity.INT8_MIN_COSINE or random_weights
    if not out["pass"]:
        raise _int8_error(out)
    return out, tokens


def _int8_answers(entry: dict, llm: Path, prefix: list[int], questions: list[list[int]], tokens: dict,
                  threads: int | None, parity) -> dict:
    """The int8 entry with answer agreement added; raises when a trained model's falls short."""
    r = parity.answer_agreement(llm, prefix, questions, tokens["fp32"], tokens["int8"], threads)
    entry = entry | {"answers": r, "answer_agreement": r["agreement"]}
    entry["pass"] = not entry["enforced"] or (entry["min_token_cosine"] >= parity.INT8_MIN_COSINE
                                              and r["agreement"] >= parity.INT8_MIN_AGREEMENT)
    if not entry["pass"]:
        raise _int8_error(entry)
    return entry


def _int8_error(r: dict) -> ExportError:
    figures = f"worst token cosine {r['min_token_cosine']:.4f}"
    if "answer_agreement" in r:
        figures += f", answer agreement {r['answer_agreement']:.0%}"
    t = r["thresholds"]
    return ExportError(f"parity failed for the int8 vision graph ({figures}; thresholds: cosine >= "
                       f"{t['min_token_cosine']}, agreement >= {t['min_agreement']:.0%})",
                       "the export was discarded; export with --vision-quant fp32 for this model")
