"""Bundles: the self-describing directory an export writes and a device runs.

    DIR/manifest.json   what is inside, with a sha256 per artifact (written last)
    DIR/vision.onnx     pixel_values (B, 3, H, W) -> image_features (B, P, C)
    DIR/mqt.onnx        image_features, query_ids (m,) -> visual_tokens (B, m, hidden)
    DIR/llm-<quant>.gguf

Torch-free: the runtime opens bundles. An export is built in a hidden staging directory beside
DIR and moved into place only once the manifest is written, so an interrupted export never leaves a
directory that `Bundle.open` accepts.

Re-exporting onto a bundle replaces only what that bundle owns (manifest.json and the artifacts it
lists); anything else the user put in DIR stays. The replacement is journalled: DIR/.mqt-edge-replacing.json
lists the files in play, manifest.json is removed first (so `run` refuses the directory from then
on) and written last; after a kill mid-way the next export treats the journalled files as the bundle's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import ClassVar

from .atomic import atomic_dir, move_into_place, remove_stale_staging  # noqa: F401 (the exporters import it here)
from .errors import InputError, MQTEdgeError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_BUNDLE = Path("mqt-edge-bundle")
JOURNAL = ".mqt-edge-replacing.json"  # present only while a re-export swaps files in DIR
# Names an export may write into DIR: a user file by one of these names would be overwritten.
ARTIFACT_NAMES = re.compile(r"^(vision(-ort|-int8)?\.onnx|mqt\.onnx)(\.data)?$|^llm-\w+\.gguf$|^(vision|mqt)\.engine$")


# -- the manifest's schema: (type, required) per key; a table so a new key is one row ----------------
# Types: "int" (not bool), "num" (finite int or float), "str", "bool", "int_list" (ints >= 0, any
# length), "counts" (name -> an int >= 0), "shapes" (name -> a shape: ints >= 0 and axis names),
# "dict" / "list" (free-form records the runtime only displays), a nested table, or [table] (a list
# of such records). Unknown keys and wrong types are refused.
def _ints(n: int) -> tuple[str, int]:
    return ("ints", n)


def _nums(n: int) -> tuple[str, int]:
    return ("nums", n)


_FILE = {"path": ("str", True), "sha256": ("sha256", True), "bytes": ("int", True)}
_ARTIFACT = _FILE | {"data": (_FILE, False), "tensorrt": ("str", False), "gpu": ("str", False),
                     "opt_tokens": ("int", False), "max_batch": ("int", False)}
_ROLES = {"vision": (_ARTIFACT, True), "mqt": (_ARTIFACT, True), "llm": (_ARTIFACT, True),
          "vision_ort": (_ARTIFACT, False), "vision_int8": (_ARTIFACT, False),
          "vision_trt": (_ARTIFACT, False), "mqt_trt": (_ARTIFACT, False)}
_INTS = lambda *names: {n: ("int", True) for n in names}  # noqa: E731
# An ONNX graph's interface as exported; a shape lists ints and the names of dynamic axes ("batch", "m").
_GRAPH = {"inputs": ("shapes", True), "outputs": ("shapes", True), "opset": ("int", True), "layers": ("int", False),
          "max_tokens": ("int", False)}
# One row of `mqt-edge eval`'s table; "tokens" is m here (format 1's key, kept so old bundles still load).
_ACCURACY_ROW = {"tokens": ("int", True), "accuracy": ("num", True), "ttft_ms": ("num", True),
                 "total_ms": ("num", True), "n": ("int", True)}
MANIFEST_SCHEMA: dict = {
    "format_version": ("int", True), "mqt_edge_version": ("str", True), "created": ("str", False),
    "max_tokens": ("int", True), "artifacts": (_ROLES, True),
    "preprocess": ({"size": ("int", True), "crop": (_ints(2), True), "mean": (_nums(3), True),
                    "std": (_nums(3), True), "pad_to_square": ("bool", True), "rescale": ("num", True),
                    "pad_color": (_ints(3), False)}, True),
    "prompt": ({k: ("str", True) for k in ("name", "system", "user", "assistant", "sep", "stop")}
               | {"prefix_tokens": ("int", False)}, True),
    "special_tokens": ({"bos": ("int", True), "eos": ("int_list", True)}, False),
    "llm": (_INTS("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "context_length",
                  "params", "bytes") | {"quant": ("str", True), "tensor_bytes": ("counts", False)}, True),
    "vision": (_INTS("flops", "params", "patches", "feature_dim") | {k: ("int", False) for k in ("layers_run", "image_size")}
               | {"int8": ("dict", False)}, True),
    "mqt": (_INTS("flops_per_image", "flops_per_token") | {k: ("int", False) for k in (
        "params", "num_queries", "max_tokens", "heads", "hidden")}, True),
    "source": ("dict", False), "graphs": ({"vision": (_GRAPH, True), "mqt": (_GRAPH, True)}, False),
    "export": ("dict", False), "parity": ("dict", False),
    "seconds": ("dict", False), "accuracy": ([_ACCURACY_ROW], False), "accuracy_data": ("dict", False),
}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_count(v: object) -> bool:
    return _is_int(v) and v >= 0


_KINDS: dict[str, Callable[[object], bool]] = {
    "int": _is_count, "num": _is_real, "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict), "list": lambda v: isinstance(v, list),
    "sha256": lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
    "int_list": lambda v: isinstance(v, list) and all(_is_count(x) for x in v),
    "counts": lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_count(n) for k, n in v.items()),
    # One axis of a shape: a fixed size, or the name of a dynamic axis ("batch", "m").
    "shape": lambda v: isinstance(v, list) and all(_is_count(x) or (isinstance(x, str) and x) for x in v),
}


def _type_ok(kind, value) -> bool:
    if isinstance(kind, tuple):  # ("ints" | "nums", length)
        each = _is_int if kind[0] == "ints" else _is_real
        return isinstance(value, list) and len(value) == kind[1] and all(each(v) for v in value)
    return _KINDS[kind](value)


def _shape_errors(value: object, name: str) -> list[str]:
    """A graph's inputs or outputs: each name maps to a shape (checked per name, so the error names it)."""
    if not isinstance(value, dict):
        return [f"{name}: {value!r:.40} is not an object"]
    return [f"{name}.{k}: {shape!r:.40} is not {_KIND_NAMES['shape']}" for k, shape in value.items()
            if not _type_ok("shape", shape)]


