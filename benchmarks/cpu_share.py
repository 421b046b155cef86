"""Vision and the LLM on the same CPU cores: each alone, and both at once with each thread split.

    python benchmarks/cpu_share.py --bundle path/to/bench-int8 [--rounds 3]

Times, in one process and interleaved rounds: the vision graph (onnxruntime) on 1 and on all
threads; one sequence decoding (llama.cpp, one shared context) on 1 and on all threads, and four
sequences in one batch; then each pair of (vision threads, decode threads) running at the same
time in two Python threads. This is the measurement behind mqt_edge/cores.py: which splits of the
cores lose to oversubscription, and which overlap for free.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import numpy as np

from mqt_edge.bundle import Bundle
from mqt_edge.runtimes.llama import LlamaModel, SharedContext
from mqt_edge.runtimes.onnxruntime import OnnxRuntimeVision


class Decoder:
    """Four sequences with a 64-token prompt each in one shared context; `rate` decodes n of them."""

    def __init__(self, llm: LlamaModel, threads: int) -> None:
        self.ctx = SharedContext(llm, 4096, 5, 512, threads)
        for s in range(4):
            self.ctx.decode_tokens([(s, i, 100 + i, False) for i in range(64)])
        self.pos = [64] * 4

    def rate(self, n: int, steps: int) -> float:
        t0 = time.perf_counter()
        for step in range(steps):
            self.ctx.decode_tokens([(s, self.pos[s], 300 + step, True) for s in range(n)])
            for s in range(n):
                self.pos[s] += 1
        return steps * n / (time.perf_counter() - t0)


def vision_time(runner: OnnxRuntimeVision, x: np.ndarray, frames: int) -> float:
    t0 = time.perf_counter()
    for _ in range(frames):
        runner.features(x)
    return (time.perf_counter() - t0) / frames


def together(runner: OnnxRuntimeVision, x: np.ndarray, dec: Decoder, steps: int) -> tuple[float, float]:
    """(s per frame, tok/s) with vision and a lone decoding sequence running at once."""
    box: dict = {}
    th = threading.Thread(target=lambda: box.setdefault("v", vision_time(runner, x, 2)))
    th.start()
    rate = dec.rate(1, steps)
    th.join()
    return box["v"], rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    b = Bundle.open(a.bundle)
    x = np.random.default_rng(0).random((1, 3, 336, 336), dtype=np.float32)
    vis = {t: OnnxRuntimeVision(b, "CPUExecutionProvider", t).activate() for t in sorted({1, cores})}
    llm = LlamaModel(b.path("llm"))
    dec = {t: Decoder(llm, t) for t in sorted({1, cores})}
    for v in vis.values():
        v.features(x)  # warm
    got: dict = {}
    for _ in range(a.rounds):
        for t, v in vis.items():
            got.setdefault(f"vision alone, {t} thread(s): s/frame", []).append(vision_time(v, x, 2))
        for t, d in dec.items():
            got.setdefault(f"decode alone, {t} thread(s), 1 sequence: tok/s", []).append(d.rate(1, a.steps))
            got.setdefault(f"decode alone, {t} thread(s), 4 sequences: tok/s", []).append(d.rate(4, a.steps // 2))
        for vt, v in vis.items():
            for dt, d in dec.items():
                s, r = together(v, x, d, a.steps)
                got.setdefault(f"together: vision {vt} + decode {dt} thread(s): vision s/frame", []).append(s)
                got.setdefault(f"together: vision {vt} + decode {dt} thread(s): decode tok/s", []).append(r)
    print(f"{cores} CPU threads; medians of {a.rounds} interleaved rounds")
    print("| measurement | median | rounds |\n|---|---|---|")
    for k, xs in got.items():
        print(f"| {k} | {statistics.median(xs):.3f} | {', '.join(f'{v:.3f}' for v in xs)} |")
    for d in dec.values():
        d.ctx.close()
    llm.close()


if __name__ == "__main__":
    main()
