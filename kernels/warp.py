"""Backward warping and forward soft splatting (pure torch).

Conventions: images are (B, C, H, W); flows are (B, H, W, 2) in pixels, x then y.
``backward_warp`` reads: ``out[y, x] = src[y + fy, x + fx]``.
``soft_splat`` writes: ``src[y, x]`` lands at ``(x + fx, y + fy)``, spread bilinearly over the
four neighbouring pixels (scatter-add), as in "Softmax Splatting for Video Frame
Interpolation" (Niklaus & Liu, 2020).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SPLAT_MODES = ("sum", "avg", "linear", "softmax")


def _check(src: torch.Tensor, flow: torch.Tensor, name: str) -> None:
    if src.ndim != 4:
        raise ValueError(f"{name}: src must be (B, C, H, W), got {tuple(src.shape)}")
    b, _, h, w = src.shape
    if tuple(flow.shape) != (b, h, w, 2):
        raise ValueError(f"{name}: flow must be (B, H, W, 2) = {(b, h, w, 2)}, got {tuple(flow.shape)}")


def base_grid(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Pixel coordinates (H, W, 2), x then y."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype),
                            torch.arange(w, device=device, dtype=dtype), indexing="ij")
    return torch.stack([xs, ys], dim=-1)


def backward_warp(src: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear",
                  padding_mode: str = "border") -> torch.Tensor:
    """Sample ``src`` at ``p + flow(p)``. src (B, C, H, W), flow (B, H, W, 2) -> (B, C, H, W)."""
    _check(src, flow, "backward_warp")
    b, _, h, w = src.shape
    pos = base_grid(h, w, src.device, flow.dtype) + flow
    gx = pos[..., 0] * (2.0 / max(w - 1, 1)) - 1.0
    gy = pos[..., 1] * (2.0 / max(h - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1).to(src.dtype)
    return F.grid_sample(src, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def soft_splat(src: torch.Tensor, flow: torch.Tensor, metric: torch.Tensor | None = None,
               mode: str = "avg", eps: float = 1e-7, return_weight: bool = False):
    """Forward-splat ``src`` by ``flow``.

    src (B, C, H, W); flow (B, H, W, 2) pixels; metric (B, 1, H, W) for "linear"/"softmax".
    Modes: "sum" (plain accumulation), "avg" (divided by the accumulated bilinear weight),
    "linear" (weighted by ``metric``), "softmax" (weighted by ``exp(metric)``: the larger metric
    wins where several sources land on one pixel, e.g. a foreground object over background).
    Sources landing outside the image are dropped; holes are 0 in every mode.
    Returns out (B, C, H, W), plus the normaliser (B, 1, H, W) (the summed weights; 0 in holes)
    when ``return_weight``.
    """
    _check(src, flow, "soft_splat")
    if mode not in SPLAT_MODES:
        raise ValueError(f"soft_splat: mode must be one of {SPLAT_MODES}, got {mode!r}")
    b, c, h, w = src.shape
    dtype = torch.promote_types(src.dtype, torch.float32)
    if mode in ("linear", "softmax"):
        if metric is None or tuple(metric.shape) != (b, 1, h, w):
            raise ValueError(f"soft_splat: mode {mode!r} needs metric (B, 1, H, W) = {(b, 1, h, w)}")
        m = metric.to(dtype)
        if mode == "softmax":
            # exp(m - max) avoids overflow; eps is scaled by the same factor so that the result
            # equals the unshifted exp(m) / (sum + eps) and low-metric pixels keep their value
            shift = m.amax(dim=(1, 2, 3), keepdim=True)
            m = torch.exp(m - shift)
            eps = eps * torch.exp(-shift)
        weight_src = m
    else:
        weight_src = torch.ones(b, 1, h, w, dtype=dtype, device=src.device)

    values = torch.cat([src.to(dtype) * weight_src, weight_src], dim=1).reshape(b, c + 1, h * w)
    pos = (base_grid(h, w, src.device, dtype).unsqueeze(0) + flow.to(dtype)).reshape(b, h * w, 2)
    acc = splat_points(values, pos, (w, h))
    out, norm = acc[:, :c], acc[:, c:]
    if mode != "sum":
        out = torch.where(norm > 0, out / (norm + eps), torch.zeros_like(out))
    out = out.to(src.dtype)
    return (out, norm) if return_weight else out


def splat_points(values: torch.Tensor, pos: torch.Tensor, size: tuple[int, int],
                 acc: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear scatter-add of N point values into an image.

    values (B, C, N); pos (B, N, 2) pixels, x then y (pixel centres at integers); size =
    (width, height). Each value is spread over the four pixels around its position with bilinear
    weights; points that land (partly) outside the image lose that part, non-finite positions are
    dropped. Adds into ``acc`` (B, C, H, W) in place when given, else into zeros; returns it.
    This is the core of ``soft_splat``; splatting only the pixels that move (a sparse set) is
    much cheaper than splatting whole frames.
    """
    if (values.ndim != 3 or pos.ndim != 3 or pos.shape[-1] != 2
            or pos.shape[:2] != (values.shape[0], values.shape[2])):
        raise ValueError(f"splat_points: values must be (B, C, N) and pos (B, N, 2), got "
                         f"{tuple(values.shape)} and {tuple(pos.shape)}")
    b, c, n = values.shape
    w, h = int(size[0]), int(size[1])
    if acc is None:
        acc = torch.zeros(b, c, h, w, dtype=values.dtype, device=values.device)
    elif tuple(acc.shape) != (b, c, h, w) or not acc.is_contiguous():
        raise ValueError(f"splat_points: acc must be a contiguous (B, C, H, W) = {(b, c, h, w)}, "
                         f"got {tuple(acc.shape)}")
    if n == 0:
        return acc
    flat = acc.view(b, c, h * w)
    x, y = pos[..., 0].unsqueeze(1), pos[..., 1].unsqueeze(1)  # (B, 1, N)
    finite = torch.isfinite(x) & torch.isfinite(y)
    x = torch.where(finite, x, torch.full_like(x, -2.0))
    y = torch.where(finite, y, torch.full_like(y, -2.0))
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    for dx, dy, wt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                       (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1) & (wt > 0)
        if not bool(ok.any()):
            continue
        idx = torch.where(ok, yi * w + xi, torch.zeros_like(xi)).long()
        contrib = values * torch.where(ok, wt, torch.zeros_like(wt))
        flat.scatter_add_(2, idx.expand(b, c, -1), contrib)
    return acc


