"""Animate a still image by a motion field, without any model weights.

Two renderers behind :func:`animate`; frame 0 is always the input itself, and pixels that
nothing reaches are bitwise the input in every frame.

**An object and a still background** (the field carries an object mask, ``field.mask``, and
moves nothing outside it, e.g. a drag on a clicked object):

- *soft edge*: a hard mask gets an alpha matte in a narrow band at its outline (guided filter of
  the mask by the picture, ``matte_radius`` px: 3 at 512), so the edge follows the picture's own
  edge and no halo of background travels with the object; a soft mask is used as given. In the
  band the object's own colour is separated from the background's (``I = a F + (1 - a) B``);
- *sharp motion*: the object layer (premultiplied colour and alpha) is resampled from the input
  at every frame's sub-pixel position by backward mapping with a sharp kernel: a separable
  Lanczos-6 shift when the object moves rigidly (a translation per frame), a 2-D Lanczos-3
  sample of the inverted field otherwise; whole-pixel moves are exact copies;
- *still background*: pixels outside the object do not move; the object is drawn in front of
  them. (A field that also moves pixels outside the mask, e.g. a falloff band asked for in
  "Motion from drags" or a brushed region meant to bend, goes to the smooth renderer below.)
- *one fill*: the place the object covers in frame 0 is filled once (``fill="inpaint"``:
  exemplar-based, PatchMatch-style texture from around it, see ``kernels/inpaint.py``;
  ``"stretch"``: smooth push-pull colour; ``"none"``: black, for a later generative pass) and
  each frame shows the part the object has uncovered, so the fill is revealed progressively and
  never changes from frame to frame.

**A smooth field** (no mask, or motion beyond the mask: drags without a mask, a falloff band, a
predicted motion): each frame
forward-splats the pixels by that frame's flow and composites two layers, so fast pixels pass
in front of slow ones and the place they leave is filled:

- the foreground layer holds the pixels that move at least half as far as the fastest one (a
  soft ramp below that); the background layer holds the rest;
- within a layer, sources landing on the same pixel are blended by a softmax splat whose metric
  grows with the motion magnitude; a layer's alpha is twice the 3x3 mean of the splatted area,
  clamped to 1: each source carries the area it covers after the motion, ``det(I + grad flow)``
  (one-sided "minmod" differences), so stretched and compressed parts still cover their pixels,
  and cracks of up to about two pixels close;
- holes are filled by push-pull from the surrounding background (``"inpaint"``), from
  everything around them (``"stretch"``), or left black (``"none"``).

Only the region that can change is worked on (a crop around where pixels start and land).
Frames are rendered in batches (bounded by ``CHUNK_BYTES``); the progress bar advances and
interrupts are checked between batches. :func:`animate_bytes` estimates the memory a run needs
before anything large is allocated. With ``loop=True`` the field is traversed out and back with
cosine timing so the video plays seamlessly when repeated (see :func:`loop_flow`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..kernels.checks import mask_plane
from ..kernels.field import MotionField
from ..kernels.inpaint import exemplar_fill, push_pull
from ..kernels.masks import matte
from ..kernels.warp import LANCZOS_SHIFT, invert_flow, sample_lanczos, splat_points, translate
from ..runtime import ProgressBar, check_interrupt

FILL_MODES = ("inpaint", "stretch", "none")

METRIC_SCALE = 10.0  # softmax metric at the fastest pixel: exp(10) ~ 2e4 : 1 over a still one
INPAINT_MARGIN = 24  # px of context around the changing region given to the inpainting
COVERAGE_GAIN = 2.0  # alpha = gain * 3x3 mean coverage: the splat lattice of a stretched layer
# beats against the pixel grid (local coverage 0.6-1.4 where the mean is 1)
ALPHA_FULL = 254.5 / 255  # layer alpha at or above this counts as fully covered
CHUNK_BYTES = 48 * 2 ** 20  # bound on the accumulators of one batch of frames (cache-friendly)
WORK_FLOATS = 48  # float32 values per pixel of the changing region (layers, matte, fill, masks)
RIGID_TOLERANCE = 1e-3  # px: an object whose pixels all move alike within this is translated


def animate_bytes(size, frames: int, restricted: bool = False, loop: bool = False) -> int:
    """Memory in bytes :func:`animate` needs at most for a ``size`` = (W, H) picture: the output
    frames (F, H, W, 3), a copy of the field where a mask or ``loop`` changes it, and the working
    set over the region that changes (bounded by the whole picture)."""
    w, h = size
    field = frames * h * w * 2 * 4 * (int(restricted) + int(loop))
    return frames * h * w * 3 * 4 + field + h * w * 4 * WORK_FLOATS + CHUNK_BYTES


def loop_flow(flow: torch.Tensor) -> torch.Tensor:
    """Resample (F, H, W, 2) so the motion goes out and comes back: frame j uses the field at
    time ``tau_j = (F - 1) * (1 - cos(2 pi j / F)) / 2`` (linear between the given frames). So
    ``tau_0 = 0``, the far end is reached at ``j = F / 2`` and frame F - 1 equals frame 1: it is
    the step before frame 0 in the repeated video, with zero velocity at both turning points."""
    n = flow.shape[0]
    j = torch.arange(n, dtype=torch.float64)
    tau = (n - 1) * (1 - torch.cos(2 * math.pi * j / n)) / 2
    i0 = tau.floor().long().clamp(0, n - 1)
    i1 = (i0 + 1).clamp(max=n - 1)
    t = (tau - i0.double()).to(flow.dtype).view(n, 1, 1, 1)
    out = flow[i0] * (1 - t) + flow[i1] * t
    out[0] = 0
    return out


def _validate(image, field, mask, fill):
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image: expected a tensor (H, W, 3), got {type(image).__name__}")
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image: must be (H, W, 3) float 0-1, got shape {tuple(image.shape)}; "
                         f"pass one image, not a batch")
    if not image.is_floating_point():
        raise ValueError(f"image: must be float 0-1, got dtype {image.dtype}")
    if not isinstance(field, MotionField) and not hasattr(field, "flow"):
        raise ValueError(f"field: expected a MotionField, got {type(field).__name__}")
    flow = field.flow
    if flow.ndim != 4 or flow.shape[-1] != 2:
        raise ValueError(f"field: flow must be (F, H, W, 2), got {tuple(flow.shape)}")
    h, w = image.shape[:2]
    if tuple(flow.shape[1:3]) != (h, w):
        raise ValueError(f"field: the motion field is {flow.shape[2]}x{flow.shape[1]} but the image is "
                         f"{w}x{h} (width x height); build the field at the image size or resize the image")
    if flow.shape[0] < 2:
        raise ValueError(f"field: needs at least 2 frames to animate, got {flow.shape[0]}")
    lo, hi = flow.flatten(1).aminmax(dim=1)  # NaN propagates: one pass finds NaN and infinities
    bad = ~(torch.isfinite(lo) & torch.isfinite(hi))
    if bool(bad.any()):
        k = int(torch.nonzero(bad)[0])
        raise ValueError(f"field: flow has NaN or infinite values (first in frame {k}); "
                         f"check the drags or the flow source")
    if fill not in FILL_MODES:
        raise ValueError(f"fill: must be one of {FILL_MODES}, got {fill!r}")
    if mask is not None:
        mask = mask_plane(mask, (w, h), "mask")
    fmask = getattr(field, "mask", None)
    if fmask is not None and tuple(fmask.shape) != (h, w):
        raise ValueError(f"field: its mask is {fmask.shape[1]}x{fmask.shape[0]} but the image is {w}x{h}")
    return image, mask


def _box3(x: torch.Tensor) -> torch.Tensor:
    """3x3 mean of (N, C, H, W), zero beyond the edges (shifted sums: cheap on CPU)."""
    p = F.pad(x, (1, 1, 0, 0))
    r = p[..., :-2] + p[..., 1:-1] + p[..., 2:]
    p = F.pad(r, (0, 0, 1, 1))
    return (p[..., :-2, :] + p[..., 1:-1, :] + p[..., 2:, :]) / 9.0


def _minmod(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The smaller of two one-sided differences, 0 where they disagree in sign."""
    return torch.where(a * b > 0, torch.where(a.abs() < b.abs(), a, b), torch.zeros_like(a))


