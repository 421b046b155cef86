"""mqt.onnx: image_features (B, P, C) + query_ids (m,) -> visual_tokens (B, m, hidden).

Written with torch's current (dynamo) ONNX exporter. optimum has no config for this graph: its
exporters describe whole Hugging Face models with fixed input signatures, and this one has an
index input with its own dynamic axis (m), so we export it ourselves.

The graph is the MQT with everything that does not depend on the image folded in at export time
(in float64, then rounded once to float32):
- queries and keys never see the image, so the attention weights A = softmax(q k^T / sqrt(d)) are
  a constant (heads, max_tokens, P); `query_ids` gathers its rows, and unused queries beyond
  `max_tokens` are simply not in the graph;
- the softmax rows sum to 1, so the value bias passes straight through the attention and folds,
  with out_proj and proj, into one (C, hidden) matrix and one bias.
What remains per image: ln_v, one (P, C) x (C, C) value projection, A[ids] @ V, one matmul.
This also avoids an in-graph bicubic Resize, which drifts by ~1e-4 from PyTorch's.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..bundle import Graph
from ..model.mqt import MatryoshkaQueryTransformer

OPSET = 18


class MQTGraph(nn.Module):
    """The exported form of a MatryoshkaQueryTransformer, limited to its first `max_tokens` queries."""

    def __init__(self, mqt: MatryoshkaQueryTransformer, max_tokens: int) -> None:
        super().__init__()
        c = mqt.config
        H, D = c.num_heads, c.kv_dim
        hd = D // H
        with torch.no_grad():
            m64 = lambda t: t.detach().to(torch.float64)  # noqa: E731
            ids = torch.arange(max_tokens)
            pos = mqt.pos_embed.to(torch.float16).to(torch.float64)
            q = F.layer_norm(m64(mqt.query)[ids] + pos[ids], (D,), m64(mqt.ln_q.weight), m64(mqt.ln_q.bias), mqt.ln_q.eps)
            k = F.layer_norm(mqt.key_positions().to(torch.float64), (D,), m64(mqt.ln_k.weight), m64(mqt.ln_k.bias), mqt.ln_k.eps)
            w_q, w_k, w_v = m64(mqt.attn.in_proj_weight).chunk(3)
            b_q, b_k, b_v = m64(mqt.attn.in_proj_bias).chunk(3)
            qh = (q @ w_q.T + b_q).view(-1, H, hd).transpose(0, 1)  # (H, max, hd)
            kh = (k @ w_k.T + b_k).view(-1, H, hd).transpose(0, 1)  # (H, P, hd)
            attn = torch.softmax(qh @ kh.transpose(1, 2) * hd**-0.5, dim=-1)  # (H, max, P)
            w_o, b_o, proj = m64(mqt.attn.out_proj.weight), m64(mqt.attn.out_proj.bias), m64(mqt.proj)
            out_w = w_o.T @ proj  # (D, hidden)
            out_b = (b_v @ w_o.T + b_o) @ proj  # (hidden,)
        self.num_heads, self.eps = H, mqt.ln_v.eps
        f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
        self.register_buffer("attn_weights", f32(attn))
        self.register_buffer("ln_v_weight", f32(m64(mqt.ln_v.weight)))
        self.register_buffer("ln_v_bias", f32(m64(mqt.ln_v.bias)))
        self.register_buffer("value_weight", f32(w_v.T))  # (D, D), applied as v @ W
        self.register_buffer("out_weight", f32(out_w))
        self.register_buffer("out_bias", f32(out_b))

    def forward(self, image_features: torch.Tensor, query_ids: torch.Tensor) -> torch.Tensor:
        B, P, D = image_features.shape
        H = self.num_heads
        v = F.layer_norm(image_features, (D,), self.ln_v_weight, self.ln_v_bias, self.eps)
        v = (v @ self.value_weight).view(B, P, H, D // H).transpose(1, 2)  # (B, H, P, hd)
        a = self.attn_weights.index_select(1, query_ids)  # (H, m, P)
        out = (a.unsqueeze(0) @ v).transpose(1, 2).reshape(B, -1, D)  # (B, m, D)
        return out @ self.out_weight + self.out_bias  # (B, m, hidden)


def export_mqt(mqt: MatryoshkaQueryTransformer, max_tokens: int, path: Path) -> Graph:
    """Write mqt.onnx; return its description for the manifest."""
    graph = MQTGraph(mqt, max_tokens).eval()
    c = mqt.config
    P = c.key_grid[0] * c.key_grid[1]
    feats = torch.randn(2, P, c.kv_dim)
    ids = torch.arange(min(3, max_tokens))
    batch = torch.export.Dim("batch", min=1, max=1024)
    m = torch.export.Dim("m", min=1, max=max(max_tokens, 2))
    torch.onnx.export(
        graph, (feats, ids), str(path), dynamo=True, opset_version=OPSET,
        input_names=["image_features", "query_ids"], output_names=["visual_tokens"],
        dynamic_shapes={"image_features": {0: batch}, "query_ids": {0: m}},
        external_data=False, verbose=False,
    )
    _name_dynamic_axes(path)
    return Graph(inputs={"image_features": ("batch", P, c.kv_dim), "query_ids": ("m",)},
                 outputs={"visual_tokens": ("batch", "m", c.hidden_size)}, opset=OPSET, max_tokens=max_tokens)


def _name_dynamic_axes(path: Path) -> None:
    """Give the dynamic axes stable names (the exporter writes s0, s1 …)."""
    import onnx

    proto = onnx.load(str(path))
    names = {"image_features": {0: "batch"}, "query_ids": {0: "m"}, "visual_tokens": {0: "batch", 1: "m"}}
    for vi in (*proto.graph.input, *proto.graph.output):
        for axis, name in names.get(vi.name, {}).items():
            dim = vi.type.tensor_type.shape.dim[axis]
            dim.ClearField("dim_value")
            dim.dim_param = name
    onnx.save_model(proto, str(path))
