"""Multi-head attention (pure torch): the one place where tokens are split into heads and
``scaled_dot_product_attention`` is called, and the attention variants built on it.

Tokens are ``(N, L, heads * d)`` with the heads as contiguous channel chunks (the layout of
every ``to_q/to_k/to_v`` projection in the pack); the scale is ``d ** -0.5`` unless given.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, L, heads * d) -> (N, heads, L, d), a view where the layout allows."""
    return rearrange(x, "n l (h d) -> n h l d", h=heads)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(N, heads, L, d) -> (N, L, heads * d)."""
    return rearrange(x, "n h l d -> n l (h d)")


def check_heads(width: int, heads: int, name: str = "attention") -> None:
    """A ValueError naming ``name`` unless ``width`` channels split into ``heads`` equal heads."""
    if heads < 1 or width % heads:
        raise ValueError(f"{name}: {width} channels do not split into {heads} heads")


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                        mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention over ``heads`` heads.

    q: (N, Lq, heads * d); k: (N, Lk, heads * d); v: (N, Lk, heads * dv) -> (N, Lq, heads * dv).
    mask: bool, broadcastable to (N, heads, Lq, Lk), True = may attend, or None.
    scale: defaults to ``d ** -0.5``.
    """
    check_heads(q.shape[-1], heads)
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads),
                                         attn_mask=mask, scale=scale)
    return merge_heads(out)


def all_to_first_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_frames: int,
                           heads: int, scale: float | None = None) -> torch.Tensor:
    """Every frame's queries attend to the keys/values of its video's first frame.

    query: (B*F, Lq, C) batch-major (row = b*F + f). key, value: (B, Lk, C) computed from
    frame 0 of each video, or (B*F, Lk, C) from which frame 0 is taken. Returns (B*F, Lq, C):
    ``softmax(q k^T * scale) v`` per head (scale defaults to head_dim ** -0.5). With one frame
    this is plain self-attention.
    """
    bf, lq, c = query.shape
    if num_frames < 1 or bf % num_frames:
        raise ValueError(f"all_to_first_attention: {bf} rows is not a whole number of {num_frames}-frame videos")
    b = bf // num_frames
    if key.shape[0] == bf and bf != b:
        key = key[::num_frames]
        value = value[::num_frames]
    if key.shape[0] != b or value.shape[0] != b:
        raise ValueError(f"all_to_first_attention: key/value have {key.shape[0]} rows, expected {b} or {bf}")
    check_heads(c, heads, "all_to_first_attention")
    # all frames of a video share the keys: fold the frames into the query length
    out = multihead_attention(query.reshape(b, num_frames * lq, c), key, value, heads, scale=scale)
    return out.reshape(bf, lq, -1)
