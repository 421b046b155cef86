"""`mqt-edge calibrate`: measure this device with a bundle and write a profile the planner uses.

Measured with the real runtime (Pipeline) on one image: preprocess + vision (fixed per image), the
MQT (fixed + per token), prefill (fixed + per position, least squares over several m), decode (per
token), the process's peak RSS, and the batched decode rate (total tokens/s of 1, 2 and 4 sequences
in one shared context, as the scheduler runs them). The planner scales these to other models by FLOPs, parameters
and weight bytes.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .profiles import Calibration, Profile, detect, load_profile, parse_profile

POINTS = (1, 16, 64, 128, 256)
BATCH_POINTS = (1, 2, 4)  # sequences decoding together, one llama_decode per step
BATCH_STEPS = 16
BATCH_PROMPT = 16  # positions each sequence holds before the timed steps


def line_fit(x, y) -> tuple[float, float]:
    """(fixed, per_unit) of the least-squares line y = fixed + per_unit * x with both terms >= 0.

    Timing noise on a busy machine can tilt an unconstrained fit below zero; the constrained optimum
    lies either inside (the plain fit) or on a boundary (through the origin, or flat at the mean).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    slope, fixed = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (0.0, float(y.mean()))
    if fixed >= 0 and slope >= 0:
        return float(fixed), float(slope)
    candidates = [(float(max(y.mean(), 0.0)), 0.0)]
    if (x * x).sum() > 0:
        candidates.append((0.0, float(max((x * y).sum() / (x * x).sum(), 0.0))))
    return min(candidates, key=lambda c: float(((c[0] + c[1] * x - y) ** 2).sum()))


def measure(bundle_dir: str, runs: int = 2, threads: int | None = None) -> Calibration:
    from .image import sample_images
    from .pipeline import Pipeline

    from .errors import InputError

    if runs < 1:
        raise InputError(f"--runs {runs}", "measure at least one run per point")
    rows = []
    with Pipeline.load(bundle_dir, threads=threads) as pipe:
        points = sorted({p for p in POINTS if p <= pipe.max_tokens} | {pipe.max_tokens})
        if len(points) < 2:
            raise InputError(f"the bundle serves only m = {pipe.max_tokens}",
                             "calibrate with a bundle exported with --max-tokens 16 or more")
        # a new image for every request: the pipeline caches encoded images by content, and a cached
        # one would time neither vision nor the MQT's queries below the m already encoded
        images = iter(sample_images(1 + len(points) * runs, seed=11))
        pipe.ask(next(images), "Warm up.", m=1, max_new_tokens=2)
        for m in points:
            for _ in range(runs):
                a = pipe.ask(next(images), "What is in this image?", m=m, max_new_tokens=16)
                rows.append((m, a))
        manifest = pipe.bundle.manifest
        precision = pipe.vision.precision  # the graph the timings were measured on
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the batch's own context
        # on the scheduler's loop thread, where the pipeline's own decodes run: one more calling
        # thread would give libgomp a second worker pool and throttle its barriers (scheduler.py)
        batch = pipe.scheduler.call(lambda: measure_batched(pipe.llm, pipe.threads))
    t = lambda a, k: a.timings_ms[k]  # noqa: E731
    mqt_fixed, mqt_slope = line_fit([m for m, _ in rows], [t(a, "mqt") for _, a in rows])
    prefill_fixed, prefill_slope = line_fit([a.prefilled for _, a in rows], [t(a, "prefill") for _, a in rows])
    decode = [1000 / a.decode_tokens_per_s for _, a in rows if a.decode_tokens_per_s]
    by_m = {m: [a for k, a in rows if k == m] for m in points}
    prefill_points = tuple((statistics.median(a.prefilled for a in got), round(statistics.median(
        t(a, "prefill") for a in got), 2)) for got in by_m.values())
    return Calibration(
        vision_ms=round(statistics.median(t(a, "preprocess") + t(a, "vision") for _, a in rows), 2),
        mqt_ms_fixed=round(mqt_fixed, 4), mqt_ms_per_token=round(mqt_slope, 5),
        prefill_ms_fixed=round(prefill_fixed, 3), prefill_ms_per_token=round(prefill_slope, 4),
        decode_ms_per_token=round(statistics.median(decode), 3) if decode else 0.0,
        peak_mb=round(peak_mb, 1),
        llm_params=manifest.llm.params, llm_bytes=manifest.llm.bytes,
        vision_flops=manifest.vision.flops, bundle=str(Path(bundle_dir).resolve()),
        vision_precision=precision, batch_tok_s=batch, prefill_points=prefill_points,
    )


