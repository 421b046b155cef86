"""`mqt-edge`: a thin Typer layer over the Python API.

Imports of torch and transformers stay inside the build-host commands, so device commands start
fast and run on the base install. A user error (`MQTEdgeError`) ends as one line on stderr and a
non-zero exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from . import __version__
from .errors import MQTEdgeError

app = typer.Typer(
    name="mqt-edge",
    help="Run Matryoshka Query Transformer VLMs (MQT-LLaVA) on Jetson, CUDA GPUs and the CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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
    preset: str = typer.Option("tiny", "--preset", "-p", help="tiny | bench | mqt-llava-7b"),
    seed: int = typer.Option(0, help="Seed of the random weights."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Write a random-weight checkpoint in the MQT-LLaVA release layout (CLIP tower included)."""
    from .model.synth import PRESETS, get_preset, write_checkpoint

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
    tokens: Optional[int] = typer.Option(None, "--tokens", "-m", help="Visual tokens m (default: all M)."),
    max_new_tokens: int = typer.Option(128, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 decodes greedily, as the release's evaluation."),
    vision_tower: Optional[str] = typer.Option(None, help="CLIP directory overriding mm_vision_tower."),
    dtype: str = typer.Option("float32", help="float32 | float16 | bfloat16 | auto (as stored)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Answer with the PyTorch reference (the numbers every export is checked against)."""
    from .model import MQTLlava

    with err.status("loading the reference model"):
        m = MQTLlava.from_pretrained(model, vision_tower=vision_tower, dtype=dtype)
    out = m.generate(image, question, tokens=tokens, max_new_tokens=max_new_tokens, temperature=temperature)
    if as_json:
        used = tokens or m.num_queries
        print(json.dumps({"answer": out.text, "token_ids": out.token_ids, "tokens": used}))
    else:
        print(out.text)


def main() -> None:
    try:
        app()
    except MQTEdgeError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
