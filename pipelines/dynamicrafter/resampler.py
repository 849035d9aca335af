"""Query-transformer resampler: CLIP vision tokens -> image context tokens.

Key-compatible with the released ``image_proj_model.*`` weights. Learned query latents
(``num_queries * video_length`` of them, frame-major) cross-attend, layer after layer, to the
projected vision tokens together with themselves (Perceiver style).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ...kernels.attention import merge_heads, split_heads


class PerceiverAttention(nn.Module):
    """Latents attend to ``cat[x, latents]``; keys ``norm1 norm2 to_q to_kv to_out``."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x: (B, N, dim), latents: (B, L, dim) -> (B, L, dim)."""
        x = self.norm1(x)
        latents = self.norm2(latents)
        q = split_heads(self.to_q(latents), self.heads)
        k, v = (split_heads(t, self.heads) for t in self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1))
        # softmax((q d^-1/4)(k d^-1/4)^T) computed in float32, as the released model does (written
        # out rather than scaled_dot_product_attention, whose half-precision softmax differs).
        s = self.dim_head ** -0.25
        w = torch.matmul(q * s, (k * s).transpose(-1, -2))
        w = torch.softmax(w.float(), dim=-1).to(w.dtype)
        return self.to_out(merge_heads(torch.matmul(w, v)))


class FeedForward(nn.Sequential):
    """LayerNorm -> Linear(dim, mult*dim) -> GELU -> Linear(mult*dim, dim); keys ``0 1 3``."""

    def __init__(self, dim: int, mult: int):
        inner = int(dim * mult)
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class Resampler(nn.Module):
    """(B, N, embedding_dim) vision tokens -> (B, num_queries*video_length, output_dim).

    Output token ``num_queries * f + q`` belongs to frame ``f``.
    """

    def __init__(self, dim: int = 1024, depth: int = 4, dim_head: int = 64, heads: int = 12,
                 num_queries: int = 16, embedding_dim: int = 1280, output_dim: int = 1024,
                 ff_mult: int = 4, video_length: int | None = 16):
        super().__init__()
        self.num_queries = num_queries
        self.video_length = video_length
        n = num_queries * video_length if video_length else num_queries
        self.latents = nn.Parameter(torch.randn(1, n, dim) / dim ** 0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), FeedForward(dim, ff_mult)])
            for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))
