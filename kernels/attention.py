"""Attention variants (pure torch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
    if c % heads:
        raise ValueError(f"all_to_first_attention: {c} channels do not split into {heads} heads")
    d = c // heads
    # all frames of a video share the keys: fold the frames into the query length
    q = query.reshape(b, num_frames * lq, heads, d).transpose(1, 2)
    k = key.reshape(b, -1, heads, key.shape[-1] // heads).transpose(1, 2)
    v = value.reshape(b, -1, heads, value.shape[-1] // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(bf, lq, -1)
