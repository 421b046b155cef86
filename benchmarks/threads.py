"""Thread count and thread waiting against other processes on the same cores: TTFT and decode speed.

    python benchmarks/threads.py --bundle mqt-edge-bundle [--bundle bundles/bench-int8] \
        [--rounds 5] [--requests 3] [--tokens 16] [--decode 32] [--json threads.json]

Each configuration is (threads, busy, wait):
- threads: llama.cpp's and onnxruntime's thread count (all cores, all but one, one);
- busy: how many cores another process keeps busy (`while True: pass` subprocesses, started before
  the measurement and killed after it), as ROS nodes and perception do on a robot;
- wait: how idle threads wait. `spin` is the libraries' default (MQT_EDGE_SPIN=on): llama-cpp-python's
  wheels build ggml with OpenMP, whose barriers spin (libgomp's default spin count) before sleeping,
  and onnxruntime's intra-op pool spins too. `passive` (mqt-edge's default from issue 24 to issue 22)
  sets OMP_WAIT_POLICY=PASSIVE (libgomp sleeps at once) and onnxruntime's
  `session.intra_op.allow_spinning` = 0. `short` (the default now) is passive with GOMP_SPINCOUNT=1000:
  libgomp spins about 10 us at a barrier before it sleeps. (ggml's own threadpool `poll` level only
  applies to builds without OpenMP; `llama_print_system_info` says which: OPENMP = 1.)

Every configuration runs in a fresh process (libgomp reads its environment once, when it loads).
Configurations are interleaved: each round runs every one once, in a rotated order, so the load of
other jobs on a shared machine falls on all of them alike; figures are medians over the rounds.
TTFT is `Answer.timings_ms["ttft"]` of a fresh request (vision + MQT + prefill) at m = --tokens;
decode is llama.cpp's per-token step (one token fed, logits read) over --decode tokens, measured on
a context of its own so the model's end-of-answer token does not cut it short.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

QUESTION = "What color is the circle?"
IMAGE = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"


def configs(cores: int) -> list[tuple[int, int, str]]:
    threads = sorted({cores, max(1, cores - 1), 1}, reverse=True)
    out = []
    for busy in (0, 1):
        for t in threads:
            out += [(t, busy, "spin")] + ([(t, busy, "passive"), (t, busy, "short")] if t > 1 else [])
    return out


# ---- the child: one configuration, one process ---------------------------------------------------
def _no_spinning_onnxruntime() -> None:
    import onnxruntime as ort

    base = ort.SessionOptions

    def options():
        so = base()
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return so

    ort.SessionOptions = options  # the runner builds its options through the module attribute


def child(bundle: str, threads: int, wait: str, requests: int, m: int, decode: int) -> dict:
    if wait == "passive":
        _no_spinning_onnxruntime()
    from mqt_edge.pipeline import Pipeline

    with Pipeline.load(bundle, threads=threads) as pipe:
        pipe.ask(IMAGE, QUESTION, m=m, max_new_tokens=1)  # warm-up: first-call allocations
        ttft, vision, prefill = [], [], []
        for _ in range(requests):
            t = pipe.ask(IMAGE, QUESTION, m=m, max_new_tokens=1).timings_ms
            ttft.append(t["ttft"])
            vision.append(t["vision"])
            prefill.append(t["prefill"])

        def decode_rate() -> float:
            ctx = pipe.llm.context(len(pipe.prefix_ids) + decode + 8, threads=threads)
            try:
                ctx.feed_tokens(list(pipe.prefix_ids))
                token = int(ctx.logits().argmax())
                t0 = time.perf_counter()
                for _ in range(decode):
                    ctx.feed_tokens([token])
                    token = int(ctx.logits().argmax())
                return decode / (time.perf_counter() - t0)
            finally:
                ctx.close()

        # on the scheduler's thread, as the pipeline decodes: a second calling thread would get a
        # libgomp pool of its own and throttled barriers (mqt_edge/scheduler.py)
        tok_s = pipe.scheduler.call(decode_rate)
        return {"ttft": statistics.median(ttft), "vision": statistics.median(vision),
                "prefill": statistics.median(prefill), "decode_tok_s": tok_s, "backends": pipe.backends}


# ---- the parent: busy cores, interleaving, medians -------------------------------------------------
def _busy(n: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(0.5)  # let the scheduler spread them before the measurement starts
    return procs


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def run_one(bundle: str, cfg: tuple[int, int, str], args) -> dict:
    threads, busy, wait = cfg
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MQT_EDGE_SPIN")}
    if wait == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    elif wait == "short":
        pass  # mqt-edge's default: quiet_waits() sets OMP_WAIT_POLICY=PASSIVE and GOMP_SPINCOUNT=SHORT_SPIN
    else:  # the libraries' own spinning, which mqt-edge turns off unless MQT_EDGE_SPIN=on
        env["MQT_EDGE_SPIN"] = "on"
    cmd = [sys.executable, __file__, "--child", "--bundle", bundle, "--threads", str(threads), "--wait", wait,
           "--requests", str(args.requests), "--tokens", str(args.tokens), "--decode", str(args.decode)]
    procs = _busy(busy)
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, check=True)
    finally:
        _stop(procs)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(bundle: str, args) -> dict:
    cfgs = configs(os.cpu_count() or 1)
    samples: dict = {c: [] for c in cfgs}
    for r in range(args.rounds):
        order = cfgs[r % len(cfgs):] + cfgs[:r % len(cfgs)]
        for cfg in order:
            samples[cfg].append(run_one(bundle, cfg, args))
            print(f"round {r + 1} {cfg}: {samples[cfg][-1]['ttft']:.0f} ms, "
                  f"{samples[cfg][-1]['decode_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    rows = []
    for (threads, busy, wait), got in samples.items():
        med = {k: round(statistics.median(s[k] for s in got), 1) for k in ("ttft", "vision", "prefill", "decode_tok_s")}
        rows.append({"threads": threads, "busy": busy, "wait": wait, **med,
                     "ttft_runs": [round(s["ttft"]) for s in got], "backends": got[0]["backends"]})
    return {"bundle": bundle, "rows": rows}


def table(result: dict) -> str:
    """Markdown rows; ratios against all cores, spinning, on idle cores (the libraries' default)."""
    rows = result["rows"]
    ref = next(r for r in rows if r["busy"] == 0 and r["wait"] == "spin" and r["threads"] == max(x["threads"] for x in rows))
    lines = ["| busy cores | threads | wait | TTFT (ms) | vs default | vision (ms) | prefill (ms) | decode (tok/s) "
             "| vs default | TTFT per round (ms) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["busy"], -r["threads"], r["wait"] != "spin")):
        lines.append(f"| {r['busy']} | {r['threads']} | {r['wait']} | {r['ttft']:.0f} | {ref['ttft'] / r['ttft']:.2f}x "
                     f"| {r['vision']:.0f} | {r['prefill']:.0f} | {r['decode_tok_s']:.1f} "
                     f"| {r['decode_tok_s'] / ref['decode_tok_s']:.2f}x | {', '.join(map(str, r['ttft_runs']))} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", action="append", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=3, help="requests per configuration and round (median)")
    ap.add_argument("--tokens", type=int, default=16, help="m")
    ap.add_argument("--decode", type=int, default=32, help="decode steps timed")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--wait", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.bundle[0], args.threads, args.wait, args.requests, args.tokens, args.decode)))
        return
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = [measure(b, args) | {"started": started, "loadavg_after": os.getloadavg()} for b in args.bundle]
    for res in results:
        print(f"\n{res['bundle']} (started {started}, load average after {res['loadavg_after'][0]:.1f}):")
        print(table(res))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
