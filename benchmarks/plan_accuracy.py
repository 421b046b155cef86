"""The planner against the runtime: predicted TTFT, peak memory and streams' rate against measured ones.

    python benchmarks/plan_accuracy.py --bundle B [--profile P.toml | --out-dir DIR] [--runs 5]
                                       [--rate R] [--seconds 20] [--answer-tokens 16]

1. The profile: `--profile` as given, else `mqt-edge calibrate --bundle B --out DIR/calibrated.toml
   --base cpu` (DIR: `--out-dir`, default a new temporary directory; nothing is written into B).
2. TTFT at m = 2, 16, 256: the planner's vision + MQT + prefill against the median of `--runs`
   `Pipeline.ask` calls, each on a new image (the pipeline caches encoded images), m interleaved
   round by round; `Answer.timings_ms` per stage beside it. The planner is given the question's own
   length, as `Pipeline.answer` gives it; the prediction for a typical 16-id question (what
   `mqt-edge plan` assumes) is printed beside the stages.
3. Peak memory at each m: the planner's `memory_breakdown` against the peak RSS (VmHWM) of a fresh
   process that loads the bundle and answers one question at that m.
4. Streams: the streams planner (`Watch(..., rate=R)`'s, with its question's length; R: `--rate`,
   default just under the planned rate at m = 16) against a `Watch` over 4 synthetic 30 fps
   cameras at the chosen m for `--seconds` (as benchmarks/watch_bench.py runs them): answers per
   second per stream.

The load average (1 minute) is printed next to every figure: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # watch_bench's synthetic camera

MS = (2, 16, 256)
QUESTION = "What is in this image?"
STREAMS = 4


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def err(predicted: float, measured: float) -> str:
    return f"{100 * (predicted - measured) / measured:+.1f}%"


def calibrated_profile(args) -> str:
    if args.profile:
        return args.profile
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="plan-accuracy-")) / "calibrated.toml"
    before = load()
    r = subprocess.run([sys.executable, "-m", "mqt_edge", "calibrate", "--bundle", args.bundle, "--out", str(out),
                        "--base", "cpu"], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr)
    print(f"calibrated (load {before:.2f} -> {load():.2f}): {' '.join(r.stderr.split())}", flush=True)
    return str(out)


def planner(profile_path: str, pipe, question: str):
    """The profile, the bundle's facts and the run's options, with `question`'s length (what
    `Pipeline.answer` and a `Watch` with that question plan with)."""
    from mqt_edge.profiles import load_profile
    from mqt_edge.profiles.planner import ModelFacts, Options

    profile, facts = load_profile(profile_path), ModelFacts.from_bundle(pipe.bundle)
    opts = Options.for_run(pipe.vision_backend, pipe.n_gpu_layers, pipe.sequential, facts, pipe.vision_precision)
    return profile, facts, replace(opts, question_tokens=len(pipe.question_ids(question)))


def ttft_rows(args, profile_path: str) -> tuple[list[dict], object]:
    """Measured TTFT per m (median of --runs, m interleaved) beside the planner's terms."""
    from mqt_edge.image import sample_images
    from mqt_edge.pipeline import Pipeline
    from mqt_edge.profiles.planner import QUESTION_TOKENS, terms

    images = iter(sample_images(1 + args.runs * len(MS), seed=101))
    seen: dict[int, list] = {m: [] for m in MS}
    loads = []
    with Pipeline.load(args.bundle) as pipe:
        profile, facts, opts = planner(profile_path, pipe, QUESTION)
        pipe.ask(next(images), QUESTION, m=1, max_new_tokens=2)  # warm-up
        for _ in range(args.runs):
            for m in MS:
                loads.append(load())
                seen[m].append(pipe.ask(next(images), QUESTION, m=m, max_new_tokens=2))
    rows = []
    for m in MS:
        t = terms(profile, facts, m, opts)
        typical = terms(profile, facts, m, replace(opts, question_tokens=QUESTION_TOKENS))  # `mqt-edge plan`'s
        med = {k: statistics.median(a.timings_ms[k] for a in seen[m])
               for k in ("preprocess", "vision", "mqt", "prefill", "ttft")}
        rows.append({"m": m, "predicted": t["vision"] + t["mqt"] + t["prefill"], "measured": med["ttft"],
                     "predicted_typical_question": typical["vision"] + typical["mqt"] + typical["prefill"],
                     "question_tokens": opts.question_tokens,
                     "stages_predicted": {k: round(t[k], 1) for k in ("vision", "mqt", "prefill")},
                     "stages_measured": med, "prefilled": seen[m][0].prefilled,
                     "runs": [a.timings_ms["ttft"] for a in seen[m]], "load": round(statistics.mean(loads), 2)})
    return rows, opts


