"""The Matryoshka Query Transformer (MQT), as released with MQT-LLaVA.

One cross-attention layer in the style of Qwen-VL's resampler. Parameter names are the release's
(`model.query_abstractor.<name>`), so its weights load unchanged:

    query      (M, D)        learned queries; M = 256, D = kv_dim = 1024 in the release
    pos_embed  (M, D) fp16   fixed 2-D sin-cos embedding of the sqrt(M) x sqrt(M) query grid
    attn       nn.MultiheadAttention(D, heads): packed in_proj_weight (3D, D), out_proj
    ln_q/ln_k/ln_v           LayerNorm(D, eps=1e-6)
    proj       (D, hidden)   applied as `out @ proj`, straight into the LLM's embedding space

For query ids I (normally 0..m-1) and CLIP patch features x (B, P, D):

    q = ln_q(query[I] + pos_embed[I])               (m, D)
    k = ln_k(bicubic(pos_embed -> key grid))        (P, D)   position only, no image content
    v = ln_v(x)                                     (B, P, D)
    tokens = attn(q, k, v) @ proj                   (B, m, hidden)

Queries never attend to each other, so row i depends only on query i: the tokens for m are the
first m rows of the tokens for M (the nesting property), and any subset of ids can be computed on
its own. Note that neither q nor k sees the image, so the attention weights are a constant of the
model; only v carries image content.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TokensError


@dataclass(frozen=True)
class MQTConfig:
    num_queries: int  # M
    kv_dim: int  # D: width of the CLIP features and of the attention
    hidden_size: int  # the LLM's embedding width
    num_heads: int
    key_grid: tuple[int, int]  # patch grid of the vision tower: (H, W)

    @property
    def query_grid(self) -> int:
        return math.isqrt(self.num_queries)


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """MAE's 2-D sin-cos embedding of a grid x grid lattice, (grid*grid, dim) float32.

    The first half of the channels encodes the width coordinate, the second the height (the
    release builds `np.meshgrid(w, h)` and encodes the first plane first).
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, not {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float32) / (dim / 4.0))  # (dim/4,)
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32),
                         indexing="ij")  # row-major over (h, w)

    def encode(pos: np.ndarray) -> np.ndarray:  # (N,) -> (N, dim/2)
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(xs), encode(ys)], axis=1)


class MatryoshkaQueryTransformer(nn.Module):
    def __init__(self, config: MQTConfig) -> None:
        super().__init__()
        c = self.config = config
        if c.query_grid ** 2 != c.num_queries:
            raise ValueError(f"the number of queries ({c.num_queries}) must be a square")
        if c.kv_dim % c.num_heads:
            raise ValueError(f"kv_dim {c.kv_dim} is not divisible by {c.num_heads} heads")
        D = c.kv_dim
        self.query = nn.Parameter(torch.zeros(c.num_queries, D))
        # fp16 like the release: its rounding is part of the model's numbers.
        self.pos_embed = nn.Parameter(
            torch.from_numpy(sincos_pos_embed_2d(D, c.query_grid)).half(), requires_grad=False
        )
        self.attn = nn.MultiheadAttention(D, c.num_heads)
        self.ln_q = nn.LayerNorm(D, eps=1e-6)
        self.ln_k = nn.LayerNorm(D, eps=1e-6)
        self.ln_v = nn.LayerNorm(D, eps=1e-6)
        self.proj = nn.Parameter(torch.zeros(D, c.hidden_size))

    # ---- the pieces of the forward pass ------------------------------------------------------
    def query_ids(
        self, m: int | None = None, query_ids: Sequence[int] | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Validate and return the int64 ids to compute: `m` means 0..m-1."""
        M = self.config.num_queries
        if query_ids is None:
            m = M if m is None else m
            if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 1 <= m <= M:
                raise TokensError(f"m={m!r} is out of range", f"choose an integer in 1..{M}")
            return torch.arange(int(m))
        if m is not None:
            raise TokensError("both m and query_ids were given", "pass only one of them")
        ids = torch.as_tensor(query_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= M:
            raise TokensError(
                f"query_ids must be non-empty and within 0..{M - 1}", f"got {ids.tolist()[:8]}…"
            )
        return ids

    def key_positions(self) -> torch.Tensor:
        """pos_embed resized bicubically from the query grid to the patch grid: (P, D).

        Runs in fp32 and rounds to fp16, as the release does; the result depends on the weights
        only, so exporters may fold it into a constant.
        """
        g, (h, w) = self.config.query_grid, self.config.key_grid
        grid = self.pos_embed.to(torch.float16).float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return resized.permute(0, 2, 3, 1).reshape(h * w, -1).to(torch.float16)

    def attention_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Scaled q.k of queries `ids` against every key position: (H, m, P), before the softmax.

        Depends on the weights only (neither side sees the image); training code fits it directly.
        """
        c = self.config
        dtype = self.query.dtype
        H, hd = c.num_heads, c.kv_dim // c.num_heads
        pos = self.pos_embed.to(torch.float16)
        q = self.ln_q(self.query[ids] + pos[ids].to(dtype))  # (m, D)
        k = self.ln_k(self.key_positions().to(dtype))  # (P, D)
        w_q, w_k, _ = self.attn.in_proj_weight.chunk(3)
        b_q, b_k, _ = self.attn.in_proj_bias.chunk(3)
        q = F.linear(q, w_q, b_q).view(-1, H, hd).transpose(0, 1)  # (H, m, hd)
        k = F.linear(k, w_k, b_k).view(-1, H, hd).transpose(0, 1)  # (H, P, hd)
        return (q @ k.transpose(1, 2)) * hd**-0.5

    def forward(
        self,
        features: torch.Tensor,
        m: int | None = None,
        query_ids: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """CLIP patch features (B, P, D) -> visual tokens (B, m, hidden) for the chosen queries."""
        c = self.config
        B, P, D = features.shape
        if (P, D) != (c.key_grid[0] * c.key_grid[1], c.kv_dim):
            raise ValueError(f"expected features (B, {c.key_grid[0] * c.key_grid[1]}, {c.kv_dim})")
        ids = self.query_ids(m, query_ids).to(features.device)
        H, hd = c.num_heads, D // c.num_heads
        # Image-independent attention weights (H, m, P), shared by the whole batch.
        weights = torch.softmax(self.attention_logits(ids), dim=-1)
        _, _, w_v = self.attn.in_proj_weight.chunk(3)
        _, _, b_v = self.attn.in_proj_bias.chunk(3)
        v = self.ln_v(features.to(self.query.dtype))  # (B, P, D)
        v = F.linear(v, w_v, b_v).view(B, P, H, hd).transpose(1, 2)  # (B, H, P, hd)
        out = (weights.unsqueeze(0) @ v).transpose(1, 2).reshape(B, -1, D)  # (B, m, D)
        out = self.attn.out_proj(out)
        return out @ self.proj  # (B, m, hidden)
