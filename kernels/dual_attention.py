"""Dual-stream cross-attention (DynamiCrafter image injection), pure torch.

Every spatial transformer attends to the text tokens and, through its own key/value
projections, to the image-context tokens, and adds both results:

    out = Attn(q, K_txt, V_txt) + s * Attn(q, K_img, V_img)

``s`` is a fixed scale (1.0 in the 512/1024 models) or ``tanh(alpha) + 1`` with a learned
scalar ``alpha`` (256 model). The image tokens of a video are laid out frame-major
(``16 * f + q`` belongs to frame ``f``); :func:`per_frame_context` hands each frame its own
slice under exactly the condition the released models were trained with.
"""
from __future__ import annotations

import torch

from .attention import multihead_attention


def image_scale(scale: float, alpha: torch.Tensor | None) -> torch.Tensor | float:
    """Weight of the image stream: ``scale`` or ``scale * (tanh(alpha) + 1)`` when learned."""
    if alpha is None:
        return scale
    return scale * (torch.tanh(alpha) + 1.0)


def dual_cross_attention(q: torch.Tensor, k_txt: torch.Tensor, v_txt: torch.Tensor,
                         k_img: torch.Tensor | None, v_img: torch.Tensor | None, heads: int,
                         scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``Attn(q, K_txt, V_txt) + scale * Attn(q, K_img, V_img)`` (before the output projection).

    q: (N, Lq, C); k_txt/v_txt: (N, Lt, C); k_img/v_img: (N, Li, C) or None (text only).
    Returns (N, Lq, C).
    """
    out = multihead_attention(q, k_txt, v_txt, heads)
    if k_img is not None and k_img.shape[1] > 0:
        out = out + scale * multihead_attention(q, k_img, v_img, heads)
    return out


def per_frame_context(context: torch.Tensor, frames: int, text_len: int = 77,
                      tokens_per_frame: int = 16) -> torch.Tensor:
    """Context for every frame, (B, L, C) -> (B*frames, L', C), index ``b * frames + t``.

    When ``L == text_len + tokens_per_frame * frames`` the image tokens are split per frame:
    frame ``t`` gets ``[text, img[tokens_per_frame*t : tokens_per_frame*(t+1)]]``
    (``L' = text_len + tokens_per_frame``). Otherwise every frame gets the whole context
    unchanged (so a 256-token image context with a frame count other than 16 is seen in full
    by every frame, as in the released models).
    """
    if context.dim() != 3:
        raise ValueError(f"context: expected (B, L, C), got shape {tuple(context.shape)}")
    b, length, c = context.shape
    if length == text_len + tokens_per_frame * frames:
        text = context[:, :text_len].repeat_interleave(frames, dim=0)
        img = context[:, text_len:].reshape(b * frames, tokens_per_frame, c)
        return torch.cat([text, img], dim=1)
    return context.repeat_interleave(frames, dim=0)
