"""Exporters: an MQT-LLaVA checkpoint -> a verified bundle a device runs without torch.

One front door, `export(ExportOptions(...))`. Each target lives in its own module and is listed
once in FORMATS; options are validated before any work starts. The export is staged in a hidden
directory and renamed into place only after every parity check passed and the manifest is written.
"""

from __future__ import annotations

import datetime as _dt
import errno
import gc
import hashlib
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from .. import __version__
from ..device import available_ram_bytes
from ..bundle import (DEFAULT_BUNDLE, FORMAT_VERSION, Bundle, LLMFacts, Manifest, MQTFacts, Preprocess, Prompt,
                      SpecialTokens, VisionFacts, artifact_entry, check_output_dir, remove_stale_staging, staging,
                      write_manifest)
from ..errors import InputError, MQTEdgeError, TokensError


@dataclass(frozen=True)
class Format:
    name: str
    artifacts: str
    what: str
    modules: tuple[str, ...]  # what must be importable, checked before work starts
    extra: str


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("onnx", "vision.onnx, mqt.onnx", "CLIP tower and query transformer; dynamic batch and m",
               ("torch", "onnx", "onnxruntime", "onnxscript", "optimum.exporters.onnx"), "export"),
        Format("gguf", "llm-<quant>.gguf", "the LLaMA for llama.cpp: f32, f16, q8_0, q5_k_m, q4_k_m",
               ("gguf", "llama_cpp", "sentencepiece"), "export"),
        Format("tensorrt", "vision.engine, mqt.engine", "FP16 engines, built on the target device",
               ("tensorrt",), "tensorrt"),
    )
}


class ExportError(MQTEdgeError):
    """An export failed a check (parity, disk space); nothing was left behind."""


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
    from .gguf_llm import get_quant

    get_quant(opts.quant)
    if opts.max_tokens is not None and (isinstance(opts.max_tokens, bool) or opts.max_tokens < 1):
        raise TokensError(f"--max-tokens {opts.max_tokens} is below 1", "choose 1..M (the model's query count)")
    if opts.optimize not in (0, 1, 2, 99):
        raise InputError(f"--optimize {opts.optimize} is not a level", "choose 0, 1, 2 or 99")
    from .onnx_quant import check_vision_quant

    check_vision_quant(opts.vision_quant)
    for name in ("onnx", "gguf"):
        _check_modules(FORMATS[name])
    if opts.tensorrt:
        from .tensorrt import load_tensorrt

        load_tensorrt()


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _llm_params(cfg: dict) -> int:
    from ..profiles.planner import llm_param_count

    heads = cfg["num_attention_heads"]
    return llm_param_count(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                           cfg["vocab_size"], heads, cfg.get("num_key_value_heads") or heads)


def _vision_cost(model) -> dict:
    from ..profiles.planner import vision_cost

    v = model.vision.config
    layers = len(model.vision.vision_model.encoder.layers)
    cost = vision_cost(v.hidden_size, v.intermediate_size, layers, v.image_size, v.patch_size)
    params = sum(p.numel() for p in model.vision.parameters())
    return cost | {"params": int(params), "layers_run": layers, "feature_dim": v.hidden_size,
                   "image_size": v.image_size}