def schema_errors(data: object, schema: dict = MANIFEST_SCHEMA, where: str = "") -> list[str]:
    """Every way `data` breaks `schema`, as 'key: problem' strings (empty when it conforms)."""
    if not isinstance(data, dict):
        return [f"{where.rstrip('.') or 'the manifest'}: not an object"]
    errors = [f"{where}{k}: unknown key" for k in data if k not in schema]
    for key, (kind, required) in schema.items():
        name = f"{where}{key}"
        if key not in data:
            errors += [f"{name}: missing"] if required else []
        elif isinstance(kind, dict):
            errors += schema_errors(data[key], kind, name + ".")
        elif isinstance(kind, list):
            rows = data[key]
            errors += ([f"{name}: {rows!r:.40} is not a list"] if not isinstance(rows, list) else
                       [e for i, row in enumerate(rows) for e in schema_errors(row, kind[0], f"{name}[{i}].")])
        elif kind == "shapes":
            errors += _shape_errors(data[key], name)
        elif not _type_ok(kind, data[key]):
            errors.append(f"{name}: {data[key]!r:.40} is not {_KIND_NAMES.get(kind if isinstance(kind, str) else kind[0], kind)}"
                          + (f" (x{kind[1]})" if isinstance(kind, tuple) else ""))
    return errors


