"""Defaults the CLI and the runtime read without torch: where the shipped model lives, and how many
CPU threads to use when other processes share the cores.

The thread figures behind `threads_for_load` are in docs/benchmarks.md ("Threads on a busy CPU",
`benchmarks/threads.py`): when another process holds a core, llama.cpp's and onnxruntime's workers
wait on a thread the scheduler has taken away, and fewer threads than cores answer sooner.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default-model"

# on: let idle llama.cpp (OpenMP) and onnxruntime threads spin, the libraries' own default. Off (the
# default) they sleep at once: a spinning thread waits on a core another process holds, which made
# TTFT 3-15x longer on shared cores (docs/benchmarks.md, "Threads on a busy CPU").
SPIN_ENV = "MQT_EDGE_SPIN"

# How long a waiting llama.cpp thread spins before it sleeps, in libgomp's spins (it estimates 100000
# a millisecond): about 10 us. With OpenMP every ggml barrier (several per layer) is an OpenMP barrier,
# so sleeping at once costs a futex wake at each: the bench preset decoded 22.0 tok/s sleeping, 31.0
# with this spin and 35.1 with libgomp's default spin, and with one core taken by another process
# 19.5, 15.4 and 9.4 (docs/benchmarks.md, "Threads on a busy CPU").
SHORT_SPIN = 1000

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


def spinning() -> bool:
    """Whether idle worker threads may spin (MQT_EDGE_SPIN=on), as llama.cpp and onnxruntime do by
    default, rather than sleep."""
    return os.environ.get(SPIN_ENV, "off").strip().lower() in ("on", "1", "true", "yes")


def quiet_waits() -> None:
    """Make llama.cpp's OpenMP threads spin only briefly when they wait, then sleep
    (OMP_WAIT_POLICY=PASSIVE with GOMP_SPINCOUNT=SHORT_SPIN), unless MQT_EDGE_SPIN=on or the user set
    either variable. libgomp reads its environment once, when it loads, so this runs before
    llama.cpp's libraries are first loaded."""
    if spinning() or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = str(SHORT_SPIN)
