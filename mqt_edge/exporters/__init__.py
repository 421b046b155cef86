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

import datetime as _dt
import errno
import hashlib
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from importlib import import_module
from pathlib import Path
from typing import Callable

from .._version import __version__
from ..bundle import (DEFAULT_BUNDLE, FORMAT_VERSION, Bundle, LLMFacts, Manifest, MQTFacts, Preprocess, Prompt,
                      SpecialTokens, VisionFacts, artifact_entry, check_output_dir, remove_stale_staging, staging,
                      write_manifest)
from ..costs import llm_param_count, mqt_flops, vision_cost
from ..device import available_ram_bytes
from ..errors import InputError, TokensError
from ..quants import get_quant
from .job import ExportError, ExportJob, PromptFacts, timed


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
    from .tensorrt import load_tensorrt

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
        Format("quantize", "llm-<quant>.gguf", "llama.cpp's quantisation: q8_0, q5_k_m, q4_k_m", _GGUF, "export",
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


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _llm_params(cfg: dict) -> int:
    heads = cfg["num_attention_heads"]
    return llm_param_count(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                           cfg["vocab_size"], heads, cfg.get("num_key_value_heads") or heads)


def _vision_cost(model) -> dict:
    v = model.vision.config
    layers = len(model.vision.vision_model.encoder.layers)
    cost = vision_cost(v.hidden_size, v.intermediate_size, layers, v.image_size, v.patch_size)
    params = sum(p.numel() for p in model.vision.parameters())
    return cost | {"params": int(params), "layers_run": layers, "feature_dim": v.hidden_size,
                   "image_size": v.image_size}


def _mqt_cost(mqt, max_tokens: int) -> dict:
    c = mqt.config
    flops = mqt_flops(c.key_grid[0] * c.key_grid[1], c.kv_dim, c.hidden_size)
    return {
        "params": int(sum(p.numel() for p in mqt.parameters())),
        "flops_per_image": flops["flops_per_image"],
        "flops_per_token": flops["flops_per_token"],
        "num_queries": c.num_queries,
        "max_tokens": max_tokens,
        "heads": c.num_heads,
        "hidden": c.hidden_size,
    }


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
        job = _load(opts, on_stage, seconds)
        _check_disk(job)
    out = Path(opts.out)
    try:
        with staging(out) as tmp:
            job.tmp = tmp
            for fmt in enabled(opts):
                fmt.build(job)
                if opts.parity:
                    fmt.check(job)
            with job.stage("manifest"):
                write_manifest(tmp, _manifest(job))
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ExportError("the disk filled up during the export",
                              "free some space or choose another --out; nothing was written") from None
        raise
    return ExportResult(Bundle.open(out, verify=False), job.seconds)


def _load(opts: ExportOptions, on_stage: Callable[[str], None], seconds: dict[str, float]) -> ExportJob:
    """The checkpoint as a torch model, and the job around it."""
    import torch

    from ..model import MQTLlava
    from ..model.checkpoint import LlavaConfig, resolve_model_dir
    from .gguf_llm import intermediate

    ckpt = resolve_model_dir(opts.model)
    raw = LlavaConfig.read(ckpt).raw
    stored = str(raw.get("torch_dtype") or raw.get("dtype") or "float32").removeprefix("torch.")
    # The LLM only serves the logits check; at fp32 a 7B would not fit in RAM, so keep it as stored.
    llm_dtype = "float32" if _llm_params(raw) * 4 < 0.45 * (available_ram_bytes() or 0) else stored
    model = MQTLlava.from_pretrained(ckpt, vision_tower=opts.vision_tower, dtype=torch.float32,
                                     llm_dtype=llm_dtype)
    M = model.num_queries
    max_tokens = M if opts.max_tokens is None else opts.max_tokens
    if max_tokens > M:
        raise TokensError(f"--max-tokens {max_tokens} is above the model's {M} queries", f"choose 1..{M}")
    quant = get_quant(opts.quant)
    prompt = PromptFacts(preprocess=model.image_spec.to_dict(),
                         prompt=model.template.to_dict() | {"prefix_tokens": len(model.prompt_ids("?")[0])},
                         bos=model.bos_id, eos=sorted(model.eos_ids))
    return ExportJob(opts=opts, quant=quant, ckpt=ckpt, raw=raw, model=model, max_tokens=max_tokens,
                     inter=intermediate(quant, stored), llm_dtype=llm_dtype, prompt=prompt,
                     vision_cost=_vision_cost(model), mqt_cost=_mqt_cost(model.mqt, max_tokens),
                     on_stage=on_stage, seconds=seconds)


def _check_disk(job: ExportJob) -> None:
    """Refuse before any file is written when the bundle would not fit (5% margin)."""
    opts, quant, llm_params = job.opts, job.quant, _llm_params(job.raw)
    out = Path(opts.out)
    vision_bytes = job.vision_cost["params"] * 4
    need = vision_bytes * (2 if opts.optimize else 1) + (vision_bytes // 4 if opts.vision_quant == "int8" else 0)
    need += llm_params * (4 if job.inter == "f32" else 2)
    need += 0 if quant.name == job.inter else int(llm_params * quant.bits / 8)
    free = _free_bytes(out.parent.resolve())
    if need * 1.05 > free:
        raise ExportError(
            f"not enough disk space for the export: need about {need / 2**30:.1f} GiB under {out.parent.resolve()}, "
            f"{free / 2**30:.1f} GiB free",
            "free some space or choose another --out",
        )


def _tupled(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _manifest(job: ExportJob) -> Manifest:
    """The bundle's manifest: every artifact's entry (sha256 of the staged file) and what the
    runtime, the planner and `mqt-edge info` read."""
    opts, raw, ckpt = job.opts, job.raw, job.ckpt
    artifacts = {role: artifact_entry(job.tmp, rel) for role, rel in job.artifacts.items()} | job.entries
    heads = int(raw["num_attention_heads"])
    llm = LLMFacts(layers=int(raw["num_hidden_layers"]), hidden=int(raw["hidden_size"]), heads=heads,
                   kv_heads=int(raw.get("num_key_value_heads") or heads), head_dim=int(raw["hidden_size"]) // heads,
                   intermediate=int(raw["intermediate_size"]), vocab=job.gguf["vocab"],
                   context_length=int(raw.get("max_position_embeddings", 4096)), params=job.gguf["params"],
                   quant=job.quant.name, bytes=artifacts["llm"].bytes)
    source = {"model": str(opts.model), "path": str(ckpt.resolve()),
              "config_sha256": hashlib.sha256((ckpt / "config.json").read_bytes()).hexdigest(),
              "synth": raw.get("mqt_edge_synth")}
    return Manifest(
        format_version=FORMAT_VERSION, mqt_edge_version=__version__, max_tokens=job.max_tokens,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), artifacts=artifacts,
        source=source, graphs=job.graphs, preprocess=Preprocess(**_tupled(job.prompt.preprocess)),
        prompt=Prompt(**job.prompt.prompt), special_tokens=SpecialTokens(bos=job.prompt.bos, eos=tuple(job.prompt.eos)),
        llm=llm, vision=VisionFacts(**job.vision_cost), mqt=MQTFacts(**job.mqt_cost),
        export=opts.to_dict() | {"max_tokens": job.max_tokens, "gguf_intermediate": job.inter,
                                 "reference_llm_dtype": job.llm_dtype},
        parity=job.report,
        seconds={k: v for k, v in job.seconds.items() if k != "manifest"},  # stages done
    )


def build_engines_in_bundle(bundle_dir: Path, opt_tokens: int = 64, max_batch: int = 4) -> Bundle:
    """`mqt-edge engine`: add TensorRT engines to an existing bundle, on the target device; the
    same engine build as the "tensorrt" format's, reading the ONNX graphs in place."""
    from .tensorrt import build_engines

    FORMATS["tensorrt"].require()
    bundle = Bundle.open(bundle_dir)
    tmp = bundle_dir / ".engines-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        entries = build_engines(bundle_dir, tmp, bundle.manifest.graphs, bundle.max_tokens, opt_tokens, max_batch)
        for entry in entries.values():
            os.replace(tmp / entry.path, bundle_dir / entry.path)
        write_manifest(bundle_dir, replace(bundle.manifest, artifacts={**bundle.manifest.artifacts, **entries}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Bundle.open(bundle_dir)


__all__ = ["FORMATS", "ExportError", "ExportJob", "ExportOptions", "ExportResult", "Format", "Step",
           "build_engines_in_bundle", "enabled", "export", "validate"]