_KIND_NAMES = {"int": "an integer >= 0", "num": "a finite number", "str": "a string", "bool": "true/false",
               "dict": "an object", "list": "a list", "sha256": "64 hex digits", "ints": "a list of integers",
               "nums": "a list of numbers", "int_list": "a list of integers >= 0",
               "counts": "an object of integers >= 0",
               "shape": "a shape (a list of sizes >= 0 and axis names)"}


class BundleError(MQTEdgeError):
    """A bundle is missing, corrupt, or of a format this version cannot read."""


# -- the manifest as records: with the schema above, the only code that knows manifest.json's layout ----
# Display-only parts (source, export, parity, seconds, accuracy_data, vision.int8) stay free-form
# dicts; everything the runtime or the planner acts on is a typed field. None means "not in the file".
@dataclass(frozen=True)
class FileEntry:
    """One file of the bundle, checked by size and sha256 before anything runs."""

    path: str  # relative to the bundle directory
    sha256: str
    bytes: int


@dataclass(frozen=True, kw_only=True)
class Artifact(FileEntry):
    """A graph, engine or GGUF file, with the ONNX external data beside it if any."""

    data: FileEntry | None = None  # NAME.data, for a graph over protobuf's 2 GiB
    tensorrt: str | None = None  # engines only: the TensorRT version that built them,
    gpu: str | None = None  # the GPU they were built on,
    opt_tokens: int | None = None  # and their optimisation profile
    max_batch: int | None = None

    def files(self) -> tuple[FileEntry, ...]:
        return (self, self.data) if self.data else (self,)

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files())

    @classmethod
    def from_json(cls, d: dict) -> Artifact:
        return cls(**(d | ({"data": FileEntry(**d["data"])} if "data" in d else {})))


@dataclass(frozen=True, kw_only=True)
class Preprocess:
    size: int  # shortest edge after resize
    crop: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad_to_square: bool
    rescale: float
    pad_color: tuple[int, int, int] | None = None


@dataclass(frozen=True, kw_only=True)
class Prompt:
    name: str
    system: str
    user: str
    assistant: str
    sep: str
    stop: str
    prefix_tokens: int | None = None  # BOS + the prompt before <image>


@dataclass(frozen=True)
class SpecialTokens:
    bos: int
    eos: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class LLMFacts:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    context_length: int
    params: int
    quant: str  # a QUANTS name: the GGUF's weight type
    bytes: int  # of the GGUF
    tensor_bytes: dict | None = None  # the GGUF's tensor bytes by ggml type ("Q4_K": ..., "Q6_K": ...)


@dataclass(frozen=True, kw_only=True)
class VisionFacts:
    flops: int  # per image
    params: int
    patches: int  # P
    feature_dim: int  # C
    layers_run: int | None = None
    image_size: int | None = None
    int8: dict | None = None  # how vision-int8.onnx was quantised (display only)


@dataclass(frozen=True, kw_only=True)
class MQTFacts:
    flops_per_image: int  # the part of the MQT cost independent of m
    flops_per_token: int
    params: int | None = None
    num_queries: int | None = None
    max_tokens: int | None = None
    heads: int | None = None
    hidden: int | None = None


@dataclass(frozen=True, kw_only=True)
class Graph:
    """An exported ONNX graph's interface: what TensorRT's optimisation profiles are built from."""

    inputs: Mapping[str, tuple[int | str, ...]]  # name -> shape; a str is a dynamic axis ("batch", "m")
    outputs: Mapping[str, tuple[int | str, ...]]
    opset: int
    layers: int | None = None  # vision: the CLIP layers the graph runs
    max_tokens: int | None = None  # mqt: the largest m it serves

    @classmethod
    def from_json(cls, d: dict) -> Graph:
        shapes = {k: {name: tuple(shape) for name, shape in d[k].items()} for k in ("inputs", "outputs")}
        return cls(**(d | shapes))


