"""Hole filling from surrounding pixels (pure torch).

``push_pull`` fills the pixels of an image that have no (or partial) weight from the pixels
around them, coarse to fine:

1. pull: build a pyramid of weight-premultiplied colours by 2x2 sums; at each level the colour
   is the weighted mean of the known pixels below it and the weight is clamped to 1 (a coarse
   pixel is "known" as soon as its children carry one pixel's worth of weight);
2. push: from the coarsest level down, each level keeps its own colour where it is known and
   takes the bilinearly upsampled coarser level where it is not, blended by the weight;
3. optionally relax: a few Jacobi steps of the Laplace equation on the unknown pixels at each
   level (known pixels stay fixed), which removes the pyramid's blockiness and gives a smooth
   membrane that meets the hole's border without a seam.

Everything is a convex combination of known pixels, so filled values stay within the range of
the known colours. Cost is O(H * W) per image, a few tens of ms at 512^2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(image: torch.Tensor, weight: torch.Tensor) -> None:
    if image.ndim != 4:
        raise ValueError(f"inpaint: image must be (B, C, H, W), got {tuple(image.shape)}")
    b, _, h, w = image.shape
    if weight.ndim != 4 or tuple(weight.shape) != (b, 1, h, w):
        raise ValueError(f"inpaint: weight must be (B, 1, H, W) = {(b, 1, h, w)}, got {tuple(weight.shape)}")


def _down(x: torch.Tensor) -> torch.Tensor:
    """2x2 sums (odd sizes padded with zeros)."""
    h, w = x.shape[-2:]
    x = F.pad(x, (0, w % 2, 0, h % 2))
    h2, w2 = x.shape[-2] // 2, x.shape[-1] // 2
    # reshape-sum: much faster on CPU than avg_pool2d
    return x.reshape(*x.shape[:-2], h2, 2, w2, 2).sum(dim=(-3, -1))


def _relax(c: torch.Tensor, known: torch.Tensor, iters: int,
           need: torch.Tensor | None = None) -> torch.Tensor:
    """Jacobi steps of the Laplace equation where ``known`` < 1 (blended by it), computed only
    inside the bounding box of those pixels (plus a one-pixel rim), or of those where ``need``
    is true (B, 1, H, W) when given."""
    if iters <= 0 or min(c.shape[-2:]) < 2:
        return c
    free = known < 1
    if need is not None:
        free = free & need
    free_any = free.flatten(0, -3).any(dim=0)
    rows = torch.nonzero(free_any.any(dim=1)).flatten()
    if rows.numel() == 0:
        return c
    cols = torch.nonzero(free_any.any(dim=0)).flatten()
    h, w = c.shape[-2:]
    y0, y1 = max(int(rows[0]) - 1, 0), min(int(rows[-1]) + 2, h)
    x0, x1 = max(int(cols[0]) - 1, 0), min(int(cols[-1]) + 2, w)
    sub = c[..., y0:y1, x0:x1]
    free = 1.0 - known[..., y0:y1, x0:x1]
    for _ in range(iters):
        p = F.pad(sub, (1, 1, 1, 1), mode="replicate")
        avg = 0.25 * (p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:])
        sub = sub + free * (avg - sub)
    c = c.clone()
    c[..., y0:y1, x0:x1] = sub
    return c


def push_pull(image: torch.Tensor, weight: torch.Tensor, relax_iters: int = 4,
              min_size: int = 1, need: torch.Tensor | None = None) -> torch.Tensor:
    """Fill ``image`` (B, C, H, W) where ``weight`` (B, 1, H, W) in [0, 1] is below 1.

    ``weight`` 1 = known, 0 = hole, in between = partly known (the pixel is blended with the
    fill). ``relax_iters`` Jacobi steps are run per pyramid level on the unknown pixels.
    ``need`` (B, 1, H, W) bool, optional: the pixels whose fill is used; at full resolution the
    relaxation is then only run around them (elsewhere the fill is the plain push-pull).
    Returns (B, C, H, W); an image without any known pixel is returned as zeros.
    """
    _check(image, weight)
    dtype = torch.promote_types(image.dtype, torch.float32)
    wt = weight.to(dtype).clamp(0, 1)
    col = image.to(dtype)
    levels = [(col, wt)]
    while min(levels[-1][0].shape[-2:]) > min_size and max(levels[-1][0].shape[-2:]) > 1:
        c, w = levels[-1]
        ws = _down(w)
        cs = _down(c * w)
        c_next = torch.where(ws > 0, cs / ws.clamp_min(1e-12), torch.zeros_like(cs))
        levels.append((c_next, ws.clamp(max=1.0)))
        if bool((ws >= 1).all()):
            break
    filled, _ = levels[-1]
    for i in range(len(levels) - 2, -1, -1):
        c, w = levels[i]
        up = F.interpolate(filled, size=c.shape[-2:], mode="bilinear", align_corners=False)
        filled = _relax(w * c + (1 - w) * up, w, relax_iters, need if i == 0 else None)
    out = filled if len(levels) > 1 else col
    return out.to(image.dtype)


def fill_holes(image: torch.Tensor, hole: torch.Tensor, relax_iters: int = 4) -> torch.Tensor:
    """Replace the pixels where ``hole`` (B, 1, H, W) is > 0 by a push-pull fill from the others;
    pixels outside the hole are returned unchanged (bitwise)."""
    _check(image, hole)
    known = (hole <= 0).to(image.dtype)
    filled = push_pull(image, known, relax_iters)
    return torch.where(hole > 0, filled, image)
