"""mqt-edge: Matryoshka Query Transformer vision-language models on Jetson, CUDA GPUs and the CPU.

    from mqt_edge import Pipeline          # the device runtime (no torch)
    from mqt_edge import Watch             # camera streams on a Pipeline: Watch(pipe, frames, question)
    from mqt_edge.model import MQTLlava    # the PyTorch reference (build host, `export` extra)

The top level stays light: `Pipeline` and `Watch` are imported on first use.
"""

from ._version import __version__
from .errors import MQTEdgeError

__all__ = ["MQTEdgeError", "Pipeline", "Watch", "__version__"]


_LAZY = {"Pipeline": "pipeline", "Watch": "watch"}  # name -> module that defines it


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'mqt_edge' has no attribute {name!r}")
