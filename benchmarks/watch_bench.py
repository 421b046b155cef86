"""Answers per second of `Watch`: overlapped against sequential, on one bundle.

    python benchmarks/watch_bench.py --bundle B [--tokens 16,256] [--seconds 8] [--rounds 3]

A synthetic 30 fps camera (examples/shapes.png with fresh noise per frame, so no two frames are
equal) feeds every configuration for the same time; frames arrive faster than answers, so the
latest-frame policy drops the rest. Configurations run in interleaved rounds (A B C A B C ...)
so a change in the machine's load hits all of them alike; the table gives the median of the rounds.
For the bench preset: `mqt-edge synth --preset bench --out B0 && mqt-edge export B0 --out B`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mqt_edge.pipeline import Pipeline
from mqt_edge.watch import Watch

EXAMPLE = np.asarray(Image.open(Path(__file__).parent.parent / "examples" / "shapes.png").convert("RGB"))
Q = "What color is the circle?"
# name -> (pipeline threads, overlap, vision threads, llm threads)
CONFIGS = {
    "sequential 1 thread": (1, False, None, None),
    "sequential 2 threads": (2, False, None, None),
    "overlap vision 1 + LLM 1": (1, True, 1, 1),
    "overlap vision 2 + LLM 2": (2, True, 2, 2),
}


def camera(seconds: float, fps: float = 30.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        time.sleep(1 / fps)
        noise = rng.integers(-3, 4, EXAMPLE.shape)
        yield np.clip(EXAMPLE.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def run_once(pipe: Pipeline, overlap: bool, vt, lt, m: int, seconds: float, max_new_tokens: int) -> dict:
    with Watch(pipe, camera(seconds), Q, m=m, overlap=overlap, vision_threads=vt, llm_threads=lt,
               max_new_tokens=max_new_tokens) as w:
        answers = list(w)
    s = w.stats
    lat = [a.timings_ms["latency"] for a in answers]
    return {"answers_per_s": s["answers_per_s"] or 0.0, "answered": s["answered"], "dropped": s["dropped"],
            "latency_ms": statistics.median(lat) if lat else None,
            "answer": answers[-1].answer.answer if answers else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--tokens", default="16,256")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names from CONFIGS")
    args = ap.parse_args()
    names = [n.strip() for n in args.configs.split(",")]
    pipes = {t: Pipeline.load(args.bundle, threads=t) for t in sorted({CONFIGS[n][0] for n in names})}
    for pipe in pipes.values():
        pipe.ask(EXAMPLE, Q, m=1, max_new_tokens=2)  # warm-up
    results = {}
    for m in (int(x) for x in args.tokens.split(",")):
        runs = {n: [] for n in names}
        for _ in range(args.rounds):
            for n in names:
                threads, overlap, vt, lt = CONFIGS[n]
                runs[n].append(run_once(pipes[threads], overlap, vt, lt, m, args.seconds, args.max_new_tokens))
                print(f"m={m}, {n}: {runs[n][-1]}", flush=True)  # a run cut short still leaves its rows
        for n in names:
            r = runs[n]
            results[f"m={m}, {n}"] = {
                "answers_per_s": round(statistics.median(x["answers_per_s"] for x in r), 2),
                "rounds": [x["answers_per_s"] for x in r],
                "latency_ms": round(statistics.median(x["latency_ms"] for x in r if x["latency_ms"]), 1),
                "answered": sum(x["answered"] for x in r), "dropped": sum(x["dropped"] for x in r),
                "answer": r[-1]["answer"]}
    for pipe in pipes.values():
        pipe.close()
    print(json.dumps(results, indent=1))
    print("\n| configuration | answers/s (median) | rounds | median latency (ms) | answered / dropped |")
    print("|---|---|---|---|---|")
    for k, v in results.items():
        print(f"| {k} | {v['answers_per_s']} | {v['rounds']} | {v['latency_ms']} | {v['answered']} / {v['dropped']} |")


if __name__ == "__main__":
    main()
