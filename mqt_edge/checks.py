"""Argument checks shared by every front end: one place for each rule, each a one-line InputError.

The CLI names its flags (--confidence -1), the API its arguments (confidence=-1): `_shown` picks.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .errors import InputError

def _is_int(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, np.integer))


def _is_real(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float, np.integer, np.floating)) and math.isfinite(x)


SAMPLING = {"max_new_tokens": 128, "temperature": 0.0, "top_p": 1.0, "seed": 0}  # generate()'s defaults
DEFAULT_CONFIDENCE = 0.5
ALWAYS_REFINE = 1.01  # above any probability: the largest confidence, "always refine"


def check_sampling(max_new_tokens, temperature, top_p, seed=0) -> None:
    """The sampling arguments of every generation, or a one-line InputError."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens!r}", "ask for at least one new token (an integer)")
    if not (_is_real(temperature) and temperature >= 0) or not (_is_real(top_p) and 0 < top_p <= 1):
        raise InputError(f"temperature={temperature!r} / top_p={top_p!r}",
                         "use a temperature >= 0 and a top_p in (0, 1] (numbers)")
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise InputError(f"seed={seed!r}", "use an integer seed in 0..2**63-1")


def sampling(kw: dict) -> dict:
    """The keyword arguments a one-shot call passes on to generate(), checked and with the defaults
    filled in, before any work: an old `tokens=` or a typo is one line, not a TypeError after encoding."""
    if "tokens" in kw:
        raise InputError("tokens= is now m= (the visual-token count)", f"pass m={kw['tokens']!r}")
    unknown = sorted(set(kw) - set(SAMPLING))
    if unknown:
        raise InputError(f"unknown argument {unknown[0]}=", f"use m=, refine_to=, confidence= or {', '.join(SAMPLING)}")
    kw = SAMPLING | kw
    check_sampling(**kw)
    return kw


def _shown(name: str, value) -> str:
    # The CLI names its flags (--confidence -1), the API its arguments (confidence=-1).
    return f"{name} {value}" if name.startswith("--") else f"{name}={value!r}"


def check_confidence(confidence, name: str = "confidence") -> float:
    """A first-token probability threshold in 0..1.01 (1.01: always refine), or a one-line InputError."""
    if not _is_real(confidence):
        raise InputError(f"{_shown(name, confidence)} is not a number", "use a probability in 0..1 (1.01: always)")
    if not 0 <= confidence <= ALWAYS_REFINE:
        raise InputError(f"{_shown(name, confidence)} is not a probability", "use 0..1 (1.01: always refine)")
    return float(confidence)


def check_limit(name: str, value) -> float | None:
    """A planner limit (ttft_ms, memory_mb): None or a finite number > 0, or a one-line InputError."""
    if value is not None and not (_is_real(value) and value > 0):
        example = f"{name} 2000" if name.startswith("--") else f"{name}=2000"
        raise InputError(f"{_shown(name, value)} is not a positive number", f"e.g. {example}")
    return value


def check_threads(threads) -> int | None:
    """None (all cores) or 1..cores: more threads than cores only make llama.cpp and onnxruntime
    contend (measured: 512 threads turned a 1 s answer into 65 s)."""
    cores = os.cpu_count() or 1
    if threads is not None and (not _is_int(threads) or not 1 <= threads <= cores):
        raise InputError(f"threads={threads!r} is outside 1..{cores} (this machine's CPU cores)",
                         f"use 1..{cores}, or leave it unset for all cores")
    return threads


def check_refine(refine_to, m, max_m: int, name: str = "refine_to") -> int | None:
    """A refinement target: None, or an m above `m` (when m is known) and at most `max_m`."""
    if refine_to is None:
        return None
    if not _is_int(refine_to) or refine_to < 1:
        raise InputError(f"{_shown(name, refine_to)} is out of range", f"refine to an integer m in 2..{max_m}")
    if refine_to > max_m:
        raise InputError(f"{_shown(name, refine_to)} is above the bundle's maximum of {max_m}",
                         f"refine to 2..{max_m}, or re-export with --max-tokens {refine_to}")
    if m is not None and refine_to <= m:
        raise InputError(f"{_shown(name, refine_to)} is not above m={m}",
                         f"refine to a larger m, e.g. {_shown(name, min(4 * m, max_m))}")
    return int(refine_to)
