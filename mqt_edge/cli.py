"""`mqt-edge`: a thin Typer layer over the Python API.

Imports of torch and transformers stay inside the build-host commands, so device commands start
fast and run on the base install. A user error (`MQTEdgeError`) ends as one line on stderr and a
non-zero exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .backends import VISION_BACKENDS
from .bundle import DEFAULT_BUNDLE
from .errors import InputError, MQTEdgeError
from .presets import PRESETS

_BACKENDS_HELP = "Vision backend: " + ", ".join(VISION_BACKENDS) + "."  # the table in backends.py

app = typer.Typer(
    name="mqt-edge",
    help="Run Matryoshka Query Transformer VLMs (MQT-LLaVA) on Jetson, CUDA GPUs and the CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain text: "[/cpu|/cuda]" is an option list, not a closing tag
)
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"mqt-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    pass


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the checkpoint to."),
    preset: str = typer.Option("tiny", "--preset", "-p", help=" | ".join(PRESETS)),
    seed: int = typer.Option(0, help="Seed of the random weights."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Write a random-weight checkpoint in the MQT-LLaVA release layout (CLIP tower included)."""
    from .model.synth import get_preset, write_checkpoint

    p = get_preset(preset)
    with err.status(f"synth {preset}") as status:
        path = write_checkpoint(p, out, seed=seed, force=force,
                                on_stage=lambda s: status.update(f"synth {preset}: {s}"))
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    err.print(f"wrote {path} ({PRESETS[preset].about}; {size / 2**20:,.1f} MiB)")


