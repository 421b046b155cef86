"""Accuracy against m for the default model: PyTorch reference and exported bundle, one held-out set.

    python benchmarks/independent_vqa.py --n 300 --seed 2026 --out /tmp/heldout
    python benchmarks/accuracy_vs_m.py --model mqt_edge/assets/default-model --bundle mqt-edge-bundle \\
        --data /tmp/heldout/test.jsonl --out docs/accuracy.md --plot docs/accuracy.png --save

The held-out set comes from `independent_vqa.py`, written from the task's spec without the project's
generator. Scoring is `mqt-edge eval`'s (first word, case and punctuation ignored).
"""

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from mqt_edge.evaluate import DEFAULT_TOKENS, evaluate, evaluate_reference, load_items, plot, save_to_bundle
from mqt_edge.model import MQTLlava
from mqt_edge.pipeline import Pipeline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)))
    ap.add_argument("--out")
    ap.add_argument("--plot")
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--name", default="the default model", help="what the model is, for the titles")
    args = ap.parse_args()
    ms = [int(t) for t in args.tokens.split(",")]
    items = load_items(Path(args.data))
    ref = evaluate_reference(MQTLlava.from_pretrained(args.model, dtype=torch.float32), items, ms)
    with Pipeline.load(args.bundle) as pipe:
        rows = evaluate(pipe, items, ms, timing_samples=10)
        quant = pipe.bundle.manifest.llm.quant
        if args.save:
            save_to_bundle(pipe.bundle, rows, Path(args.data))
    report = {"n": len(items), "bundle_quant": quant, "reference": [asdict(r) for r in ref],
              "bundle": [asdict(r) for r in rows],
              "max_gap_points": max(abs(a.accuracy - b.accuracy) * 100 for a, b in zip(ref, rows))}
    print(json.dumps(report, indent=1))
    if args.plot:
        plot(rows, Path(args.plot), f"{args.name}, {quant} bundle: accuracy and TTFT against m ({len(items)} questions)")
    if args.out:
        lines = [f"# Accuracy against m ({args.name})", "",
                 f"Held-out set: {len(items)} questions from `benchmarks/independent_vqa.py` (written from the "
                 "task's spec, not from the project's generator). Scoring: first word, case and punctuation ignored.",
                 f"Bundle: {quant}, onnxruntime CPU + llama.cpp; reference: PyTorch fp32. 2-core CPU machine.", "",
                 "| m | PyTorch accuracy | bundle accuracy | gap (points) | bundle TTFT (ms) | bundle total (ms) |",
                 "|---|---|---|---|---|---|"]
        for a, b in zip(ref, rows):
            lines.append(f"| {b.m} | {100 * a.accuracy:.1f}% | {100 * b.accuracy:.1f}% | "
                         f"{100 * (b.accuracy - a.accuracy):+.1f} | {b.ttft_ms:.0f} | {b.total_ms:.0f} |")
        lines += ["", f"Largest gap between bundle and PyTorch: {report['max_gap_points']:.1f} points."]
        if args.plot:
            lines += ["", f"![accuracy and TTFT against m]({Path(args.plot).name})"]
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
