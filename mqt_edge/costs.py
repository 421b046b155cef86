"""Cost formulas of the three parts, written once: the exporter records them in the manifest from a
loaded model, and the planner computes them from a synth preset before any model exists.

Ground layer: pure arithmetic on sizes, standard library only, so `plan` runs on a device install.
"""

from __future__ import annotations

from dataclasses import dataclass


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


# -- the KV cache: one formula for the planner, the scheduler and the server ---------------------------

def position_bytes(layers: int, kv_heads: int, head_dim: int, kv_f32: bool = False) -> int:
    """Bytes of one position of llama.cpp's KV cache: K and V in every layer (f16, or f32 for f32 bundles)."""
    return layers * 2 * kv_heads * head_dim * (4 if kv_f32 else 2)


MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ (src/llama-cparams.h); sequence 0 holds the prompt head


@dataclass(frozen=True)
class CachePlan:
    """How one byte budget is split: KV cells in the shared context, and host bytes for parked
    conversations. `conversation_bytes` is the budget of one conversation at its longest."""

    n_ctx: int  # cells of the shared context (every sequence's positions, the prompt head once)
    n_seq: int  # llama.cpp sequence ids, the prompt head's included
    position_bytes: int
    conversation_positions: int
    host_bytes: int

    @property
    def conversation_bytes(self) -> int:
        return self.conversation_positions * self.position_bytes

    @property
    def context_bytes(self) -> int:
        return self.n_ctx * self.position_bytes

    @property
    def budget_bytes(self) -> int:
        return self.context_bytes + self.host_bytes


QUESTION_RESERVE = 512  # context a session keeps for question + answer, beyond its visual prefix


def default_cache_budget(position: int, head: int, conversation_positions: int, parallel: int) -> int:
    """The budget a pipeline's cache gets when none is configured: the prompt head and four times
    `parallel` conversations at their longest (plan_cache puts half of them in the context)."""
    return (head + 4 * parallel * conversation_positions) * position


def plan_cache(budget_bytes: int, position: int, conversation_positions: int, parallel: int, head: int) -> CachePlan:
    """Split `budget_bytes`: the context holds twice `parallel` conversations at their longest (those
    being answered, and as many idle ones that need no restore), within the budget; the host keeps
    the rest for conversations parked when the context is full. The context's cells are allocated
    (and zeroed by llama.cpp) at start-up; host bytes only when a conversation is parked."""
    floor = head + parallel * conversation_positions
    if budget_bytes < floor * position:
        raise ValueError(f"a budget of {budget_bytes / 2**20:.1f} MB is below {parallel} conversations of "
                         f"{conversation_positions * position / 2**20:.1f} MB")
    n_ctx = min(budget_bytes // position, head + 2 * parallel * conversation_positions)
    n_seq = min(MAX_SEQUENCES, 1 + max(parallel + 1, 4 * n_ctx // max(1, conversation_positions)))
    return CachePlan(int(n_ctx), int(n_seq), position, conversation_positions, int(budget_bytes - n_ctx * position))
