"""Where the shipped default model lives (torch-free: the CLI reads it on any install)."""

from pathlib import Path

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default-model"


def default_model() -> Path | None:
    return DEFAULT_MODEL if (DEFAULT_MODEL / "config.json").is_file() else None
