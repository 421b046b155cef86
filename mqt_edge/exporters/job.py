"""The state one export's formats share: every row's build and check (FORMATS in __init__.py) reads
and writes an ExportJob and nothing global, so a row's inputs and outputs are all named here; and
the typed Manifest a finished job becomes (`job_manifest`).

Torch-free at import: `validate()` and `mqt-edge engine` import this package where torch is absent.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import threading
import time
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .._version import __version__
from ..bundle import (FORMAT_VERSION, Graph, LLMFacts, Manifest, MQTFacts, Preprocess, Prompt, SpecialTokens, VisionFacts,
                      artifact_entry)
from ..errors import MQTEdgeError

if TYPE_CHECKING:
    from ..quants import Quant
    from . import ExportOptions


class ExportError(MQTEdgeError):
    """An export failed a check (parity, disk space); nothing was left behind."""


# Set by the CLI's Ctrl-C handler. A KeyboardInterrupt raised while Python runs inside a native
# library's callback (llama.cpp's log, through ctypes) is swallowed by ctypes; every stage boundary
# raises it again, so an interrupted export is never installed.
INTERRUPTED = threading.Event()


@contextmanager
def timed(name: str, on_stage: Callable[[str], None], seconds: dict[str, float]) -> Iterator[None]:
    """One stage: announced to on_stage, timed into seconds (its start time until it finishes)."""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt
    on_stage(name)
    seconds[name] = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - seconds[name], 2)
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt


@dataclass(frozen=True)
class PromptFacts:
    """What the manifest says about the model's input side, taken while the torch model is loaded."""

    preprocess: dict  # ImageSpec.to_dict()
    prompt: dict  # the template's to_dict() and prefix_tokens (BOS + the prompt before <image>)
    bos: int
    eos: list[int]


@dataclass(frozen=True)
class Reference:
    """The PyTorch LLM's answer the GGUF checks compare against. Taken before the torch model is
    freed, which must happen before llama.cpp loads the GGUF (both in RAM would not fit a 7B)."""

    ids: list[int]  # the prompt's token ids: before + after
    logits: Any  # (T, vocab) float32
    before: list[int]  # ids up to <image> (BOS + system + "USER: ")
    after: list[int]
    pieces: tuple[str, str]  # the prompt text either side of the question, for the tokenizer check
    questions: list[list[int]]  # parity.SAMPLE_QUESTIONS' ids after <image>, for answer agreement


@dataclass
class ExportJob:
    """Mutable on purpose: the rows fill in artifacts, graphs and reports as they run."""

    opts: ExportOptions
    quant: Quant
    ckpt: Path
    raw: dict  # the checkpoint's config.json
    model: Any  # the torch MQTLlava; None once the gguf row frees it
    max_tokens: int
    inter: str  # the unquantised GGUF written first: "f32" or "f16"
    llm_dtype: str  # the reference LLM's dtype (as stored when fp32 would not fit in RAM)
    prompt: PromptFacts
    vision_cost: dict
    mqt_cost: dict
    on_stage: Callable[[str], None] = lambda s: None
    tmp: Path = Path()  # the staging directory, set once it exists
    artifacts: dict[str, str] = field(default_factory=dict)  # role -> path under tmp
    entries: dict[str, dict] = field(default_factory=dict)  # role -> finished manifest entry (engines)
    graphs: dict[str, Graph] = field(default_factory=dict)  # role -> the ONNX graph's interface
    report: dict = field(default_factory=dict)  # the manifest's "parity"
    seconds: dict[str, float] = field(default_factory=dict)
    gguf: dict = field(default_factory=dict)  # write_gguf's counts: params, vocab
    reference: Reference | None = None
    int8_tokens: dict = field(default_factory=dict)  # "fp32"/"int8" -> m -> visual tokens

    @property
    def is_synth(self) -> bool:
        return bool(self.raw.get("mqt_edge_synth"))

    @property
    def random_weights(self) -> bool:
        """A synth checkpoint never trained: quantised-quality thresholds are reported, not enforced."""
        return self.is_synth and not self.raw.get("mqt_edge_train")

    def path(self, role: str) -> Path:
        return self.tmp / self.artifacts[role]

    def stage(self, name: str) -> AbstractContextManager[None]:
        return timed(name, self.on_stage, self.seconds)

    def gate(self, key: str) -> None:
        """Fail the export if report[key] did not pass."""
        r = self.report[key]
        if not r["pass"]:
            figures = ", ".join(f"{k}={v:.3g}" for k, v in r.items() if isinstance(v, float))
            raise ExportError(f"parity failed for {key} ({figures}; thresholds {r.get('thresholds', '')})",
                              "the export was discarded; report this with the checkpoint's origin")


def _tupled(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def job_manifest(job: ExportJob) -> Manifest:
    """The bundle's manifest: every artifact's entry (sha256 of the staged file) and what the
    runtime, the planner and `mqt-edge info` read."""
    from .gguf_llm import tensor_bytes  # gguf_llm imports this module

    opts, raw, ckpt = job.opts, job.raw, job.ckpt
    artifacts = {role: artifact_entry(job.tmp, rel) for role, rel in job.artifacts.items()} | job.entries
    heads = int(raw["num_attention_heads"])
    llm = LLMFacts(layers=int(raw["num_hidden_layers"]), hidden=int(raw["hidden_size"]), heads=heads,
                   kv_heads=int(raw.get("num_key_value_heads") or heads), head_dim=int(raw["hidden_size"]) // heads,
                   intermediate=int(raw["intermediate_size"]), vocab=job.gguf["vocab"],
                   context_length=int(raw.get("max_position_embeddings", 4096)), params=job.gguf["params"],
                   quant=job.quant.name, bytes=artifacts["llm"].bytes,
                   tensor_bytes=tensor_bytes(job.path("llm")))
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
