"""Device profiles: data files with a strict schema, and device detection.

A profile is a TOML file (the built-ins live beside this module). Every key is checked: an unknown
or misspelt key is an error naming the key and its line, never a silent default. `repr(profile)`
rebuilds the call that loads it.
"""

from __future__ import annotations

import math
import re
from operator import ge, gt, lt
import sys
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

from .. import device
from ..backends import BACKENDS, VISION_BACKENDS
from ..errors import MQTEdgeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

HERE = Path(__file__).parent
ORIN_FALLBACK = "jetson-agx-orin-64gb"


class ProfileError(MQTEdgeError):
    """A profile name is unknown or a profile file is malformed."""


@dataclass(frozen=True)
class Memory:
    total_gb: float
    usable_gb: float  # what the model may use: Jetson memory is shared with the OS and CUDA context
    bandwidth_gbs: float
    unified: bool  # CPU and GPU share it (Jetson)


@dataclass(frozen=True)
class Compute:
    fp16_tflops: float  # dense tensor-core FP16 (CPU profiles: the CPU's float rate)
    int8_tops: float
    cpu_cores: int
    cpu_gflops: float  # the CPU's float rate, for vision-on-CPU


@dataclass(frozen=True)
class Limits:
    ttft_ms: float
    memory_mb: float


@dataclass(frozen=True)
class Prefer:
    quant: str
    vision_backend: str
    llm_on_gpu: bool


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the roofline peaks that real kernels reach (refined by calibration)."""

    compute: float = 0.35
    bandwidth: float = 0.65
    cpu: float = 0.3


@dataclass(frozen=True)
class Calibration:
    """Measured on a device by `mqt-edge calibrate` with one bundle; the planner scales it to others."""

    vision_ms: float
    mqt_ms_fixed: float
    mqt_ms_per_token: float
    prefill_ms_fixed: float
    prefill_ms_per_token: float
    decode_ms_per_token: float
    peak_mb: float
    llm_params: int
    llm_bytes: int
    vision_flops: int
    bundle: str = ""
    vision_precision: str = "fp32"  # of the vision graph measured: fp32 | int8
    # ((n sequences, total decode tokens/s), ...) with one llama_decode per step; () when not measured
    batch_tok_s: tuple = ()
    # ((positions, ms), ...): the median prefill of one request at each calibrated m; () when not measured
    prefill_points: tuple = ()


DATASHEET = ("total_gb", "usable_gb", "bandwidth_gbs", "fp16_tflops", "int8_tops", "cpu_cores", "cpu_gflops")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    kind: str  # jetson | gpu | cpu
    memory: Memory
    compute: Compute
    limits: Limits
    prefer: Prefer
    sources: dict = field(default_factory=dict)
    modes: dict = field(default_factory=dict)  # name -> {field: value, "source": str}
    efficiency: Efficiency = Efficiency()
    calibration: Calibration | None = None
    mode: str | None = None
    path: str | None = None

    def __repr__(self) -> str:
        target = self.path if self.path else self.name
        return f"load_profile({target!r}" + (f", mode={self.mode!r})" if self.mode else ")")

    def with_mode(self, mode: str | None) -> Profile:
        """The profile in a power mode (e.g. the Orin Nano's "super")."""
        if mode is None:
            return self
        if mode not in self.modes:
            known = ", ".join(self.modes) or "none"
            raise ProfileError(f"profile {self.name} has no mode '{mode}'", f"its modes: {known}")
        over = {k: v for k, v in self.modes[mode].items() if k != "source"}
        mem = replace(self.memory, **{k: v for k, v in over.items() if k in Memory.__dataclass_fields__})
        comp = replace(self.compute, **{k: v for k, v in over.items() if k in Compute.__dataclass_fields__})
        return replace(self, memory=mem, compute=comp, mode=mode)


# ---- parsing -----------------------------------------------------------------------------------
_TYPES = {float: (int, float), int: (int,), bool: (bool,), str: (str,)}


def _line_of(text: str, key: str, section: str | None) -> int:
    """The line where `key` is set (in `section` when given) or its [key] table starts."""
    current = None
    for i, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s.startswith("["):
            current = s.strip("[]").strip()
            if current == key or current.startswith(key + "."):
                return i
        elif re.match(rf"{re.escape(key)}\s*=", s) and (section is None or current == section):
            return i
    return 0


def _build(cls, data: dict, section: str, text: str, where: str):
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: [{section}] must be a table", "see the built-in profiles for the layout")
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            line = _line_of(text, key, section)
            raise ProfileError(
                f"{where}, line {line}: unknown key '{key}' in [{section}]",
                f"valid keys: {', '.join(known)}",
            )
    values = {}
    for name, f in known.items():
        if name not in data:
            if f.default is MISSING:
                raise ProfileError(f"{where}: [{section}] is missing '{name}'", "add it (see the built-in profiles)")
            continue
        v = data[name]
        if str(f.type) == "tuple":  # calibration's batch_tok_s, prefill_points: [[x, y], ...]
            if not (isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in p) for p in v)):
                raise ProfileError(f"{where}, line {_line_of(text, name, section)}: '{name}' is {v!r}",
                                   "give pairs of numbers, both above 0 (e.g. [[1, 12.5], [2, 20.0]])")
            values[name] = tuple(tuple(p) for p in v)
            continue
        want = {"float": float, "int": int, "bool": bool, "str": str}[str(f.type)]
        line = _line_of(text, name, section)
        if isinstance(v, bool) and want is not bool or not isinstance(v, _TYPES[want]):
            raise ProfileError(f"{where}, line {line}: '{name}' is {v!r}, expected {want.__name__}",
                               "fix the value")
        if want in (int, float) and not (math.isfinite(v) and v >= 0) or (
                want in (int, float) and v == 0 and name in POSITIVE):
            raise ProfileError(f"{where}, line {line}: '{name}' is {v!r}", "use a positive, finite number")
        if section == "efficiency" and not 0 < v <= 1:
            raise ProfileError(f"{where}, line {line}: efficiency '{name}' is {v!r}", "use a fraction in (0, 1]")
        values[name] = want(v)
    return cls(**values)


