"""Errors a user can cause.

Each carries one line that names the problem and the fix. The CLI prints that line and exits
non-zero; library users catch `MQTEdgeError` (or a subclass) and never see the process die.
Anything that is not an `MQTEdgeError` is a bug and keeps its traceback.
"""

from __future__ import annotations


class MQTEdgeError(Exception):
    """Base class: `str(err)` is the one-line message shown to the user."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)


class CheckpointError(MQTEdgeError):
    """A model checkpoint is missing, corrupt or not MQT-LLaVA."""


class MissingDependencyError(MQTEdgeError):
    """An optional dependency (an extra) is not installed."""


class ImageError(MQTEdgeError):
    """An image cannot be read or is refused (too large, wrong shape)."""


class ImageTooLargeError(ImageError):
    """An image is over the pixel limit, decided from its header before decoding (HTTP 413)."""


class TokensError(MQTEdgeError, ValueError):
    """A number of visual tokens (m) or a set of query ids is out of range."""


class ClosedError(MQTEdgeError, RuntimeError):
    """A pipeline, session or llama.cpp object was used after `close()`."""


class InputError(MQTEdgeError, ValueError):
    """Any other bad argument: an empty question, an unknown preset, an unusable output path."""


def require(module: str, extra: str):
    """Import an optional dependency, or raise one line naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"'{module}' is not installed ({exc.msg})",
            f"install it with: pip install 'mqt-edge[{extra}]'",
        ) from None
