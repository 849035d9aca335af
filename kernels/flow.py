"""Optical-flow utilities: colour-wheel pictures, magnitude statistics, composition, and the
Follow-Your-Click motion-strength bucket.

Flows are in pixels, x then y. A flow "from frame 0" ``(F, H, W, 2)`` says where each pixel of
frame 0 is at frame k: ``(x, y) + flow[k, y, x]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The Middlebury colour wheel (Baker et al., "A Database and Evaluation Methodology for Optical
# Flow", 2007): six hue ramps round the circle, each (steps, channel held at full, channel that
# ramps, rising): red -> yellow 15, yellow -> green 6, green -> cyan 4, cyan -> blue 11,
# blue -> magenta 13, magenta -> red 6; 55 colours in all.
WHEEL_RAMPS = ((15, 0, 1, True), (6, 1, 0, False), (4, 1, 2, True),
               (11, 2, 1, False), (13, 2, 0, True), (6, 0, 2, False))


def colour_wheel(device=None) -> torch.Tensor:
    """The wheel's colours (55, 3) float32, 0-255, starting at red (+x) and turning towards +y."""
    ramps = []
    for steps, full, ramp, rising in WHEEL_RAMPS:
        part = torch.zeros(steps, 3, device=device)
        part[:, full] = 255
        level = torch.floor(255 * torch.arange(steps, device=device) / steps)
        part[:, ramp] = level if rising else 255 - level
        ramps.append(part)
    return torch.cat(ramps)


