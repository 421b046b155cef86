"""mqt-edge: Matryoshka Query Transformer vision-language models on Jetson, CUDA GPUs and the CPU.

    from mqt_edge import Pipeline          # the device runtime (no torch)
    from mqt_edge.model import MQTLlava    # the PyTorch reference (build host, `export` extra)

The top level stays light: `Pipeline` is imported on first use.
"""

from ._version import __version__
from .errors import MQTEdgeError

__all__ = ["MQTEdgeError", "Pipeline", "__version__"]


def __getattr__(name: str):
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'mqt_edge' has no attribute {name!r}")