@dataclass(frozen=True)
class AccuracyRow:
    """Accuracy and times at m visual tokens, one row of `mqt-edge eval`'s table."""

    m: int
    accuracy: float  # the share of answers whose first word is right
    ttft_ms: float
    total_ms: float
    n: int  # questions scored
    JSON_KEYS: ClassVar[Mapping[str, str]] = {"m": "tokens"}  # field -> manifest.json key, where they differ

    @classmethod
    def from_json(cls, d: dict) -> AccuracyRow:
        return cls(**{f.name: d[cls.JSON_KEYS.get(f.name, f.name)] for f in fields(cls)})


# -- the export's parity report (manifest "parity"), read for display --------------------------------
# The exporters write it (exporters/onnx_graphs, onnx_quant, gguf_llm, quants.Quant.judge); this is the
# only code that reads it, so the CLI prints ParityCheck rows and never looks inside the report.
GGUF_PARITY = "gguf_"  # report key prefix of a GGUF check, before its weight type: gguf_f32, gguf_q4_k_m
TOKEN_REPORTS = ("m=", "ids=")  # an ONNX entry's visual-token reports (beside "features" and "pass")


def gguf_parity_key(quant: str) -> str:
    """The parity report's key for the check of llm-QUANT.gguf."""
    return GGUF_PARITY + quant


@dataclass(frozen=True)
class ParityCheck:
    """One parity check of an export, as the export summary shows it."""

    name: str  # what it checked, where one role has several ("f32", "q4_k_m"); "" otherwise
    passed: bool
    enforced: bool  # False: figures of a random-weight model, reported without gating the export
    figures: str  # the deciding numbers, short

    @property
    def verdict(self) -> str:
        return "FAIL" if not self.passed else "pass" if self.enforced else "reported"

    def __str__(self) -> str:
        return f"{self.name} {self.verdict}: {self.figures}" if self.name else f"{self.verdict}: {self.figures}"


def _int8_checks(parity: dict, role: str) -> list[ParityCheck]:
    r = parity["vision_int8"]
    agreement = r.get("answer_agreement", float("nan"))  # absent when the export stopped before the GGUF
    return [ParityCheck("", r["pass"], r["enforced"],
                        f"worst token cosine {r['min_token_cosine']:.4f}, answers {agreement:.0%} same as fp32")]


def _onnx_checks(parity: dict, role: str) -> list[ParityCheck]:
    entry = parity["onnx"]["vision_ort" if role == "vision_ort" else "vision"]  # mqt.onnx is checked behind vision.onnx
    worst = max(v["max_abs_err"] for k, v in entry.items() if k.startswith(TOKEN_REPORTS))
    return [ParityCheck("", entry["pass"], True, f"tokens max err {worst:.1e}")]


def _gguf_checks(parity: dict, role: str) -> list[ParityCheck]:
    checks = []
    for key, r in parity.items():
        if key.startswith(GGUF_PARITY):  # the unquantised conversion's check is by rel err, a quant's by KL
            figs = f"rel {r['rel_err']:.1e}" if "max_rel_err" in r["thresholds"] else f"KL {r['kl']:.3f}"
            checks.append(ParityCheck(key[len(GGUF_PARITY):], r["pass"], r.get("enforced", True),
                                      f"{figs}, top-1 {r['top1']:.0%}"))
    return checks


# Artifact role -> its checks in the report. Roles without a row (TensorRT engines) have no parity run.
_PARITY_CHECKS: dict[str, Callable[[dict, str], list[ParityCheck]]] = {
    "vision": _onnx_checks, "vision_ort": _onnx_checks, "mqt": _onnx_checks, "vision_int8": _int8_checks,
    "llm": _gguf_checks}


