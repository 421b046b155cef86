"""Cost formulas of the three parts, written once: the exporter records them in the manifest from a
loaded model, and the planner computes them from a synth preset before any model exists.

Ground layer: pure arithmetic on sizes, standard library only, so `plan` runs on a device install.
"""

from __future__ import annotations


def llm_param_count(h: int, inter: int, layers: int, vocab: int, heads: int, kv_heads: int) -> int:
    """A LLaMA's parameters: untied embeddings and head, GQA attention, SwiGLU MLP, RMSNorms."""
    per_layer = 2 * h * h + 2 * h * (h // heads * kv_heads) + 3 * h * inter + 2 * h
    return 2 * vocab * h + layers * per_layer + h


def vision_cost(D: int, inter: int, layers_run: int, image: int, patch: int) -> dict:
    """CLIP-ViT FLOPs for one image over the layers actually run, and its parameter count."""
    P = (image // patch) ** 2
    T = P + 1
    flops = 2 * P * 3 * patch * patch * D + layers_run * (2 * T * (4 * D * D + 2 * D * inter) + 4 * T * T * D)
    params = 3 * patch * patch * D + (T + 1) * D + layers_run * (4 * D * D + 2 * D * inter + 9 * D + inter) + 4 * D
    return {"flops": int(flops), "params": int(params), "patches": P}


def mqt_flops(patches: int, kv_dim: int, hidden: int) -> dict:
    """FLOPs of mqt.onnx (the folded graph, onnx_mqt.py): per image and per visual token.

    Per image: ln_v and the (P, C) x (C, C) value projection, whatever m is. Per token: one attention
    row over the P values and its (C, hidden) output matmul."""
    P, C = patches, kv_dim
    return {"flops_per_image": int(2 * P * C * C), "flops_per_token": int(2 * P * C + 2 * C * hidden)}
