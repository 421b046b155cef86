"""Peak RSS of MQTLlava.from_pretrained against the model's fp16 size.

    python benchmarks/load_peak_rss.py DIR [--dtype auto]

Prints one JSON line: touched, params, fp16_bytes, peak_rss_bytes, ratio, seconds. Run it in a fresh process
(ru_maxrss is a per-process high-water mark).
"""

import argparse
import json
import resource
import time

from mqt_edge.model import MQTLlava


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--touch", action="store_true",
                    help="read every weight after loading (safetensors maps files lazily)")
    args = ap.parse_args()
    t = time.perf_counter()
    model = MQTLlava.from_pretrained(args.model, dtype=args.dtype)
    seconds = time.perf_counter() - t
    if args.touch:
        for p in model.parameters():
            p.detach().float().sum()  # faults every page of the weight in
    params = sum(p.numel() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"touched": args.touch, "params": params, "fp16_bytes": 2 * params, "peak_rss_bytes": peak,
                      "ratio": round(peak / (2 * params), 3), "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
