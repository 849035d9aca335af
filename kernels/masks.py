"""Mask operations (pure torch).

Masks are float tensors in [0, 1] shaped (H, W) or (B, H, W); every function returns the same
layout it was given. Radii are in pixels. Sizes are ``(width, height)`` like the rest of the pack.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

RESIZE_MODES = ("nearest", "bilinear", "area")


def _as_batch(mask: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor (H, W) or (B, H, W), got {type(mask).__name__}")
    if mask.ndim == 2:
        return mask.unsqueeze(0), True
    if mask.ndim == 3:
        return mask, False
    raise ValueError(f"{name}: mask must be (H, W) or (B, H, W), got {tuple(mask.shape)}")


def _restore(m: torch.Tensor, single: bool) -> torch.Tensor:
    return m[0] if single else m


def _float(m: torch.Tensor) -> torch.Tensor:
    return m if m.is_floating_point() else m.float()


def _check_radius(radius, name: str) -> float:
    try:
        r = float(radius)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: radius must be a number, got {radius!r}") from None
    if not math.isfinite(r) or r < 0:
        raise ValueError(f"{name}: radius must be a finite number >= 0, got {radius!r}")
    return r


def resize(mask: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize to ``size`` = (width, height). "nearest" keeps the values, "bilinear" and "area"
    (box average, best for shrinking) give soft edges; the result stays in [0, 1]."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"mask resize: mode must be one of {RESIZE_MODES}, got {mode!r}")
    w, h = (int(v) for v in size)
    if w < 1 or h < 1:
        raise ValueError(f"mask resize: size must be positive (width, height), got {tuple(size)}")
    m, single = _as_batch(mask, "mask resize")
    x = _float(m).unsqueeze(1)
    if tuple(x.shape[-2:]) == (h, w):
        out = x.clone()
    elif mode == "nearest":
        out = F.interpolate(x, size=(h, w), mode="nearest-exact")
    elif mode == "bilinear":
        out = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False,
                            antialias=h < x.shape[-2] or w < x.shape[-1])
    else:
        out = F.interpolate(x, size=(h, w), mode="area")
    return _restore(out[:, 0].clamp(0, 1), single)


def gaussian_kernel1d(sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1-D gaussian, truncated at 3 sigma."""
    half = max(1, int(math.ceil(3.0 * sigma)))
    t = torch.arange(-half, half + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable gaussian blur of (N, C, H, W) with replicate padding."""
    if sigma <= 0:
        return x
    k = gaussian_kernel1d(sigma, x.dtype, x.device)
    half = (k.numel() - 1) // 2
    c = x.shape[1]
    kx = k.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    ky = k.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    # reflect-like edges without 'reflect' limits on tiny images
    x = F.pad(x, (half, half, 0, 0), mode="replicate")
    x = F.conv2d(x, kx, groups=c)
    x = F.pad(x, (0, 0, half, half), mode="replicate")
    return F.conv2d(x, ky, groups=c)


def feather(mask: torch.Tensor, radius: float) -> torch.Tensor:
    """Soften the edge with a gaussian whose sigma is ``radius / 2`` (so the ramp is about
    ``2 * radius`` px wide). radius 0 returns a copy."""
    r = _check_radius(radius, "mask feather")
    m, single = _as_batch(mask, "mask feather")
    m = _float(m)
    if r == 0:
        return _restore(m.clone(), single)
    return _restore(blur(m.unsqueeze(1), r / 2.0)[:, 0].clamp(0, 1), single)


def _shift(x: torch.Tensor, d: int, dim: int, fill: float) -> torch.Tensor:
    """``out[i] = x[i + d]`` along ``dim`` (-1 or -2), ``fill`` beyond the edge."""
    n = x.shape[dim]
    if d == 0:
        return x
    out = torch.full_like(x, fill)
    if abs(d) >= n:
        return out
    if d > 0:
        out.narrow(dim, 0, n - d).copy_(x.narrow(dim, d, n - d))
    else:
        out.narrow(dim, -d, n + d).copy_(x.narrow(dim, 0, n + d))
    return out


def sliding_max(x: torch.Tensor, half: int, dim: int = -1) -> torch.Tensor:
    """Max over the window ``[i - half, i + half]`` along ``dim`` (-1 or -2), by doubling:
    O(log window) elementwise maxima (stride-1 max pooling is far slower on CPU)."""
    if half <= 0:
        return x.clone()
    neg = torch.finfo(x.dtype).min
    n = x.shape[dim]
    k = 2 * half + 1
    pad = (half, half) if dim in (-1, x.ndim - 1) else (0, 0, half, half)
    m = F.pad(x, pad, value=neg)  # window of output i = m[i .. i + k - 1]
    span = 1  # m[i] = max of the padded input over [i, i + span - 1]
    while span * 2 <= k:
        m = torch.maximum(m, _shift(m, span, dim, neg))
        span *= 2
    return torch.maximum(m.narrow(dim, 0, n), m.narrow(dim, k - span, n))


def box_max(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Max over the (2r+1)^2 square around each pixel of (..., H, W)."""
    return sliding_max(sliding_max(x, radius, -1), radius, -2)


def box_min(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Min over the (2r+1)^2 square around each pixel of (..., H, W)."""
    return -box_max(-x, radius)


def _disc_offsets(r: int) -> list[tuple[int, int]]:
    """Half-widths of a disc of radius r per row offset: [(dy, half_width)]."""
    return [(dy, int(math.floor(math.sqrt(r * r - dy * dy) + 1e-6))) for dy in range(-r, r + 1)]


def _max_filter_disc(x: torch.Tensor, r: int) -> torch.Tensor:
    """Grey dilation of (N, 1, H, W) by a disc of integer radius r.

    A disc is a union of horizontal segments; we take one 1-D horizontal max per distinct
    half-width and shift it vertically, which is exact for the digital disc."""
    if r <= 0:
        return x.clone()
    neg = torch.finfo(x.dtype).min
    rows = {}
    out = None
    for dy, hw in _disc_offsets(r):
        if hw not in rows:
            rows[hw] = sliding_max(x, hw, -1)
        shifted = _shift(rows[hw], dy, -2, neg)
        out = shifted if out is None else torch.maximum(out, shifted)
    return out


def dilate(mask: torch.Tensor, radius: float) -> torch.Tensor:
    """Grey dilation by a disc of radius ``round(radius)`` px (exact digital disc)."""
    r = int(round(_check_radius(radius, "mask dilate")))
    m, single = _as_batch(mask, "mask dilate")
    return _restore(_max_filter_disc(_float(m).unsqueeze(1), r)[:, 0], single)


def erode(mask: torch.Tensor, radius: float) -> torch.Tensor:
    """Grey erosion by a disc of radius ``round(radius)`` px; outside the image counts as 1,
    so a full mask stays full."""
    r = int(round(_check_radius(radius, "mask erode")))
    m, single = _as_batch(mask, "mask erode")
    return _restore(-_max_filter_disc(-_float(m).unsqueeze(1), r)[:, 0], single)


def bounding_box(mask: torch.Tensor, padding: int = 0, threshold: float = 0.5):
    """Box (x0, y0, x1, y1) of the pixels above ``threshold``, grown by ``padding`` px and clamped
    to the image; x1/y1 are exclusive. None for an empty mask. For (B, H, W) the box covers all."""
    if int(padding) < 0:
        raise ValueError(f"mask bounding box: padding must be >= 0, got {padding}")
    m, _ = _as_batch(mask, "mask bounding box")
    on = (m > threshold).any(dim=0)
    h, w = on.shape
    rows = torch.nonzero(on.any(dim=1)).flatten()
    cols = torch.nonzero(on.any(dim=0)).flatten()
    if rows.numel() == 0:
        return None
    p = int(padding)
    return (max(int(cols[0]) - p, 0), max(int(rows[0]) - p, 0),
            min(int(cols[-1]) + 1 + p, w), min(int(rows[-1]) + 1 + p, h))


def _runs(inside: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Horizontal runs of a 2-D bool tensor: flat (row-major) indices of its pixels, the run id
    of each, and the number of runs."""
    prev = torch.zeros_like(inside)
    prev[:, 1:] = inside[:, :-1]
    start = (inside & ~prev).flatten()  # first pixel of each run (a run never crosses a row start)
    flat_in = inside.flatten()
    run_id = torch.cumsum(start.to(torch.int64), 0) - 1
    return torch.nonzero(flat_in).flatten(), run_id[flat_in], int(start.sum())


def connected_component(mask: torch.Tensor, point: Sequence[float], threshold: float = 0.5,
                        max_iters: int = 10_000) -> torch.Tensor:
    """The 4-connected component of ``mask > threshold`` that contains ``point`` = (x, y).

    Pure torch label propagation by runs: each pass fills every horizontal run of the mask that
    touches the labelled set, then every vertical run (cumulative-sum run ids + scatter), until
    nothing changes. One pass crosses a whole run, so the number of passes is about the number
    of turns of the component (a handful for object masks, O(H) only for spirals). Run ids are
    computed once, and a pass only visits the rows and columns that touch the labelled set, so
    small components cost little even in big images; a full-image pass at 1024^2 costs about
    50 ms on one CPU core. Returns a float mask in
    {0, 1} of the input layout; all zero if the point is off the mask. (B, H, W) input takes
    the same point in every item.
    """
    m, single = _as_batch(mask, "connected component")
    try:
        x, y = (float(v) for v in point)
    except (TypeError, ValueError):
        raise ValueError(f"connected component: point must be (x, y), got {point!r}") from None
    b, h, w = m.shape
    if not (math.isfinite(x) and math.isfinite(y)) or not (0 <= x < w and 0 <= y < h):
        raise ValueError(f"connected component: point ({x}, {y}) is outside the {w}x{h} mask")
    xi, yi = int(x), int(y)
    outs = []
    for i in range(b):
        inside = (m[i] > threshold).cpu()
        label = torch.zeros(h * w, dtype=torch.bool)
        if inside[yi, xi]:
            idx_h, rid_h, n_h = _runs(inside)
            idx_t, rid_v, n_v = _runs(inside.t().contiguous())
            idx_v = (idx_t % h) * w + idx_t // h  # column-major positions back to row-major
            # per run: its line (row / column) and the span it covers across the other axis
            spans = []
            for idx, rid, n, line in ((idx_h, rid_h, n_h, w), (idx_t, rid_v, n_v, h)):
                ends = torch.cumsum(torch.bincount(rid, minlength=n), 0)
                first, last = idx[ends - torch.bincount(rid, minlength=n)], idx[ends - 1]
                spans.append((first // line, first % line, last % line))
            label[yi * w + xi] = True
            y0, y1, x0, x1 = yi, yi + 1, xi, xi + 1  # box of the labelled set
            count = 1
            for _ in range(max_iters):
                # only the rows (then columns) that touch the labelled set can change; in the
                # sorted pixel lists they form one contiguous slice
                for axis, (idx, rid, key, n, lo_k, hi_k) in enumerate((
                        (idx_h, rid_h, idx_h, n_h, max(y0 - 1, 0) * w, min(y1 + 1, h) * w),
                        (idx_v, rid_v, idx_t, n_v, max(x0 - 1, 0) * h, min(x1 + 1, w) * h))):
                    lo = int(torch.searchsorted(key, lo_k))
                    hi = int(torch.searchsorted(key, hi_k))
                    if hi <= lo:
                        continue
                    sub_idx, sub_rid = idx[lo:hi], rid[lo:hi]
                    hit = torch.zeros(n, dtype=torch.bool)
                    hit[sub_rid[label[sub_idx]]] = True
                    label[sub_idx] = hit[sub_rid]
                    on = torch.nonzero(hit).flatten()
                    if on.numel():
                        line, a0, a1 = (t[on] for t in spans[axis])
                        l0, l1, s0, s1 = int(line.min()), int(line.max()) + 1, int(a0.min()), int(a1.max()) + 1
                        if axis == 0:
                            y0, y1, x0, x1 = min(y0, l0), max(y1, l1), min(x0, s0), max(x1, s1)
                        else:
                            x0, x1, y0, y1 = min(x0, l0), max(x1, l1), min(y0, s0), max(y1, s1)
                new = int(label.sum())
                if new == count:
                    break
                count = new
        outs.append(label.view(h, w).to(device=m.device, dtype=torch.float32))
    return _restore(torch.stack(outs), single)


# ---------------------------------------------------------------- motion brush

BRUSH_MODES = ("paint", "erase")


def _validate_strokes(strokes) -> list[tuple[str, float, torch.Tensor]]:
    if isinstance(strokes, dict):
        strokes = [strokes]
    if not isinstance(strokes, (list, tuple)):
        raise ValueError(f"brush: strokes must be a list of {{'mode', 'radius', 'points'}}, "
                         f"got {type(strokes).__name__}")
    parsed = []
    for i, s in enumerate(strokes):
        if not isinstance(s, dict):
            raise ValueError(f"brush: stroke {i} must be an object with mode, radius and points, "
                             f"got {type(s).__name__}")
        mode = s.get("mode", "paint")
        if mode not in BRUSH_MODES:
            raise ValueError(f"brush: stroke {i} has mode {mode!r}; use 'paint' or 'erase'")
        if "radius" not in s:
            raise ValueError(f"brush: stroke {i} has no radius")
        r = s["radius"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
            raise ValueError(f"brush: stroke {i} has radius {r}; it must be a number > 0 (pixels)")
        pts = s.get("points")
        if not isinstance(pts, (list, tuple)) or len(pts) == 0:
            raise ValueError(f"brush: stroke {i} needs a non-empty list of [x, y] points")
        for j, p in enumerate(pts):
            ok = isinstance(p, (list, tuple)) and len(p) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p)
            if not ok:
                raise ValueError(f"brush: stroke {i} point {j} is {p!r}; expected [x, y] numbers")
        parsed.append((mode, float(r), torch.tensor(pts, dtype=torch.float32).view(-1, 2)))
    return parsed


def _capsules(points: torch.Tensor, radius: float, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage of the union of capsules along ``points`` over the pixel centres
    ``xs`` (W',) / ``ys`` (H',); returns (H', W')."""
    px = xs.view(1, -1)
    py = ys.view(-1, 1)
    best = None
    segs = [(points[0], points[0])] if points.shape[0] == 1 else \
        [(points[k], points[k + 1]) for k in range(points.shape[0] - 1)]
    for a, b in segs:
        d = b - a
        ll = float(d @ d)
        if ll > 0:
            t = (((px - a[0]) * d[0] + (py - a[1]) * d[1]) / ll).clamp(0, 1)
        else:
            t = torch.zeros(1, 1)
        dist2 = (px - a[0] - t * d[0]) ** 2 + (py - a[1] - t * d[1]) ** 2
        best = dist2 if best is None else torch.minimum(best, dist2)
    # a pixel is covered by the part of its unit square inside the capsule (linear ramp on the edge)
    return (radius + 0.5 - best.sqrt()).clamp(0, 1)


def rasterize_strokes(strokes, size: tuple[int, int], antialias: bool = True) -> torch.Tensor:
    """Motion-brush strokes -> mask (H, W) in [0, 1].

    ``strokes``: list of ``{"mode": "paint"|"erase", "radius": r, "points": [[x, y], ...]}``
    (pixels, pixel centres at integer coordinates) applied in order: each stroke is the union of
    capsules of radius r around its consecutive segments (a disc for a single point); "paint"
    takes the maximum with its coverage, "erase" multiplies by one minus it. ``size`` = (width,
    height). ``antialias`` False thresholds each stroke at half coverage.
    """
    w, h = (int(v) for v in size)
    if w < 1 or h < 1:
        raise ValueError(f"brush: size must be positive (width, height), got {tuple(size)}")
    out = torch.zeros(h, w)
    for mode, r, pts in _validate_strokes(strokes):
        x0 = max(int(math.floor(float(pts[:, 0].min()) - r - 1)), 0)
        x1 = min(int(math.ceil(float(pts[:, 0].max()) + r + 2)), w)
        y0 = max(int(math.floor(float(pts[:, 1].min()) - r - 1)), 0)
        y1 = min(int(math.ceil(float(pts[:, 1].max()) + r + 2)), h)
        if x0 >= x1 or y0 >= y1:
            continue  # entirely outside the image
        cov = _capsules(pts, r, torch.arange(x0, x1, dtype=torch.float32),
                        torch.arange(y0, y1, dtype=torch.float32))
        if not antialias:
            cov = (cov >= 0.5).float()
        region = out[y0:y1, x0:x1]
        if mode == "paint":
            out[y0:y1, x0:x1] = torch.maximum(region, cov)
        else:
            out[y0:y1, x0:x1] = region * (1 - cov)
    return out


def strokes_from_json(text: str):
    """Parse the brush's JSON text (a list of strokes); errors name the input."""
    import json
    try:
        data = json.loads(text) if text and text.strip() else []
    except json.JSONDecodeError as e:
        raise ValueError(f"brush: strokes are not valid JSON ({e.msg} at character {e.pos})") from None
    _validate_strokes(data)
    return data


# ---------------------------------------------------------------- soft edges


def _box_sum1d(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Sum over the window [i - r, i + r] along ``dim`` (clipped at the ends), by a running sum."""
    n = x.shape[dim]
    c = torch.cumsum(x, dim=dim)
    c = torch.cat([torch.zeros_like(c.narrow(dim, 0, 1)), c], dim=dim)  # c[i] = sum of x[:i]
    idx = torch.arange(n, device=x.device)
    hi = (idx + r + 1).clamp(max=n)
    lo = (idx - r).clamp(min=0)
    return c.index_select(dim, hi) - c.index_select(dim, lo)


def _box_mean(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over the (2r+1)^2 window of (N, C, H, W); at the border, of the pixels that exist.
    Running sums: the cost does not grow with the window."""
    h, w = x.shape[-2:]
    ones_h = _box_sum1d(torch.ones(h, dtype=x.dtype, device=x.device), r, 0)
    ones_w = _box_sum1d(torch.ones(w, dtype=x.dtype, device=x.device), r, 0)
    s = _box_sum1d(_box_sum1d(x, r, -1), r, -2)
    return s / (ones_h[:, None] * ones_w[None, :])


def guided_filter(guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """He, Sun & Tang's guided filter: ``src`` (H, W) smoothed so that its edges follow those
    of a colour ``guide`` (H, W, 3) 0-1. Locally ``out = a . guide + b`` with (a, b) the ridge
    regression of ``src`` on the guide over each (2r+1)^2 window (``eps`` the ridge weight),
    averaged over the windows covering each pixel. Returns (H, W) float32."""
    g = guide.permute(2, 0, 1)[None].to(torch.float32)  # (1, 3, H, W)
    p = src[None, None].to(torch.float32)
    r = int(radius)
    mean_g = _box_mean(g, r)
    mean_p = _box_mean(p, r)
    cov_gp = _box_mean(g * p, r) - mean_g * mean_p  # (1, 3, H, W)
    prod = torch.stack([g[:, a] * g[:, b] for a in range(3) for b in range(3)], 1)
    var = _box_mean(prod, r) - torch.stack([mean_g[:, a] * mean_g[:, b] for a in range(3) for b in range(3)], 1)
    h, w = src.shape
    sigma = var[0].permute(1, 2, 0).reshape(h, w, 3, 3) + eps * torch.eye(3, dtype=var.dtype, device=var.device)
    a = torch.linalg.solve(sigma, cov_gp[0].permute(1, 2, 0)[..., None])[..., 0]  # (H, W, 3)
    a = a.permute(2, 0, 1)[None]
    b = mean_p - (a * mean_g).sum(1, keepdim=True)
    return ((_box_mean(a, r) * g).sum(1, keepdim=True) + _box_mean(b, r))[0, 0]


MATTE_SNAP = 0.02  # matte values this close to 0 or 1 are taken as 0 or 1


def matte(image: torch.Tensor, mask: torch.Tensor, radius: int, eps: float = 1e-3) -> torch.Tensor:
    """Alpha matte of a hard object mask in a narrow band at its edge.

    image (H, W, 3) 0-1; mask (H, W) in [0, 1] (thresholded at 0.5). Within ``radius`` px of the
    mask's outline the alpha is the mask guided-filtered by the picture (so it follows the
    picture's own edge and is soft where the edge is soft, e.g. hair or blur), snapped to 0 or 1
    within ``MATTE_SNAP``; farther inside it is 1 and farther outside 0. Returns (H, W) float32
    in [0, 1]."""
    hard = (mask > 0.5).to(torch.float32)
    r = int(radius)
    if r <= 0:
        return hard
    band = (dilate(hard, r) > 0) & (erode(hard, r) < 1)
    soft = guided_filter(image, hard, r, eps).clamp(0, 1)
    soft = torch.where(soft >= 1 - MATTE_SNAP, torch.ones_like(soft), soft)
    soft = torch.where(soft <= MATTE_SNAP, torch.zeros_like(soft), soft)
    return torch.where(band, soft, hard)
