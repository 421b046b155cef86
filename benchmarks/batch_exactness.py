"""Does a request answer the same alone and in a batch? Greedy ids and first-token logits.

    python benchmarks/batch_exactness.py --bundle B [--requests 50] [--new 32]

50 requests (10 images, 4 questions, m from 2 to 256) run one at a time, then in groups of 1 to 8 at
once through the same pipeline (`Pipeline.load(..., parallel=8)`: one llama.cpp context, one decode per
step for every running request). Reported: how many answers' ids differ from the lone run, at which
token the first difference comes, and the largest difference of the first token's logits (the
prefill's, which the scheduler keeps). llama.cpp's CPU kernels may round a row differently when the
batch has more rows (another matmul path), so a random-weights model with near-tied logits can flip.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from conftest import scene  # noqa: E402

from mqt_edge.pipeline import Pipeline  # noqa: E402

QUESTIONS = ["What color is the circle?", "How many shapes are there?", "What shape is red?", "Is there a square?"]
GROUPS = (1, 2, 3, 4, 5, 6, 7, 8, 8, 6)


def one(pipe, req, new):
    im, q, m = req
    with pipe.look(pipe.encode(im, m=m), reserve=64 + new) as s:
        g = s.generate(q, max_new_tokens=new)
        first = g.job.last_logits
        for _ in g:
            pass
        return g.token_ids, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    with Pipeline.load(a.bundle, parallel=8, threads=a.threads) as pipe:
        ims = [scene(seed=200 + s) for s in range(10)]
        reqs = [(ims[k % 10], QUESTIONS[k % 4], (2, 4, 16, 64, 256)[k % 5]) for k in range(sum(GROUPS))]
        for im in ims:  # every run reads the same cached visual tokens: only the LLM side is compared
            pipe.encode(im, m=256)
        alone = [one(pipe, r, a.new) for r in reqs]
        again = [one(pipe, r, a.new) for r in reqs]  # alone once more: what the cache layout alone changes
        batched, start = [], 0
        with ThreadPoolExecutor(8) as pool:
            for n in GROUPS:
                batched += list(pool.map(lambda r: one(pipe, r, a.new), reqs[start:start + n]))
                start += n
    differ = [(i, next((k for k, (x, y) in enumerate(zip(al[0], ba[0])) if x != y), min(len(al[0]), len(ba[0]))))
              for i, (al, ba) in enumerate(zip(alone, batched)) if al[0] != ba[0]]
    dlogit = max(float(np.max(np.abs(al[1] - ba[1]))) for al, ba in zip(alone, batched))
    redo = sum(x[0] != y[0] for x, y in zip(alone, again))
    dredo = max(float(np.max(np.abs(x[1] - y[1]))) for x, y in zip(alone, again))
    print(f"alone twice: {redo} of {len(reqs)} answers differ; largest first-token logit difference {dredo:.3g}")
    print(f"{len(reqs)} requests, groups {GROUPS}: {len(differ)} answers differ from the lone run; "
          f"first differing token per answer: {[k for _, k in differ]}; largest first-token logit difference "
          f"{dlogit:.3g}")


if __name__ == "__main__":
    main()
