"""What this machine is: CPU model and the instruction sets that matter, cores and RAM.

Ground layer, torch-free and dependency-free: the runtime's AMX guard, the planner and `mqt-edge
doctor` read the machine through here, once. Every probe degrades to "unknown" instead of raising.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# /proc/cpuinfo flag -> the name users know; the ones that decide llama.cpp's and ORT's kernels.
CPU_FEATURES = {
    "avx2": "AVX2",
    "avx512f": "AVX512",
    "avx512_vnni": "AVX512-VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX512-BF16",
    "amx_tile": "AMX-TILE",
    "amx_int8": "AMX-INT8",
    "amx_bf16": "AMX-BF16",
    "asimd": "NEON",  # aarch64 (Jetson)
    "sve": "SVE",
}


@dataclass(frozen=True)
class CpuInfo:
    model: str
    arch: str
    cores: int  # usable by this process (affinity), not the host's
    flags: frozenset[str]  # raw /proc/cpuinfo flags

    @property
    def features(self) -> list[str]:
        return [name for flag, name in CPU_FEATURES.items() if flag in self.flags]

    @property
    def has_amx(self) -> bool:
        return "amx_int8" in self.flags or "amx_tile" in self.flags


def _cpuinfo_text() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def _field(text: str, *keys: str) -> str | None:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in keys and value.strip():
            return value.strip()
    return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    text = _cpuinfo_text()
    flags = frozenset((_field(text, "flags", "features") or "").split())
    model = _field(text, "model name", "hardware", "cpu model") or platform.processor() or "unknown"
    return CpuInfo(model=model, arch=platform.machine(), cores=usable_cores(), flags=flags)


def meminfo_bytes(key: str) -> int | None:
    """A /proc/meminfo field in bytes (MemTotal, MemAvailable), or None off Linux."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def total_ram_bytes() -> int | None:
    found = meminfo_bytes("MemTotal")
    if found is None:
        try:
            found = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return found


def available_ram_bytes() -> int | None:
    return meminfo_bytes("MemAvailable") or total_ram_bytes()