@app.command()
def reference(
    model: str = typer.Argument(..., help="MQT-LLaVA checkpoint directory or hub id."),
    image: Path = typer.Argument(..., help="Image file."),
    question: str = typer.Argument(..., help="Question about the image."),
    m: Optional[int] = typer.Option(None, "--tokens", "-m", help="Visual tokens m (default: all M)."),
    max_new_tokens: int = typer.Option(128, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 decodes greedily, as the release's evaluation."),
    vision_tower: Optional[str] = typer.Option(None, help="CLIP directory overriding mm_vision_tower."),
    dtype: str = typer.Option("float32", help="float32 | float16 | bfloat16 | auto (as stored)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Answer with the PyTorch reference (the numbers every export is checked against)."""
    from .model import MQTLlava

    with err.status("loading the reference model"):
        llava = MQTLlava.from_pretrained(model, vision_tower=vision_tower, dtype=dtype)
    out = llava.generate(image, question, m=m, max_new_tokens=max_new_tokens, temperature=temperature)
    if as_json:
        print(json.dumps({"answer": out.text, "token_ids": out.token_ids, "m": m or llava.num_queries}))
    else:
        print(out.text)


@app.command("export")
def export_cmd(
    model: Optional[str] = typer.Argument(None, help="MQT-LLaVA checkpoint directory or hub id (default: the shipped model)."),
    out: Path = typer.Option(DEFAULT_BUNDLE, "--out", "-o", help="Bundle directory to write."),
    max_tokens: Optional[int] = typer.Option(None, help="Largest m the bundle serves (default: the model's M)."),
    quant: str = typer.Option("q4_k_m", help="LLM weights: f32 | f16 | q8_0 | q5_k_m | q4_k_m | q4_0."),
    vision_tower: Optional[str] = typer.Option(None, help="CLIP directory overriding mm_vision_tower."),
    tensorrt: bool = typer.Option(False, "--tensorrt", help="Also build TensorRT engines (on the target GPU)."),
    optimize: int = typer.Option(0, help="ONNX Runtime optimisation of the vision graph: 0, 1, 2 or 99."),
    vision_quant: str = typer.Option("fp32", help="Vision graph for onnxruntime on CPUs: fp32 | int8 (adds vision-int8.onnx)."),
    opt_tokens: int = typer.Option(64, help="TensorRT profile's optimal m."),
    max_batch: int = typer.Option(4, help="TensorRT profiles' largest batch."),
    no_parity: bool = typer.Option(False, "--no-parity", help="Skip the parity checks (not recommended)."),
) -> None:
    """Export a checkpoint to a verified bundle: vision.onnx, mqt.onnx, llm-<quant>.gguf, manifest.json."""
    from rich.table import Table

    from .exporters import ExportOptions, export

    if model is None:
        from .defaults import default_model

        shipped = default_model()
        if shipped is None:
            raise MQTEdgeError(
                "no MODEL given and this install has no default model",
                "pass a checkpoint directory (try: mqt-edge synth --preset tiny --out models/tiny)",
            )
        model = str(shipped)
    opts = ExportOptions(model=model, out=out, max_tokens=max_tokens, quant=quant, vision_tower=vision_tower,
                         tensorrt=tensorrt, optimize=optimize, vision_quant=vision_quant, opt_tokens=opt_tokens,
                         max_batch=max_batch, parity=not no_parity)
    # The export silences file descriptor 2 (native libraries' logs); draw progress on a copy of it.
    try:
        screen = Console(file=os.fdopen(os.dup(sys.stderr.fileno()), "w"), stderr=False)
    except (AttributeError, OSError, ValueError):
        screen = err
    from .exporters.job import INTERRUPTED

    def on_sigint(_sig, frame):
        again = INTERRUPTED.is_set()
        INTERRUPTED.set()  # seen at the next stage boundary even if no raise reaches the export
        if not again and screen.is_terminal and unsafe_to_interrupt(frame):
            screen.print("stopping after this stage (Ctrl-C again stops now)", highlight=False)
        interrupt_unless_finalizing(frame, defer_native=not again)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        result = _export_with_progress(export, opts, screen)
    except KeyboardInterrupt:
        raise ExportInterrupted(f"export interrupted: nothing was written to {out}",
                                "a bundle already there is unchanged; run the export again") from None
    manifest = result.bundle.manifest
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    err.print(f"stages: {stages}", highlight=False)
    table = Table(title=f"bundle {result.bundle.root}")
    for col in ("artifact", "size", "parity"):
        table.add_column(col)
    for role, entry in manifest.artifacts.items():
        table.add_row(entry.path, f"{entry.total_bytes / 2**20:,.1f} MiB", manifest.parity_summary(role))
    err.print(table)


class ExportInterrupted(MQTEdgeError):
    """Ctrl-C during an export: the staging directory is gone and --out untouched."""

    exit_code = 130


# Where a KeyboardInterrupt must not be raised: an import (a C extension's init, such as onnx's
# pybind11 module, half done: the process crashed with SIGSEGV or SIGABRT and no message, the export
# silencing fd 2; seen in CI with Ctrl-C at the start of an export) and Python code that torch calls
# from C++ while it traces and exports (an exception may cross a C++ frame that cannot throw).
_UNSAFE_FILES = ("<frozen importlib.", f"{os.sep}torch{os.sep}")


def unsafe_to_interrupt(frame) -> bool:
    while frame is not None:
        if any(part in frame.f_code.co_filename for part in _UNSAFE_FILES):
            return True
        frame = frame.f_back
    return False


def interrupt_unless_finalizing(frame, defer_native: bool = False) -> None:
    """Raise KeyboardInterrupt where the signal landed, unless that is inside a `__del__` (Python
    swallows an exception there and prints its traceback, "Exception ignored in ...") or, with
    `defer_native`, inside an import or torch's code (`unsafe_to_interrupt`): the interrupted export
    is then left to its next stage boundary (exporters.job.INTERRUPTED)."""
    if defer_native and unsafe_to_interrupt(frame):
        return
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return
        frame = frame.f_back
    raise KeyboardInterrupt


def _export_with_progress(export, opts, screen: Console):
    if not screen.is_terminal:  # logs and pipes get the summary only
        return export(opts)
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=screen, transient=True) as bar:
        current: list = []

        def on_stage(name: str) -> None:
            if current:
                bar.update(current[-1], completed=1)
            current.append(bar.add_task(name, total=1))

        return export(opts, on_stage=on_stage)


@app.command()
def engine(
    bundle: Path = typer.Option(DEFAULT_BUNDLE, "--bundle", "-b", help="Bundle directory."),
    opt_tokens: int = typer.Option(64, help="Optimal m of the TensorRT profile."),
    max_batch: int = typer.Option(4, help="Largest batch of the TensorRT profiles."),
) -> None:
    """Build FP16 TensorRT engines for a bundle, on the device that will run them."""
    from .runtimes.engines import build_engines_in_bundle

    with err.status("building TensorRT engines"):
        b = build_engines_in_bundle(bundle, opt_tokens, max_batch)
    for role in ("vision_trt", "mqt_trt"):
        e = b.manifest.artifacts[role]
        err.print(f"{e.path}: {e.bytes / 2**20:,.1f} MiB, TensorRT {e.tensorrt} on {e.gpu}")


def check_gpu_layers(n_gpu_layers: int) -> None:
    """--n-gpu-layers on a llama.cpp that cannot offload is an error, as a --vision-backend this
    machine lacks is: llama.cpp would ignore it and run every layer on the CPU, and the planner would
    still choose m as if those layers were on a GPU (README, `run`)."""
    if n_gpu_layers <= 0:
        return
    from .runtimes.llama import supports_gpu_offload

    if not supports_gpu_offload():
        raise InputError(f"--n-gpu-layers {n_gpu_layers}: this llama.cpp is built without GPU offload",
                         "drop --n-gpu-layers to run the LLM on the CPU, or reinstall llama-cpp-python with "
                         "CMAKE_ARGS=\"-DGGML_CUDA=on\" (README, Install)")


@app.command()
def run(
    image: Path = typer.Argument(..., help="Image file."),
    question: str = typer.Argument(..., help="Question about the image."),
    bundle: Path = typer.Option(DEFAULT_BUNDLE, "--bundle", "-b", help="Bundle directory."),
    m: Optional[int] = typer.Option(None, "--tokens", "-m", help="Visual tokens m (default: the planner's)."),
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="Device profile (default: auto)."),
    mode: Optional[str] = typer.Option(None, help="The profile's power mode, e.g. super."),
    ttft_ms: Optional[float] = typer.Option(None, help="TTFT limit for the planner (default: the profile's)."),
    memory_mb: Optional[float] = typer.Option(None, help="Memory limit for the planner (default: the profile's)."),
    max_new_tokens: int = typer.Option(128, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 decodes greedily (the release's evaluation)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (with --temperature > 0)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    refine: Optional[int] = typer.Option(None, help="Refine to this m when the first token is not confident."),
    confidence: float = typer.Option(0.5, help="First-token probability below which --refine refines (1.01: always)."),
    vision_backend: str = typer.Option("auto", help=_BACKENDS_HELP),
    vision_precision: str = typer.Option("auto", help="onnxruntime's vision graph: auto (int8 on a CPU when the "
                                         "bundle has it) | fp32 | int8."),
    n_gpu_layers: int = typer.Option(0, min=0, help="LLM layers offloaded to the GPU (llama.cpp built with CUDA)."),
    sequential: bool = typer.Option(False, "--sequential", help="Free the vision encoder before the LLM's peak."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads, at most the cores (default: all cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming."),
) -> None:
    """Answer a question about an image with a bundle (no torch: onnxruntime/TensorRT + llama.cpp)."""
    from .pipeline import Pipeline, check_confidence, check_limit, check_sampling, check_threads
    from .prompt import check_question

    # The API's own checks, run before the bundle loads (a typo costs milliseconds, not a model
    # load) and naming the flags.
    check_question(question)
    check_sampling(max_new_tokens, temperature, top_p, seed)
    check_threads(threads)
    check_confidence(confidence, "--confidence")
    check_limit("--ttft-ms", ttft_ms)
    check_limit("--memory-mb", memory_mb)
    check_gpu_layers(n_gpu_layers)
    gen = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    with Pipeline.load(bundle, profile=profile, vision_backend=vision_backend, n_gpu_layers=n_gpu_layers,
                       threads=threads, sequential=sequential, mode=mode, vision_precision=vision_precision) as pipe:
        if profile is not None or m is None:
            _profile_note(profile or "auto")
        answer = pipe.answer(image, question, m=m, refine_to=refine, confidence=confidence,
                             ttft_ms=ttft_ms, memory_mb=memory_mb, on_piece=None if as_json else show, **gen)
    out = run_record(answer)
    if as_json:
        print(json.dumps(out))
        return
    print()
    attempt = answer.refined_from
    speed = f", {answer.decode_tokens_per_s:.1f} tok/s" if answer.decode_tokens_per_s else ""
    refined = f" (refined from m={attempt['m']}, p={attempt['first_token_prob']:.2f})" if attempt else ""
    ttft = f"TTFT {out['request_ttft_ms']:.0f} ms"
    if attempt:
        ttft += f" ({attempt['timings_ms']['ttft']:.0f} first attempt + {answer.timings_ms['ttft']:.0f} refined)"
    err.print(f"m={answer.m}{refined} · vision {answer.backends['vision']} · llm {answer.backends['llm']} · "
              f"{ttft}{speed}", highlight=False)


# `run --json`: every key always present, null when unknown (no decode speed for a one-token answer,
# no prediction when m was given, no refined_from when the first attempt was kept), so a script can
# index it without checking. request_ttft_ms is the whole request's time to its first kept token:
# with --refine, the dropped attempt's TTFT plus the refined one's (refined_from has the first's own).
RUN_JSON_KEYS = ("answer", "token_ids", "m", "profile", "backends", "timings_ms", "request_ttft_ms",
                 "decode_tokens_per_s", "first_token_prob", "prefilled", "predicted", "refined_from")


def run_record(answer) -> dict:
    """An `Answer` as `run --json` prints it: RUN_JSON_KEYS, in that order."""
    from dataclasses import asdict

    fields = asdict(answer)
    first = answer.refined_from
    request = answer.timings_ms["ttft"] + (first["timings_ms"]["ttft"] if first else 0.0)
    fields["request_ttft_ms"] = round(request, 2)
    return {k: fields.get(k) for k in RUN_JSON_KEYS}


@app.command()
def watch(
    source: str = typer.Argument(..., help="/dev/videoN (or N), a video file, an rtsp:// or http(s):// stream "
                                 "(MJPEG too), an image folder or a quoted glob."),
    question: str = typer.Argument(..., help="Question asked about the newest frame, again and again."),
    bundle: Path = typer.Option(DEFAULT_BUNDLE, "--bundle", "-b", help="Bundle directory."),
    m: Optional[int] = typer.Option(None, "--tokens", "-m", help="Visual tokens m (default: the planner's)."),
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="Device profile (default: auto)."),
    every: int = typer.Option(1, min=1, help="Offer only every Nth frame read to the model."),
    rate: Optional[float] = typer.Option(None, help="At most this many answers a second."),
    refine: Optional[int] = typer.Option(None, help="Refine to this m when the first token is not confident."),
    confidence: float = typer.Option(0.5, help="First-token probability below which --refine refines."),
    speed: float = typer.Option(1.0, min=0.0, help="A video file plays at this times its frame rate (0: as fast "
                                "as it decodes)."),
    no_drop: Optional[bool] = typer.Option(None, "--no-drop/--drop", help="Answer every offered frame, holding "
                                           "the reader (default: --no-drop for image folders, --drop otherwise)."),
    max_new_tokens: int = typer.Option(32, help="Most tokens per answer."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads (default: all cores)."),
    vision_backend: str = typer.Option("auto", help=_BACKENDS_HELP),
    n_gpu_layers: int = typer.Option(0, min=0, help="LLM layers offloaded to the GPU."),
    as_json: bool = typer.Option(False, "--json", help="One JSON line per answer, then one {\"summary\": ...}."),
) -> None:
    """Answer a question about a camera, video or stream, frame after frame (extra: video)."""
    from dataclasses import replace

    from .live import WatchSettings, run_watch
    from .pipeline import Pipeline, check_confidence, check_sampling, check_threads
    from .prompt import check_question
    from .sources import open_source

    check_question(question)
    check_sampling(max_new_tokens, 0.0, 1.0)
    check_threads(threads)
    check_confidence(confidence, "--confidence")
    settings = WatchSettings(question, m, refine, confidence, every, rate, speed, bool(no_drop), max_new_tokens,
                             profile).check()
    with open_source(source) as src:  # a source that cannot be opened fails before the bundle loads
        if no_drop is None:
            settings = replace(settings, no_drop=src.kind == "images")
        with Pipeline.load(bundle, profile=profile, vision_backend=vision_backend, n_gpu_layers=n_gpu_layers,
                           threads=threads) as pipe:
            if profile is not None or m is None:
                _profile_note(profile or "auto")
            run_watch(pipe, src, settings, as_json=as_json, err=err)


@app.command()
def chat(
    image: Optional[Path] = typer.Argument(None, help="Image to talk about (or /image PATH later)."),
    bundle: Path = typer.Option(DEFAULT_BUNDLE, "--bundle", "-b", help="Bundle directory."),
    m: Optional[int] = typer.Option(None, "--tokens", "-m", help="Visual tokens m (default: the planner's; /m N)."),
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="Device profile (default: auto)."),
    refine: Optional[int] = typer.Option(None, help="Refine to this m when the first token is not confident."),
    confidence: float = typer.Option(0.5, help="First-token probability below which --refine refines."),
    max_new_tokens: int = typer.Option(128, help="Most tokens per answer."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads (default: all cores)."),
    vision_backend: str = typer.Option("auto", help=_BACKENDS_HELP),
    n_gpu_layers: int = typer.Option(0, min=0, help="LLM layers offloaded to the GPU."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per answer instead of streaming."),
) -> None:
    """Ask about an image question after question, the bundle loaded once (/help lists the commands)."""
    import time

    from .chat import Chat, ChatSettings, run_chat
    from .pipeline import Pipeline, check_confidence, check_sampling, check_threads

    check_sampling(max_new_tokens, 0.0, 1.0)
    check_threads(threads)
    check_confidence(confidence, "--confidence")
    if image is not None and not image.is_file():
        raise InputError(f"no image at {image}", "give the path of an image file, or start without one and use /image")
    tty = sys.stdin.isatty()
    screen = Console(stderr=True, highlight=False, color_system="auto" if tty else None)
    t0 = time.perf_counter()
    with Pipeline.load(bundle, profile=profile, vision_backend=vision_backend, n_gpu_layers=n_gpu_layers,
                       threads=threads) as pipe:
        if profile is not None or m is None:
            _profile_note(profile or "auto")
        auto_m = pipe.choose_tokens(None, max_new_tokens).m if m is None else pipe.check_tokens(m)
        settings = ChatSettings(str(image) if image else None, m, None, confidence, max_new_tokens, as_json)
        session = Chat(pipe, settings, auto_m, screen, tty)
        if refine is not None:
            session.set_refine(str(refine))
        screen.print(f"loaded {bundle} in {time.perf_counter() - t0:.1f} s; m = {session.m}"
                     + ("; /help lists the commands" if tty else ""), soft_wrap=True)
        code = run_chat(session)
    if code:
        sys.exit(code)


@app.command()
def serve(
    bundle: Path = typer.Option(DEFAULT_BUNDLE, "--bundle", "-b", help="Bundle directory."),
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="Device profile (default: auto)."),
    mode: Optional[str] = typer.Option(None, help="The profile's power mode, e.g. super."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 exposes the server: set --api-key)."),
    port: int = typer.Option(8080, help="TCP port."),
    parallel: int = typer.Option(1, min=1, help="Slots: requests computed at once, each on its own context."),
    queue: int = typer.Option(16, min=0, help="Requests that may wait for a slot; more get 503 + Retry-After."),
    timeout: float = typer.Option(120.0, help="Seconds per request, waiting and computing."),
    max_body_mb: float = typer.Option(20.0, help="Largest request body (MB)."),
    media_dir: Optional[Path] = typer.Option(None, help="Allow local paths and file:// images under this directory."),
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images", help="Fetch http(s) image URLs (SSRF risk)."),
    api_key: Optional[str] = typer.Option(None, help="Require 'Authorization: Bearer KEY' (or set MQT_EDGE_API_KEY)."),
    ttft_ms: Optional[float] = typer.Option(None, help="TTFT limit for the planner (default: the profile's)."),
    memory_mb: Optional[float] = typer.Option(None, help="Memory limit for the planner and the session cache."),
    cache_mb: Optional[float] = typer.Option(None, help="Session cache budget (default: what the memory limit leaves)."),
    conversation_tokens: int = typer.Option(1024, min=16, help="Context each conversation has beyond its visual tokens."),
    max_new_tokens: int = typer.Option(256, min=1, help="Answer length when a request sets no max_tokens."),
    model_name: Optional[str] = typer.Option(None, help="Model id clients send (default: the bundle's directory name)."),
    vision_backend: str = typer.Option("auto", help=_BACKENDS_HELP),
    n_gpu_layers: int = typer.Option(0, min=0, help="LLM layers offloaded to the GPU."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads per llama.cpp context."),
    ray: bool = typer.Option(False, "--ray", help="Serve on Ray Serve (extra: ray); --replicas copies of the server."),
    replicas: int = typer.Option(1, min=1, help="With --ray: replicas, each with its own Pipeline and slots."),
    ray_address: Optional[str] = typer.Option(None, help="With --ray: a running cluster's address (default: local)."),
    cpus_per_replica: float = typer.Option(1.0, min=0.1, help="With --ray: CPUs Ray reserves per replica; its threads."),
) -> None:
    """Serve a bundle over HTTP in the OpenAI Chat Completions dialect (extra: serve)."""
    from .serve import ServeConfig, run_server

    cfg = ServeConfig(bundle=str(bundle), profile=profile, mode=mode, host=host, port=port, parallel=parallel,
                      queue=queue, timeout_s=timeout, max_body_mb=max_body_mb,
                      media_dir=str(media_dir) if media_dir else None, allow_remote_images=allow_remote_images,
                      api_key=api_key, ttft_ms=ttft_ms, memory_mb=memory_mb, cache_mb=cache_mb,
                      conversation_tokens=conversation_tokens, max_new_tokens=max_new_tokens, model_name=model_name,
                      threads=threads, vision_backend=vision_backend, n_gpu_layers=n_gpu_layers)
    from .bundle import Bundle

    Bundle.open(bundle, verify=False)  # a wrong path is one line now, not a 503 later
    if ray:
        from .serve.ray import run_on_ray

        run_on_ray(cfg, replicas, ray_address, cpus_per_replica)
    else:
        run_server(cfg)


@app.command("ros2", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ros2_cmd(
    ctx: typer.Context,
    bundle: Path = typer.Option(DEFAULT_BUNDLE, "--bundle", "-b", help="Bundle directory."),
    image_topics: Optional[list[str]] = typer.Option(
        None, "--image-topic", metavar="<topic>",
        help="An image topic, one stream each; repeat for several cameras (default: image)."),
    m: int = typer.Option(0, "--tokens", "-m", min=0, help="Visual tokens m (0: the planner's)."),
    profile: str = typer.Option("", "--profile", help="Device profile for the planner (default: auto)."),
    query: str = typer.Option("", help="Standing query, answered as frames allow (default: only the query topic)."),
    rate: float = typer.Option(0.0, min=0.0, help="Answer the standing query at most this often (Hz); with --tokens 0, "
                              "the planner's m is the largest that gives every topic this rate."),
    every_n: int = typer.Option(0, min=0, help="Answer the standing query on every Nth frame."),
    refine: int = typer.Option(0, min=0, help="Refine to this m when the first token is not confident."),
    confidence: float = typer.Option(0.5, help="First-token probability below which --refine refines."),
    max_new_tokens: int = typer.Option(32, min=1, help="Most tokens per answer."),
    temperature: float = typer.Option(0.0, help="0 decodes greedily."),
    overlap: str = typer.Option("auto", help="auto | on | off: encode the next frame while the LLM decodes."),
    threads: int = typer.Option(0, min=0, help="CPU threads (0: all cores)."),
    vision_threads: int = typer.Option(0, min=0, help="Vision threads when overlapping (0: half the cores)."),
    llm_threads: int = typer.Option(0, min=0, help="LLM threads when overlapping (0: the other half)."),
    vision_backend: str = typer.Option("auto", help=_BACKENDS_HELP),
    n_gpu_layers: int = typer.Option(0, min=0, help="LLM layers offloaded to the GPU."),
) -> None:
    """Run the ROS 2 node: image, image/compressed and query in; answer, answer_info and refused out.

    Options are the node's ROS parameters' defaults; ROS arguments follow --ros-args
    (e.g. --ros-args -r image:=/camera/image_raw -p query:="Is the door open?")."""
    from .ros2.node import NodeOptions, main as run_node

    topics = tuple(image_topics or ("image",))
    options = NodeOptions(bundle=str(bundle), image_topics=topics, m=m, profile=profile, refine=refine,
                          confidence=confidence, max_new_tokens=max_new_tokens, temperature=temperature, query=query,
                          rate=rate, every_n=every_n, overlap=overlap, threads=threads, vision_threads=vision_threads,
                          llm_threads=llm_threads, vision_backend=vision_backend, n_gpu_layers=n_gpu_layers)
    run_node(options.check(), list(ctx.args))
    # The node has freed the model and left the ROS graph. Python's own teardown of the loaded
    # libraries takes 0.4-0.8 s more on a busy 2-core CPU: time a supervisor's SIGTERM-then-SIGKILL
    # window should not have to give.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


profiles_app = typer.Typer(help="List and show device profiles.", invoke_without_command=True, no_args_is_help=False,
                           rich_markup_mode=None)
app.add_typer(profiles_app, name="profiles")


@profiles_app.callback()
def profiles_list(ctx: typer.Context) -> None:
    """List the built-in device profiles."""
    if ctx.invoked_subcommand:
        return
    from rich.table import Table

    from .profiles import builtin_names, load_profile

    table = Table(title="device profiles (mqt-edge profiles show NAME)")
    table.add_column("name", no_wrap=True)
    for col in ("kind", "usable / total memory", "bandwidth", "FP16", "TTFT limit", "modes"):
        table.add_column(col)
    for name in builtin_names():
        p = load_profile(name)
        table.add_row(name, p.kind, f"{p.memory.usable_gb:g} / {p.memory.total_gb:g} GB",
                      f"{p.memory.bandwidth_gbs:g} GB/s", f"{p.compute.fp16_tflops:g} TFLOPS",
                      f"{p.limits.ttft_ms:,.0f} ms", ", ".join(p.modes) or "-")
    Console().print(table)
    err.print("aliases: auto (detect this device), jetson-orin (the Orin module here; AGX Orin 64GB elsewhere)",
              soft_wrap=True)


@profiles_app.command("show")
def profiles_show(name: str = typer.Argument(..., help="Profile name, alias or .toml path."),
                  mode: Optional[str] = typer.Option(None, help="Power mode, e.g. super.")) -> None:
    """Show one profile with the source of every datasheet number."""
    from dataclasses import asdict

    from rich.table import Table


    p = _load_profile_cli(name, mode)
    table = Table(title=f"{p.name}{' (' + p.mode + ')' if p.mode else ''}: {p.description}")
    for col in ("field", "value", "source"):
        table.add_column(col)
    for section in ("memory", "compute", "limits", "prefer", "efficiency"):
        for k, v in asdict(getattr(p, section)).items():
            src = p.sources.get(k, "")
            if p.mode and k in p.modes[p.mode]:
                src = p.modes[p.mode].get("source", "")
            table.add_row(f"{section}.{k}", str(v), src)
    if p.calibration:
        for k, v in asdict(p.calibration).items():
            table.add_row(f"calibration.{k}", str(v), "measured by mqt-edge calibrate")
    Console().print(table)


def _load_profile_cli(name: str, mode: str | None = None):
    from .profiles import load_profile

    _profile_note(name)
    return load_profile(name, mode)


def _profile_note(name: str) -> None:
    """Say what an alias resolves to on this machine (stderr)."""
    from .profiles import ORIN_FALLBACK, detect, detect_jetson

    if name == "jetson-orin" and detect_jetson() is None:
        err.print(f"note: not on a Jetson, so jetson-orin means {ORIN_FALLBACK}", highlight=False)
    if name == "auto":
        found, how = detect()
        err.print(f"profile auto: {found} ({how})", highlight=False)


@app.command("plan")
def plan_cmd(
    profile: str = typer.Option(..., "--profile", "-p", help="Profile name, auto, jetson-orin or a .toml path."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b", help="Plan for this bundle."),
    preset: Optional[str] = typer.Option(None, help="Or plan for a synth preset (no export needed)."),
    quant: str = typer.Option("q4_k_m", help="The preset's quant."),
    ttft_ms: Optional[float] = typer.Option(None, help="TTFT limit (default: the profile's)."),
    memory_mb: Optional[float] = typer.Option(None, help="Memory limit (default: the profile's)."),
    max_new_tokens: int = typer.Option(128, help="Answer length to plan for."),
    mode: Optional[str] = typer.Option(None, help="Power mode, e.g. super (Orin Nano)."),
    vision_backend: str = typer.Option("auto", help="As in run: onnxruntime/cpu plans vision on the CPU."),
    n_gpu_layers: Optional[int] = typer.Option(None, min=0, help="As in run (default: every layer on the GPU)."),
    sequential: bool = typer.Option(False, "--sequential", help="As in run: vision freed before the LLM's peak."),
    vision_precision: str = typer.Option("auto", help="As in run; with --preset, int8 plans an int8 vision graph."),
    streams: Optional[int] = typer.Option(None, help="Plan N streams sharing the device (with --rate and/or "
                                          "--latency-ms)."),
    rate: Optional[float] = typer.Option(None, help="With --streams: answers per second each stream needs."),
    latency_ms: Optional[float] = typer.Option(None, help="With --streams: the longest a frame may wait."),
    answer_tokens: int = typer.Option(16, help="With --streams: expected answer length in tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Predict memory and latency for each m on a device, and choose m (for N streams: --streams)."""
    from rich.table import Table

    from .bundle import Bundle
    from .profiles.planner import ModelFacts, Options, plan

    if (bundle is None) == (preset is None):
        raise InputError("give exactly one of --bundle and --preset", "e.g. --preset mqt-llava-7b --quant q4_k_m")
    facts = ModelFacts.from_bundle(Bundle.open(bundle, verify=False)) if bundle else ModelFacts.from_preset(preset, quant)
    if preset and vision_precision == "int8":  # as if exported with --vision-quant int8: a byte per weight
        from dataclasses import replace

        facts = replace(facts, vision_int8_bytes=facts.vision_params)
    elif bundle and vision_precision == "int8" and not facts.vision_int8_bytes:
        raise InputError(f"the bundle {bundle} has no int8 vision graph", "re-export it with --vision-quant int8")
    prof = _load_profile_cli(profile, mode)
    opts = Options.for_run(vision_backend, n_gpu_layers, sequential, facts, vision_precision)
    if streams is not None or rate is not None or latency_ms is not None:
        return _plan_streams_cli(prof, facts, streams, rate, latency_ms, answer_tokens, opts, memory_mb, as_json)
    result = plan(prof, facts, ttft_ms, memory_mb, max_new_tokens, opts)
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    table = Table(title=f"{facts.name} ({facts.quant}) on {result.profile}; {result.options}")
    for col in ("m", "memory (MB)", "TTFT (ms)", "total (ms)", "fits"):
        table.add_column(col, justify="right")
    for c in result.candidates:
        mark = "[bold green]<- chosen[/]" if c.m == result.chosen_m else ("yes" if c.fits else "[red]no[/]")
        # one decimal: the digits that decide a fit against the limits below
        table.add_row(str(c.m), f"{c.memory_mb:,.1f}", f"{c.ttft_ms:,.1f}", f"{c.total_ms:,.0f}", mark)
    Console().print(table)
    lim = result.limits
    print(f"limits: memory {lim['memory_mb']:,.1f} MB, TTFT {lim['ttft_ms']:,.1f} ms, {max_new_tokens} new tokens")
    if result.chosen_m is not None:
        print(f"chosen m = {result.chosen_m}: {result.reason}")
    else:
        print(result.reason)
        for s in result.suggestions:
            print(f"  would fit: {s['change']} -> m = {s['m']} "
                  f"({s['memory_mb']:,.0f} MB, TTFT {s['ttft_ms']:,.0f} ms)")


def _plan_streams_cli(prof, facts, streams, rate, latency_ms, answer_tokens, opts, memory_mb, as_json) -> None:
    from rich.table import Table

    from .profiles.planner import plan_streams

    if streams is None:
        raise InputError("--rate/--latency-ms without --streams", "add --streams N (1 for a single stream)")
    result = plan_streams(prof, facts, streams, rate, latency_ms, answer_tokens, opts, memory_mb)
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    table = Table(title=f"{facts.name} ({facts.quant}) on {result.profile}: {streams} stream(s), "
                        f"{answer_tokens}-token answers")
    for col in ("m", "cycle (ms)", "answers/s per stream", "memory (MB)", "meets"):
        table.add_column(col, justify="right")
    for c in result.candidates:
        mark = "[bold green]<- chosen[/]" if c.m == result.chosen_m else ("yes" if c.meets else "[red]no[/]")
        table.add_row(str(c.m), f"{c.cycle_ms:,.1f}", f"{c.rate_hz:,.3f}", f"{c.memory_mb:,.1f}", mark)
    Console().print(table)
    want = [f"{rate:g} answers/s per stream" if rate else "", f"latency {latency_ms:,.1f} ms" if latency_ms else ""]
    print("target: " + ", ".join(w for w in want if w))
    print(f"chosen m = {result.chosen_m}: {result.reason}" if result.chosen_m is not None else result.reason)


@app.command()
def calibrate(
    out: Path = typer.Option(..., "--out", "-o", help="Profile file to write, e.g. my-device.toml."),
    bundle: Path = typer.Option(DEFAULT_BUNDLE, "--bundle", "-b", help="Bundle to measure with."),
    base: Optional[str] = typer.Option(None, help="Profile to start from (default: auto)."),
    runs: int = typer.Option(2, help="Runs per point."),
    threads: Optional[int] = typer.Option(None, help="CPU threads."),
) -> None:
    """Measure this device with a bundle and write a profile (use it with --profile my-device.toml)."""
    from .calibrate import calibrate as run_calibration

    if out.suffix != ".toml":
        raise InputError(f"--out {out} is not a .toml file", "name it like my-device.toml")
    with err.status("measuring vision, MQT, prefill, decode and batched decode"):
        p = run_calibration(str(bundle), out, base, runs, threads)
    c = p.calibration
    err.print(f"wrote {out}: vision {c.vision_ms:.0f} ms, MQT {c.mqt_ms_fixed:.1f} + {c.mqt_ms_per_token:.3f} ms/token, "
              f"prefill {c.prefill_ms_fixed:.0f} + {c.prefill_ms_per_token:.2f} ms/position, "
              f"decode {c.decode_ms_per_token:.1f} ms/token, peak {c.peak_mb:,.0f} MB; batched decode "
              f"{'/'.join(f'{r:.0f}' for _, r in c.batch_tok_s)} tok/s in total at "
              f"{'/'.join(str(n) for n, _ in c.batch_tok_s)} sequences", highlight=False)


@app.command("synth-vqa")
def synth_vqa(
    out: Path = typer.Option(..., "--out", "-o", help="Directory for images/ and data.jsonl."),
    n: int = typer.Option(200, "--n", help="Number of questions (one image each)."),
    seed: int = typer.Option(0, help="Seed: the same seed writes the same set."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Write a synthetic shapes-and-colours VQA set (LLaVA-style jsonl + images)."""
    from .vqa import write_dataset

    path = write_dataset(out, n, seed, force)
    err.print(f"wrote {path} ({n} questions)", highlight=False)


@app.command("eval")
def eval_cmd(
    data: Path = typer.Option(..., "--data", "-d", help="VQA jsonl (image, text, answer per line)."),
    bundle: Path = typer.Option(DEFAULT_BUNDLE, "--bundle", "-b", help="Bundle directory."),
    ms_text: str = typer.Option(",".join(map(str, (2, 4, 8, 16, 36, 64, 144, 256))), "--tokens",
                                help="Comma-separated visual token counts m."),
    limit: Optional[int] = typer.Option(None, min=1, help="Use only the first N records."),
    timing_samples: int = typer.Option(5, min=1, help="Fresh requests per m for TTFT and total time."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of accuracy and TTFT against m."),
    save: bool = typer.Option(False, "--save", help="Store the table in the bundle for the planner."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads."),
) -> None:
    """Accuracy, TTFT and total time against m on a VQA set."""
    from dataclasses import asdict

    from rich.table import Table

    from .evaluate import evaluate, load_items, plot, save_to_bundle
    from .pipeline import Pipeline

    try:
        ms = sorted({int(t) for t in ms_text.split(",") if t.strip()})
    except ValueError:
        raise InputError(f"--tokens {ms_text!r} is not a comma-separated list of integers",
                         "e.g. --tokens 2,4,8,16,36,64,144,256") from None
    if not ms:
        raise InputError("--tokens is empty", "e.g. --tokens 2,16,256")
    items = load_items(data, limit)
    with Pipeline.load(bundle, threads=threads) as pipe:
        for m in ms:
            pipe.check_tokens(m)
        with err.status(f"evaluating {len(items)} questions at m = {', '.join(map(str, ms))}") as status:
            rows = evaluate(pipe, items, ms, timing_samples,
                            on_item=lambda i: status.update(f"evaluating: {i + 1}/{len(items)}"))
        if save:
            save_to_bundle(pipe.bundle, rows, data)
    if plot_path:
        plot(rows, plot_path, f"{bundle.name}: accuracy and TTFT against m ({len(items)} questions)")
    if as_json:
        print(json.dumps({"bundle": str(bundle), "data": str(data), "results": [asdict(r) for r in rows]}))
        return
    table = Table(title=f"{bundle} on {data} ({len(items)} questions)")
    for col in ("m", "accuracy", "TTFT (ms)", "total (ms)", "n"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r.m), f"{100 * r.accuracy:.1f}%", f"{r.ttft_ms:,.0f}", f"{r.total_ms:,.0f}", str(r.n))
    Console().print(table)


@app.command()
def train(
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint directory to write (release layout)."),
    model: Optional[str] = typer.Option(None, help="Checkpoint to start from (default: a fresh --init preset)."),
    init: str = typer.Option("shapes", help="synth preset to start from when no --model is given."),
    stage0_steps: int = typer.Option(0, min=0, help="Vision pretraining steps on dense scene labels."),
    stage1_steps: int = typer.Option(600, min=0, help="Stage 1 steps (m = M)."),
    stage2_steps: int = typer.Option(1200, min=0, help="Stage 2 steps (m drawn from 2, 4, ..., M)."),
    batch_size: int = typer.Option(16, min=1),
    lr: float = typer.Option(1e-3, help="Peak learning rate (cosine schedule, warm-up)."),
    parts: str = typer.Option("vision,mqt,llm", help="Trained parts in stages 1 and 2: any of vision, mqt, llm."),
    aux_weight: float = typer.Option(0.0, min=0.0, help="Weight of the dense scene-label loss in stages 1 and 2."),
    token_aux_weight: float = typer.Option(0.0, min=0.0, help="Weight of the scene-wide label loss on the "
                                           "visual tokens in stages 1 and 2."),
    stage0_lr: Optional[float] = typer.Option(None, help="Peak learning rate of stage 0 (default: --lr)."),
    localize: bool = typer.Option(False, help="Start the MQT's attention maps as local Gaussians."),
    local_init: bool = typer.Option(False, help="Start the ViT local: sin-cos positions, mimetic q/k, edge filters."),
    turns: int = typer.Option(1, min=1, max=16, help="Questions per image in stages 1 and 2: a multi-turn "
                              "conversation, every answer supervised (LLaVA's multi-turn data)."),
    colour_twins: bool = typer.Option(False, help="Follow each scene of two or more colours with its colour "
                                      "twin (colours permuted among the shapes, same questions)."),
    separate_turns: bool = typer.Option(False, help="Each question of an image sees only the image and "
                                        "itself (a block attention mask), exactly as at inference."),
    reset_llm: bool = typer.Option(False, help="Start from a freshly initialised LLM (seeded), keeping the "
                                   "vision tower, the MQT and the tokenizer."),
    visual_norm: Optional[float] = typer.Option(None, help="With --reset-llm: scale the MQT's output so the "
                                                "visual tokens' mean norm is this (the text embeddings' is ~0.3)."),
    seed: int = typer.Option(0, help="Seed of the data stream, the init and the m draws."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads (default: torch's)."),
    keep_stages: bool = typer.Option(False, help="Also save the model after each stage, as OUT-stageN."),
) -> None:
    """Matryoshka training on the synthetic shapes task (stage 1: m = M, stage 2: random m)."""
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .train import TrainRecipe, train_checkpoint

    if threads:
        torch.set_num_threads(threads)
    recipe = TrainRecipe(
        stage0_steps=stage0_steps, stage1_steps=stage1_steps, stage2_steps=stage2_steps, batch_size=batch_size,
        lr=lr, parts=tuple(p.strip() for p in parts.split(",") if p.strip()), aux_weight=aux_weight,
        token_aux_weight=token_aux_weight, separate_turns=separate_turns, colour_twins=colour_twins,
        reset_llm=reset_llm, visual_norm=visual_norm, stage0_lr=stage0_lr, localize=localize,
        local_init=local_init, turns=turns, seed=seed)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("loss {task.fields[loss]:.3f}"),
                  TextColumn("m {task.fields[m]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=err) as bar:
        def on_stage(cfg):
            task = bar.add_task(f"stage {cfg.stage}", total=cfg.steps, loss=float("nan"), m="-")
            return lambda s, loss, m: bar.update(task, advance=1, loss=loss, m=m)

        final = train_checkpoint(out, recipe, model=model, init=init, keep_stages=keep_stages, on_stage=on_stage)
    err.print(f"wrote {out}: final losses {final}", highlight=False)



@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Describe this machine and what mqt-edge uses on it (paste it into bug reports)."""
    from .doctor import lines, report

    rep = report()  # never raises: a failing probe is reported and the rest still run
    if as_json:
        print(json.dumps(rep, indent=2, default=str))
        return
    print("\n".join(lines(rep)))


def _fail(message: str, code: int) -> None:
    """The one way a user error ends: one line on stderr, a non-zero exit code."""
    err.print(f"[bold red]error:[/] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)
    sys.exit(code)


def main() -> None:
    try:  # typer >= 0.22 carries its own copy of click; earlier ones use click itself
        from typer._click.exceptions import ClickException, UsageError
        from typer.exceptions import Abort
    except ImportError:  # pragma: no cover - depends on the installed typer
        from click.exceptions import Abort, ClickException, UsageError

    try:
        code = app(standalone_mode=False)  # usage errors come back here, to be printed in one line
        if isinstance(code, int) and code:
            sys.exit(code)
    except UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError" and exc.ctx is not None:  # bare `mqt-edge`: its help
            print(exc.ctx.get_help())
            sys.exit(2)
        where = f"{exc.ctx.command_path} --help" if exc.ctx is not None else "mqt-edge --help"
        _fail(f"{' '.join(exc.format_message().split()).rstrip('.')}; run {where}", exc.exit_code)
    except ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except MQTEdgeError as exc:
        _fail(str(exc), exc.exit_code)
    except (Abort, KeyboardInterrupt):
        err.print("interrupted")
        sys.exit(130)
