"""Defaults the CLI and the runtime read without torch: where the shipped model lives, and how many
CPU threads to use when other processes share the cores.

The thread figures behind `threads_for_load` are in docs/benchmarks.md ("Threads on a busy CPU",
`benchmarks/threads.py`): when another process holds a core, llama.cpp's and onnxruntime's workers
wait on a thread the scheduler has taken away, and fewer threads than cores answer sooner.
"""

from __future__ import annotations

import math
from pathlib import Path

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default-model"

# Other processes' share of the cores, in cores, from which `doctor` says to pass fewer threads:
# one whole core's worth of the 1-minute load average.
BUSY_CORES = 1.0


def default_model() -> Path | None:
    return DEFAULT_MODEL if (DEFAULT_MODEL / "config.json").is_file() else None


def busy_cores(load_1m: float, cores: int, host_cores: int | None = None) -> float:
    """How many of this process's `cores` other work keeps busy: the load average (counted over
    the host's cores) scaled to the cores this process may use."""
    host = max(host_cores or cores, cores, 1)
    return max(0.0, load_1m) * cores / host


def threads_for_load(load_1m: float, cores: int, host_cores: int | None = None) -> int | None:
    """The thread count to pass when the cores are shared (the cores left free, at least 1), or None
    when fewer than BUSY_CORES are taken and all cores are the better choice."""
    taken = busy_cores(load_1m, cores, host_cores)
    if taken < BUSY_CORES:
        return None
    return max(1, math.floor(cores - taken))
