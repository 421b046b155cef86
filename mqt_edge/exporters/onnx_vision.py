"""vision.onnx: pixel_values (B, 3, H, W) -> image_features (B, P, C), the release's CLIP features.

optimum's CLIP vision ONNX config drives the export (its input spec, model patcher and output
validation). Two changes on top of it: the tower is already truncated to the selected layer (so
`last_hidden_state` *is* hidden_states[-2] and the last layer is never computed), and the CLS row is
dropped in-graph with a Slice, so the graph's output is exactly what the query transformer reads.
The spatial shape is fixed (the MQT's key grid depends on it); only the batch is dynamic.

The optional ONNX Runtime optimisation (attention / LayerNorm / GELU fusion) also goes through
optimum (`ORTOptimizer`). Its fused graph uses com.microsoft contrib ops that TensorRT's parser does
not read, so it is written as a separate artifact and the portable graph stays in the bundle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..bundle import Graph
from ..model import MQTLlava

OPSET = 18
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's limit is 2 GB; keep a margin


def _optimum_config(model: MQTLlava):
    from optimum.exporters.onnx.model_configs import CLIPVisionModelOnnxConfig

    class PenultimateFeaturesConfig(CLIPVisionModelOnnxConfig):
        @property
        def inputs(self):
            return {"pixel_values": {0: "batch"}}

        @property
        def outputs(self):
            return {"last_hidden_state": {0: "batch"}}

    return PenultimateFeaturesConfig(model.vision.config, task="feature-extraction")


def save_onnx(proto: onnx.ModelProto, path: Path) -> None:
    """Save with external data (`<name>.data`) when the weights pass protobuf's 2 GB limit."""
    big = sum(t.ByteSize() for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(proto, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def export_vision(model: MQTLlava, path: Path) -> Graph:
    """Write vision.onnx; return its description for the manifest."""
    from optimum.exporters.onnx import export

    raw = path.with_name(path.stem + ".raw.onnx")
    config = _optimum_config(model)
    vision = model.vision.eval()
    export(vision, config, raw, opset=OPSET, device="cpu")
    proto = onnx.load(str(raw))
    for f in raw.parent.glob(raw.name + "*"):
        f.unlink()

    g = proto.graph
    hidden = g.output[0].name  # last_hidden_state (B, 1 + P, C)
    C = model.mqt.config.kv_dim
    P = model.mqt.config.key_grid[0] * model.mqt.config.key_grid[1]
    g.initializer.extend([
        helper.make_tensor("cls_starts", TensorProto.INT64, [1], [1]),
        helper.make_tensor("cls_ends", TensorProto.INT64, [1], [np.iinfo(np.int64).max]),
        helper.make_tensor("cls_axes", TensorProto.INT64, [1], [1]),
    ])
    g.node.append(helper.make_node("Slice", [hidden, "cls_starts", "cls_ends", "cls_axes"],
                                   ["image_features"], name="drop_cls"))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["batch", P, C]))
    onnx.checker.check_model(proto)
    save_onnx(proto, path)
    H, W = model.image_spec.crop
    return Graph(inputs={"pixel_values": ("batch", 3, H, W)}, outputs={"image_features": ("batch", P, C)},
                 opset=OPSET, layers=len(vision.vision_model.encoder.layers))


def optimize_vision(src: Path, dst: Path, model: MQTLlava, level: int) -> None:
    """ONNX Runtime's transformer fusions for the CLIP graph, through optimum's ORTOptimizer."""
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import OptimizationConfig
    from transformers import CLIPConfig

    v = model.vision.config
    # optimum reads heads / hidden size from a CLIP config; give both halves the vision tower's.
    same = dict(hidden_size=v.hidden_size, num_attention_heads=v.num_attention_heads)
    config = CLIPConfig(text_config=same, vision_config=v.to_dict())
    opt = ORTOptimizer([src], config=config)
    out_dir = dst.parent / (dst.stem + ".opt-tmp")
    opt.optimize(
        OptimizationConfig(optimization_level=level, optimize_for_gpu=False,
                           enable_transformers_specific_optimizations=True),
        save_dir=out_dir,
    )
    produced = out_dir / (src.stem + "_optimized.onnx")
    proto = onnx.load(str(produced))
    save_onnx(proto, dst)
    for f in sorted(out_dir.iterdir(), reverse=True):
        f.unlink()
    out_dir.rmdir()