TOP = {"name", "description", "kind", "memory", "compute", "limits", "prefer", "sources", "modes",
       "efficiency", "calibration"}


POSITIVE = {"total_gb", "usable_gb", "bandwidth_gbs", "fp16_tflops", "int8_tops", "cpu_cores", "cpu_gflops",
            "ttft_ms", "memory_mb", "vision_flops", "llm_params", "llm_bytes"}


def parse_profile(text: str, where: str, path: str | None = None) -> Profile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{where} is not valid TOML ({exc})", "fix the file") from None
    _check_top(data, text, where)
    sources = _checked_sources(data, text, where)
    modes = _checked_modes(data, text, where)
    cal = data.get("calibration")
    precision = cal.get("vision_precision", "fp32") if isinstance(cal, dict) else "fp32"
    if precision not in ("fp32", "int8"):
        raise ProfileError(f"{where}, line {_line_of(text, 'vision_precision', 'calibration')}: "
                           f"'vision_precision' is {precision!r}", "use \"fp32\" or \"int8\"")
    return Profile(
        name=str(data["name"]), description=str(data["description"]), kind=data["kind"],
        memory=_build(Memory, data["memory"], "memory", text, where),
        compute=_build(Compute, data["compute"], "compute", text, where),
        limits=_build(Limits, data["limits"], "limits", text, where),
        prefer=_checked_prefer(_build(Prefer, data["prefer"], "prefer", text, where), text, where),
        sources=dict(sources), modes=dict(modes),
        efficiency=_build(Efficiency, data.get("efficiency", {}), "efficiency", text, where),
        calibration=_build(Calibration, data["calibration"], "calibration", text, where)
        if "calibration" in data else None,
        path=path,
    )


def _checked_prefer(prefer: Prefer, text: str, where: str) -> Prefer:
    """A misspelt backend is refused here, not when a run first asks for it (or, on a CPU, never)."""
    if prefer.vision_backend not in BACKENDS:
        raise ProfileError(f"{where}, line {_line_of(text, 'vision_backend', 'prefer')}: [prefer] vision_backend "
                           f"'{prefer.vision_backend}' is not a vision backend",
                           f"choose one of: {', '.join(VISION_BACKENDS)}")
    return prefer


def _check_top(data: dict, text: str, where: str) -> None:
    for key in data:
        if key not in TOP:
            raise ProfileError(f"{where}, line {_line_of(text, key, None)}: unknown key '{key}'",
                               f"valid top-level keys: {', '.join(sorted(TOP))}")
    for key in ("name", "description", "kind", "memory", "compute", "limits", "prefer"):
        if key not in data:
            raise ProfileError(f"{where} is missing '{key}'", "see the built-in profiles for the layout")
    if data["kind"] not in ("jetson", "gpu", "cpu"):
        raise ProfileError(f"{where}, line {_line_of(text, 'kind', None)}: kind '{data['kind']}'",
                           "use jetson, gpu or cpu")


def _checked_sources(data: dict, text: str, where: str) -> dict:
    """[sources]: text for every datasheet number (unless the profile is calibrated), nothing else."""
    sources = data.get("sources", {})
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        raise ProfileError(f"{where}, line {_line_of(text, 'sources', None)}: [sources] must map keys to text",
                           'e.g. bandwidth_gbs = "vendor data sheet: 68 GB/s"')
    missing = [k for k in DATASHEET if k not in sources]
    if missing and "calibration" not in data:
        raise ProfileError(f"{where}: [sources] has no source for {', '.join(missing)}",
                           "give each datasheet number its source (or calibrate the profile)")
    unknown = [k for k in sources if k not in DATASHEET]
    if unknown:
        raise ProfileError(f"{where}, line {_line_of(text, unknown[0], 'sources')}: unknown key '{unknown[0]}' "
                           "in [sources]", f"valid keys: {', '.join(DATASHEET)}")
    return sources