# Manifest fields that are records, and how each is read from its checked JSON object.
_RECORDS = {"preprocess": Preprocess, "prompt": Prompt, "special_tokens": SpecialTokens, "llm": LLMFacts,
            "vision": VisionFacts, "mqt": MQTFacts}


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What a bundle is: its artifacts by role, and the facts the runtime and the planner need."""

    format_version: int = FORMAT_VERSION
    mqt_edge_version: str
    created: str | None = None  # ISO 8601, UTC
    max_tokens: int  # the largest m the MQT graph serves
    artifacts: Mapping[str, Artifact]  # role (vision, mqt, llm, vision_ort, vision_int8, vision_trt, mqt_trt)
    source: dict | None = None
    graphs: Mapping[str, Graph] | None = None  # vision and mqt: each graph's input and output shapes
    preprocess: Preprocess
    prompt: Prompt
    special_tokens: SpecialTokens | None = None
    llm: LLMFacts
    vision: VisionFacts
    mqt: MQTFacts
    export: dict | None = None  # the export's options
    parity: dict | None = None  # the export's parity report per check ({} when skipped)
    seconds: dict | None = None
    accuracy: tuple[AccuracyRow, ...] | None = None  # `mqt-edge eval`'s table, by m
    accuracy_data: dict | None = None

    def has(self, role: str) -> bool:
        return role in self.artifacts

    @property
    def source_name(self) -> str | None:
        """What the bundle was exported from: the synth preset, else the model as given to export."""
        source = self.source or {}
        return (source.get("synth") or {}).get("preset", source.get("model"))

    def parity_checks(self, role: str) -> list[ParityCheck] | None:
        """The export's parity checks of one artifact; None when the export skipped parity."""
        if not self.parity:
            return None
        read = _PARITY_CHECKS.get(role)
        return read(self.parity, role) if read else []

    def parity_summary(self, role: str) -> str:
        """One artifact's parity, as the export summary's cell."""
        checks = self.parity_checks(role)
        if checks is None:
            return "skipped"
        return "; ".join(map(str, checks)) if role in _PARITY_CHECKS else "built on this device"

    @classmethod
    def from_json(cls, data: object, where: str = "the manifest") -> Manifest:
        """Parse strictly: unknown keys, wrong types and unreadable formats are one BundleError."""
        data = _upgrade(data, where)
        problems = schema_errors(data)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise BundleError(f"{where} is not a valid bundle manifest: {problems[0]}{more}", "re-export the bundle")
        if data["max_tokens"] < 1:
            raise BundleError(f"{where} has max_tokens {data['max_tokens']}", "re-export the bundle")
        parsed = {key: _tuples(kind, data[key]) for key, kind in _RECORDS.items() if key in data}
        parsed["artifacts"] = {role: Artifact.from_json(e) for role, e in data["artifacts"].items()}
        if "graphs" in data:
            parsed["graphs"] = {role: Graph.from_json(g) for role, g in data["graphs"].items()}
        if "accuracy" in data:
            parsed["accuracy"] = tuple(AccuracyRow.from_json(row) for row in data["accuracy"])
        return cls(**(data | parsed))

    def to_json(self) -> dict:
        """The manifest.json object: `Manifest.from_json(m.to_json()) == m`."""
        return _plain(self)


def _tuples(kind: type, d: dict):
    """A flat record from its checked JSON object; its lists become tuples so it stays immutable."""
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _plain(value):
    """Records as JSON objects without their absent (None) fields, under their JSON_KEYS names;
    tuples as lists; the rest as is."""
    if is_dataclass(value):
        keys = getattr(value, "JSON_KEYS", {})
        return {keys.get(f.name, f.name): _plain(getattr(value, f.name)) for f in fields(value)
                if getattr(value, f.name) is not None}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


# Format N -> N + 1, for every format this version still reads (a layout change bumps FORMAT_VERSION and
# adds its row here). None yet: format 1 is the first, and is today's layout.
UPGRADES: dict[int, Callable[[dict], dict]] = {}
FIRST_FORMAT = min(UPGRADES, default=FORMAT_VERSION)


