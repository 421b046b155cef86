"""Does optimum's ONNX Runtime optimizer make vision.onnx faster?  (issue: keep it only if it wins)

    python benchmarks/vision_optimize.py CHECKPOINT [--levels 1 2 99] [--runs 5]

Exports vision.onnx, optimises it at each level with optimum's ORTOptimizer, and reports for each
graph the median CPU latency (batch 1) and the max abs error of the features against PyTorch.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mqt_edge.exporters import native_stderr_silenced, quiet_tools
from mqt_edge.exporters.onnx_vision import export_vision, optimize_vision
from mqt_edge.image import sample_images
from mqt_edge.model import MQTLlava


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 99])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    model = MQTLlava.from_pretrained(args.model, dtype=torch.float32, llm_dtype="auto")
    px = model.pixel_values(sample_images(1)[0]).numpy()
    with torch.no_grad():
        ref = model.image_features(torch.from_numpy(px)).numpy()
    rows = []
    with tempfile.TemporaryDirectory() as d, quiet_tools(), native_stderr_silenced():
        d = Path(d)
        export_vision(model, d / "vision.onnx")
        graphs = {"none": d / "vision.onnx"}
        for level in args.levels:
            optimize_vision(d / "vision.onnx", d / f"vision-{level}.onnx", model, level)
            graphs[f"level {level}"] = d / f"vision-{level}.onnx"
        for name, path in graphs.items():
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            out = sess.run(None, {"pixel_values": px})[0]  # warm-up
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                sess.run(None, {"pixel_values": px})
                times.append(time.perf_counter() - t)
            ops = sorted({n.op_type for n in __import__("onnx").load(str(path), load_external_data=False).graph.node})
            rows.append({"graph": name, "median_ms": round(1000 * statistics.median(times), 1),
                         "max_abs_err": float(np.abs(out - ref).max()),
                         "fused": [o for o in ops if o in ("Attention", "MultiHeadAttention", "SkipLayerNormalization",
                                                          "LayerNormalization", "QuickGelu", "BiasGelu", "FastGelu")]})
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