def _checked_modes(data: dict, text: str, where: str) -> dict:
    """[modes.NAME]: positive [memory] / [compute] overrides, each table with its source."""
    modes = data.get("modes", {})
    if not isinstance(modes, dict) or not all(isinstance(v, dict) for v in modes.values()):
        raise ProfileError(f"{where}, line {_line_of(text, 'modes', None)}: [modes] must hold [modes.NAME] tables",
                           "see jetson-orin-nano-8gb.toml")
    for mode, over in modes.items():
        for key, v in over.items():
            line = _line_of(text, key, f"modes.{mode}")
            if key == "source":
                if not isinstance(v, str):
                    raise ProfileError(f"{where}, line {line}: [modes.{mode}] source must be text", "quote it")
                continue
            if key not in Memory.__dataclass_fields__ and key not in Compute.__dataclass_fields__ or key == "unified":
                raise ProfileError(f"{where}, line {line}: unknown key '{key}' in [modes.{mode}]",
                                   "a mode overrides [memory] or [compute] numbers")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ProfileError(f"{where}, line {line}: [modes.{mode}] '{key}' is {v!r}",
                                   "use a positive, finite number")
        if "source" not in over:
            raise ProfileError(f"{where}: [modes.{mode}] has no source", "say where its numbers come from")
    return modes


def builtin_names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.toml"))


def load_profile(name_or_path: str, mode: str | None = None) -> Profile:
    """A built-in profile by name, the alias `jetson-orin`, `auto`, or a path to a TOML file."""
    if name_or_path == "auto":
        name_or_path, _ = detect()
    elif name_or_path == "jetson-orin":
        name_or_path = detect_jetson() or ORIN_FALLBACK
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ProfileError(f"profile file not found: {path}", "check the path (or use a built-in name)")
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as exc:
            raise ProfileError(f"cannot read profile {path} ({type(exc).__name__})", "save it as UTF-8 TOML") from None
        return parse_profile(text, str(path), str(path)).with_mode(mode)
    builtin = HERE / f"{name_or_path}.toml"
    if not builtin.is_file():
        import difflib

        close = difflib.get_close_matches(name_or_path, builtin_names(), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ProfileError(f"unknown profile '{name_or_path}'{hint}",
                           f"known: {', '.join(builtin_names())}, auto, jetson-orin, or a .toml path")
    return parse_profile(builtin.read_text(), builtin.name).with_mode(mode)


# ---- detection (the probing itself is mqt_edge.device's; here names become profiles) -----------
# Jetson modules: (words the lower-cased module name holds, [(test, GiB of RAM, profile)]). The first
# row whose words all match decides: its first RAM tier that passes gives the profile, none gives None.
# A module no row matches (Xavier, the original Nano, TX2) has no built-in profile.
JETSON_MODULES = (
    (("thor",), ((ge, -math.inf, "jetson-thor"),)),
    (("orin", "nano"), ((gt, 6, "jetson-orin-nano-8gb"),)),  # the 4 GB module has no profile
    (("orin", "nx"), ((gt, 12, "jetson-orin-nx-16gb"),)),  # nor the 8 GB NX
    (("orin",), ((lt, 40, "jetson-agx-orin-32gb"), (ge, 40, "jetson-agx-orin-64gb"))),
)


def detect_jetson() -> str | None:
    """The Orin/Thor profile of this Jetson, from the module name device.py reads."""
    model = (device.jetson_model() or "").lower()
    tiers = next((t for words, t in JETSON_MODULES if all(w in model for w in words)), ()) if model else ()
    if not tiers:
        return None
    ram = _total_ram_gb() or 0
    return next((profile for test, gib, profile in tiers if test(ram, gib)), None)


GPU_NAMES = (("4090", "rtx-4090"), ("3060", "rtx-3060-12gb"), ("l4", "l4"), ("a100", "a100-80gb"),
             ("h100", "h100-80gb"))
# Words that make a card another one than its profile's, whatever its memory: a laptop 4090, a 3060 Ti.
GPU_VARIANTS = ("laptop", " ti", "mobile")


def detect_gpu() -> str | None:
    """A built-in profile for this machine's first NVIDIA GPU (device.gpus: NVML, else nvidia-smi)."""
    found = device.gpus()
    return match_gpu(found[0].name, found[0].memory_gb) if found else None


def match_gpu(name: str, mem_gb: float) -> str | None:
    """A built-in profile for a GPU name, only when its memory matches too (an A100 40GB, a laptop
    4090 or a 3060 Ti is not the profile's card)."""
    low = name.lower()
    if any(word in low for word in GPU_VARIANTS):
        return None
    for key, profile in GPU_NAMES:
        if re.search(rf"\b{key}\b", low):
            total = load_profile(profile).memory.total_gb
            return profile if abs(mem_gb - total) <= 0.15 * total else None
    return None


def detect() -> tuple[str, str]:
    """(profile name, how it was found) for `--profile auto`."""
    jetson = detect_jetson()
    if jetson:
        return jetson, "Jetson module from the device tree"
    gpu = detect_gpu()
    if gpu:
        return gpu, "GPU name and memory from NVML"
    return "cpu", "no Jetson Orin/Thor or known NVIDIA GPU found (run mqt-edge calibrate for this device)"


def _total_ram_gb() -> float | None:
    total = device.total_ram_bytes()
    return total / 2**30 if total else None