def _upgrade(data: object, where: str) -> dict:
    """The manifest in today's layout, or one line saying to re-export."""
    version = data.get("format_version") if isinstance(data, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{where} has no bundle format_version (it is not an mqt-edge manifest, or too old)",
                          "re-export the bundle with this mqt-edge")
    if version > FORMAT_VERSION:
        raise BundleError(f"{where} has bundle format {version}; this mqt-edge reads formats "
                          f"{FIRST_FORMAT}-{FORMAT_VERSION}",
                          "upgrade mqt-edge (pip install -U mqt-edge) or re-export with this version")
    if version < FIRST_FORMAT:
        raise BundleError(f"{where} has bundle format {version}, older than this mqt-edge reads "
                          f"({FIRST_FORMAT}-{FORMAT_VERSION})", "re-export the bundle with this mqt-edge")
    while version < FORMAT_VERSION:
        data, version = UPGRADES[version](data), version + 1
    return data


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def artifact_entry(root: Path, rel: str) -> Artifact:
    """The Artifact of a file under root, including its ONNX external data if any."""
    path = root / rel
    data = path.with_name(path.name + ".data")
    extra = FileEntry(data.name, sha256_file(data), data.stat().st_size) if data.is_file() else None
    return Artifact(path=rel, sha256=sha256_file(path), bytes=path.stat().st_size, data=extra)


@dataclass
class Bundle:
    root: Path
    manifest: Manifest

    @classmethod
    def open(cls, root: str | os.PathLike = DEFAULT_BUNDLE, verify: bool = True) -> Bundle:
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise BundleError(
                f"no bundle at {root} (no {MANIFEST})",
                "make one with: mqt-edge export MODEL --out " + str(root),
            )
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{path} is corrupt ({exc})", "re-export the bundle") from None
        manifest = Manifest.from_json(data, str(path))
        _check_inside(root, manifest.artifacts)
        bundle = cls(root, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Check every artifact's size and sha256 against the manifest."""
        for role, entry in self.manifest.artifacts.items():
            for item in entry.files():
                path = self.root / item.path
                if not path.is_file():
                    raise BundleError(f"bundle artifact missing: {path} ({role})", "re-export the bundle")
                if path.stat().st_size != item.bytes or sha256_file(path) != item.sha256:
                    raise BundleError(
                        f"bundle artifact {path} does not match its sha256 in {MANIFEST} ({role})",
                        "the file is corrupt or was changed; re-export or re-copy the bundle",
                    )

    def path(self, role: str) -> Path:
        if not self.manifest.has(role):
            raise BundleError(f"the bundle at {self.root} has no '{role}' artifact", "re-export it")
        return self.root / self.manifest.artifacts[role].path

    @property
    def max_tokens(self) -> int:
        return self.manifest.max_tokens


def _check_inside(root: Path, artifacts: Mapping[str, Artifact]) -> None:
    """Every artifact path resolves inside the bundle directory (symlinks followed)."""
    base = root.resolve()
    for role, entry in artifacts.items():
        for item in entry.files():
            if not (root / item.path).resolve().is_relative_to(base):
                raise BundleError(f"bundle artifact '{item.path}' ({role}) points outside {root}",
                                  "re-export the bundle; a bundle never refers to files outside itself")


def check_output_dir(out: Path) -> None:
    """Before any heavy work: an export may write a new path, an empty directory, or an existing
    bundle (replacing only its own files); every directory it writes to must be writable."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory", "choose another --out")
    if out.exists() and (out.resolve() == Path.cwd().resolve() or out.resolve().parent == out.resolve()):
        raise InputError(f"--out {out} is the current or root directory", "name a new directory for the bundle")
    if out.exists() and any(out.iterdir()):
        if not is_bundle(out) and not (out / JOURNAL).is_file():
            raise InputError(
                f"{out} exists and is not an mqt-edge bundle",
                "choose another --out (an export only replaces an existing bundle)",
            )
        owned = owned_files(out)
        clash = sorted(p.name for p in out.iterdir() if ARTIFACT_NAMES.match(p.name) and p.name not in owned)
        if clash:
            raise InputError(f"{out / clash[0]} is not part of the bundle there, and an export would overwrite it",
                             "move it out of the way (an export never replaces files it does not own)")
        _check_writable(out, out)
    _check_writable(out.parent, out)  # the staging directory goes beside `out`


def _check_writable(path: Path, out: Path) -> None:
    """Create and remove a directory in the nearest existing ancestor: the only test that sees
    read-only mounts, immutable directories and pseudo-filesystems (/proc) alike."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"--out {out} is inside {probe}, which is a file", "choose another --out")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mqt-edge-write-test-", dir=probe))
    except OSError as exc:
        raise InputError(f"cannot write to {probe} for --out {out} ({exc.strerror or exc})",
                         "choose a writable --out") from None


