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