def child_rss(bundle: str, m: int) -> None:
    """In a fresh process: load, answer once at m, report the RSS high-water mark and its parts."""
    from mqt_edge.image import sample_images
    from mqt_edge.pipeline import Pipeline

    def status() -> dict:
        keep = ("VmHWM", "VmRSS", "RssAnon", "RssFile")
        lines = Path("/proc/self/status").read_text().splitlines()
        return {k: int(v.split()[0]) / 1024 for k, v in (x.split(":", 1) for x in lines) if k in keep}

    with Pipeline.load(bundle) as pipe:
        loaded = status()
        a = pipe.ask(sample_images(1, seed=7)[0], QUESTION, m=m, max_new_tokens=16)
        stats = pipe.scheduler.stats()
        print(json.dumps({"loaded": loaded, "answered": status(), "m": a.m, "n_ctx": stats.n_ctx,
                          "position_bytes": stats.position_bytes}))


def memory_rows(args, profile_path: str, opts) -> list[dict]:
    from mqt_edge.bundle import Bundle
    from mqt_edge.profiles import load_profile
    from mqt_edge.profiles.planner import ModelFacts, memory_breakdown

    profile, facts = load_profile(profile_path), ModelFacts.from_bundle(Bundle.open(args.bundle, verify=False))
    rows = []
    for m in MS:
        before = load()
        r = subprocess.run([sys.executable, __file__, "--bundle", args.bundle, "--child-rss", str(m)],
                           capture_output=True, text=True, env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
        if r.returncode:
            sys.exit(r.stderr)
        got = json.loads(r.stdout.strip().splitlines()[-1])
        parts = memory_breakdown(profile, facts, m, replace(opts, max_new_tokens=16))
        rows.append({"m": m, "predicted": parts["total_mb"], "measured": got["answered"]["VmHWM"], "parts": parts,
                     "rss": got, "load": round((before + load()) / 2, 2)})
    return rows


def timed(obj, names: tuple, spent: dict, key: str) -> None:
    """Add the seconds of every call of obj's methods `names` to spent[key] (wrapped on the instance)."""
    for name in names:
        method = getattr(obj, name)

        def wrapper(*a, _method=method, **k):
            t = time.perf_counter()
            try:
                return _method(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
        setattr(obj, name, wrapper)


def streams_row(args, profile_path: str) -> dict:
    from watch_bench import Q, camera

    from mqt_edge.pipeline import Pipeline
    from mqt_edge.profiles.planner import plan_streams
    from mqt_edge.watch import Watch

    with Pipeline.load(args.bundle, parallel=STREAMS) as pipe:
        profile, facts, opts = planner(profile_path, pipe, Q)
        rate = args.rate
        if rate is None:  # just under the planned rate at m = 16: the plan chooses m = 16
            probe = plan_streams(profile, facts, STREAMS, 1e-9, answer_tokens=args.answer_tokens, options=opts)
            rate = round(next(c.rate_hz for c in probe.candidates if c.m == 16) * 0.99, 4)
        p = plan_streams(profile, facts, STREAMS, rate, answer_tokens=args.answer_tokens, options=opts)
        if p.chosen_m is None:
            sys.exit(f"plan: {p.reason}")
        chosen = next(c for c in p.candidates if c.m == p.chosen_m)
        pipe.ask(camera(1.0).__next__(), Q, m=p.chosen_m, max_new_tokens=2)  # warm-up
        spent = {"vision": 0.0, "llm": 0.0}  # time inside vision runs and llama_decode calls, not waits
        timed(pipe.vision, ("features", "tokens"), spent, "vision")
        timed(pipe.scheduler.ctx, ("decode_tokens", "decode_embeddings"), spent, "llm")
        sched, before, start = pipe.scheduler.stats(), load(), time.perf_counter()
        cams = {f"cam{i}": camera(args.seconds, seed=i) for i in range(STREAMS)}
        with Watch(pipe, cams, Q, m=p.chosen_m, max_new_tokens=args.answer_tokens) as w:
            answers = list(w)
        elapsed = time.perf_counter() - start
        after = pipe.scheduler.stats()
    lengths = [len(a.answer.token_ids) for a in answers]
    return {"rate": rate, "m": p.chosen_m, "predicted": chosen.rate_hz, "cycle_ms": chosen.cycle_ms,
            "measured": len(answers) / elapsed / STREAMS, "steady": (w.stats["answers_per_s"] or 0) / STREAMS,
            "answers": len(answers), "seconds": round(elapsed, 1), "answer_tokens": statistics.mean(lengths or [0]),
            "latency_ms": statistics.median(a.timings_ms["latency"] for a in answers) if answers else None,
            "load": round((before + load()) / 2, 2),
            # where the time went: the frames' encoding (vision + MQT, one at a time) and the LLM's steps
            "vision_s": round(spent["vision"], 1), "llm_s": round(spent["llm"], 1),
            "steps": after.steps - sched.steps, "rows": after.rows - sched.rows}


def report(args, profile_path: str, ttft: list, mem: list, streams: dict) -> None:
    print(f"\nprofile {profile_path}; CPU flags: {cpu_flags()}")
    print("\n| quantity | m | predicted | measured | error | load (1 min) |")
    print("|---|---|---|---|---|---|")
    for r in ttft:
        print(f"| TTFT (ms) | {r['m']} | {r['predicted']:,.0f} | {r['measured']:,.0f} | "
              f"{err(r['predicted'], r['measured'])} | {r['load']} |")
    for r in mem:
        print(f"| peak RSS (MB) | {r['m']} | {r['predicted']:,.0f} | {r['measured']:,.0f} | "
              f"{err(r['predicted'], r['measured'])} | {r['load']} |")
    s = streams
    print(f"| answers/s per stream, 4 streams | {s['m']} | {s['predicted']:.3f} | {s['measured']:.3f} | "
          f"{err(s['predicted'], s['measured'])} | {s['load']} |")
    print(f"\nstreams: the streams planner on {profile_path} ({STREAMS} streams at {s['rate']} answers/s, "
          f"{args.answer_tokens} answer tokens, the question's own length) chose m = {s['m']} "
          f"(cycle {s['cycle_ms']:,.0f} ms); "
          f"measured {s['answers']} answers in {s['seconds']} s (steady {s['steady']:.3f}/s per stream), "
          f"{s['answer_tokens']:.1f} tokens per answer, median latency {s['latency_ms']:,.0f} ms; inside vision + MQT "
          f"{s['vision_s']} s, inside llama_decode {s['llm_s']} s ({s['steps']} steps, {s['rows']} rows)")
    for r in ttft:
        print(f"TTFT m={r['m']}: stages predicted {r['stages_predicted']}, measured {r['stages_measured']}, "
              f"prefilled {r['prefilled']} positions, runs {r['runs']}; predicted for the question's "
              f"{r['question_tokens']} ids, {r['predicted_typical_question']:,.0f} ms for a typical 16 "
              f"({err(r['predicted_typical_question'], r['measured'])})")
    for r in mem:
        print(f"memory m={r['m']}: predicted parts {r['parts']}; measured {r['rss']}")


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in flags)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--profile", help="a calibrated profile (default: calibrate now into --out-dir)")
    ap.add_argument("--out-dir", help="where to write the calibrated profile (default: a new temporary directory)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rate", type=float, help="answers/s per stream for the 4 streams (default: see the top)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--child-rss", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_rss is not None:
        return child_rss(args.bundle, args.child_rss)
    profile = calibrated_profile(args)
    ttft, opts = ttft_rows(args, profile)
    print(json.dumps(ttft), flush=True)
    mem = memory_rows(args, profile, opts)
    print(json.dumps(mem), flush=True)
    streams = streams_row(args, profile)
    print(json.dumps(streams), flush=True)
    report(args, profile, ttft, mem, streams)


if __name__ == "__main__":
    main()
