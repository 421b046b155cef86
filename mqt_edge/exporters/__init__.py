"""Exporters: an MQT-LLaVA checkpoint -> a verified bundle a device runs without torch.

One front door, `export(ExportOptions(...))`. The export is a loop over FORMATS: each row names
what it writes, what it needs installed, when the options ask for it, and its `build` and `check`,
which live in the row's own module and share one ExportJob (job.py). Options and each enabled row's
dependencies are validated before any work starts. The export is staged in a hidden directory and
renamed into place only after every check passed and the manifest is written.

A new export target is one module (with `build(job)` and, if it has a parity check, `check(job)`)
plus one FORMATS row; the manifest picks up what its build puts in `job.artifacts` / `job.entries`
(a new artifact role is also declared once in bundle.py's manifest schema, which the device reads).
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Callable

from ..bundle import DEFAULT_BUNDLE, Bundle, check_output_dir, remove_stale_staging, staging, write_manifest
from ..errors import InputError, TokensError
from ..quants import get_quant
from .job import ExportError, ExportJob, job_manifest, timed
from .source import check_disk, load_job
from ..runtimes.engines import build_engines_in_bundle  # noqa: F401  (export's public name)


@dataclass(frozen=True)
class ExportOptions:
    model: str
    out: Path = DEFAULT_BUNDLE
    max_tokens: int | None = None  # default: the model's M
    quant: str = "q4_k_m"
    vision_tower: str | None = None
    tensorrt: bool = False
    optimize: int = 0  # optimum ORT optimisation level for vision (0: none; 1, 2, 99)
    vision_quant: str = "fp32"  # fp32, or int8: also write vision-int8.onnx (onnx_quant.py)
    opt_tokens: int = 64  # TensorRT profile's "opt" m
    max_batch: int = 4  # TensorRT profiles' largest batch
    parity: bool = True
    threads: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


@dataclass
class ExportResult:
    bundle: Bundle
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """A format module's function, imported on first call: validate() and `mqt-edge engine` import
    this package where torch (which most format modules need) is absent."""

    module: str  # under mqt_edge.exporters
    name: str

    def resolve(self) -> Callable[[ExportJob], None]:
        return getattr(import_module(f"{__name__}.{self.module}"), self.name)

    def __call__(self, job: ExportJob) -> None:
        self.resolve()(job)


def _nothing(job: ExportJob) -> None:
    pass


def _tensorrt_here() -> None:
    from ..runtimes.tensorrt import load_tensorrt

    load_tensorrt()  # also needs a GPU; says how to install TensorRT on Jetson


@dataclass(frozen=True)
class Format:
    name: str
    artifacts: str
    what: str
    modules: tuple[str, ...]  # what must be importable, checked before work starts
    extra: str
    build: Callable[[ExportJob], None] = _nothing
    check: Callable[[ExportJob], None] = _nothing  # run when opts.parity; raises ExportError on a failure
    when: Callable[[ExportOptions], bool] = lambda opts: True
    probe: Callable[[], None] | None = None  # replaces the import check where that is not enough

    def require(self) -> None:
        """Raise one line saying what to install when this format cannot run here."""
        if self.probe is not None:
            return self.probe()
        _check_modules(self)


_ONNX = ("torch", "onnx", "onnxruntime", "onnxscript", "optimum.exporters.onnx")
_GGUF = ("gguf", "llama_cpp", "sentencepiece")
_int8 = lambda opts: opts.vision_quant == "int8"  # noqa: E731

# In order: a row may read what earlier rows wrote into the job. "gguf" frees the torch model, so
# every check that needs PyTorch comes before it, and "int8_answers" (greedy answers through the
# final GGUF) after "quantize".
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("onnx", "vision.onnx, mqt.onnx (+ vision-ort.onnx with --optimize)",
               "CLIP tower and query transformer; dynamic batch and m", _ONNX, "export",
               Step("onnx_graphs", "build"), Step("onnx_graphs", "check")),
        Format("vision_int8", "vision-int8.onnx", "INT8 vision graph for onnxruntime on CPUs", _ONNX, "export",
               Step("onnx_quant", "build"), Step("onnx_quant", "check"), when=_int8),
        Format("gguf", "llm-f32.gguf or llm-f16.gguf", "the LLaMA for llama.cpp, converted unquantised", _GGUF,
               "export", Step("gguf_llm", "build"), Step("gguf_llm", "check")),
        Format("quantize", "llm-<quant>.gguf", "llama.cpp's quantisation: q8_0, q5_k_m, q4_k_m, q4_0", _GGUF, "export",
               Step("gguf_llm", "build_quantised"), Step("gguf_llm", "check_quantised"),
               when=lambda opts: get_quant(opts.quant).quantised),
        Format("int8_answers", "(a check only)", "int8 vision's greedy answers against fp32's, through the GGUF",
               _GGUF, "export", check=Step("onnx_quant", "check_answers"), when=_int8),
        Format("tensorrt", "vision.engine, mqt.engine", "FP16 engines, built on the target device",
               ("tensorrt",), "tensorrt", Step("tensorrt", "build"), when=lambda opts: opts.tensorrt,
               probe=_tensorrt_here),
    )
}


def enabled(opts: ExportOptions) -> list[Format]:
    """The rows these options ask for, in export order."""
    return [f for f in FORMATS.values() if f.when(opts)]


def _check_modules(fmt: Format) -> None:
    import importlib.util

    from ..errors import MissingDependencyError

    for mod in fmt.modules:
        try:
            found = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise MissingDependencyError(
                f"'{mod}' is needed for the {fmt.name} export but is not installed",
                f"install it with: pip install 'mqt-edge[{fmt.extra}]'",
            )


def validate(opts: ExportOptions) -> None:
    """Everything that can be checked before loading a model; --out first, before torch is imported."""
    check_output_dir(Path(opts.out))
    get_quant(opts.quant)
    if opts.max_tokens is not None and (isinstance(opts.max_tokens, bool) or opts.max_tokens < 1):
        raise TokensError(f"--max-tokens {opts.max_tokens} is below 1", "choose 1..M (the model's query count)")
    if opts.optimize not in (0, 1, 2, 99):
        raise InputError(f"--optimize {opts.optimize} is not a level", "choose 0, 1, 2 or 99")
    from .onnx_quant import check_vision_quant

    check_vision_quant(opts.vision_quant)
    for fmt in enabled(opts):
        fmt.require()


@contextmanager
def quiet_tools():
    """Silence the exporters' chatter (tracer warnings, llama.cpp's per-tensor log); errors still raise."""
    import logging
    import warnings

    names = ("torch.onnx", "torch._dynamo", "torch.export", "optimum", "transformers", "llama-cpp-python",
             "gguf", "onnxscript")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


@contextmanager
def native_stderr_silenced():
    """Send file descriptor 2 (C libraries' logs: llama.cpp, torch's C++ logging) to a temporary
    file; if the block fails, replay it so the diagnostic is not lost."""
    import sys
    import tempfile

    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), fd)
        try:
            yield
        except BaseException:
            os.dup2(saved, fd)
            log.seek(0)
            tail = log.read()[-4000:].decode(errors="replace")
            if tail.strip():
                sys.stderr.write(tail)
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)


def export(opts: ExportOptions, on_stage: Callable[[str], None] = lambda s: None) -> ExportResult:
    """Build a bundle from a checkpoint. Raises MQTEdgeError (nothing written) on any failure."""
    validate(opts)  # before torch is imported or a model loaded: a bad --out costs milliseconds
    out = Path(opts.out).absolute()
    if out.parent.is_dir():
        remove_stale_staging(out.parent)  # left by killed exports; never one whose process is alive
    with quiet_tools(), native_stderr_silenced():
        return _export(opts, on_stage)


def _export(opts: ExportOptions, on_stage: Callable[[str], None]) -> ExportResult:
    seconds: dict[str, float] = {}
    with timed("load", on_stage, seconds):
        job = load_job(opts, on_stage, seconds)
        check_disk(job)
    out = Path(opts.out)
    try:
        with staging(out) as tmp:
            job.tmp = tmp
            for fmt in enabled(opts):
                fmt.build(job)
                if opts.parity:
                    fmt.check(job)
            with job.stage("manifest"):
                write_manifest(tmp, job_manifest(job))
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ExportError("the disk filled up during the export",
                              "free some space or choose another --out; nothing was written") from None
        raise
    return ExportResult(Bundle.open(out, verify=False), job.seconds)


__all__ = ["FORMATS", "ExportError", "ExportJob", "ExportOptions", "ExportResult", "Format", "Step",
           "build_engines_in_bundle", "enabled", "export", "validate"]
