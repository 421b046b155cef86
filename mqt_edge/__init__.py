"""mqt-edge: Matryoshka Query Transformer vision-language models on Jetson, CUDA GPUs and the CPU.

The top level stays light (no torch): `mqt_edge.model` holds the PyTorch reference and is imported
only by build-host code.
"""

from .errors import MQTEdgeError

__version__ = "0.1.0"
__all__ = ["MQTEdgeError", "__version__"]
