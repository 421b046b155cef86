"""`mqt-edge calibrate`: measure this device with a bundle and write a profile the planner uses.

Measured with the real runtime (Pipeline) on one image: preprocess + vision (fixed per image), the
MQT (fixed + per token), prefill (fixed + per position, least squares over several m), decode (per
token) and the process's peak RSS. The planner scales these to other models by FLOPs, parameters
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
    image = sample_images(1, seed=11)[0]
    rows = []
    with Pipeline.load(bundle_dir, threads=threads) as pipe:
        points = sorted({p for p in POINTS if p <= pipe.max_tokens} | {pipe.max_tokens})
        if len(points) < 2:
            raise InputError(f"the bundle serves only m = {pipe.max_tokens}",
                             "calibrate with a bundle exported with --max-tokens 16 or more")
        pipe.ask(image, "Warm up.", m=1, max_new_tokens=2)
        for m in points:
            for _ in range(runs):
                a = pipe.ask(image, "What is in this image?", m=m, max_new_tokens=16)
                rows.append((m, a))
        manifest = pipe.bundle.manifest
        precision = pipe.vision.precision  # the graph the timings were measured on
    t = lambda a, k: a.timings_ms[k]  # noqa: E731
    mqt_fixed, mqt_slope = line_fit([m for m, _ in rows], [t(a, "mqt") for _, a in rows])
    prefill_fixed, prefill_slope = line_fit([a.prefilled for _, a in rows], [t(a, "prefill") for _, a in rows])
    decode = [1000 / a.decode_tokens_per_s for _, a in rows if a.decode_tokens_per_s]
    return Calibration(
        vision_ms=round(statistics.median(t(a, "preprocess") + t(a, "vision") for _, a in rows), 2),
        mqt_ms_fixed=round(mqt_fixed, 4), mqt_ms_per_token=round(mqt_slope, 5),
        prefill_ms_fixed=round(prefill_fixed, 3), prefill_ms_per_token=round(prefill_slope, 4),
        decode_ms_per_token=round(statistics.median(decode), 3) if decode else 0.0,
        peak_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        llm_params=manifest.llm.params, llm_bytes=manifest.llm.bytes,
        vision_flops=manifest.vision.flops, bundle=str(Path(bundle_dir).resolve()),
        vision_precision=precision, batch_tok_s=measure_batched(bundle_dir, threads),
    )


def measure_batched(bundle_dir: str, threads: int | None = None, steps: int = BATCH_STEPS) -> tuple:
    """((n, total decode tokens/s), ...) for n in BATCH_POINTS: n sequences in one context, each
    fed one token per step in one llama_decode. Raw llama_cpp calls, self-contained, until the
    runtime's multi-sequence context can be measured instead."""
    import os

    from .bundle import Bundle
    from .runtimes.llama import model_params, require

    lib = require("llama_cpp.llama_cpp", "cpu")
    gguf = Bundle.open(Path(bundle_dir), verify=False).path("llm")
    lib.llama_backend_init()
    model = lib.llama_model_load_from_file(str(gguf).encode(), model_params(0))
    try:
        return tuple((n, round(_batched_rate(lib, model, n, steps, threads or os.cpu_count() or 1), 2))
                     for n in BATCH_POINTS)
    finally:
        lib.llama_model_free(model)


def _batched_rate(lib, model, n: int, steps: int, threads: int) -> float:
    cp = lib.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_seq_max = 64 * n, 64, n
    cp.n_threads = cp.n_threads_batch = threads
    ctx = lib.llama_init_from_model(model, cp)
    batch = lib.llama_batch_init(n, 0, 1)
    try:
        def step(pos: int) -> None:
            batch.n_tokens = n
            for s in range(n):  # token id 1: a valid id in every vocabulary; the rate ignores the text
                batch.token[s], batch.pos[s], batch.n_seq_id[s] = 1, pos, 1
                batch.seq_id[s][0], batch.logits[s] = s, 1
            if lib.llama_decode(ctx, batch) != 0:
                raise RuntimeError(f"llama_decode failed with {n} sequences")

        step(0)  # warm-up: first-call allocations are not decode
        start = time.perf_counter()
        for pos in range(1, steps + 1):
            step(pos)
        return n * steps / (time.perf_counter() - start)
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)


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