def _area(f: torch.Tensor, fxp, fxm, fyp, fym) -> torch.Tensor:
    """Area factor det(I + grad flow) (n, N) at sources with flow ``f`` (n, N, 2) and the flow of
    their right/left/lower/upper neighbours; clamped to [1/4, 4]."""
    dx = _minmod(fxp - f, f - fxm)  # d flow / dx
    dy = _minmod(fyp - f, f - fym)  # d flow / dy
    det = (1 + dx[..., 0]) * (1 + dy[..., 1]) - dy[..., 0] * dx[..., 1]
    return det.clamp(0.25, 4.0)


def _layer(premult: torch.Tensor, weight: torch.Tensor, cov: torch.Tensor):
    """Colour (N, 3, h, w) and alpha (N, 1, h, w) of one splatted layer. Pixels that the alpha
    reaches but no source did take the weighted mean of their 3x3 neighbours."""
    alpha = (COVERAGE_GAIN * _box3(cov)).clamp(0, 1)
    alpha = torch.where(alpha >= ALPHA_FULL, torch.ones_like(alpha), alpha)
    colour = premult / weight.clamp_min(1e-30)
    crack = torch.nonzero(((alpha > 0) & (weight <= 0))[:, 0], as_tuple=True)
    if crack[0].numel():
        b, y, x = crack
        h, w = weight.shape[-2:]
        sum_p = torch.zeros(b.numel(), premult.shape[1], dtype=premult.dtype, device=premult.device)
        sum_w = torch.zeros(b.numel(), 1, dtype=weight.dtype, device=weight.device)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy, xx = (y + dy).clamp(0, h - 1), (x + dx).clamp(0, w - 1)
                sum_p += premult[b, :, yy, xx]
                sum_w += weight[b, :, yy, xx]
        colour[b, :, y, x] = sum_p / sum_w.clamp_min(1e-30)
    return colour, alpha


