"""llama.cpp's own batching gain on this machine, without mqt-edge's scheduler around it.

    python benchmarks/raw_batch_decode.py path/to/llm.gguf [--steps 32] [--threads 2]

One shared context (unified KV cache, `runtimes.llama.SharedContext`), N sequences with a 64-token
prompt each, then `--steps` decode calls carrying one token per sequence: total tok/s and ms per step
at N = 1, 2, 4 and 8. This is the ceiling any scheduler on top can reach here.
"""

from __future__ import annotations

import argparse
import time

from mqt_edge.runtimes.llama import LlamaModel, SharedContext


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    llm = LlamaModel(a.gguf)
    for n in (1, 2, 4, 8):
        ctx = SharedContext(llm, 4096, 9, 512, a.threads)
        for s in range(n):
            ctx.decode_tokens([(s, i, 100 + i, False) for i in range(64)])
        t0 = time.perf_counter()
        for step in range(a.steps):
            ctx.decode_tokens([(s, 64 + step, 300 + step, True) for s in range(n)])
        dt = time.perf_counter() - t0
        print(f"{n} sequences: {a.steps * n / dt:.1f} tok/s in total, {1000 * dt / a.steps:.1f} ms per step", flush=True)
        ctx.close()
    llm.close()


if __name__ == "__main__":
    main()