def _mqt_cost(mqt, max_tokens: int) -> dict:
    c = mqt.config
    P = c.key_grid[0] * c.key_grid[1]
    return {
        "params": int(sum(p.numel() for p in mqt.parameters())),
        "flops_per_image": int(2 * P * c.kv_dim * c.kv_dim),  # ln_v + value projection, m-independent
        "flops_per_token": int(2 * P * c.kv_dim + 2 * c.kv_dim * c.hidden_size),
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
    import torch

    from ..model import MQTLlava
    from ..model.checkpoint import LlavaConfig, resolve_model_dir
    from . import gguf_llm, onnx_mqt, onnx_vision, parity

    out = Path(opts.out)
    quant = gguf_llm.get_quant(opts.quant)
    seconds: dict[str, float] = {}

    def stage(name: str):
        on_stage(name)
        seconds[name] = time.perf_counter()

    def done(name: str) -> None:
        seconds[name] = round(time.perf_counter() - seconds[name], 2)

    stage("load")
    ckpt = resolve_model_dir(opts.model)
    cfg = LlavaConfig.read(ckpt)
    raw = cfg.raw
    llm_params = _llm_params(raw)
    stored = str(raw.get("torch_dtype") or raw.get("dtype") or "float32").removeprefix("torch.")
    # The LLM only serves the logits check; at fp32 a 7B would not fit in RAM, so keep it as stored.
    llm_dtype = "float32" if llm_params * 4 < 0.45 * (available_ram_bytes() or 0) else stored
    model = MQTLlava.from_pretrained(ckpt, vision_tower=opts.vision_tower, dtype=torch.float32,
                                     llm_dtype=llm_dtype)
    M = model.num_queries
    max_tokens = M if opts.max_tokens is None else opts.max_tokens
    if max_tokens > M:
        raise TokensError(f"--max-tokens {max_tokens} is above the model's {M} queries", f"choose 1..{M}")
    is_synth = bool(raw.get("mqt_edge_synth"))
    inter = "f32" if quant.name == "f32" or (quant.name != "f16" and stored == "float32") else "f16"
    vision_cost, mqt_cost = _vision_cost(model), _mqt_cost(model.mqt, max_tokens)
    vision_bytes = vision_cost["params"] * 4
    need = vision_bytes * (2 if opts.optimize else 1) + (vision_bytes // 4 if opts.vision_quant == "int8" else 0)
    need += llm_params * (4 if inter == "f32" else 2)
    need += 0 if quant.name == inter else int(llm_params * quant.bits / 8)
    free = _free_bytes(out.parent.resolve())
    if need * 1.05 > free:
        raise ExportError(
            f"not enough disk space for the export: need about {need / 2**30:.1f} GiB under {out.parent.resolve()}, "
            f"{free / 2**30:.1f} GiB free",
            "free some space or choose another --out",
        )
    done("load")

    report: dict = {}
    graphs: dict = {}
    try:
        with staging(out) as tmp:
            # ---- ONNX: vision tower and query transformer
            stage("vision.onnx")
            graphs["vision"] = onnx_vision.export_vision(model, tmp / "vision.onnx")
            done("vision.onnx")
            stage("mqt.onnx")
            graphs["mqt"] = onnx_mqt.export_mqt(model.mqt, max_tokens, tmp / "mqt.onnx")
            done("mqt.onnx")
            artifacts = {"vision": "vision.onnx", "mqt": "mqt.onnx"}
            if opts.optimize:
                stage("optimize")
                onnx_vision.optimize_vision(tmp / "vision.onnx", tmp / "vision-ort.onnx", model, opts.optimize)
                artifacts["vision_ort"] = "vision-ort.onnx"
                done("optimize")
            if opts.vision_quant == "int8":
                stage("vision int8")
                vision_cost["int8"] = _quantize_vision(tmp, artifacts, model)
                done("vision int8")
            if opts.parity:
                stage("parity: onnx")
                report["onnx"] = _onnx_parity(model, tmp, artifacts, max_tokens, parity)
                done("parity: onnx")
                if not report["onnx"]["pass"]:
                    worst = max((v for r in ("vision", "vision_ort") if r in report["onnx"]
                                 for k, v in report["onnx"][r].items() if isinstance(v, dict)),
                                key=lambda v: v["max_abs_err"])
                    raise ExportError(
                        f"parity failed for the ONNX graphs (max abs error {worst['max_abs_err']:.2e}, "
                        f"min cosine {worst['min_cosine']:.6f}; thresholds {parity.ONNX_REL_TOL:g} x max(1, |ref|), "
                        f"{parity.ONNX_MIN_COSINE})",
                        "the export was discarded; report this with the checkpoint's origin",
                    )
                if "vision_int8" in artifacts:
                    stage("parity: vision int8")
                    random_weights = is_synth and not raw.get("mqt_edge_train")  # a trained synth is enforced
                    report["vision_int8"], int8_tokens = _int8_parity(model, tmp, artifacts, max_tokens, parity,
                                                                      random_weights)
                    done("parity: vision int8")

            # ---- GGUF: reference logits first, then free the torch LLM before llama.cpp loads
            ids: list[int] = []
            ref_logits = None
            if opts.parity:
                stage("parity: reference logits")
                question = "What is shown in this image?"
                before, after = model.prompt_ids(question)
                ids = before + after
                sample_q = [model.prompt_ids(q)[1] for q in parity.SAMPLE_QUESTIONS]
                prompt_text = model.template.split(question)
                with torch.no_grad():
                    ref_logits = model.llm(torch.tensor([ids])).logits[0].float().numpy()
                done("parity: reference logits")
            spec, template, bos, eos = model.image_spec, model.template, model.bos_id, sorted(model.eos_ids)
            prefix_tokens = len(model.prompt_ids("?")[0])  # BOS + the prompt before <image>
            del model
            gc.collect()

            stage(f"gguf ({inter})")
            inter_path = tmp / f"llm-{inter}.gguf"
            gguf_info = gguf_llm.write_gguf(ckpt, raw, inter_path, inter, ckpt.name)
            done(f"gguf ({inter})")
            if opts.parity:
                stage(f"parity: gguf {inter}")
                r = parity.logits_report(parity.gguf_logits(inter_path, ids, opts.threads), ref_logits)
                t = gguf_llm.QUANTS[inter]
                r["pass"] = (r["rel_err"] <= t.max_rel_err and r["top1_decided"] >= t.min_top1
                             and r["decided_positions"] >= 0.5 * r["positions"])
                r["thresholds"] = {"max_rel_err": t.max_rel_err, "min_top1": t.min_top1, "min_decided": 0.5}
                report["tokenizer"] = parity.tokenizer_report(inter_path, prompt_text, before, after)
                report[f"gguf_{inter}"] = r
                done(f"parity: gguf {inter}")
            final = tmp / f"llm-{quant.name}.gguf"
            if quant.name != inter:
                stage(f"quantize ({quant.name})")
                gguf_llm.quantize(inter_path, final, quant, opts.threads)
                inter_path.unlink()
                done(f"quantize ({quant.name})")
                if opts.parity:
                    stage(f"parity: gguf {quant.name}")
                    r = parity.logits_report(parity.gguf_logits(final, ids, opts.threads), ref_logits)
                    r["thresholds"] = {"max_kl": quant.max_kl, "min_top1": quant.min_top1}
                    ok = r["kl"] <= quant.max_kl and r["top1"] >= quant.min_top1
                    r["pass"] = ok or is_synth
                    if is_synth:
                        r["enforced"] = False
                        r["note"] = ("random-weight checkpoint: quantised-quality thresholds describe trained "
                                     "models; the unquantised check gates the conversion")
                    report[f"gguf_{quant.name}"] = r
                    done(f"parity: gguf {quant.name}")
            artifacts["llm"] = final.name
            if opts.parity and "vision_int8" in artifacts:
                stage("parity: int8 answers")
                report["vision_int8"] = _int8_answers(report["vision_int8"], final, before, sample_q, int8_tokens,
                                                      opts.threads, parity)
                done("parity: int8 answers")

            failed = {k: v for k, v in report.items() if not v["pass"]}
            if failed:
                name, r = next(iter(failed.items()))
                figures = ", ".join(f"{k}={v:.3g}" for k, v in r.items() if isinstance(v, float))
                raise ExportError(f"parity failed for {name} ({figures}; thresholds {r.get('thresholds', '')})",
                                  "the export was discarded; report this with the checkpoint's origin")

            manifest_artifacts = {role: artifact_entry(tmp, rel) for role, rel in artifacts.items()}
            if opts.tensorrt:
                stage("tensorrt")
                manifest_artifacts |= _build_engines(tmp, tmp, graphs, max_tokens, opts.opt_tokens, opts.max_batch)
                done("tensorrt")

            stage("manifest")
            manifest = Manifest(
                format_version=FORMAT_VERSION,
                mqt_edge_version=__version__,
                created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                max_tokens=max_tokens,
                artifacts=manifest_artifacts,
                source={
                    "model": str(opts.model),
                    "path": str(ckpt.resolve()),
                    "config_sha256": hashlib.sha256((ckpt / "config.json").read_bytes()).hexdigest(),
                    "synth": raw.get("mqt_edge_synth"),
                },
                graphs=graphs,
                preprocess=Preprocess(**spec.to_dict() | {"pad_color": spec.pad_color}),
                prompt=Prompt(**template.to_dict(), prefix_tokens=prefix_tokens),
                special_tokens=SpecialTokens(bos, tuple(eos)),
                llm=LLMFacts(
                    layers=int(raw["num_hidden_layers"]),
                    hidden=int(raw["hidden_size"]),
                    heads=int(raw["num_attention_heads"]),
                    kv_heads=int(raw.get("num_key_value_heads") or raw["num_attention_heads"]),
                    head_dim=int(raw["hidden_size"]) // int(raw["num_attention_heads"]),
                    intermediate=int(raw["intermediate_size"]),
                    vocab=gguf_info["vocab"],
                    context_length=int(raw.get("max_position_embeddings", 4096)),
                    params=gguf_info["params"],
                    quant=quant.name,
                    bytes=manifest_artifacts["llm"].bytes,
                ),
                vision=VisionFacts(**vision_cost),
                mqt=MQTFacts(**mqt_cost),
                export=opts.to_dict() | {"max_tokens": max_tokens, "gguf_intermediate": inter,
                                         "reference_llm_dtype": llm_dtype},
                parity=report,
                seconds={k: v for k, v in seconds.items() if k != "manifest"},  # stages done
            )
            write_manifest(tmp, manifest)
            done("manifest")
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ExportError("the disk filled up during the export",
                              "free some space or choose another --out; nothing was written") from None
        raise
    return ExportResult(Bundle.open(out, verify=False), seconds)


def _onnx_parity(model, tmp: Path, artifacts: dict, max_tokens: int, parity) -> dict:
    """vision(.ort).onnx -> mqt.onnx against the PyTorch reference for m in {1, middle, max}."""
    import numpy as np
    import onnxruntime as ort
    import torch

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = lambda p: ort.InferenceSession(str(tmp / p), so, providers=["CPUExecutionProvider"])  # noqa: E731
    mqt = sess(artifacts["mqt"])
    images = parity.sample_images(3)
    ms = sorted({1, max(1, max_tokens // 2 - 1), max_tokens})
    px = np.concatenate([model.pixel_values(im).numpy() for im in images])
    with torch.no_grad():
        ref_feats = model.image_features(torch.from_numpy(px))
        ref_tokens = {m: model.mqt(ref_feats, tokens=m).numpy() for m in ms}
    out = {"images": len(images), "tokens": ms}
    for role in [r for r in ("vision", "vision_ort") if r in artifacts]:
        feats = sess(artifacts[role]).run(None, {"pixel_values": px})[0]
        entry = {"features": parity.token_report(feats, ref_feats.numpy())}
        for m in ms:
            got = mqt.run(None, {"image_features": feats, "query_ids": np.arange(m, dtype=np.int64)})[0]
            entry[f"m={m}"] = parity.token_report(got, ref_tokens[m])
        lo, hi = max(0, max_tokens // 4), max_tokens
        got = mqt.run(None, {"image_features": feats, "query_ids": np.arange(lo, hi, dtype=np.int64)})[0]
        entry[f"ids={lo}..{hi - 1}"] = parity.token_report(got, ref_tokens[max_tokens][:, lo:hi])
        entry["pass"] = all(v["pass"] for k, v in entry.items() if k != "features")
        out[role] = entry
    out["pass"] = all(out[r]["pass"] for r in ("vision", "vision_ort") if r in out)
    return out


def _quantize_vision(tmp: Path, artifacts: dict, model) -> dict:
    """vision-int8.onnx from the graph onnxruntime would otherwise run (the fused one with --optimize)."""
    from . import onnx_quant, parity

    src = artifacts.get("vision_ort", artifacts["vision"])
    calib = [model.pixel_values(im).numpy() for im in parity.sample_images(8, seed=7)]
    method = onnx_quant.DEFAULT_METHOD
    info = onnx_quant.quantize_vision(tmp / src, tmp / "vision-int8.onnx", method,
                                      calib if method == "static" else ())
    artifacts["vision_int8"] = "vision-int8.onnx"
    return info


def _int8_parity(model, tmp: Path, artifacts: dict, max_tokens: int, parity, random_weights: bool
                 ) -> tuple[dict, dict]:
    """vision-int8.onnx -> mqt.onnx against the PyTorch reference: token errors per m; also the
    fp32 and int8 graphs' visual tokens for the answer-agreement check once the GGUF exists."""
    import numpy as np
    import onnxruntime as ort
    import torch

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = lambda p: ort.InferenceSession(str(tmp / p), so, providers=["CPUExecutionProvider"])  # noqa: E731
    mqt, fp32, int8 = sess(artifacts["mqt"]), sess(artifacts["vision"]), sess(artifacts["vision_int8"])
    px = np.concatenate([model.pixel_values(im).numpy() for im in parity.sample_images(3)])
    ms = sorted({1, max(1, max_tokens // 2 - 1), max_tokens})
    with torch.no_grad():
        ref_feats = model.image_features(torch.from_numpy(px))
        ref = {m: model.mqt(ref_feats, tokens=m).numpy() for m in ms}
    feats = {"fp32": fp32.run(None, {"pixel_values": px})[0], "int8": int8.run(None, {"pixel_values": px})[0]}
    run = lambda f, m: mqt.run(None, {"image_features": f, "query_ids": np.arange(m, dtype=np.int64)})[0]  # noqa: E731
    tokens = {k: {m: run(f, m) for m in ms} for k, f in feats.items()}
    out = {"images": len(px), "tokens": ms, "features": parity.int8_token_report(feats["int8"], ref_feats.numpy())}
    out |= {f"m={m}": parity.int8_token_report(tokens["int8"][m], ref[m]) for m in ms}
    out["min_token_cosine"] = min(out[f"m={m}"]["min_cosine"] for m in ms)
    out["thresholds"] = {"min_token_cosine": parity.INT8_MIN_COSINE, "min_agreement": parity.INT8_MIN_AGREEMENT}
    out["enforced"] = not random_weights
    out["pass"] = out["min_token_cosine"] >= parity.INT8_MIN_COSINE or random_weights
    if not out["pass"]:
        raise _int8_error(out)
    return out, tokens


def _int8_answers(entry: dict, llm: Path, prefix: list[int], questions: list[list[int]], tokens: dict,
                  threads: int | None, parity) -> dict:
    """The int8 entry with answer agreement added; raises when a trained model's falls short."""
    r = parity.answer_agreement(llm, prefix, questions, tokens["fp32"], tokens["int8"], threads)
    entry = entry | {"answers": r, "answer_agreement": r["agreement"]}
    entry["pass"] = not entry["enforced"] or (entry["min_token_cosine"] >= parity.INT8_MIN_COSINE
                                              and r["agreement"] >= parity.INT8_MIN_AGREEMENT)
    if not entry["pass"]:
        raise _int8_error(entry)
    return entry


def _int8_error(r: dict) -> ExportError:
    figures = f"worst token cosine {r['min_token_cosine']:.4f}"
    if "answer_agreement" in r:
        figures += f", answer agreement {r['answer_agreement']:.0%}"
    t = r["thresholds"]
    return ExportError(f"parity failed for the int8 vision graph ({figures}; thresholds: cosine >= "
                       f"{t['min_token_cosine']}, agreement >= {t['min_agreement']:.0%})",
                       "the export was discarded; export with --vision-quant fp32 for this model")


def _build_engines(src: Path, dst: Path, graphs: dict, max_tokens: int, opt_tokens: int, max_batch: int) -> dict:
    """vision.engine and mqt.engine in dst, built from src's ONNX files."""
    from . import tensorrt as trt_export

    shapes = trt_export.engine_shapes(graphs, max_tokens, opt_tokens, max_batch)
    entries = {}
    for role in ("vision", "mqt"):
        trt_export.build_engine(src / f"{role}.onnx", dst / f"{role}.engine", shapes[role])
        entries[f"{role}_trt"] = replace(
            artifact_entry(dst, f"{role}.engine"), tensorrt=trt_export.tensorrt_version(),
            gpu=trt_export.gpu_name(), opt_tokens=opt_tokens, max_batch=max_batch,
        )
    return entries


def build_engines_in_bundle(bundle_dir: Path, opt_tokens: int = 64, max_batch: int = 4) -> Bundle:
    """`mqt-edge engine`: add TensorRT engines to an existing bundle, on the target device."""
    from . import tensorrt as trt_export

    trt_export.load_tensorrt()
    bundle = Bundle.open(bundle_dir)
    tmp = bundle_dir / ".engines-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        entries = _build_engines(bundle_dir, tmp, bundle.manifest.graphs, bundle.max_tokens, opt_tokens, max_batch)
        for entry in entries.values():
            os.replace(tmp / entry.path, bundle_dir / entry.path)
        write_manifest(bundle_dir, replace(bundle.manifest, artifacts={**bundle.manifest.artifacts, **entries}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Bundle.open(bundle_dir)


__all__ = ["FORMATS", "ExportError", "ExportOptions", "ExportResult", "build_engines_in_bundle", "export", "validate"]