def splat_operator(flow: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """The "avg" :func:`soft_splat` of ``flow`` as a sparse linear map, to build once and apply
    to many sources (every channel and every call shares the flow's positions and weights).

    flow (B, H, W, 2) pixels -> coalesced sparse COO (B*H*W, B*H*W), float32, block diagonal
    over the batch: row b*H*W + target pixel, column b*H*W + source pixel, value the source's
    bilinear weight at the target divided by the target's summed weight (+ ``eps``). For src
    (B, C, H, W) read as tokens ``t = src.permute(0, 2, 3, 1).reshape(B*H*W, C)``,
    ``S @ t`` equals ``soft_splat(src, flow, mode="avg")`` read the same way (holes 0, sources
    leaving the image or with non-finite positions dropped).
    """
    if flow.ndim != 4 or flow.shape[-1] != 2:
        raise ValueError(f"splat_operator: flow must be (B, H, W, 2), got {tuple(flow.shape)}")
    b, h, w, _ = flow.shape
    hw = h * w
    pos = (base_grid(h, w, flow.device) + flow.float()).reshape(b, hw, 2)
    x, y = pos[..., 0], pos[..., 1]
    finite = torch.isfinite(x) & torch.isfinite(y)
    x = torch.where(finite, x, torch.full_like(x, -2.0))
    y = torch.where(finite, y, torch.full_like(y, -2.0))
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    source = torch.arange(b * hw, device=flow.device).view(b, hw)
    offset = (torch.arange(b, device=flow.device) * hw).view(b, 1)
    rows, cols, vals = [], [], []
    for dx, dy, wt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                       (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1) & (wt > 0)
        rows.append((yi * w + xi).long().add_(offset)[ok])
        cols.append(source[ok])
        vals.append(wt[ok])
    rows, cols, vals = torch.cat(rows), torch.cat(cols), torch.cat(vals)
    norm = torch.zeros(b * hw, dtype=vals.dtype, device=flow.device).index_add_(0, rows, vals)
    vals = vals / (norm[rows] + eps)
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (b * hw, b * hw),
                                   check_invariants=False).coalesce()


# ---------------------------------------------------------------- sharp resampling

LANCZOS_SHIFT = 6  # lobes of the separable kernel for translations (12 taps)
LANCZOS_SAMPLE = 3  # lobes of the 2-D kernel for general maps (6 x 6 taps)


def lanczos_weights(frac: torch.Tensor, a: int) -> torch.Tensor:
    """Normalised Lanczos-``a`` weights (..., 2a) for sampling at ``i + frac`` (frac in [0, 1))
    from the samples ``i - a + 1 .. i + a``."""
    wide = torch.float64 if frac.device.type != "mps" else torch.float32  # MPS has no float64
    offs = torch.arange(-a + 1, a + 1, dtype=wide, device=frac.device)
    d = frac.to(wide)[..., None] - offs
    pd = torch.pi * d
    w = torch.where(d.abs() < 1e-9, torch.ones_like(d), a * torch.sin(pd) * torch.sin(pd / a) / (pd * pd).clamp_min(1e-18))
    w = torch.where(d.abs() < a, w, torch.zeros_like(w))
    w = torch.where(d == d.round(), (d == 0).to(w.dtype), w)  # exactly a copy at whole pixels
    return (w / w.sum(-1, keepdim=True)).to(torch.float32)


