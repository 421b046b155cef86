"""Answers per second of `Watch`: overlapped against sequential; several streams at once.

    python benchmarks/watch_bench.py --bundle B [--tokens 16,256] [--seconds 8] [--rounds 3]
    python benchmarks/watch_bench.py --bundle B --streams 1,2,4 --m 16 [--seconds 40] [--rounds 2]

With --streams, N synthetic 30 fps cameras at a fixed m (--m; the planner's m for a target rate
is not chosen here) run three ways, in interleaved rounds: one Watch over the N named streams on a
pipeline loaded with parallel=N; N Watch objects, one thread each, on one pipeline with parallel=1;
and N Watch objects each on its own pipeline (its own llama.cpp context and vision runner, one
thread each: the cores split as before the shared scheduler). It reports answers/s per stream and
in total, the median latency, and the scheduler's mean rows per decode step.

    python benchmarks/watch_bench.py --bundle B --vision-batch 4 --rounds 5

times N frames through the vision graph as N calls of batch 1 against batches of 2 and N.

A synthetic 30 fps camera (examples/shapes.png with fresh noise per frame, so no two frames are
equal) feeds every configuration for the same time; frames arrive faster than answers, so the
latest-frame policy drops the rest. Configurations run in interleaved rounds (A B C A B C ...)
so a change in the machine's load hits all of them alike; the table gives the median of the rounds.
For the bench preset: `mqt-edge synth --preset bench --out B0 && mqt-edge export B0 --out B`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import threading
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


def run_streams(how: str, pipes: list[Pipeline], n: int, m: int, seconds: float, max_new_tokens: int,
                vision_threads: int | None = None) -> dict:
    """One run of n cameras: `how` is "one" (one Watch, n streams), "threads" (n Watches on pipes[0])
    or "own" (n Watches on n pipelines)."""
    cams = {f"cam{i}": camera(seconds, seed=i) for i in range(n)}
    before = [p.scheduler.stats() for p in pipes]
    answers: list = []
    start = time.perf_counter()
    if how == "one":
        with Watch(pipes[0], cams, Q, m=m, max_new_tokens=max_new_tokens, vision_threads=vision_threads) as w:
            answers = list(w)
    else:
        def one(i: int, name: str, frames) -> None:
            with Watch(pipes[i if how == "own" else 0], frames, Q, m=m, max_new_tokens=max_new_tokens) as w:
                answers.extend((name, a) for a in w)
        threads = [threading.Thread(target=one, args=(i, k, v)) for i, (k, v) in enumerate(cams.items())]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        answers = [a for _, a in sorted(answers, key=lambda x: x[1].started)]
    elapsed = time.perf_counter() - start
    after = [p.scheduler.stats() for p in pipes]
    steps = sum(a.steps - b.steps for a, b in zip(after, before))
    rows = sum(a.rows - b.rows for a, b in zip(after, before))
    lat = [a.timings_ms["latency"] for a in answers]
    return {"total_per_s": len(answers) / elapsed, "per_stream_per_s": len(answers) / elapsed / n,
            "answered": len(answers), "latency_ms": statistics.median(lat) if lat else None,
            "rows_per_step": rows / steps if steps else None}


def streams_main(args) -> None:
    counts = [int(x) for x in args.streams.split(",")]
    top = max(counts)
    shared = Pipeline.load(args.bundle, parallel=top)
    single = Pipeline.load(args.bundle, parallel=1)
    own = [Pipeline.load(args.bundle, threads=1) for _ in range(top if top > 1 else 0)]
    for p in [shared, single, *own]:
        p.ask(EXAMPLE, Q, m=args.m, max_new_tokens=2)  # warm-up
    plans = {"one Watch, N streams, parallel=N": ("one", [shared]),
             "one Watch, N streams, parallel=N, vision_threads=1": ("one", [shared], 1),
             "N Watches in threads, parallel=1": ("threads", [single])}
    runs: dict = {}
    for _ in range(args.rounds):
        for n in counts:
            configs = dict(plans) | ({"N Watches, own pipeline each (1 thread)": ("own", own[:n])} if n > 1 else {})
            for name, (how, ps, *vt) in configs.items():
                r = run_streams(how, ps, n, args.m, args.seconds, args.max_new_tokens, *vt)
                runs.setdefault((n, name), []).append(r)
                print(f"N={n}, {name}: {r}", flush=True)
    for p in [shared, single, *own]:
        p.close()
    print("\n| streams | configuration | answers/s per stream | total answers/s | rounds (total) "
          "| median latency (ms) | rows per step |")
    print("|---|---|---|---|---|---|---|")
    med = lambda rs, k: statistics.median(r[k] for r in rs if r[k] is not None)  # noqa: E731
    for (n, name), rs in runs.items():
        print(f"| {n} | {name} | {med(rs, 'per_stream_per_s'):.3f} | {med(rs, 'total_per_s'):.3f} | "
              f"{[round(r['total_per_s'], 3) for r in rs]} | {med(rs, 'latency_ms'):.0f} | {med(rs, 'rows_per_step'):.2f} |")
    for n in counts:
        for one_name, other in itertools.product([k for k in plans if k.startswith("one")],
                                                 ("N Watches in threads, parallel=1", "N Watches, own pipeline each (1 thread)")):
            one, name = runs[(n, one_name)], other
            if (n, name) in runs:  # same-round ratios: the machine's load hits both alike
                ratios = [a["total_per_s"] / b["total_per_s"] for a, b in zip(one, runs[(n, name)]) if b["total_per_s"]]
                print(f"N={n}: {one_name} / {name}: {[round(x, 2) for x in ratios]}")


def vision_batch_main(args) -> None:
    """onnxruntime vision on the CPU: N frames as N calls of batch 1 against calls of batch 2 and N
    (the exported graph's batch axis is dynamic), interleaved rounds; ratios to batch 1."""
    from mqt_edge.bundle import Bundle
    from mqt_edge.runtimes import make_vision

    n = args.vision_batch
    runner = make_vision(Bundle.open(args.bundle, verify=False), "onnxruntime", None, None).activate()
    x = np.random.default_rng(0).standard_normal((n, 3, *runner_size(args.bundle))).astype(np.float32)
    runner.features(x[:1])  # warm-up
    sizes = sorted({1, 2, n} & set(range(1, n + 1)))
    runs: dict = {b: [] for b in sizes}
    for r in range(args.rounds):
        for b in sizes:
            t = time.perf_counter()
            for i in range(0, n, b):
                runner.features(x[i:i + b])
            runs[b].append(time.perf_counter() - t)
        print(f"round {r}: " + ", ".join(f"batch {b}: {runs[b][-1]:.2f} s" for b in sizes), flush=True)
    for b in sizes:
        ratios = [a / c for a, c in zip(runs[1], runs[b])]
        print(f"| {n} frames as batch {b} | {statistics.median(runs[b]):.2f} s | "
              f"{statistics.median(ratios):.2f}x | {[round(x, 2) for x in ratios]} |")
    runner.deactivate()


def runner_size(bundle: str) -> tuple[int, int]:
    from mqt_edge.bundle import Bundle

    return tuple(Bundle.open(bundle, verify=False).manifest.preprocess.crop)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--tokens", default="16,256")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names from CONFIGS")
    ap.add_argument("--streams", default=None, help="e.g. 1,2,4: several cameras at once (see the top)")
    ap.add_argument("--m", type=int, default=16, help="visual tokens for --streams (fixed, not planned)")
    ap.add_argument("--vision-batch", type=int, default=0, help="N: time N frames through vision as batch 1, 2, N")
    args = ap.parse_args()
    if args.vision_batch:
        return vision_batch_main(args)
    if args.streams:
        return streams_main(args)
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