def is_bundle(path: Path) -> bool:
    """A directory an export may replace: its manifest is one of ours (not any manifest.json)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return isinstance(manifest, dict) and "mqt_edge_version" in manifest and "format_version" in manifest
    except (OSError, ValueError):
        return False


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def owned_files(out: Path) -> set[str]:
    """Names directly in `out` that its bundle owns: the manifest, the artifacts it lists (with
    their external data), and the files of an interrupted replacement (the journal)."""
    names = {MANIFEST, MANIFEST + ".tmp", JOURNAL}
    for source in (MANIFEST, JOURNAL):
        try:
            data = json.loads((out / source).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        if source == JOURNAL:
            names.update(data.get("files", []) if isinstance(data.get("files"), list) else [])
            continue
        for entry in (data.get("artifacts") or {}).values() if isinstance(data.get("artifacts"), dict) else []:
            for item in (entry, entry.get("data") if isinstance(entry, dict) else None):
                if isinstance(item, dict):
                    names.add(item.get("path"))
    return {n for n in names if _plain_name(n)}


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Ctrl-C waits until the files are swapped (a few renames): a bundle is never half-replaced."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda sig, frame: pressed.append(sig))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)  # a Ctrl-C during the swap lets the export finish


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """Yield a hidden directory beside `out`; on success its files replace `out`'s bundle, on failure it vanishes."""
    with atomic_dir(out, _install) as tmp:
        yield tmp


def _install(tmp: Path, out: Path) -> None:
    if not (tmp / MANIFEST).is_file():
        raise RuntimeError("staging finished without a manifest")  # a bug, not a user error
    with _sigint_deferred():
        if out.is_dir() and any(out.iterdir()):
            _replace_owned(tmp, out)
        else:
            move_into_place(tmp, out)


def _replace_owned(tmp: Path, out: Path) -> None:
    """Move the new bundle's files into `out`, remove the old bundle's other files, keep the rest."""
    new = sorted(p.name for p in tmp.iterdir() if p.name != MANIFEST)
    old = owned_files(out) - {MANIFEST, MANIFEST + ".tmp", JOURNAL}
    clash = [n for n in new if (out / n).exists() and n not in old]
    if clash:
        raise InputError(f"{out / clash[0]} is not part of the bundle there, and an export would overwrite it",
                         "move it out of the way; nothing was written")
    _write_json(out / JOURNAL, {"files": sorted(set(new) | old)})
    (out / MANIFEST).unlink(missing_ok=True)  # from here on `run` refuses the directory
    for name in new:
        os.replace(tmp / name, out / name)
    for name in sorted(old - set(new)):
        path = out / name
        if path.is_file() or path.is_symlink():  # never a directory the user made
            path.unlink()
    os.replace(tmp / MANIFEST, out / MANIFEST)  # the new bundle exists
    (out / JOURNAL).unlink()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Written last, via a temporary name: its presence is what makes a directory a bundle."""
    _write_json(root / MANIFEST, manifest.to_json())
