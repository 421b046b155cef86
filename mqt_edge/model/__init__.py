"""The PyTorch reference of MQT-LLaVA (build host only: needs the `export` extra)."""

from .llava import MQTLlava, ReferenceAnswer
from .mqt import MatryoshkaQueryTransformer, MQTConfig

__all__ = ["MQTLlava", "ReferenceAnswer", "MatryoshkaQueryTransformer", "MQTConfig"]