def _wheel_picture(flow: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 2) float flow, at most 1 long -> (N, H, W, 3) float32 multiples of 1/255: the
    direction picks the hue between two neighbouring wheel colours (linearly), the length blends
    it from white."""
    wheel = colour_wheel(flow.device) / 255.0
    u, v = flow[..., 0], flow[..., 1]
    length = torch.sqrt(torch.sum(flow ** 2, dim=-1))
    turn = (torch.atan2(-v, -u) / torch.pi + 1) / 2 * (wheel.shape[0] - 1)  # 0 .. 54
    k0 = torch.floor(turn).long()
    k1 = torch.where(k0 + 1 == wheel.shape[0], torch.zeros_like(k0), k0 + 1)
    f = (turn - k0)[..., None]
    hue = (1 - f) * wheel[k0] + f * wheel[k1]
    return torch.floor(255 * (1 - length[..., None] * (1 - hue))) / 255.0

from .checks import finite_number, region_mask


def flow_to_color(flow: torch.Tensor) -> torch.Tensor:
    """Colour-wheel picture of a flow (the Middlebury wheel, as torchvision's ``flow_to_image``).

    flow: (..., H, W, 2) pixels. Hue = direction: rightwards (+x) is red, downwards (+y, image
    rows) is orange-yellow, leftwards is cyan-blue, upwards is blue-violet. Saturation =
    magnitude over the largest magnitude in the whole tensor (all frames share one scale): zero
    flow is white, the longest flow is the full wheel colour; an all-zero flow is all white.

    Returns (..., H, W, 3) float32 in [0, 1] (multiples of 1/255) on the flow's device.
    """
    flow = torch.as_tensor(flow)
    if flow.ndim < 3 or flow.shape[-1] != 2:
        raise ValueError(f"flow: expected (..., H, W, 2), got shape {tuple(flow.shape)}")
    if not bool(torch.isfinite(flow).all()):
        raise ValueError("flow: has NaN or infinite values")
    lead, (h, w) = flow.shape[:-3], flow.shape[-3:-1]
    batch = flow.reshape(-1, h, w, 2).to(torch.float32)
    longest = torch.sqrt(torch.sum(batch ** 2, dim=-1)).max()
    picture = _wheel_picture(batch / (longest + torch.finfo(torch.float32).eps))
    return picture.reshape(*lead, h, w, 3)


def _check_flow(flow, name: str = "flow") -> torch.Tensor:
    flow = torch.as_tensor(flow)
    if flow.ndim != 4 or flow.shape[-1] != 2:
        raise ValueError(f"{name}: expected (F, H, W, 2), got shape {tuple(flow.shape)}")
    if not flow.is_floating_point():
        flow = flow.to(torch.float32)
    if not bool(torch.isfinite(flow).all()):
        raise ValueError(f"{name}: has NaN or infinite values")
    return flow


def _check_mask(mask, h: int, w: int, device) -> torch.Tensor | None:
    if mask is None:
        return None
    return region_mask(mask, (w, h), "mask", "select the moving object or pass no mask", against="flow",
                       device=device)


def _percentile(values: torch.Tensor, q: float) -> float:
    """Linear-interpolated percentile (the usual definition: rank ``q/100 * (n - 1)``)."""
    v, _ = values.reshape(-1).sort()
    n = v.numel()
    pos = q / 100.0 * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return float(v[lo] * (1.0 - frac) + v[hi] * frac)


def flow_magnitude_stats(flow: torch.Tensor, mask=None, percentile: float = 90.0) -> dict:
    """Statistics of the flow magnitude ``|flow|`` over all F frames, inside a mask.

    flow: (F, H, W, 2) pixels (pass ``flow[1:]`` to leave out a zero frame 0, or
    :func:`pair_motion` for frame-to-frame motion). mask: (H, W) (or (1, H, W)), > 0.5 = inside;
    None = every pixel. percentile: 0..100.

    Returns ``{"mean": float, "percentile": float, "max": float}`` in pixels.
    """
    flow = _check_flow(flow)
    f, h, w, _ = flow.shape
    if f == 0:
        raise ValueError("flow: has no frames")
    try:
        q = float(percentile)
    except (TypeError, ValueError):
        raise ValueError(f"percentile: expected a number in 0..100, got {percentile!r}") from None
    if not (0.0 <= q <= 100.0):
        raise ValueError(f"percentile: {percentile} is outside 0..100")
    m = _check_mask(mask, h, w, flow.device)
    mag = flow.norm(dim=-1)  # (F, H, W)
    vals = mag[:, m] if m is not None else mag.reshape(f, -1)
    vals = vals.to(torch.float64)
    return {"mean": float(vals.mean()), "percentile": _percentile(vals, q), "max": float(vals.max())}


def pair_motion(flow: torch.Tensor) -> torch.Tensor:
    """Frame-to-frame motion of every frame-0 pixel: ``flow[k] - flow[k-1]``.

    flow: (F, H, W, 2) from frame 0 -> (F-1, H, W, 2). Entry k-1 is how far the pixel that
    started at (x, y) moved between frames k-1 and k (it follows the pixel, so no resampling
    is needed and a mask drawn on frame 0 keeps selecting the same pixels)."""
    flow = _check_flow(flow)
    return flow[1:] - flow[:-1]


def path_length(flow: torch.Tensor) -> torch.Tensor:
    """Distance each frame-0 pixel travels over the clip, summed frame to frame.

    flow: (F, H, W, 2) from frame 0 -> (H, W) pixels."""
    flow = _check_flow(flow)
    if flow.shape[0] < 2:
        return torch.zeros(flow.shape[1:3], dtype=flow.dtype, device=flow.device)
    return pair_motion(flow).norm(dim=-1).sum(0)


# Lower bounds (px per frame pair, at a 512 px short side) of buckets 1..10.
STRENGTH_THRESHOLDS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.5, 7.5, 10.0)


def strength_bucket(mean_magnitude: float, size, frames: int) -> int:
    """Follow-Your-Click motion-strength condition (an integer 0..10) from measured motion.

    FYC conditions its UNet on an integer "flow strength" (4 in the official demo) which the
    paper derives from the mean optical-flow magnitude inside the object mask; the official
    conversion is not released, so this mapping is our own:

    mean_magnitude: mean over the mask of the distance each pixel travels over the whole clip,
        in pixels at ``size`` (e.g. ``path_length(flow)[mask].mean()``, or ``(frames - 1)`` times
        the mean of ``flow_magnitude_stats(pair_motion(flow), mask)``).
    size: (W, H) of the frames the magnitude was measured on. frames: frames in the clip (>= 2).

    1. Per-frame-pair speed: ``v = mean_magnitude / (frames - 1)``, so clips of different length
       with the same speed get the same bucket.
    2. Resolution: ``v *= 512 / min(W, H)`` (motion as it would be at the model's 512 px).
    3. Bucket = number of thresholds ``<= v`` in :data:`STRENGTH_THRESHOLDS`
       ``(0.25, 0.5, 1, 1.5, 2, 3, 4, 5.5, 7.5, 10)`` px/pair:

       ====== ============ ================================================
       bucket px per pair  over 16 frames at 512 px (15 pairs)
       ====== ============ ================================================
       0      < 0.25       < 4 px: still
       1-3    0.25 - 1.5   4-22 px: subtle (breathing, hair, ripples)
       4      1.5 - 2      22-30 px: the demo default, a clear gentle move
       5-7    2 - 5.5      30-82 px: a walk, a turn of the head
       8-9    5.5 - 10     82-150 px: fast motion
       10     >= 10        >= 150 px (more than a quarter of the frame)
       ====== ============ ================================================

    Steps are finer at low speeds, where a difference of half a pixel per frame is visible,
    and coarser at high speeds, where the model's output saturates.
    """
    m = finite_number(mean_magnitude, "mean_magnitude", "pixels", minimum=0)
    try:
        w, h = size
        w, h = int(w), int(h)
    except (TypeError, ValueError):
        raise ValueError(f"size: expected (width, height), got {size!r}") from None
    if w < 1 or h < 1:
        raise ValueError(f"size: {w}x{h} is not a valid image size")
    try:
        whole = not isinstance(frames, bool) and int(frames) == frames and int(frames) >= 2
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole:
        raise ValueError(f"frames: {frames!r} must be a whole number >= 2 (motion needs two frames)")
    v = m / (int(frames) - 1) * 512.0 / min(w, h)
    return int(sum(1 for t in STRENGTH_THRESHOLDS if v >= t))


def motion_strength(flow: torch.Tensor, mask=None) -> int:
    """FYC strength bucket of a motion field: :func:`strength_bucket` of the mean path length
    inside ``mask``. flow: (F, H, W, 2) from frame 0, F >= 2; mask: (H, W) or None."""
    flow = _check_flow(flow)
    f, h, w, _ = flow.shape
    if f < 2:
        raise ValueError(f"flow: has {f} frame; motion strength needs at least 2 frames")
    m = _check_mask(mask, h, w, flow.device)
    length = path_length(flow)
    mean = float(length[m].mean()) if m is not None else float(length.mean())
    return strength_bucket(mean, (w, h), f)


def sample_field(field: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Bilinear sample of a field at pixel positions.

    field: (B, H, W, C); pos: (B, ..., 2) pixels (x, y), pixel (x, y) at integer x, y.
    Positions outside the image take the value of the nearest edge pixel.
    Returns (B, ..., C).
    """
    b, h, w, c = field.shape
    if pos.shape[0] != b or pos.shape[-1] != 2:
        raise ValueError(f"positions: expected ({b}, ..., 2), got {tuple(pos.shape)}")
    inner = pos.shape[1:-1]
    p = pos.reshape(b, 1, -1, 2).to(field.dtype)
    gx = p[..., 0] * (2.0 / (w - 1)) - 1.0 if w > 1 else torch.zeros_like(p[..., 0])
    gy = p[..., 1] * (2.0 / (h - 1)) - 1.0 if h > 1 else torch.zeros_like(p[..., 1])
    grid = torch.stack([gx, gy], dim=-1)
    out = F.grid_sample(field.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="border",
                        align_corners=True)  # (B, C, 1, N)
    return out[:, :, 0].permute(0, 2, 1).reshape(b, *inner, c)


def compose_flow(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Chain two flows: ``first`` a->b and ``second`` b->c give a->c.

    ``result(x) = first(x) + second(x + first(x))``, with ``second`` sampled bilinearly at the
    moved position (edge values outside the image). first, second: (..., H, W, 2) pixels,
    same shape. Returns (..., H, W, 2).
    """
    first, second = torch.as_tensor(first), torch.as_tensor(second)
    if first.shape != second.shape or first.ndim < 3 or first.shape[-1] != 2:
        raise ValueError(f"flows: expected two (..., H, W, 2) flows of the same shape, got "
                         f"{tuple(first.shape)} and {tuple(second.shape)}")
    lead = first.shape[:-3]
    h, w = first.shape[-3:-1]
    a = first.reshape(-1, h, w, 2)
    bflow = second.reshape(-1, h, w, 2).to(a.dtype)
    ys, xs = torch.meshgrid(torch.arange(h, device=a.device, dtype=a.dtype),
                            torch.arange(w, device=a.device, dtype=a.dtype), indexing="ij")
    pos = torch.stack([xs, ys], dim=-1)[None] + a
    return (a + sample_field(bflow, pos)).reshape(*lead, h, w, 2)