def animate(image: torch.Tensor, field: MotionField, mask: torch.Tensor | None = None,
            loop: bool = False, fill: str = "inpaint", progress: bool = True,
            return_holes: bool = False):
    """Render the frames of ``image`` moved by ``field``.

    image (H, W, 3) float 0-1; field.flow (F, H, W, 2) pixels from frame 0 (F >= 2; frame 0 is
    always the input, whatever ``flow[0]`` holds); field.mask (H, W) or None marks the moving
    object (the foreground layer). ``mask`` (H, W) in [0, 1] or None restricts the motion: the
    flow is multiplied by it and the frames are blended with the input by it, so pixels where it
    is 0 are exactly the input. ``loop`` makes a seamless out-and-back loop (:func:`loop_flow`).
    ``fill`` in "inpaint" | "stretch" | "none" (see the module doc).

    Returns frames (F, H, W, 3) in the image's dtype, 0-1; with ``return_holes`` also holes
    (F, H, W) in [0, 1]: how much of each pixel had to be filled (before the fill).
    """
    image, mask = _validate(image, field, mask, fill)
    flow, restrict = _effective_flow(image, field, mask, loop)
    n_frames, h, w = flow.shape[:3]
    frames = image.unsqueeze(0).expand(n_frames, h, w, 3).clone()
    holes = torch.zeros(n_frames, h, w, dtype=torch.float32, device=image.device) if return_holes else None
    pbar = ProgressBar(n_frames, "warp animate") if progress else None

    moving = _moving(flow)  # (H, W): the sources to splat
    if not bool(moving.any()):
        if pbar is not None:
            pbar.update(n_frames)
        return (frames, holes) if return_holes else frames
    fmask = _object_mask(field, moving, restrict)
    if fmask is not None:
        _animate_layered(image, flow, moving, fmask, restrict, fill, frames, holes, pbar, check_interrupt)
        return (frames, holes) if return_holes else frames

    src = _Sources(image, field, flow, moving, restrict, fill)
    y0, y1, x0, x1 = src.box
    chunk = max(1, min(n_frames, CHUNK_BYTES // (4 * (src.base.shape[0] + 12) * (y1 - y0) * (x1 - x0))))
    for k0 in range(0, n_frames, chunk):
        check_interrupt()
        ks = slice(k0, min(k0 + chunk, n_frames))
        out, hole = src.render(ks, fill)
        frames[ks, y0:y1, x0:x1] = out
        if holes is not None:
            holes[ks, y0:y1, x0:x1] = hole
        if pbar is not None:
            pbar.update(ks.stop - ks.start)
    return (frames, holes) if return_holes else frames


def _effective_flow(image: torch.Tensor, field: MotionField, mask, loop: bool):
    """The flow to render (F, H, W, 2) float32 on the image's device: times the restricting
    ``mask`` (returned as ``restrict`` (H, W) in [0, 1], or None), zero at frame 0, looped."""
    flow = field.flow.to(device=image.device, dtype=torch.float32)
    restrict = None
    if mask is not None:
        restrict = mask.to(device=image.device, dtype=torch.float32).clamp(0, 1)
        flow = flow * restrict[..., None]
    if bool((flow[0] != 0).any()):  # frame 0 is the input whatever the field says: no copy unless needed
        flow = flow.clone() if restrict is None else flow
        flow[0] = 0
    if loop:
        flow = loop_flow(flow)
    return flow, restrict


def _moving(flow: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: the pixels that move in some frame of ``flow`` (F, H, W, 2). One pass over
    the frames, reducing along the contiguous frame axis."""
    n, h, w = flow.shape[:3]
    return flow.reshape(n, h * w * 2).ne(0).any(dim=0).view(h, w, 2).any(dim=-1)


def _object_mask(field: MotionField, moving: torch.Tensor, restrict):
    """The field's object mask when only the object moves (then it is rendered as a cut-out
    layer), else None: a field that also moves what is around the mask (a falloff band, a
    brushed region meant to deform) is warped smoothly. ``moving`` (H, W) bool: the pixels
    that move in some frame."""
    fmask = getattr(field, "mask", None)
    if fmask is None:
        return None
    if restrict is not None:
        fmask = fmask.to(device=moving.device, dtype=torch.float32) * (restrict > 0)
    hard = (fmask > 0.5).to(moving.device)
    if bool(hard.any()) and not bool((moving & ~hard).any()):
        return fmask
    return None


class _Sources:
    """The moving pixels of a smooth warp, splatted frame batch by frame batch into two layers
    (foreground, background) over the box that can change (with context for the inpainting)."""

    def __init__(self, image, field, flow, moving, restrict, fill):
        h, w = image.shape[:2]
        self.image, self.flow = image, flow
        ys, xs = torch.nonzero(moving, as_tuple=True)
        self.ys, self.xs = ys, xs
        self.f_src = flow[:, ys, xs]  # (F, N, 2)
        self.mag = self.f_src.norm(dim=-1)  # (F, N)
        self.max_mag = float(self.mag.max())
        fg_alpha = self._foreground_alpha(field, restrict, h, w)
        self.box = y0, y1, x0, x1 = self._change_box(h, w)
        self.a_s = fg_alpha[ys, xs]  # (N,)
        self.col_s = image[ys, xs].to(torch.float32).t()  # (3, N)
        self.pos0 = torch.stack([xs - x0, ys - y0], dim=-1).float()  # (N, 2) crop coordinates
        self.xs_p, self.xs_m = (xs + 1).clamp(max=w - 1), (xs - 1).clamp(min=0)
        self.ys_p, self.ys_m = (ys + 1).clamp(max=h - 1), (ys - 1).clamp(min=0)
        self.img_crop = image[y0:y1, x0:x1]
        self.restrict_c = restrict[y0:y1, x0:x1, None] if restrict is not None else None
        self.base = self._still_pixels(fg_alpha[y0:y1, x0:x1].unsqueeze(0), moving[y0:y1, x0:x1])
        # When every moving pixel is wholly foreground (a hard object mask), the background layer
        # is the still pixels alone, the same in every frame: build and inpaint it once.
        self.bg_still = bool((self.a_s >= 1).all())
        if self.bg_still:
            self.bg_col0, self.bg_a0 = _layer(self.base[None, 5:8], self.base[None, 8:9], self.base[None, 9:10])
            self.bg_full0 = push_pull(self.bg_col0, self.bg_a0) if fill == "inpaint" else None  # (1, 3, hc, wc)
            self.base = self.base[[0, 1, 2, 3, 4, 10]]

    def _foreground_alpha(self, field, restrict, h: int, w: int) -> torch.Tensor:
        """(H, W): the object mask, or without one how fast each pixel moves (full at half the
        top speed); 0 outside the restricting mask."""
        fmask = getattr(field, "mask", None)
        if fmask is not None:
            fg_alpha = fmask.to(device=self.flow.device, dtype=torch.float32).clamp(0, 1)
        else:
            fg_alpha = torch.zeros(h, w, device=self.flow.device)
            fg_alpha[self.ys, self.xs] = (self.mag.amax(dim=0) / (0.5 * self.max_mag)).clamp(0, 1)
        if restrict is not None:
            fg_alpha = fg_alpha * (restrict > 0)
        return fg_alpha

    def _change_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1): where the sources start and land, plus context for the inpainting."""
        land = torch.stack([self.xs, self.ys], dim=-1).float().unsqueeze(0) + self.f_src  # (F, N, 2)
        lx = torch.cat([self.xs.float(), land[..., 0].flatten()]).clamp(0, w - 1)
        ly = torch.cat([self.ys.float(), land[..., 1].flatten()]).clamp(0, h - 1)
        x0 = max(int(lx.min().floor()) - INPAINT_MARGIN, 0)
        x1 = min(int(lx.max().ceil()) + 2 + INPAINT_MARGIN, w)
        y0 = max(int(ly.min().floor()) - INPAINT_MARGIN, 0)
        y1 = min(int(ly.max().ceil()) + 2 + INPAINT_MARGIN, h)
        return y0, y1, x0, x1

    def _still_pixels(self, a_c: torch.Tensor, moving_c: torch.Tensor) -> torch.Tensor:
        """Accumulators (11, hc, wc) holding the pixels that never move: they contribute to
        themselves with metric 0 (weight exp(0) = 1). Channels: fg rgb * w, w, coverage |
        bg rgb * w, w, coverage | moved onto."""
        img_c = self.img_crop.permute(2, 0, 1).to(torch.float32)  # (3, hc, wc)
        still = (~moving_c).unsqueeze(0).float()
        return torch.cat([img_c * a_c, a_c, a_c, img_c * (1 - a_c), 1 - a_c, 1 - a_c,
                          torch.zeros_like(a_c)], dim=0) * still

    def _splat(self, ks: slice) -> torch.Tensor:
        """The accumulators (n, channels, hc, wc) of frames ``ks``."""
        y0, y1, x0, x1 = self.box
        fk, mk, a_s, col_s = self.f_src[ks], self.mag[ks], self.a_s, self.col_s  # (n, N, 2), (n, N)
        ew = torch.exp(METRIC_SCALE * mk / self.max_mag)  # softmax weights, 1 for still sources
        wf = a_s * ew  # (n, N)
        fl = self.flow[ks]
        ys, xs = self.ys, self.xs
        area = _area(fk, fl[:, ys, self.xs_p], fl[:, ys, self.xs_m], fl[:, self.ys_p, xs], fl[:, self.ys_m, xs])
        parts = [col_s * wf.unsqueeze(1), wf.unsqueeze(1), (a_s * area).unsqueeze(1)]
        if not self.bg_still:
            wb = (1 - a_s) * ew
            parts += [col_s * wb.unsqueeze(1), wb.unsqueeze(1), ((1 - a_s) * area).unsqueeze(1)]
        parts.append((mk > 0).to(col_s.dtype).unsqueeze(1))
        vals = torch.cat(parts, dim=1)  # (n, n_ch, N)
        acc = self.base.unsqueeze(0).repeat(fk.shape[0], 1, 1, 1)
        splat_points(vals, self.pos0.unsqueeze(0) + fk, (x1 - x0, y1 - y0), acc)
        return acc

    def render(self, ks: slice, fill: str):
        """Frames ``ks`` over the box (n, hc, wc, 3) in the image's dtype, and their holes
        (n, hc, wc): how much of each pixel had to be filled."""
        y0, y1, x0, x1 = self.box
        acc = self._splat(ks)
        fg_col, fg_a = _layer(acc[:, 0:3], acc[:, 3:4], acc[:, 4:5])
        if self.bg_still:
            bg_col, bg_a = self.bg_col0, self.bg_a0
        else:
            bg_col, bg_a = _layer(acc[:, 5:8], acc[:, 8:9], acc[:, 9:10])
        # share of what the foreground leaves visible that the background covers: pixels split
        # between the layers (a soft mask) are whole when the two alphas add up to 1
        bg_a = torch.where(bg_a > 0, (bg_a / (1 - fg_a).clamp_min(1e-6)).clamp(max=1.0),
                           torch.zeros_like(bg_a))
        bg_a = torch.where(bg_a >= ALPHA_FULL, torch.ones_like(bg_a), bg_a)
        if fill == "inpaint":
            # the background only shows where the foreground does not cover it
            bg_full = self.bg_full0 if self.bg_still else push_pull(bg_col, bg_a, relax_iters=2, need=fg_a < 1)
            out = fg_col * fg_a + bg_full * (1 - fg_a)
        else:
            alpha = fg_a + (1 - fg_a) * bg_a
            premult = fg_col * fg_a + bg_col * bg_a * (1 - fg_a)
            out = push_pull(premult / alpha.clamp_min(1e-12), alpha) if fill == "stretch" else premult
        # bitwise input where nothing moved away and nothing landed
        untouched = (acc[:, -1] <= 0) & (self.flow[ks, y0:y1, x0:x1] == 0).all(dim=-1)  # (n, hc, wc)
        img_crop, restrict_c = self.img_crop, self.restrict_c
        out = out.permute(0, 2, 3, 1).clamp(0, 1).to(self.image.dtype)
        out = torch.where(untouched.unsqueeze(-1), img_crop.unsqueeze(0), out)
        if restrict_c is not None:
            out = torch.where(restrict_c > 0, restrict_c * out + (1 - restrict_c) * img_crop, img_crop)
        if ks.start == 0:
            out[0] = img_crop  # frame 0 is the input itself
        hole = ((1 - fg_a) * (1 - bg_a))[:, 0]
        if restrict_c is not None:
            hole = hole * restrict_c[..., 0]
        return out, torch.where(untouched, torch.zeros_like(hole), hole)


def matte_radius(h: int, w: int) -> int:
    """Half-width in pixels of the soft band a hard object mask gets: 3 px at 512."""
    return max(2, int(round(min(h, w) / 170)))


def _crop_box(support: torch.Tensor, flow: torch.Tensor, moving: torch.Tensor, margin: int):
    """Bounding box (y0, y1, x0, x1) of ``support`` (H, W) bool and of where the pixels of
    ``moving`` (H, W) bool land under ``flow`` (F, H, W, 2), grown by ``margin``."""
    h, w = support.shape
    ys, xs = torch.nonzero(support | moving, as_tuple=True)
    my, mx = torch.nonzero(moving, as_tuple=True)
    lo_x, hi_x = float(xs.min()), float(xs.max())
    lo_y, hi_y = float(ys.min()), float(ys.max())
    if my.numel():
        f = flow[:, my, mx]  # (F, N, 2)
        lx, ly = mx.float() + f[..., 0], my.float() + f[..., 1]
        lo_x, hi_x = min(lo_x, float(lx.min())), max(hi_x, float(lx.max()))
        lo_y, hi_y = min(lo_y, float(ly.min())), max(hi_y, float(ly.max()))
    y0 = max(int(math.floor(lo_y)) - margin, 0)
    y1 = min(int(math.ceil(hi_y)) + margin + 1, h)
    x0 = max(int(math.floor(lo_x)) - margin, 0)
    x1 = min(int(math.ceil(hi_x)) + margin + 1, w)
    return y0, y1, x0, x1


def _foreground_colour(img: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Colour of the object itself (3, h, w) in a soft edge, where the picture mixes it with
    the background: ``I = a F + (1 - a) B``. B and the object's inner colour are smooth fills
    (push-pull) from the pure background and the pure object; F is solved where the alpha is
    large enough and blends towards the inner colour where it is not. Exactly the picture
    where alpha is 1."""
    a = alpha[None, None]
    back = push_pull(img[None], (a <= 0).to(img.dtype), relax_iters=0)[0]
    inner = push_pull(img[None], (a >= 1).to(img.dtype), relax_iters=0)[0]
    a = a[0]
    solved = ((img - (1 - a) * back) / a.clamp_min(1e-3)).clamp(0, 1)
    weight = ((a - 0.1) / 0.4).clamp(0, 1)
    return torch.where(a >= 1, img, weight * solved + (1 - weight) * inner)


def _background_plate(image: torch.Tensor, hole: torch.Tensor, fill: str, box, check) -> torch.Tensor:
    """The picture without the object (3, h, w) over the crop ``box``: ``hole`` (H, W) bool is
    filled once for all frames ("inpaint": exemplar-based texture, "stretch": smooth push-pull,
    "none": black)."""
    y0, y1, x0, x1 = box
    chw = image.permute(2, 0, 1).to(torch.float32)
    if fill == "inpaint":
        full = exemplar_fill(chw, hole, check=check)
        return full[:, y0:y1, x0:x1]
    crop = chw[:, y0:y1, x0:x1]
    hc = hole[y0:y1, x0:x1]
    if fill == "stretch":
        return push_pull(crop[None], (~hc).to(crop.dtype)[None, None])[0]
    return crop * (~hc)


def _animate_layered(image, flow, moving, fmask, restrict, fill, frames, holes, pbar, check):
    """Object layer over a still background (see the module doc); ``moving`` (H, W) bool: the
    pixels that move in some frame. Writes ``frames`` (and ``holes``) in place."""
    h, w = image.shape[:2]
    n_frames = flow.shape[0]
    dev = image.device
    m = fmask.to(device=dev, dtype=torch.float32).clamp(0, 1)
    hard = m > 0.5
    soft_given = bool(((m > 0) & (m < 1)).any())
    r = matte_radius(h, w)
    if soft_given:
        support = m > 0
    else:  # the matte's band reaches r px beyond the mask
        support = F.max_pool2d(hard[None, None].float(), 2 * r + 1, 1, r)[0, 0] > 0
    margin = LANCZOS_SHIFT + r + 2
    box = _crop_box(support, flow, moving | support, margin)
    y0, y1, x0, x1 = box
    img_c = image[y0:y1, x0:x1].permute(2, 0, 1).to(torch.float32)  # (3, hc, wc)
    hard_c = hard[y0:y1, x0:x1]
    if soft_given:
        alpha0 = m[y0:y1, x0:x1]
    else:
        alpha0 = matte(img_c.permute(1, 2, 0), hard_c.float(), r)
    hole = torch.zeros(h, w, dtype=torch.bool, device=dev)
    hole[y0:y1, x0:x1] = alpha0 > 0
    fg = _foreground_colour(img_c, alpha0)
    layer0 = torch.cat([fg * alpha0, alpha0[None]], 0)  # premultiplied (4, hc, wc)
    plate = _background_plate(image, hole, fill, box, check)
    hole_c = hole[y0:y1, x0:x1]
    check()

    # the object's motion: one translation per frame where the mask moves rigidly
    fo = flow[:, hard]  # (F, N, 2)
    shift = fo.mean(dim=1)  # (F, 2)
    rigid = float((fo - shift[:, None]).abs().max()) <= RIGID_TOLERANCE
    flow_c = flow[:, y0:y1, x0:x1]
    hc, wc = y1 - y0, x1 - x0
    img_crop = image[y0:y1, x0:x1]
    restrict_c = restrict[y0:y1, x0:x1, None] if restrict is not None else None
    chunk = max(1, min(n_frames, CHUNK_BYTES // (4 * 24 * hc * wc)))
    for k0 in range(0, n_frames, chunk):
        check()
        ks = slice(k0, min(k0 + chunk, n_frames))
        n = ks.stop - ks.start
        support0 = (alpha0 > 0).to(torch.float32)[None]
        if rigid:
            layer = translate(layer0, shift[ks])
            # where the object's pixels are (within a pixel): the kernel's ringing stays inside
            reach = translate(support0, shift[ks], a=1)[:, 0] > 0
        else:
            ext = push_pull(flow_c[ks].permute(0, 3, 1, 2), hard_c.to(torch.float32)[None, None].expand(n, 1, hc, wc))
            src = invert_flow(ext.permute(0, 2, 3, 1))  # (n, hc, wc, 2)
            layer = sample_lanczos(layer0, src).permute(1, 0, 2, 3)  # (n, 4, hc, wc)
            reach = sample_lanczos(support0, src, a=1)[0] > 0
        a = layer[:, 3:4].clamp(0, 1)
        a = torch.where((a < 1e-3) | ~reach[:, None], torch.zeros_like(a), a)
        rgb = torch.minimum(layer[:, :3].clamp_min(0), a)
        out = rgb + (1 - a) * plate.unsqueeze(0)
        out = out.permute(0, 2, 3, 1).to(image.dtype)
        untouched = (a[:, 0] == 0) & ~hole_c[None]
        out = torch.where(untouched[..., None], img_crop.unsqueeze(0), out)
        if restrict_c is not None:
            out = torch.where(restrict_c > 0, restrict_c * out + (1 - restrict_c) * img_crop, img_crop)
        if ks.start == 0:
            out[0] = img_crop
        frames[ks, y0:y1, x0:x1] = out
        if holes is not None:
            hole_k = (1 - a[:, 0]) * hole_c[None]
            if restrict_c is not None:
                hole_k = hole_k * restrict_c[..., 0]
            if ks.start == 0:
                hole_k[0] = 0
            holes[ks, y0:y1, x0:x1] = hole_k
        if pbar is not None:
            pbar.update(n)
