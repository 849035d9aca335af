"""Classical optical flow on an image batch (OpenCV DIS), flows from frame 0, point tracking.

DIS (dense inverse search) runs on 8-bit grey frames. Two presets:

- ``medium``: OpenCV's MEDIUM preset (finest scale 1, 12 px patches, stride 3, variational
  refinement).
- ``fine``: ours, for sub-pixel accuracy at a higher cost: full resolution (finest scale 0),
  8 px patches with stride 2, 25 gradient-descent and 10 variational refinement iterations.
- ``fast`` and ``ultrafast`` map to OpenCV's presets of those names.

Flow from frame 0 to frame k (:func:`flow_from_first`) is by default **chained**: DIS between
consecutive frames, accumulated by composition ``F_k(x) = F_{k-1}(x) + f_k(x + F_{k-1}(x))``
with ``f_k`` (frame k-1 -> k) sampled bilinearly at the moved position. Consecutive frames
differ little (small displacements, nearly the same appearance), where DIS is most accurate,
and the chain follows large total motions that a direct 0 -> k match would miss; its cost is a
slow drift of sub-pixel errors. ``method="direct"`` matches frame 0 with each frame instead
(no drift, but it fails once the motion outgrows DIS's coarsest scale or the appearance
changes).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from ..kernels.flow import compose_flow, sample_field
from ..runtime import ProgressBar, check_interrupt

PRESETS = ("medium", "fine", "fast", "ultrafast")
METHODS = ("chain", "direct")
MIN_SIDE = 16


def _dis(preset: str):
    if preset not in PRESETS:
        raise ValueError(f"preset: {preset!r} is not a DIS preset; use one of {', '.join(PRESETS)}")
    if preset == "ultrafast":
        return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
    if preset == "fast":
        return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST)
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    if preset == "fine":
        dis.setFinestScale(0)
        dis.setPatchSize(8)
        dis.setPatchStride(2)
        dis.setGradientDescentIterations(25)
        dis.setVariationalRefinementIterations(10)
    return dis


def _grey(frames, name: str = "frames") -> np.ndarray:
    """(F, H, W, 3|1) float 0-1 (or (F, H, W)) -> (F, H, W) uint8 grey."""
    if not isinstance(frames, torch.Tensor):
        raise ValueError(f"{name}: expected an IMAGE tensor (F, H, W, 3), got {type(frames).__name__}")
    x = frames
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name}: expected an IMAGE batch (F, H, W, 3), got shape {tuple(frames.shape)}")
    f, h, w, c = x.shape
    if f < 1:
        raise ValueError(f"{name}: the batch has no frames")
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"{name}: {w}x{h} is too small for optical flow; frames need at least "
                         f"{MIN_SIDE} px on each side")
    x = x.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: has NaN or infinite values")
    if c == 4:
        x = x[..., :3]
    u8 = (x.clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    if u8.shape[-1] == 1:
        return np.ascontiguousarray(u8[..., 0])
    return np.stack([cv2.cvtColor(fr, cv2.COLOR_RGB2GRAY) for fr in u8])


def _pair(dis, a: np.ndarray, b: np.ndarray) -> torch.Tensor:
    """DIS flow a -> b: (H, W, 2) float32, a(x) ~ b(x + flow(x))."""
    flow = dis.calc(a, b, None)
    return torch.from_numpy(np.ascontiguousarray(flow, dtype=np.float32))


def pair_flows(frames: torch.Tensor, preset: str = "medium") -> torch.Tensor:
    """Flow between consecutive frames.

    frames: (F, H, W, 3) float 0-1 IMAGE batch, F >= 2. Returns (F-1, H, W, 2) float32 on the
    frames' device; entry k-1 maps frame k-1 to frame k (pixels, x then y).
    """
    dis = _dis(preset)
    grey = _grey(frames)
    if grey.shape[0] < 2:
        raise ValueError(f"frames: optical flow needs at least 2 frames, got {grey.shape[0]}")
    bar = ProgressBar(grey.shape[0] - 1, "optical flow")
    out = []
    for k in range(1, grey.shape[0]):
        check_interrupt()
        out.append(_pair(dis, grey[k - 1], grey[k]))
        bar.update()
    return torch.stack(out).to(frames.device)


def flow_from_first(frames: torch.Tensor, preset: str = "medium", method: str = "chain") -> torch.Tensor:
    """Flow from frame 0 to every frame.

    frames: (F, H, W, 3) float 0-1 IMAGE batch. preset: see the module docstring. method:
    ``chain`` (default; consecutive flows composed) or ``direct`` (frame 0 matched with each
    frame). Returns (F, H, W, 2) float32 pixels on the frames' device, ``flow[0] == 0``: pixel
    (x, y) of frame 0 is at (x, y) + flow[k, y, x] in frame k.
    """
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not known; use one of {', '.join(METHODS)}")
    dis = _dis(preset)
    grey = _grey(frames)
    f, h, w = grey.shape
    out = torch.zeros(f, h, w, 2)
    bar = ProgressBar(max(f - 1, 1), "optical flow")
    for k in range(1, f):
        check_interrupt()
        if method == "direct":
            out[k] = _pair(dis, grey[0], grey[k])
        else:
            out[k] = compose_flow(out[k - 1], _pair(dis, grey[k - 1], grey[k]))
        bar.update()
    return out.to(frames.device)


def track_points(frames: torch.Tensor, points, preset: str = "medium") -> torch.Tensor:
    """Follow pixels through a video by chaining frame-to-frame flow.

    frames: (F, H, W, 3) float 0-1 IMAGE batch. points: (P, 2) pixel positions (x, y) in frame 0.
    Each step moves a point by the flow from frame k-1 to k sampled bilinearly at its current
    (sub-pixel) position; points that leave the image keep following the edge flow.
    Returns (F, P, 2) float32 positions (row 0 = the given points).
    """
    pts = torch.as_tensor(points, dtype=torch.float32).detach().cpu()
    if pts.ndim == 1 and pts.shape[0] == 2:
        pts = pts[None]
    if pts.ndim != 2 or pts.shape[-1] != 2 or pts.shape[0] < 1:
        raise ValueError(f"points: expected (P, 2) pixel positions, got shape {tuple(pts.shape)}")
    if not bool(torch.isfinite(pts).all()):
        raise ValueError("points: have NaN or infinite coordinates")
    grey = _grey(frames)
    f, h, w = grey.shape
    bad = (pts[:, 0] < 0) | (pts[:, 0] > w - 1) | (pts[:, 1] < 0) | (pts[:, 1] > h - 1)
    if bool(bad.any()):
        x, y = pts[bad][0].tolist()
        raise ValueError(f"points: ({x:g}, {y:g}) is outside the {w}x{h} frames "
                         f"(x must be in 0..{w - 1}, y in 0..{h - 1})")
    dis = _dis(preset)
    out = torch.zeros(f, pts.shape[0], 2)
    out[0] = pts
    bar = ProgressBar(max(f - 1, 1), "tracking")
    for k in range(1, f):
        check_interrupt()
        step = _pair(dis, grey[k - 1], grey[k])
        out[k] = out[k - 1] + sample_field(step[None], out[k - 1][None])[0]
        bar.update()
    return out.to(frames.device)


def track_point(frames: torch.Tensor, point, preset: str = "medium") -> torch.Tensor:
    """:func:`track_points` for one point (x, y). Returns (F, 2) float32 positions."""
    p = torch.as_tensor(point, dtype=torch.float32).reshape(-1)
    if p.shape[0] != 2:
        raise ValueError(f"point: expected (x, y), got {tuple(torch.as_tensor(point).shape)} values")
    return track_points(frames, p[None], preset)[:, 0]
