"""Regional animation: only the masked region moves, everything else stays the input (pure torch).

Two steps, shared by the model backends:

1. **latent blending** during sampling: after every denoising step the latent outside the
   region is replaced by the input image's latent noised to the level of that step, and by the
   clean image latent after the last step (:func:`latent_keep`, :func:`blend`). The model sees
   a background that agrees with the input at every step, so the moving part fits into it;
2. **a feathered paste** after decoding: the VAE does not reproduce the input exactly (its
   reconstruction error is several grey levels), so every frame is composited over the input
   with an alpha that is 0 everywhere outside the mask and ramps up to 1 over ``feather``
   pixels inside its edge (:func:`paste_alpha`, :func:`paste`). Outside the mask the result is
   the input itself; there is no seam at the edge because the blended latent already matches
   the input there.

Shapes: masks (1, 1, H, W) in [0, 1] (1 = may move); frames (T, H, W, 3); latents
(B, C, T, h, w).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import erode, feather


def cover_crop(x: torch.Tensor, height: int, width: int, mode: str = "bilinear") -> torch.Tensor:
    """(N, C, H, W) -> (N, C, height, width): scale to cover, centre crop."""
    h, w = x.shape[-2:]
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    kw = {"align_corners": False, "antialias": True} if mode == "bilinear" else {}
    x = F.interpolate(x, size=(nh, nw), mode=mode, **kw)
    top, left = (nh - height) // 2, (nw - width) // 2
    return x[..., top:top + height, left:left + width]


def fit_mask(mask: torch.Tensor, height: int, width: int, name: str = "mask") -> torch.Tensor:
    """MASK (B, H, W) or (H, W), 1 = may move -> (1, 1, height, width) in [0, 1] (the first mask),
    scaled and centre-cropped like the picture (nearest, so a hard mask stays hard)."""
    if not torch.is_tensor(mask) or mask.dim() not in (2, 3):
        raise ValueError(f"{name}: expected a MASK of shape (B, H, W), got "
                         f"{tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__}")
    m = mask[:1] if mask.dim() == 3 else mask[None]
    m = cover_crop(m[:, None].float(), height, width, mode="nearest").clamp(0, 1)
    if float(m.max()) <= 0:
        raise ValueError(f"{name}: the mask is empty; select the region that should move (or leave the mask "
                         f"unconnected to animate the whole picture)")
    return m


def latent_keep(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel mask (1, 1, H, W), 1 = may move -> keep weight (1, 1, 1, h, w): 1 on latent cells
    entirely outside the region, 0 on cells entirely inside, the covered share between."""
    return (1.0 - F.interpolate(mask.float(), size=tuple(latent_hw), mode="area"))[:, :, None]


def blend(x: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``keep * target + (1 - keep) * x`` in float32, returned in x's dtype; where keep is 1 the
    result is exactly ``target``."""
    return (keep * target.float() + (1.0 - keep) * x.float()).to(x.dtype)


def paste_alpha(mask: torch.Tensor, feather_px: float) -> torch.Tensor:
    """Compositing alpha (H, W) for a pixel mask (1, 1, H, W) or (H, W): ``mask`` times the mask
    eroded by ``feather_px`` and blurred by it, so it is exactly 0 wherever the mask is 0 and
    rises to 1 about ``2 * feather_px`` pixels inside the edge. ``feather_px`` 0: the mask."""
    m = mask.reshape(mask.shape[-2:]).float().clamp(0, 1)
    r = float(feather_px)
    if r < 0:
        raise ValueError(f"feather: {feather_px} must be >= 0 pixels")
    if r == 0:
        return m
    return m * feather(erode((m > 0).float(), r), r)


def paste(frames: torch.Tensor, source: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Composite frames (T, H, W, 3) over the source picture (H, W, 3) with alpha (H, W):
    where alpha is 0 the result is the source, bit for bit."""
    a = alpha.to(frames.device, frames.dtype)[None, :, :, None]
    src = source.to(frames.device, frames.dtype)[None]
    return torch.where(a > 0, a * frames + (1.0 - a) * src, src.expand_as(frames))


def default_feather(height: int, width: int) -> int:
    """Paste feather in pixels for a picture of this size: 1/64 of the short side (8 px at 512)."""
    return max(1, round(min(int(height), int(width)) / 64))
