"""The contract every vision backend keeps (Polygraphy's loader/runner shape).

A runner is built as `Runner(bundle, provider, threads, precision)` and its constructor only stores
those: nothing is loaded and no optional dependency is imported until `activate()`. Between
`activate()` and `deactivate()` it is active and runs the vision encoder (`features`) and the MQT
resampler (`tokens`); outside that window both raise `InactiveRunnerError` instead of failing
somewhere inside the backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..errors import ClosedError

if TYPE_CHECKING:
    import numpy as np


class InactiveRunnerError(ClosedError):
    """A vision runner was asked to run before `activate()` or after `deactivate()`."""


@runtime_checkable
class VisionRunner(Protocol):
    """What the pipeline, the stream loop and the front ends may call on any vision backend."""

    @property
    def name(self) -> str:
        """The vision graph's backend as users see it, e.g. `onnxruntime/cpu int8`."""

    @property
    def mqt_name(self) -> str:
        """The MQT graph's backend as users see it (the vision graph's, less its precision)."""

    @property
    def precision(self) -> str:
        """The vision graph's weights in use once active: fp32 | int8 (what a calibration records)."""

    @property
    def backend(self) -> str:
        """Its row in `mqt_edge.runtimes.BACKENDS` (e.g. onnxruntime/cpu), resolved once active."""

    @property
    def is_active(self) -> bool:
        """True between `activate()` and `deactivate()`."""

    def activate(self) -> VisionRunner:
        """Load the graphs or engines; returns self so `make_vision(...).activate()` reads as one step."""

    def features(self, pixel_values: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 -> (B, P, C) image features."""

    def tokens(self, features: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
        """(B, P, C), ids (m,) -> (B, m, hidden) visual tokens."""

    def free_vision(self) -> None:
        """Drop the vision encoder (sequential load); `features` loads it again, the MQT part stays."""

    def deactivate(self) -> None:
        """Free everything `activate()` loaded."""


def check_active(runner: VisionRunner) -> None:
    """Raise one line when `runner` is not between activate() and deactivate()."""
    if not runner.is_active:
        raise InactiveRunnerError(f"the {runner.backend} vision runner is not active",
                                  "call activate() first (deactivate() ends it)")
