"""The PyTorch reference of MQT-LLaVA (build host only: needs the `export` extra)."""

from .llava import Generation, MQTLlava
from .mqt import MatryoshkaQueryTransformer, MQTConfig

__all__ = ["Generation", "MQTLlava", "MatryoshkaQueryTransformer", "MQTConfig"]
