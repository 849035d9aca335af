"""Points and tracks as they travel between nodes (JSON strings), parsed into tensors.

Accepted strings (coordinates in image pixels, x then y, origin top-left, unless the dict
form says ``"normalized": true``, in which case 0-1 of width/height):

Points (clicks)
    ``[{"x": 120, "y": 80}, ...]``                 KJNodes PointsEditor coordinates
    ``[[120, 80], ...]``                            plain list
    ``{"positive": [...], "negative": [...], "box": [x0, y0, x1, y1] | null,
      "normalized": false}``                        Kinema points editor (either point form)

Tracks (drags / trajectories; each track is a list of points over time)
    ``[{"x": .., "y": ..}, ...]``                   one track (KJNodes SplineEditor)
    ``[[{"x": .., "y": ..}, ...], ...]``            several tracks (core WanTrackToVideo)
    ``[[[x, y], [x, y], ...], ...]``                plain list of tracks
    ``{"tracks": [...], "anchors": [[x, y], ...], "normalized": false}``
                                                    Kinema drag editor (anchors are static
                                                    points that must not move)

Every parse error is a ``ValueError`` naming the input.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch


@dataclass
class Points:
    """Clicks on one image. ``positive``/``negative``: (N, 2) float pixels; ``box``: (4,) or None."""
    positive: torch.Tensor
    negative: torch.Tensor
    box: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return int(self.positive.shape[0] + self.negative.shape[0])


@dataclass
class Tracks:
    """Drags on one image. ``tracks``: list of (N_i, 2) float pixels, point i at time i/(N_i-1);
    ``anchors``: (M, 2) float pixels that stay still."""
    tracks: list[torch.Tensor] = field(default_factory=list)
    anchors: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 2))

    def __len__(self) -> int:
        return len(self.tracks)


def load_json(text, name: str):
    """Parse a JSON input (a string, or an already parsed list/dict); errors name the input."""
    if isinstance(text, (list, dict)):
        return text
    if text is None or not str(text).strip():
        return []
    try:
        return json.loads(str(text))
    except json.JSONDecodeError:
        try:  # the ecosystem sometimes writes single quotes
            return json.loads(str(text).replace("'", '"'))
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: not valid JSON ({e.msg} at character {e.pos}); "
                             f"expected e.g. [{{\"x\": 10, \"y\": 20}}] or [[10, 20]]") from None


def _point(p, name: str) -> tuple[float, float]:
    if isinstance(p, dict):
        if "x" not in p or "y" not in p:
            raise ValueError(f"{name}: point {p!r} has no 'x' and 'y'")
        x, y = p["x"], p["y"]
    elif isinstance(p, (list, tuple)) and len(p) >= 2:
        x, y = p[0], p[1]
    else:
        raise ValueError(f"{name}: {p!r} is not a point; use {{\"x\": .., \"y\": ..}} or [x, y]")
    try:
        x, y = float(x), float(y)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: point {p!r} has a coordinate that is not a number") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"{name}: point {p!r} has a NaN or infinite coordinate")
    return x, y


def _points(seq, name: str) -> torch.Tensor:
    if not isinstance(seq, (list, tuple)):
        raise ValueError(f"{name}: expected a list of points, got {type(seq).__name__}")
    pts = [_point(p, name) for p in seq]
    return torch.tensor(pts, dtype=torch.float32).reshape(-1, 2)


def _is_point(p) -> bool:
    return isinstance(p, dict) and "x" in p or (
        isinstance(p, (list, tuple)) and len(p) in (2, 3) and all(isinstance(v, (int, float)) for v in p))


def _scale(t: torch.Tensor, normalized: bool, size) -> torch.Tensor:
    if not normalized:
        return t
    if size is None:
        raise ValueError("normalized coordinates need the image size")
    w, h = size
    return t * torch.tensor([float(w), float(h)])


def check_inside(t: torch.Tensor, size: tuple[int, int], name: str) -> None:
    """Error if any point of (N, 2) lies outside a ``size`` = (width, height) image."""
    if t.numel() == 0:
        return
    w, h = size
    bad = (t[:, 0] < 0) | (t[:, 0] > w - 1) | (t[:, 1] < 0) | (t[:, 1] > h - 1)
    if bool(bad.any()):
        x, y = t[bad][0].tolist()
        raise ValueError(f"{name}: ({x:g}, {y:g}) is outside the {w}x{h} image "
                         f"(x must be in 0..{w - 1}, y in 0..{h - 1})")


def parse_points(text, size: tuple[int, int] | None = None, negative_text=None,
                 name: str = "points") -> Points:
    """Parse clicks. ``size`` = (width, height) checks they lie inside the image."""
    data = load_json(text, name)
    box = None
    normalized = False
    if isinstance(data, dict):
        normalized = bool(data.get("normalized", False))
        pos = _points(data.get("positive", []), name)
        neg = _points(data.get("negative", []), name)
        if data.get("box") is not None:
            b = data["box"]
            if not isinstance(b, (list, tuple)) or len(b) != 4:
                raise ValueError(f"{name}: box must be [x0, y0, x1, y1], got {b!r}")
            box = _points([b[:2], b[2:]], name + " box").reshape(4)
    else:
        pos = _points(data, name)
        neg = torch.zeros(0, 2)
    if negative_text is not None:
        neg = torch.cat([neg, _points(load_json(negative_text, "negative_points"), "negative_points")])
    pos, neg = _scale(pos, normalized, size), _scale(neg, normalized, size)
    if box is not None:
        box = _scale(box.reshape(2, 2), normalized, size).reshape(4)
        box = torch.stack([box[[0, 2]].min(), box[[1, 3]].min(), box[[0, 2]].max(), box[[1, 3]].max()])
    if size is not None:
        check_inside(pos, size, name)
        check_inside(neg, size, "negative " + name if negative_text is None else "negative_points")
        if box is not None:
            check_inside(box.reshape(2, 2), size, name + " box")
    return Points(pos, neg, box)


def parse_tracks(text, size: tuple[int, int] | None = None, anchors_text=None,
                 name: str = "tracks") -> Tracks:
    """Parse drags/trajectories (and optional anchors). Every track needs >= 2 points."""
    data = load_json(text, name)
    normalized = False
    anchors = torch.zeros(0, 2)
    if isinstance(data, dict):
        normalized = bool(data.get("normalized", False))
        anchors = _points(data.get("anchors", []), name + " anchors")
        data = data.get("tracks", [])
    if not isinstance(data, list):
        raise ValueError(f"{name}: expected a list of tracks, got {type(data).__name__}")
    if data and _is_point(data[0]):
        data = [data]  # a single track
    tracks = []
    for i, tr in enumerate(data):
        t = _points(tr, f"{name}[{i}]")
        if t.shape[0] < 2:
            raise ValueError(f"{name}: track {i} has {t.shape[0]} point(s); a drag needs a start and an "
                             f"end (2 or more points). Use anchors for points that must stay still.")
        tracks.append(_scale(t, normalized, size))
    if anchors_text is not None:
        anchors = torch.cat([anchors, _points(load_json(anchors_text, "anchors"), "anchors")])
    anchors = _scale(anchors, normalized, size)
    if size is not None:
        for i, t in enumerate(tracks):
            check_inside(t[:1], size, f"{name}[{i}] start")
        check_inside(anchors, size, "anchors")
    return Tracks(tracks, anchors)


def tracks_to_json(tracks: Tracks) -> str:
    """The Kinema dict form, pixels."""
    return json.dumps({
        "tracks": [[{"x": round(float(x), 3), "y": round(float(y), 3)} for x, y in t.tolist()] for t in tracks.tracks],
        "anchors": [{"x": round(float(x), 3), "y": round(float(y), 3)} for x, y in tracks.anchors.tolist()],
    })


WAN_TRACK_SAMPLES = 121  # WanTrackToVideo reads 121 samples per track, spread over the clip


def wan_fit(size: tuple[int, int], out_size: tuple[int, int]):
    """How WanTrackToVideo fits a start image of ``size`` (W, H) into its video of ``out_size``:
    centre-cropped to the video's shape, then scaled (ComfyUI's ``common_upscale(...,
    "center")``). Returns ``f(xy) -> xy``: image pixels (centre at integer coordinates) to
    video pixels."""
    w, h = size
    ow, oh = out_size
    aspect, out_aspect = w / h, ow / oh
    x0 = y0 = 0
    if aspect > out_aspect:
        x0 = round((w - w * (out_aspect / aspect)) / 2)
    elif aspect < out_aspect:
        y0 = round((h - h * (aspect / out_aspect)) / 2)
    sx, sy = ow / (w - 2 * x0), oh / (h - 2 * y0)

    def fit(xy: torch.Tensor) -> torch.Tensor:
        return torch.stack([(xy[..., 0] - x0 + 0.5) * sx - 0.5, (xy[..., 1] - y0 + 0.5) * sy - 0.5], -1)
    return fit


def wan_tracks_json(positions: list[torch.Tensor], size: tuple[int, int], out_size: tuple[int, int]) -> str:
    """Tracks in core WanTrackToVideo's format: ``[[{"x": .., "y": ..}, ...], ...]``, one list of
    :data:`WAN_TRACK_SAMPLES` points per track (``positions``: (121, 2) image pixels each),
    in the pixels of its ``out_size`` (W, H) video (see :func:`wan_fit`)."""
    fit = wan_fit(size, out_size)
    out = []
    for p in positions:
        if tuple(p.shape) != (WAN_TRACK_SAMPLES, 2):
            raise ValueError(f"wan tracks: expected ({WAN_TRACK_SAMPLES}, 2) positions, got {tuple(p.shape)}")
        q = fit(p.to(torch.float64))
        out.append([{"x": round(float(x), 2), "y": round(float(y), 2)} for x, y in q.tolist()])
    return json.dumps(out)
