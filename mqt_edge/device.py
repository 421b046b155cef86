"""What this machine is: CPU model and the instruction sets that matter, cores, RAM, NVIDIA GPUs, Jetson.

Ground layer, torch-free and dependency-free (NVML and jetson-stats are used when installed): the
runtime's AMX guard, profile detection (`--profile auto`) and `mqt-edge doctor` read the machine
through here, once. Every probe degrades to "unknown" (None, an empty list) instead of raising.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
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


# ---- NVIDIA GPUs and Jetson modules --------------------------------------------------------------
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")  # "# R36 (release), REVISION: 4.3, ..." on JetPack
SMI_TIMEOUT_S = 10


@dataclass(frozen=True)
class GpuInfo:
    name: str
    memory_gb: float  # decimal GB, as the datasheets (and the built-in profiles) count them
    driver: str | None
    source: str  # nvml | nvidia-smi


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _nvml_gpus() -> list[GpuInfo]:
    import pynvml  # nvidia-ml-py, in the gpu extra

    pynvml.nvmlInit()
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            out.append(GpuInfo(_text(pynvml.nvmlDeviceGetName(handle)),
                               pynvml.nvmlDeviceGetMemoryInfo(handle).total / 1e9, driver, "nvml"))
        return out
    finally:
        pynvml.nvmlShutdown()


def _smi_gpus() -> list[GpuInfo]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    r = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
                       capture_output=True, text=True, timeout=SMI_TIMEOUT_S)
    out = []
    for line in r.stdout.splitlines() if r.returncode == 0 else []:
        name, mib, driver = ([p.strip() for p in line.rsplit(",", 2)] + ["", ""])[:3]
        try:
            mem_gb = float(mib) * 2**20 / 1e9
        except ValueError:
            mem_gb = 0.0
        out.append(GpuInfo(name, mem_gb, driver or None, "nvidia-smi"))
    return out


def gpus() -> list[GpuInfo]:
    """This machine's NVIDIA GPUs: NVML (nvidia-ml-py) when installed, else nvidia-smi, else none."""
    try:
        return _nvml_gpus()
    except Exception:  # no library, no driver, no device: NVML raises its own error types
        pass
    try:
        return _smi_gpus()
    except (OSError, ValueError, subprocess.SubprocessError):
        return []


def _jtop_board() -> dict:
    """jetson-stats' board description ({"hardware": {...}, "platform": {...}, "libraries": {...}})."""
    try:
        from jtop import jtop

        with jtop() as j:
            return dict(j.board)
    except Exception:  # not installed, no jtop service, or not a Jetson
        return {}


def jetson_model() -> str | None:
    """The Jetson (Orin, Thor, ...) module this runs on, from jetson-stats or the device tree."""
    model = str(_jtop_board().get("hardware", {}).get("Module", ""))
    if not model:
        try:
            model = DEVICE_TREE_MODEL.read_text(errors="replace").strip("\x00\n ")
        except OSError:
            model = ""
    low = model.lower()
    return model if "jetson" in low or "thor" in low else None


def l4t_release() -> str | None:
    """The L4T (Linux for Tegra) release JetPack installed, e.g. "36.4.3"."""
    try:
        head = NV_TEGRA_RELEASE.read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    major = head.split("R", 1)[-1].split()[0] if "R" in head else ""
    revision = head.split("REVISION:", 1)[-1].split(",")[0].strip() if "REVISION:" in head else ""
    return f"{major}.{revision}" if major.isdigit() and revision else None


def jetpack_version() -> str | None:
    """JetPack's version: jetson-stats when installed, else the nvidia-jetpack package's."""
    found = str(_jtop_board().get("hardware", {}).get("Jetpack", "") or "")
    if found:
        return found
    dpkg = shutil.which("dpkg-query")
    if not dpkg:
        return None
    try:
        r = subprocess.run([dpkg, "-W", "-f=${Version}", "nvidia-jetpack"], capture_output=True, text=True,
                           timeout=SMI_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    version = r.stdout.strip().split("+")[0] if r.returncode == 0 else ""
    return version or None