def measure_batched(llm, threads: int | None = None, steps: int = BATCH_STEPS) -> tuple:
    """((n, total decode tokens/s), ...) for n in BATCH_POINTS, as the scheduler decodes: n sequences
    in one `SharedContext` (unified KV), each with a short prompt, then `steps` llama_decode calls
    carrying one token of every sequence and asking for every row's logits."""
    from .runtimes.llama import SharedContext

    top = max(BATCH_POINTS)
    ctx = SharedContext(llm, top * (BATCH_PROMPT + steps + 2), top, max(BATCH_PROMPT, top), threads)
    try:
        return tuple((n, round(_batched_rate(ctx, n, steps), 2)) for n in BATCH_POINTS)
    finally:
        ctx.close()


def _batched_rate(ctx, n: int, steps: int) -> float:
    token = lambda i: (100 + i) % ctx.model.n_vocab  # noqa: E731  (any valid id: the rate ignores the text)
    for s in range(n):
        ctx.decode_tokens([(s, i, token(i), i == BATCH_PROMPT - 1) for i in range(BATCH_PROMPT)])
    ctx.decode_tokens([(s, BATCH_PROMPT, token(0), True) for s in range(n)])  # warm-up: first-call allocations
    start = time.perf_counter()
    for step in range(1, steps + 1):
        ctx.decode_tokens([(s, BATCH_PROMPT + step, token(step), True) for s in range(n)])
    seconds = time.perf_counter() - start
    for s in range(n):
        ctx.seq_rm(s)
    return n * steps / seconds


def to_toml(p: Profile) -> str:
    """A profile file (the strict schema's own layout)."""

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return repr(float(v)) if isinstance(v, float) else str(v)

    def table(name, obj):
        items = obj.items() if isinstance(obj, dict) else vars(obj).items()
        return [f"[{name}]"] + [f"{k} = {val(v)}" for k, v in items] + [""]

    lines = ["# mqt-edge device profile written by `mqt-edge calibrate`.",
             f"name = {val(p.name)}", f"description = {val(p.description)}", f"kind = {val(p.kind)}", ""]
    for name in ("memory", "compute", "limits", "prefer", "efficiency"):
        lines += table(name, getattr(p, name))
    lines += table("sources", p.sources)
    for mode, over in p.modes.items():
        lines += table(f"modes.{mode}", over)
    if p.calibration:
        lines += table("calibration", p.calibration)
    return "\n".join(lines)


def calibrate(bundle_dir: str, out: Path, base: str | None = None, runs: int = 2,
              threads: int | None = None) -> Profile:
    from .errors import InputError

    if out.is_dir() or not out.parent.is_dir():
        raise InputError(f"cannot write the profile to {out}", "name a .toml file in an existing directory")
    base_profile = load_profile(base or detect()[0])
    cal = measure(bundle_dir, runs, threads)
    name = out.stem
    profile = replace(base_profile, name=name, calibration=cal, mode=None, path=str(out),
                      description=f"{base_profile.description}; calibrated on this device")
    text = to_toml(profile)
    parse_profile(text, str(out), str(out))  # a profile that would not load is never written
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return load_profile(str(out))
