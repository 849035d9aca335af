"""Drag conditioning of Puppet-Master: encoding, modulation, drag tokens (pure torch).

A set of drags for a video is a tensor ``drags`` of shape (B, K, N, 4): for video b, frame k
and drag n the numbers (x_start, y_start, x_end_k, y_end_k) in [0, 1] of the image (x is the
column, y the row). ``x_end_k, y_end_k`` is where the dragged point should be at frame k; the
last frame holds the final target. A drag whose four numbers are all zero at a frame counts as
absent at that frame (that is how the released model was trained); :func:`encode_drags` also
takes an explicit ``valid`` mask for drags that really start at the (0, 0) corner.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CHANNELS_PER_DRAG = 6


def drag_validity(drags: torch.Tensor) -> torch.Tensor:
    """(B, K, N, 4) -> (B, K, N) bool: a drag is present at a frame iff one of its numbers is non-zero."""
    return (drags != 0).any(dim=-1)


def encode_drags(drags: torch.Tensor, resolution: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Rasterise drags into the (B, K, 6N, r, r) drag image the drag embedders read.

    Every channel is -1 except at most one pixel. For drag n, channels (6n, 6n+1) hold the
    sub-cell (x, y) offset of the start point at its cell, (6n+2, 6n+3) the offset of this
    frame's end point at its cell, and (6n+4, 6n+5) the offset of the last frame's end point
    at its cell. The cell of a coordinate u is ``clip(round_half_even(u*r - 0.5), 0, r-1)`` and
    the offset is ``u*r - cell`` (so u*r = odd integer m lands in cell m-1 with offset 1).

    drags: (B, K, N, 4) in [0, 1]. valid: (B, K, N) bool or None (then :func:`drag_validity`).
    A drag absent at a frame writes nothing at that frame (its "final" channels too).
    """
    if drags.ndim != 4 or drags.shape[-1] != 4:
        raise ValueError(f"drags: expected shape (B, K, N, 4), got {tuple(drags.shape)}")
    b, k, n, _ = drags.shape
    r = int(resolution)
    if valid is None:
        valid = drag_validity(drags)
    final = drags[:, -1:, :, 2:4].expand(b, k, n, 2)
    pts = torch.stack([drags[..., 0:2], drags[..., 2:4], final], dim=3)  # (B, K, N, 3, 2)
    scaled = pts * r
    cell = (scaled - 0.5).round().clamp(0, r - 1)  # torch.round: half to even
    offset = scaled - cell
    flat = (cell[..., 1] * r + cell[..., 0]).long()  # (B, K, N, 3) pixel index row*r + col
    values = torch.where(valid[..., None, None], offset, torch.full_like(offset, -1.0))
    out = drags.new_full((b, k, n, 3, 2, r * r), -1.0)
    index = flat[..., None, None].expand(b, k, n, 3, 2, 1)
    out.scatter_(-1, index, values[..., None])
    return out.reshape(b, k, n * CHANNELS_PER_DRAG, r, r)


