"""`mqt-edge doctor`: what this machine is and what mqt-edge will use on it.

What a user pastes into a bug report, and what says why something is slow. Torch-free: the hardware
comes from `mqt_edge.device`, the runtimes from their own libraries (llama.cpp's system info and the
AMX guard, onnxruntime's providers), the profile from `profiles.detect()`.

Each probe is one function in `PROBES` returning a dict of facts. A probe that raises is recorded as
`{"ok": false, "error": ...}` and the next one runs: the report itself never fails.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import Callable

from . import __version__, device
from .defaults import SPIN_ENV, spinning, threads_for_load
from .runtimes import BACKENDS, backend_info

# Distributions whose versions matter in a bug report (read from metadata: nothing is imported).
PACKAGES = ("numpy", "pillow", "typer", "rich", "llama-cpp-python", "onnxruntime", "onnxruntime-gpu",
            "tensorrt", "nvidia-ml-py", "torch", "transformers")
# onnxruntime execution providers that put vision on a GPU (the on_gpu rows of the backend table).
GPU_PROVIDERS = tuple(row.provider for row in BACKENDS.values() if row.provider and row.on_gpu)


def _version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe_versions() -> dict:
    return {"mqt_edge": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "executable": sys.executable,
            "packages": {d: v for d in PACKAGES if (v := _version_of(d)) is not None}}


def probe_cpu() -> dict:
    info = device.cpu_info()
    total, available = device.total_ram_bytes(), device.available_ram_bytes()
    return {"model": info.model, "arch": info.arch, "cores": info.cores, "host_cores": os.cpu_count(),
            "features": info.features, "ram_gb": round(total / 1e9, 1) if total else None,
            "available_gb": round(available / 1e9, 1) if available else None}


def probe_load() -> dict:
    """The load averages (runnable processes, over the host's cores) against the cores this process
    may use: other work on the cores makes llama.cpp's and onnxruntime's threads wait."""
    one, five, fifteen = os.getloadavg()
    return {"1m": round(one, 2), "5m": round(five, 2), "15m": round(fifteen, 2),
            "cores": device.usable_cores(), "host_cores": os.cpu_count()}


def probe_llama() -> dict:
    from .runtimes import llama

    on, why = llama.amx_guard()
    return {"version": llama.binding_version(), "system_info": llama.system_info(),
            "gpu_offload": llama.supports_gpu_offload(), "amx_guard": on, "amx_guard_why": why}


def probe_onnxruntime() -> dict:
    from .errors import require

    ort = require("onnxruntime", "cpu")
    return {"version": ort.__version__, "providers": list(ort.get_available_providers()),
            "device": ort.get_device()}


def probe_tensorrt() -> dict:
    """TensorRT's Python package (found, not imported: importing it loads CUDA) and onnxruntime's
    TensorRT execution provider."""
    found = importlib.util.find_spec("tensorrt") is not None
    try:
        import onnxruntime as ort

        ep = backend_info("onnxruntime/tensorrt-ep").provider in ort.get_available_providers()
    except ImportError:
        ep = None
    return {"present": found, "version": _version_of("tensorrt") if found else None, "ort_provider": ep}


def probe_gpus() -> dict:
    found = device.gpus()
    return {"count": len(found), "devices": [
        {"name": g.name, "memory_gb": round(g.memory_gb, 1), "driver": g.driver, "source": g.source} for g in found]}


def probe_jetson() -> dict:
    model = device.jetson_model()
    if model is None:
        return {"present": False}
    return {"present": True, "model": model, "jetpack": device.jetpack_version(), "l4t": device.l4t_release()}


def probe_profile() -> dict:
    from .profiles import detect, load_profile

    name, how = detect()
    return {"auto": name, "how": how, "calibrated": load_profile(name).calibration is not None}


PROBES: dict[str, Callable[[], dict]] = {
    "versions": probe_versions,
    "cpu": probe_cpu,
    "load": probe_load,
    "llama.cpp": probe_llama,
    "onnxruntime": probe_onnxruntime,
    "tensorrt": probe_tensorrt,
    "gpus": probe_gpus,
    "jetson": probe_jetson,
    "profile": probe_profile,
}


def _failure(exc: BaseException) -> dict:
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return {"ok": False, "error": f"{type(exc).__name__}: {text}" if text else type(exc).__name__}


def run_probes() -> dict[str, dict]:
    out = {}
    for name, probe in PROBES.items():
        try:
            out[name] = {"ok": True, **probe()}
        except Exception as exc:  # a broken probe is a finding, never the end of the report
            out[name] = _failure(exc)
    return out


# ---- why it may be slow: (probes) -> a sentence, or None ----------------------------------------
def _has_gpu(p: dict) -> bool:
    return bool(p["gpus"].get("count")) or bool(p["jetson"].get("present"))


def _note_vision_on_cpu(p: dict) -> str | None:
    ort = p["onnxruntime"]
    if _has_gpu(p) and ort["ok"] and not set(GPU_PROVIDERS) & set(ort["providers"]):
        return ("onnxruntime has no CUDA or TensorRT provider: the vision encoder runs on the CPU "
                "(pip install 'mqt-edge[gpu]' instead of [cpu])")
    return None


def _note_llm_on_cpu(p: dict) -> str | None:
    if _has_gpu(p) and p["llama.cpp"]["ok"] and not p["llama.cpp"]["gpu_offload"]:
        return ("llama.cpp is built without GPU offload: the LLM runs on the CPU (reinstall llama-cpp-python "
                "with CMAKE_ARGS=\"-DGGML_CUDA=on\")")
    return None


def _note_no_avx2(p: dict) -> str | None:
    cpu = p["cpu"]
    if cpu["ok"] and cpu["arch"] in ("x86_64", "AMD64") and "AVX2" not in cpu["features"]:
        return "the CPU has no AVX2: llama.cpp and onnxruntime fall back to slow kernels"
    return None


def _note_amx_guard(p: dict) -> str | None:
    if p["llama.cpp"]["ok"] and p["llama.cpp"]["amx_guard"]:
        return ("AMX guard on: llama.cpp keeps weights in plain CPU buffers, avoiding a crash in its AMX kernels "
                "(docs/runtime.md; MQT_EDGE_EXTRA_BUFFERS=on overrides)")
    return None


def _note_cores(p: dict) -> str | None:
    cpu = p["cpu"]
    if cpu["ok"] and cpu["host_cores"] and cpu["cores"] < cpu["host_cores"]:
        return f"this process may use {cpu['cores']} of {cpu['host_cores']} cores (CPU affinity or a container limit)"
    return None


def _note_busy(p: dict) -> str | None:
    load = p["load"]
    if not load["ok"]:
        return None
    threads = threads_for_load(load["1m"], load["cores"], load["host_cores"])
    if threads is None:
        return None
    host = f" of the host's {load['host_cores']}" if load["host_cores"] not in (None, load["cores"]) else ""
    busy = f"the CPU is busy (1-minute load average {load['1m']:g} for {load['cores']} usable cores{host})"
    how = f"pass --threads {threads} (Python: Pipeline.load(..., threads={threads}))"
    if spin_on():
        return (f"{busy} and idle threads spin ({spin_on()}): a spinning thread waits on a core another process "
                f"holds; unset it, or {how} (docs/benchmarks.md, \"Threads on a busy CPU\")")
    return (f"{busy}: answers will be slower than on an idle machine; to leave that work its cores, {how} "
            "(all cores stay the faster choice for mqt-edge itself: docs/benchmarks.md, \"Threads on a busy CPU\")")


def spin_on() -> str | None:
    """The setting that makes idle llama.cpp/onnxruntime threads spin, or None (they sleep)."""
    if spinning():
        return f"{SPIN_ENV}={os.environ[SPIN_ENV]}"
    policy = os.environ.get("OMP_WAIT_POLICY", "")
    return f"OMP_WAIT_POLICY={policy}" if policy.strip().lower() == "active" else None


def _note_uncalibrated(p: dict) -> str | None:
    prof = p["profile"]
    if prof["ok"] and not prof["calibrated"]:
        return (f"profile {prof['auto']} is not calibrated: the planner predicts from datasheet numbers "
                "(mqt-edge calibrate --out my-device.toml, then --profile my-device.toml)")
    return None


NOTES = (_note_vision_on_cpu, _note_llm_on_cpu, _note_no_avx2, _note_amx_guard, _note_cores, _note_busy,
         _note_uncalibrated)


def report() -> dict:
    """Every probe's facts (or its error) and the notes drawn from them. Never raises."""
    probes = run_probes()
    notes = []
    for note in NOTES:
        try:
            text = note(probes)
        except Exception:  # a note reads a probe that failed in an unexpected shape: skip it
            text = None
        if text:
            notes.append(text)
    return {"mqt_edge": __version__, "probes": probes, "notes": notes}


# ---- text ------------------------------------------------------------------------------------------
def _short_versions(v: dict) -> str:
    return f"mqt-edge {v['mqt_edge']}, Python {v['python']}"


def _short_cpu(c: dict) -> str:
    ram = f", {c['ram_gb']:g} GB RAM" if c["ram_gb"] else ""
    return f"{c['model']} ({c['arch']}, {c['cores']} cores, {' '.join(c['features']) or 'no SIMD flags'}){ram}"


def _short_load(x: dict) -> str:
    return f"load {x['1m']:g} on {x['cores']} cores"


def _short_llama(x: dict) -> str:
    gpu = ", GPU offload" if x["gpu_offload"] else ""
    return f"llama.cpp {x['version']} (AMX guard {'on' if x['amx_guard'] else 'off'}{gpu})"


def _short_ort(x: dict) -> str:
    providers = ",".join(p.removesuffix("ExecutionProvider") for p in x["providers"])
    return f"onnxruntime {x['version']} [{providers}]"


def _short_trt(x: dict) -> str:
    return f"TensorRT {x['version'] or 'present'}" if x["present"] else "no TensorRT"


def _short_gpus(x: dict) -> str:
    if not x["count"]:
        return "no NVIDIA GPU"
    return ", ".join(f"{g['name']} {g['memory_gb']:g} GB" for g in x["devices"])


def _short_jetson(x: dict) -> str:
    return f"{x['model']} (JetPack {x['jetpack'] or '?'}, L4T {x['l4t'] or '?'})" if x["present"] else ""


def _short_profile(x: dict) -> str:
    return f"profile auto: {x['auto']} ({'calibrated' if x['calibrated'] else 'not calibrated'})"


SHORT: dict[str, Callable[[dict], str]] = {
    "versions": _short_versions, "cpu": _short_cpu, "load": _short_load, "llama.cpp": _short_llama, "onnxruntime": _short_ort,
    "tensorrt": _short_trt, "gpus": _short_gpus, "jetson": _short_jetson, "profile": _short_profile,
}


def summary(rep: dict | None = None) -> str:
    """The report in one line (the test suite's header, the first line of `mqt-edge doctor`)."""
    rep = report() if rep is None else rep
    parts = []
    for name, facts in rep["probes"].items():
        try:
            text = SHORT[name](facts) if facts.get("ok") else f"{name}: probe failed"
        except Exception:
            text = f"{name}: ?"
        if text:
            parts.append(text)
    return " · ".join(parts)


def lines(rep: dict) -> list[str]:
    """The report as plain text (it is pasted into issues, so no box drawing)."""
    out = [summary(rep), ""]
    for name, facts in rep["probes"].items():
        if not facts.get("ok"):
            out.append(f"{name}: probe failed: {facts.get('error')}")
            continue
        out.append(f"{name}:")
        for key, value in facts.items():
            if key == "ok":
                continue
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v}" for k, v in value.items()) or "-"
            elif isinstance(value, list):
                value = "; ".join(", ".join(f"{k} {v}" for k, v in e.items()) if isinstance(e, dict) else str(e)
                                  for e in value) or "-"
            out.append(f"  {key}: {value}")
    out.append("")
    out.extend(["notes:", *(f"  - {n}" for n in rep["notes"])] if rep["notes"] else ["notes: none"])
    return out
