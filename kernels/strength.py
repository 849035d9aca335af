"""One motion strength for every backend (pure Python / torch).

The Motion strength node measures how far a region moves (mean px per frame inside the mask) and
reports Follow-Your-Click's bucket (``kernels/flow.strength_bucket``: 0-10, thresholds in px per
frame at a 512 px short side). This module maps that bucket onto each backend's own control
(the table in docs/motion_strength.md):

- Follow-Your-Click: the bucket is its motion-strength condition (0-10, default 4);
- DynamiCrafter: the frame-rate / frame-stride condition ``fs``. 512 model: fs 15-30, lower =
  more motion, default 24; 1024 model: fs 5-15, default 10; 256 model: frame stride 1-6, higher
  = more motion, default 3 (``configs/dynamicrafter/variants.json``). The map is piecewise
  linear through three points: bucket 0 -> the least-motion end of the range, bucket 4 (FYC's
  default) -> the model's default, bucket 10 -> the most-motion end (rounded);
- the warp animator: a factor on a motion field (the ``strength`` of Motion from drags) that makes
  the field's measured speed the bucket's typical speed (:func:`bucket_speed`), so measuring the
  scaled field gives the bucket back.

DynamiCrafter's fs is a training condition, not a calibrated speed: the map fixes the direction
and the ends, not px per frame.
"""
from __future__ import annotations

import torch

from .flow import STRENGTH_THRESHOLDS, flow_magnitude_stats, pair_motion

BUCKETS = len(STRENGTH_THRESHOLDS) + 1           # 0..10
DYNAMICRAFTER_VARIANTS = ("512", "1024", "256")
# fs at bucket 0 (least motion), 4 (the model's default) and 10 (most motion)
_FS_POINTS = {"512": (30, 24, 15), "1024": (15, 10, 5), "256": (1, 3, 6)}


def check_bucket(bucket) -> int:
    if isinstance(bucket, bool) or not isinstance(bucket, int) or not 0 <= bucket < BUCKETS:
        raise ValueError(f"bucket: {bucket!r} must be a whole number in 0..{BUCKETS - 1}")
    return bucket


def bucket_speed(bucket: int) -> float:
    """Typical speed of a bucket in px per frame at 512 px: the middle of its interval (0 for
    bucket 0, 1.2 x the last threshold for the open top bucket)."""
    b = check_bucket(bucket)
    if b == 0:
        return 0.0
    lo = STRENGTH_THRESHOLDS[b - 1]
    hi = STRENGTH_THRESHOLDS[b] if b < len(STRENGTH_THRESHOLDS) else 1.4 * lo
    return (lo + hi) / 2.0


def dynamicrafter_fs(bucket: int, variant: str = "512") -> int:
    """DynamiCrafter's ``fs`` for a bucket (see the module docstring)."""
    b = check_bucket(bucket)
    if variant not in _FS_POINTS:
        raise ValueError(f"variant: {variant!r} is not one of {', '.join(DYNAMICRAFTER_VARIANTS)}")
    still, default, fast = _FS_POINTS[variant]
    fs = still + (default - still) * b / 4 if b <= 4 else default + (fast - default) * (b - 4) / 6
    return int(round(fs))


def field_speed(flow: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean speed inside ``mask`` of a motion field (F, H, W, 2), px per frame at 512 px: the
    number the Motion strength node reports, at the model size."""
    f, h, w, _ = flow.shape
    if f < 2:
        raise ValueError(f"motion: {f} frame; a speed needs at least 2")
    mean = flow_magnitude_stats(pair_motion(flow), mask)["mean"]
    return mean * 512.0 / min(h, w)


def warp_strength(bucket: int, flow: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """The factor on a motion field (F, H, W, 2) that gives it the bucket's typical speed inside
    ``mask`` (0 for bucket 0). Motion fields are linear in their strength, so the scaled field
    measures as ``bucket``."""
    target = bucket_speed(bucket)
    speed = field_speed(flow, mask)
    if target == 0:
        return 0.0
    if speed <= 1e-6:
        raise ValueError("motion: the motion field does not move inside the mask; draw a drag on the region")
    return target / speed