def sincos_pos_embed_2d(dim: int, resolution: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """2D sine-cosine table (r*r, dim); row index = y*r + x.

    The first dim/2 numbers encode x (the column) as [sin(x*w_i), cos(x*w_i)], the last dim/2
    encode y the same way, with ``w_i = 10000^(-i/(dim/4))``, i < dim/4. Built in float64.
    """
    if dim % 4 != 0:
        raise ValueError(f"pos_embed_dim: {dim} must be a multiple of 4")
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    coord = torch.arange(resolution, dtype=torch.float64)

    def one_d(pos):
        ang = pos[:, None] * omega[None]
        return torch.cat([ang.sin(), ang.cos()], dim=1)  # (M, dim/2)

    ys, xs = torch.meshgrid(coord, coord, indexing="ij")
    table = torch.cat([one_d(xs.reshape(-1)), one_d(ys.reshape(-1))], dim=1)
    return table.to(dtype=dtype, device=device)


class DragEmbedding(nn.Module):
    """Drag image -> per-pixel (scale, shift) for a feature map: 3x3 convs with SiLU.

    conv_in (c_in -> ch[0]), then for each step i: conv(ch[i] -> ch[i]), conv(ch[i] -> ch[i+1]),
    then conv_out (ch[-1] -> out_channels), zero-initialised. Input (BF, 6N, r, r), output
    (BF, out_channels, r, r).
    """

    def __init__(self, in_channels: int, out_channels: int, block_out_channels=(256, 320, 320)):
        super().__init__()
        ch = list(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, ch[0], 3, padding=1)
        blocks = []
        for a, b in zip(ch[:-1], ch[1:]):
            blocks.append(nn.Conv2d(a, a, 3, padding=1))
            blocks.append(nn.Conv2d(a, b, 3, padding=1))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(ch[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(x))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


def drag_modulate(hidden: torch.Tensor, scale_shift: torch.Tensor) -> torch.Tensor:
    """``h * (1 + scale) + shift`` with scale = first C channels of (BF, 2C, r, r), shift = last C."""
    scale, shift = scale_shift.chunk(2, dim=1)
    return hidden * (1 + scale) + shift


class DragModulation:
    """One drag layer's modulation for a batch of videos, computed once and applied at every
    denoising step (the drag image does not change between steps).

    embedder: the layer's :class:`DragEmbedding`; image: (B*F, 6N, r, r) drag image, rows
    video-major; has_drags: (B,) bool, False for a video without any drag on any frame (e.g. the
    unconditional half of classifier-free guidance). Such a video's drag image is -1 everywhere
    on every frame, so its (scale, shift) is computed from one frame and broadcast over its
    frames. Held per video as ``(1 + scale, shift)``: (F or 1, C, r, r) each.
    """

    def __init__(self, embedder: nn.Module, image: torch.Tensor, has_drags: torch.Tensor):
        b = int(has_drags.shape[0])
        if image.ndim != 4 or image.shape[0] % max(b, 1):
            raise ValueError(f"drag image: {tuple(image.shape)} rows are not {b} videos of whole frames")
        self.frames = image.shape[0] // b
        flags = [bool(x) for x in has_drags.tolist()]
        if all(flags):
            rows = image
        else:  # frame 0 of each drag-free video (all -1) is enough for it
            rows = torch.cat([image[i * self.frames:(i + 1) * self.frames] if flag else
                              image[i * self.frames:i * self.frames + 1] for i, flag in enumerate(flags)])
        scale, shift = embedder(rows).chunk(2, dim=1)
        scale = 1 + scale
        self.parts, at = [], 0
        for flag in flags:
            n = self.frames if flag else 1
            self.parts.append((scale[at:at + n], shift[at:at + n]))
            at += n

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B*F, C, r, r) -> ``hidden * (1 + scale) + shift`` (one pass per video)."""
        f = self.frames
        if hidden.shape[0] != f * len(self.parts):
            raise ValueError(f"drag modulation: {hidden.shape[0]} rows for {len(self.parts)} videos of {f} frames")
        out = torch.empty_like(hidden)
        for i, (scale, shift) in enumerate(self.parts):
            torch.addcmul(shift, hidden[i * f:(i + 1) * f], scale, out=out[i * f:(i + 1) * f])
        return out


def drag_token_mlp(feature_channels: int, pos_embed_dim: int, context_dim: int) -> nn.Sequential:
    """Linear(2C + 2P -> D), SiLU, Linear(D -> D): the drag-token MLP (keys ``0.*``, ``2.*``)."""
    return nn.Sequential(
        nn.Linear(2 * feature_channels + 2 * pos_embed_dim, context_dim),
        nn.SiLU(),
        nn.Linear(context_dim, context_dim),
    )


def sample_points(feature: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of (BF, C, r, r) at (BF, N, 2) points in [0, 1] -> (BF, N, C).

    Pixel centres sit at (i + 0.5)/r; points beyond the outer centres take the border value.
    """
    grid = (points * 2 - 1)[:, None]  # (BF, 1, N, 2)
    out = F.grid_sample(feature, grid.to(feature.dtype), mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out[:, :, 0].transpose(1, 2)


def drag_token_inputs(hidden: torch.Tensor, drags_flat: torch.Tensor, pos_table: torch.Tensor) -> torch.Tensor:
    """Inputs of the drag-token MLP: cat[f_start (C), f_end (C), p_start (P), p_end (P)].

    hidden: (BF, C, r, r) modulated features (read without gradient); drags_flat: (BF, N, 4)
    (this frame's start and end); pos_table: (r*r, P) from :func:`sincos_pos_embed_2d`.
    Returns (BF, N, 2C + 2P).
    """
    r = hidden.shape[-1]
    feats = hidden.detach()
    start, end = drags_flat[..., 0:2], drags_flat[..., 2:4]
    pos = pos_table.to(hidden).reshape(1, r, r, -1).permute(0, 3, 1, 2)
    bf, n = drags_flat.shape[:2]
    pos_pts = sample_points(pos, torch.cat([start, end], dim=1).reshape(1, bf * 2 * n, 2))
    pos_pts = pos_pts.reshape(bf, 2 * n, -1)
    return torch.cat([sample_points(feats, start), sample_points(feats, end),
                      pos_pts[:, :n], pos_pts[:, n:]], dim=-1)


def drag_tokens(mlp: nn.Module, hidden: torch.Tensor, drags_flat: torch.Tensor, pos_table: torch.Tensor,
                used: torch.Tensor) -> torch.Tensor:
    """Drag tokens (BF, N, D); tokens of drags that are unused (absent on every frame) are zero.

    used: (B, N) bool, e.g. ``valid.any(dim=1)``; BF = B * frames.
    """
    tokens = mlp(drag_token_inputs(hidden, drags_flat, pos_table))
    frames = tokens.shape[0] // used.shape[0]
    keep = used.repeat_interleave(frames, dim=0)[..., None]
    return tokens.masked_fill(~keep, 0.0)


def drag_context(encoder_hidden_states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-attention context cat[image embedding (BF, L, D), drag tokens (BF, N, D)] -> (BF, L+N, D)."""
    return torch.cat([encoder_hidden_states, tokens.to(encoder_hidden_states.dtype)], dim=1)


def interpolate_drag_frames(start: torch.Tensor, end: torch.Tensor, frames: int) -> torch.Tensor:
    """(N, 2) start and end -> (frames, N, 4): start fixed, end moving linearly from start (frame 0)
    to ``end`` (last frame)."""
    t = torch.linspace(0.0, 1.0, frames, dtype=start.dtype, device=start.device)[:, None, None]
    cur = start[None] * (1 - t) + end[None] * t
    return torch.cat([start[None].expand(frames, -1, -1), cur], dim=-1)


def track_length(track: torch.Tensor) -> float:
    """Total path length of an (M, 2) track."""
    if track.shape[0] < 2:
        return 0.0
    return float((track[1:] - track[:-1]).norm(dim=-1).sum())


__all__ = [
    "CHANNELS_PER_DRAG", "drag_validity", "encode_drags", "sincos_pos_embed_2d", "DragEmbedding",
    "drag_modulate", "DragModulation", "drag_token_mlp", "sample_points", "drag_token_inputs", "drag_tokens",
    "drag_context", "interpolate_drag_frames", "track_length",
]
