"""Argument checks the kernels share. Each returns the checked value or raises a ValueError that
names the input, says what was wrong and how to fix it."""
from __future__ import annotations

import math

import torch


def finite_number(value, name: str, unit: str = "", minimum: float | None = None) -> float:
    """``value`` as a finite float (``>= minimum`` when given). ``unit`` (e.g. "pixels") only
    words the message."""
    of = f" of {unit}" if unit else ""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number{of}, got {value!r}") from None
    if not math.isfinite(x) or (minimum is not None and x < minimum):
        bound = "" if minimum is None else f" >= {minimum:g}"
        raise ValueError(f"{name}: {value!r} must be a finite number{of}{bound}")
    return x


def mask_plane(mask, size, name: str = "mask", against: str = "image") -> torch.Tensor:
    """A single mask for a picture of ``size`` = (width, height): (H, W), or (1, H, W) squeezed,
    with finite values. Returns the (H, W) tensor in its own dtype (bool stays bool)."""
    try:
        m = torch.as_tensor(mask)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name}: expected an (H, W) mask, got {type(mask).__name__}") from None
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"{name}: expected an (H, W) mask, got shape {tuple(m.shape)}")
    w, h = size
    if tuple(m.shape) != (h, w):
        raise ValueError(f"{name}: the mask is {m.shape[1]}x{m.shape[0]} but the {against} is {w}x{h} "
                         f"(width x height); resize the mask to the {against}")
    if m.is_floating_point() and not bool(torch.isfinite(m).all()):
        raise ValueError(f"{name}: the mask has NaN or infinite values")
    return m


def region_mask(mask, size, name: str, hint: str, against: str = "image", device=None) -> torch.Tensor:
    """:func:`mask_plane` as a region: (H, W) bool, True where the mask is above 0.5, on
    ``device``. An empty region is an error; ``hint`` says what to do instead."""
    m = mask_plane(mask, size, name, against)
    if device is not None:
        m = m.to(device)
    if m.dtype != torch.bool:
        m = m.to(torch.float32) > 0.5
    if not bool(m.any()):
        raise ValueError(f"{name}: the mask is empty (no pixel above 0.5); {hint}")
    return m