def translate(x: torch.Tensor, shifts: torch.Tensor, a: int = LANCZOS_SHIFT) -> torch.Tensor:
    """Move the content of each image by a sub-pixel shift, sharply: ``out[n](p) = x(p - d_n)``.

    x (C, H, W) one image; shifts (N, 2) pixels, x then y. Separable Lanczos-``a``
    resampling (exact for whole-pixel shifts); what comes in from beyond the edge is 0.
    Returns (N, C, H, W)."""
    c, h, w = x.shape
    n = shifts.shape[0]
    sh = shifts.to(torch.float64).cpu()
    ix, iy = torch.floor(sh[:, 0]), torch.floor(sh[:, 1])
    fx, fy = sh[:, 0] - ix, sh[:, 1] - iy
    # out(p) = x(p - d): sampled at p - d = (p - i - 1) + (1 - f): integer base p - i - 1, fraction 1 - f
    wx = lanczos_weights(torch.where(fx > 0, 1 - fx, torch.zeros_like(fx)), a).to(x.device)  # (N, 2a)
    wy = lanczos_weights(torch.where(fy > 0, 1 - fy, torch.zeros_like(fy)), a).to(x.device)
    bx = torch.where(fx > 0, ix + 1, ix).long()
    by = torch.where(fy > 0, iy + 1, iy).long()
    pad = a + int(max(bx.abs().max(), by.abs().max()))
    xp = F.pad(x, (pad, pad, pad, pad))
    crops = []
    for k in range(n):  # whole-pixel part: a view per frame
        y0 = pad - int(by[k]) - a + 1
        x0 = pad - int(bx[k]) - a + 1
        crops.append(xp[:, y0:y0 + h + 2 * a - 1, x0:x0 + w + 2 * a - 1])
    stack = torch.stack(crops).reshape(1, n * c, h + 2 * a - 1, w + 2 * a - 1)
    kx = wx.repeat_interleave(c, 0).view(n * c, 1, 1, 2 * a)
    ky = wy.repeat_interleave(c, 0).view(n * c, 1, 2 * a, 1)
    out = F.conv2d(F.conv2d(stack, kx, groups=n * c), ky, groups=n * c)
    return out.view(n, c, h, w)


def sample_lanczos(x: torch.Tensor, pos: torch.Tensor, a: int = LANCZOS_SAMPLE) -> torch.Tensor:
    """Sample (C, H, W) at pixel positions ``pos`` (..., 2), x then y, with a 2-D Lanczos-``a``
    kernel; positions beyond the edge read 0. Returns (C, ...)."""
    c, h, w = x.shape
    shape = pos.shape[:-1]
    p = pos.reshape(-1, 2).to(torch.float32)
    x0, y0 = torch.floor(p[:, 0]), torch.floor(p[:, 1])
    wx = lanczos_weights(p[:, 0] - x0, a)  # (M, 2a)
    wy = lanczos_weights(p[:, 1] - y0, a)
    offs = torch.arange(-a + 1, a + 1, device=x.device)
    xi = x0.long()[:, None] + offs
    yi = y0.long()[:, None] + offs
    okx = (xi >= 0) & (xi < w)
    oky = (yi >= 0) & (yi < h)
    wx = wx * okx
    wy = wy * oky
    xi, yi = xi.clamp(0, w - 1), yi.clamp(0, h - 1)
    flat = x.reshape(c, -1)
    out = torch.zeros(c, p.shape[0], dtype=x.dtype, device=x.device)
    for j in range(2 * a):
        rows = flat[:, yi[:, j:j + 1] * w + xi]  # (C, M, 2a)
        out += wy[:, j] * (rows * wx).sum(-1)
    return out.view(c, *shape)


def invert_flow(flow: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Backward map of a smooth forward flow: for every pixel q the source p with
    ``p + flow(p) = q``, by the fixed-point iteration ``p <- q - flow(p)`` (flow sampled
    bilinearly; converges where the flow's gradient is below 1). flow (N, H, W, 2) ->
    positions (N, H, W, 2) in pixels, x then y."""
    n, h, w, _ = flow.shape
    q = base_grid(h, w, flow.device, flow.dtype).unsqueeze(0)
    src = flow.permute(0, 3, 1, 2)
    p = q - flow
    for _ in range(iters):
        gx = p[..., 0] * (2.0 / max(w - 1, 1)) - 1.0
        gy = p[..., 1] * (2.0 / max(h - 1, 1)) - 1.0
        f = F.grid_sample(src, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="border",
                          align_corners=True).permute(0, 2, 3, 1)
        p = q - f
    return p
