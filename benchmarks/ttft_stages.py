"""TTFT by stage against m, fp32 against int8 vision: a stacked bar plot from `Pipeline.ask` timings.

    mqt-edge export --out bundles/int8 --vision-quant int8
    python benchmarks/ttft_stages.py --bundle bundles/int8 --plot docs/ttft_stages.png [--runs 3] [--threads 2]

One bundle with both vision graphs, opened twice (`vision_precision="fp32"` and `"int8"`). For each
round and each m the two pipelines answer the same fresh request one after the other, so load from
other processes on shared cores falls on both alike; each stage's figure is its median over the
rounds. The stages are `Answer.timings_ms`'s: preprocess, vision, mqt, prefill (their sum is TTFT).
"""

import argparse
import json
import statistics
from pathlib import Path

from mqt_edge.image import sample_images
from mqt_edge.pipeline import Pipeline

STAGES = ("preprocess", "vision", "mqt", "prefill")
COLORS = {"preprocess": "#9e9e9e", "vision": "#1f77b4", "mqt": "#2ca02c", "prefill": "#ff7f0e"}
CANDIDATES = (1, 2, 4, 8, 16, 36, 64, 144, 256)


def measure(bundle: str, ms: list[int], runs: int, threads: int | None) -> dict:
    image = sample_images(1, seed=5)[0]
    q = "What color is the circle?"
    times: dict = {p: {m: {s: [] for s in STAGES + ("ttft",)} for m in ms} for p in ("fp32", "int8")}
    pipes = {p: Pipeline.load(bundle, vision_precision=p, threads=threads) for p in ("fp32", "int8")}
    try:
        backends = {p: pipe.backends["vision"] for p, pipe in pipes.items()}
        for pipe in pipes.values():
            pipe.ask(image, q, m=ms[0], max_new_tokens=1)  # warm-up
        for _ in range(runs):
            for m in ms:
                for p, pipe in pipes.items():
                    t = pipe.ask(image, q, m=m, max_new_tokens=1).timings_ms
                    for s in STAGES + ("ttft",):
                        times[p][m][s].append(t[s])
    finally:
        for pipe in pipes.values():
            pipe.close()
    med = {p: {m: {s: round(statistics.median(v), 1) for s, v in st.items()} for m, st in by_m.items()}
           for p, by_m in times.items()}
    return {"backends": backends, "median_ms": med}


def plot(result: dict, ms: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.38
    for j, (p, hatch) in enumerate((("fp32", ""), ("int8", "//"))):
        bottom = [0.0] * len(ms)
        for s in STAGES:
            vals = [result["median_ms"][p][m][s] for m in ms]
            ax.bar([i + (j - 0.5) * width for i in range(len(ms))], vals, width, bottom=bottom, color=COLORS[s],
                   hatch=hatch, edgecolor="white", label=s if j == 0 else None)
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(ms)), [str(m) for m in ms])
    ax.set_xlabel("visual tokens m (left bar: fp32 vision, right bar, hatched: int8 vision)")
    ax.set_ylabel("TTFT (ms), median")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(result: dict, ms: list[int]) -> str:
    med = result["median_ms"]
    lines = ["| m | fp32 vision (ms) | int8 vision (ms) | vision speed-up | fp32 TTFT (ms) | int8 TTFT (ms) | TTFT ratio |",
             "|---|---|---|---|---|---|---|"]
    for m in ms:
        a, b = med["fp32"][m], med["int8"][m]
        lines.append(f"| {m} | {a['vision']:.0f} | {b['vision']:.0f} | {a['vision'] / b['vision']:.2f}x | "
                     f"{a['ttft']:.0f} | {b['ttft']:.0f} | {a['ttft'] / b['ttft']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True, help="a bundle exported with --vision-quant int8")
    ap.add_argument("--tokens", default=None, help="comma-separated m (default: 1..M of the usual candidates)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--title", default="TTFT by stage, fp32 against int8 vision")
    args = ap.parse_args()
    with Pipeline.load(args.bundle, verify=False) as probe:
        top = probe.max_tokens
    ms = [int(t) for t in args.tokens.split(",")] if args.tokens else [m for m in CANDIDATES if m <= top]
    result = measure(args.bundle, ms, args.runs, args.threads)
    print(json.dumps(result))
    print(table(result, ms))
    if args.plot:
        plot(result, ms, args.plot, args.title)


if __name__ == "__main__":
    main()
