"""Which INT8 method for vision.onnx?  Latency and feature error of each, measured side by side.

    python benchmarks/vision_quant.py CHECKPOINT [--runs 5] [--threads 2] [--calib 8]
    python benchmarks/vision_quant.py --bench-vision models/bench-vision   # writes that checkpoint first

Exports vision.onnx (and the ORT-fused graph at --optimize-level), then writes one INT8 graph per
variant: dynamic (MatMul weights int8, per channel; per tensor; reduce_range), static QDQ calibrated
on --calib sample images, and both again on the fused graph. Timing is interleaved: each round runs
every graph once on the same image, so a neighbour's load on shared cores hits every graph alike;
the figure is the median over the rounds. Errors are against the PyTorch tower on held-out images
(other seeds than the calibration's). `--bench-vision DIR` writes the bench preset's CLIP
ViT-L/14-336 with a tiny LLM (the LLM plays no part here), minutes instead of the full preset.
"""

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mqt_edge.exporters import native_stderr_silenced, quiet_tools
from mqt_edge.exporters.onnx_quant import quantize_vision
from mqt_edge.exporters.onnx_vision import export_vision, optimize_vision
from mqt_edge.image import sample_images
from mqt_edge.model import MQTLlava

VARIANTS = {  # name: (source graph, method, options)
    "dynamic": ("plain", "dynamic", {}),
    "dynamic per-tensor": ("plain", "dynamic", {"per_channel": False}),
    "dynamic reduce-range": ("plain", "dynamic", {"reduce_range": True}),
    "static QDQ": ("plain", "static", {}),
    "optimized + dynamic": ("opt", "dynamic", {}),
    "optimized + static QDQ": ("opt", "static", {}),
}


def bench_vision_checkpoint(out: Path) -> Path:
    from mqt_edge.model.synth import get_preset, write_checkpoint

    if (out / "config.json").is_file():
        return out
    tiny = get_preset("tiny")
    return write_checkpoint(replace(get_preset("bench"), name="bench-vision", llm=tiny.llm,
                                    vocab_size=tiny.vocab_size), out)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--bench-vision", type=Path, help="write/use the bench preset's CLIP with a tiny LLM here")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib", type=int, default=8, help="calibration images for static QDQ")
    ap.add_argument("--optimize-level", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = ap.parse_args()
    path = bench_vision_checkpoint(args.bench_vision) if args.bench_vision else args.model
    model = MQTLlava.from_pretrained(path, dtype=torch.float32, llm_dtype="auto")
    held_out = np.concatenate([model.pixel_values(im).numpy() for im in sample_images(4, seed=99)])
    calib = [model.pixel_values(im).numpy() for im in sample_images(args.calib, seed=7)]
    with torch.no_grad():
        ref = model.image_features(torch.from_numpy(held_out)).numpy()
    so = ort.SessionOptions()
    so.log_severity_level, so.intra_op_num_threads = 3, args.threads
    rows, sessions = {}, {}
    with tempfile.TemporaryDirectory() as d, quiet_tools(), native_stderr_silenced():
        d = Path(d)
        export_vision(model, d / "plain.onnx")
        graphs, info = {"fp32": d / "plain.onnx"}, {}
        if any(VARIANTS[v][0] == "opt" for v in args.variants):
            optimize_vision(d / "plain.onnx", d / "opt.onnx", model, args.optimize_level)
            graphs[f"fp32 optimized {args.optimize_level}"] = d / "opt.onnx"
        for name in args.variants:
            src, method, opts = VARIANTS[name]
            dst = d / f"{name.replace(' ', '_')}.onnx"
            t = time.perf_counter()
            info[name] = quantize_vision(d / f"{src}.onnx", dst, method, calib if method == "static" else (), **opts)
            info[name]["quantize_s"] = round(time.perf_counter() - t, 1)
            graphs[name] = dst
        for name, p in graphs.items():
            sessions[name] = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
            feats = np.concatenate([sessions[name].run(None, {"pixel_values": held_out[i:i + 1]})[0]
                                    for i in range(len(held_out))])  # also the warm-up
            cos = cosine(feats, ref)
            rows[name] = {"graph": name, "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                          "rel_err": float(np.abs(feats - ref).max() / np.abs(ref).max()),
                          "bytes": sum(f.stat().st_size for f in d.glob(p.name + "*")), "times": []}
            if name in info:
                rows[name]["quant"] = info[name]
        one = held_out[:1]
        for _ in range(args.runs):  # interleaved: every graph once per round
            for name, s in sessions.items():
                t = time.perf_counter()
                s.run(None, {"pixel_values": one})
                rows[name]["times"].append(1000 * (time.perf_counter() - t))
    base = statistics.median(rows["fp32"]["times"])
    for r in rows.values():
        r["median_ms"] = round(statistics.median(r.pop("times")), 1)
        r["speedup_vs_fp32"] = round(base / r["median_ms"], 2)
        print(json.dumps(r))


if __name__ == "__main__":
    main()
