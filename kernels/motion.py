"""Sparse-to-dense motion: drags (tracks) -> a dense per-frame motion field.

A *track* (a drag, a trajectory) is a polyline ``(N, 2)`` of pixel positions, x then y;
its point ``i`` is at time ``i / (N - 1)``, so the first point is where the drag starts
(time 0) and the last where it ends (time 1). A *motion field* is ``(F, H, W, 2)`` float32:
the displacement in pixels of each frame-0 pixel at frame ``k``, with ``flow[0] == 0``.

Pipeline of :func:`dense_motion`:

1. Timing. Frame ``k`` of ``F`` sits at ``s = k / (F - 1)``; an easing curve maps it to the
   track time ``t = ease(s, kind)`` (:func:`ease`), and each track is sampled at ``t``
   (:func:`sample_track`). The displacement of drag ``i`` at frame ``k`` is
   ``strength * (track_i(t_k) - track_i(0))``.
2. Interpolation in space. The drag starts carry their displacements; anchors carry zero.
   The field between them comes from per-pixel weights ``(H*W, K)`` computed once, so every
   frame is one matrix product. ``interpolation``:

   - ``shepard`` (default): inverse-distance weights ``w_i = |x - c_i|^-2 / sum_j |x - c_j|^-2``
     over drag starts and anchors. Interpolating (exact at every centre), smooth between, and
     a convex combination of the drag displacements, so it never overshoots: nothing moves
     farther than the drags, and no pixel moves against them (e.g. behind an anchor).
   - ``rbf``: inverse multiquadric ``phi(r) = 1 / sqrt(1 + (r / eps)^2)`` plus a constant,
     from a small ``(n+1) x (n+1)`` linear system over the n centres, solved once in float64
     (``eps`` = mean nearest-centre spacing, clamped to [min(W, H)/16, min(W, H)]). Smoother
     blends between distant drags, but like every RBF it can overshoot near close centres.

   Either way a single drag (with no anchors in play) gives a pure translation.
3. Locality. The interpolant is multiplied by an envelope ``E(x)`` in [0, 1] that is exactly 1
   at every drag start (so starts follow their drags exactly) and exactly 0 far away:

   - with a ``region`` mask: ``E = 1`` on the region and falls smoothly to 0 over ``falloff``
     pixels of Euclidean distance outside it; beyond region + falloff the flow is exactly 0.
     The region moves as a whole: one drag translates it rigidly; several drags are
     interpolated between.
   - without a mask: each drag ``i`` has a disc of radius ``R_i = L_i + falloff`` around its
     start, where ``L_i`` is the drag's reach (the largest distance of any of its points from
     its start); ``E = 1 - prod_i (1 - b((|x - s_i| - c) / (R_i - c)))`` with the bump
     ``b(u) = 1 - smoothstep(u)`` (``b(u) = 1`` for ``u <= 0``, ``0`` for ``u >= 1``) and a core
     ``c = falloff / 4``: a small disc around the clicked point moves with it as a whole (so
     the point stays trackable), then the influence fades out. Pixels farther than
     ``max_i R_i`` from every drag start get exactly zero flow.

   Anchors are pinned: the interpolant is 0 there and their pixels are set to exactly 0.

Everything is pure torch and runs on the device of the inputs (or ``device=``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .checks import finite_number, region_mask

MAX_FRAMES = 256
"""Largest number of frames :func:`dense_motion` and :func:`resample_track` produce."""

EASINGS = ("linear", "ease_in", "ease_out", "ease_in_out", "ease_out_back", "loop")
"""Easing kinds understood by :func:`ease`."""

TRACK_INTERPOLATIONS = ("linear", "pchip")

_BACK = 1.70158  # overshoot constant of the classic "back" easing (about 10 % overshoot)
_PIXEL_CHUNK = 65536  # pixels per block when evaluating the interpolant
START_SNAP = 4.0  # px: a drag starting this close to the region still moves it


# ----------------------------------------------------------------------------------------
# easing


def ease(t, kind: str = "linear") -> torch.Tensor:
    """Easing curve applied to a normalised time ``t`` (any shape, values in [0, 1]).

    Every curve has ``ease(0) == 0``; all but ``loop`` have ``ease(1) == 1``.

    - ``linear``:        ``t``
    - ``ease_in``:       ``t^2`` (starts slowly, ends fast)
    - ``ease_out``:      ``1 - (1 - t)^2`` (starts fast, ends slowly)
    - ``ease_in_out``:   ``3 t^2 - 2 t^3`` (smoothstep: slow at both ends)
    - ``ease_out_back``: ``1 + (c + 1)(t - 1)^3 + c (t - 1)^2`` with ``c = 1.70158``: overshoots
      the end by 10 % (maximum 1.100 at ``t ~ 0.58``) and settles back at ``t = 1``
    - ``loop``:          ``sin^2(pi t)``: out and back smoothly; 0 at ``t = 0`` and ``t = 1``,
      1 at ``t = 0.5``, zero speed at both ends and at the turn

    Returns a floating tensor of the same shape (float32 unless ``t`` is already floating).
    """
    if kind not in EASINGS:
        raise ValueError(f"easing: {kind!r} is not a known easing; use one of {', '.join(EASINGS)}")
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        t = t.to(torch.float32)
    if t.numel():
        if not bool(torch.isfinite(t).all()):
            raise ValueError("easing: time t has NaN or infinite values; pass times in [0, 1]")
        lo, hi = float(t.min()), float(t.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"easing: time t must lie in [0, 1], got values in [{lo:g}, {hi:g}]")
    if kind == "linear":
        return t.clone()
    if kind == "ease_in":
        return t * t
    if kind == "ease_out":
        u = 1.0 - t
        return 1.0 - u * u
    if kind == "ease_in_out":
        return t * t * (3.0 - 2.0 * t)
    if kind == "ease_out_back":
        u = t - 1.0
        return 1.0 + (_BACK + 1.0) * u * u * u + _BACK * u * u
    # loop
    s = torch.sin(math.pi * t)
    out = s * s
    return torch.where((t == 0) | (t == 1), torch.zeros_like(out), out)


# ----------------------------------------------------------------------------------------
# tracks


def _as_track(track, name: str, dtype=torch.float64, device=None) -> torch.Tensor:
    try:
        tr = torch.as_tensor(track)
    except Exception:
        raise ValueError(f"{name}: expected an (N, 2) list or tensor of x, y points, "
                         f"got {type(track).__name__}") from None
    if tr.ndim != 2 or tr.shape[-1] != 2 or tr.shape[0] < 1:
        raise ValueError(f"{name}: expected an (N, 2) tensor of x, y points, got shape {tuple(tr.shape)}")
    tr = tr.to(device=device if device is not None else tr.device, dtype=dtype)
    if not bool(torch.isfinite(tr).all()):
        raise ValueError(f"{name}: has NaN or infinite coordinates")
    return tr


def _pchip_slopes(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Shape-preserving (Fritsch-Butland) derivatives at the knots.

    h: (N-1,) knot spacing; y: (N, C) values -> (N, C) derivatives. Interior derivative is
    the weighted harmonic mean of the neighbouring secant slopes (0 where they differ in sign
    or one is 0); end derivatives are the one-sided three-point estimate, limited so the
    curve stays monotone where the data is.
    """
    m = (y[1:] - y[:-1]) / h[:, None]  # (N-1, C) secant slopes
    n = y.shape[0]
    if n == 2:
        return torch.cat([m, m], dim=0)
    d = torch.zeros_like(y)
    h0, h1 = h[:-1, None], h[1:, None]
    m0, m1 = m[:-1], m[1:]
    w1 = 2.0 * h1 + h0
    w2 = h1 + 2.0 * h0
    flat = (torch.sign(m0) != torch.sign(m1)) | (m0 == 0) | (m1 == 0)
    safe0 = torch.where(flat, torch.ones_like(m0), m0)
    safe1 = torch.where(flat, torch.ones_like(m1), m1)
    harm = (w1 + w2) / (w1 / safe0 + w2 / safe1)
    d[1:-1] = torch.where(flat, torch.zeros_like(harm), harm)

    def edge(ha, hb, ma, mb):
        e = ((2.0 * ha + hb) * ma - ha * mb) / (ha + hb)
        e = torch.where(torch.sign(e) != torch.sign(ma), torch.zeros_like(e), e)
        clip = (torch.sign(ma) != torch.sign(mb)) & (e.abs() > 3.0 * ma.abs())
        return torch.where(clip, 3.0 * ma, e)

    d[0] = edge(h[0], h[1], m[0], m[1])
    d[-1] = edge(h[-1], h[-2], m[-1], m[-2])
    return d


def sample_track(track, t, method: str = "linear") -> torch.Tensor:
    """Position of a track at times ``t``.

    track: (N, 2) pixels, point ``i`` at time ``i / (N - 1)``; t: (T,) times (values outside
    [0, 1] extrapolate along the first/last piece: an overshooting easing carries the point
    past the end of the drag along its last direction). method:

    - ``linear``: piecewise-linear in time between consecutive points; exact at the points.
    - ``pchip``: piecewise-cubic Hermite with shape-preserving slopes (what SciPy's
      ``PchipInterpolator`` computes over ``linspace(0, 1, N)``, x and y separately), the
      trajectory interpolation of Motion-I2V's demo; extrapolates linearly with the end slope.

    Returns (T, 2) in the track's floating dtype (float32 for integer input).
    """
    if method not in TRACK_INTERPOLATIONS:
        raise ValueError(f"track interpolation: {method!r} is not known; use one of "
                         f"{', '.join(TRACK_INTERPOLATIONS)}")
    tr = torch.as_tensor(track)
    dtype = tr.dtype if tr.is_floating_point() else torch.float32
    tr = _as_track(tr, "track", dtype=dtype)
    t = torch.as_tensor(t, dtype=dtype, device=tr.device).reshape(-1)
    if not bool(torch.isfinite(t).all()):
        raise ValueError("track: sample times have NaN or infinite values")
    n = tr.shape[0]
    if n == 1:
        return tr.expand(t.shape[0], 2).clone()
    u = t * (n - 1)
    i0 = torch.floor(u).clamp(0, n - 2).long()
    frac = (u - i0.to(dtype))[:, None]
    p0, p1 = tr[i0], tr[i0 + 1]
    if method == "linear":
        return torch.lerp(p0, p1, frac.expand_as(p0))
    # pchip on knots x_j = j / (n - 1)
    x = torch.linspace(0.0, 1.0, n, dtype=dtype, device=tr.device)
    h = x[1:] - x[:-1]
    d = _pchip_slopes(h, tr)
    hs = h[i0][:, None]
    s = ((t - x[i0]) / h[i0])[:, None]
    s2, s3 = s * s, s * s * s
    out = ((2 * s3 - 3 * s2 + 1) * p0 + (s3 - 2 * s2 + s) * hs * d[i0]
           + (-2 * s3 + 3 * s2) * p1 + (s3 - s2) * hs * d[i0 + 1])
    before, after = t < 0, t > 1
    if bool(before.any()) or bool(after.any()):
        lin0 = tr[0] + d[0] * t[:, None]
        lin1 = tr[-1] + d[-1] * (t[:, None] - 1.0)
        out = torch.where(before[:, None], lin0, torch.where(after[:, None], lin1, out))
    return out


def frame_times(frames: int, easing: str = "linear") -> torch.Tensor:
    """Times (frames,) float64 at which the frames sample the motion, before easing.

    ``k / (frames - 1)`` from 0 to 1 for the one-way easings. For ``loop`` it is ``k / frames``:
    the cycle closes one step after the last frame, so a looping player shows no repeated
    frame (frame ``frames`` would be frame 0 again).
    """
    if easing == "loop":
        return torch.arange(frames, dtype=torch.float64) / frames
    s = torch.linspace(0.0, 1.0, frames, dtype=torch.float64)
    s[-1] = 1.0
    return s


def resample_track(track, frames: int, easing: str = "linear", method: str = "linear") -> torch.Tensor:
    """Resample a track to ``frames`` points, one per output frame.

    track: (N, 2) pixels, point ``i`` at time ``i / (N - 1)`` (tracks of any length N >= 1).
    Frame ``k`` takes the track at time ``ease(frame_times(frames, easing)[k], easing)`` (that is
    ``k / (frames - 1)``, or ``k / frames`` for ``loop``), interpolated in time
    by ``method`` (``linear`` by default; see :func:`sample_track`). The first output point is
    the track's first point exactly, and with an easing that ends at 1 the last output point is
    its last point exactly. frames: 1..MAX_FRAMES (one frame gives the start point).

    Returns (frames, 2), same floating dtype as the track (float32 for integer input).
    """
    frames = _check_frames(frames, minimum=1)
    tr = torch.as_tensor(track)
    dtype = tr.dtype if tr.is_floating_point() else torch.float32
    if frames == 1:
        return _as_track(tr, "track", dtype=dtype)[:1].clone()
    t = ease(frame_times(frames, easing), easing)
    return sample_track(tr.to(dtype), t.to(dtype), method=method)


# ----------------------------------------------------------------------------------------
# dense motion


def _check_frames(frames, minimum: int = 2) -> int:
    if isinstance(frames, bool) or not isinstance(frames, (int, float)) or float(frames) != int(frames):
        raise ValueError(f"frames: must be a whole number, got {frames!r}")
    frames = int(frames)
    if frames < minimum or frames > MAX_FRAMES:
        raise ValueError(f"frames: {frames} is out of range; use {minimum}..{MAX_FRAMES}")
    return frames


def _check_size(size) -> tuple[int, int]:
    try:
        w, h = size
        if float(w) != int(w) or float(h) != int(h):
            raise TypeError
        w, h = int(w), int(h)
    except (TypeError, ValueError):
        raise ValueError(f"size: expected (width, height) in whole pixels, got {size!r}") from None
    if w < 2 or h < 2 or w > 16384 or h > 16384:
        raise ValueError(f"size: {w}x{h} is not a usable image size; width and height must be 2..16384")
    return w, h


def _check_inside(p: torch.Tensor, w: int, h: int, name: str) -> None:
    bad = (p[..., 0] < 0) | (p[..., 0] > w - 1) | (p[..., 1] < 0) | (p[..., 1] > h - 1)
    if bool(bad.any()):
        x, y = p[bad][0].tolist()
        raise ValueError(f"{name}: ({x:g}, {y:g}) is outside the {w}x{h} image "
                         f"(x must be in 0..{w - 1}, y in 0..{h - 1})")


def _bump(u: torch.Tensor) -> torch.Tensor:
    """1 - smoothstep(u): 1 at u <= 0, smooth, exactly 0 for u >= 1."""
    u = u.clamp(0.0, 1.0)
    return 1.0 - u * u * (3.0 - 2.0 * u)


def distance_to_region(region: torch.Tensor, limit: float) -> torch.Tensor:
    """Euclidean distance of every pixel to the nearest pixel of ``region``.

    region: (H, W) bool. Exact for distances up to ``limit`` pixels; farther pixels get some
    value > ``limit`` (possibly inf). Region pixels get 0. Separable: the vertical distance to
    the region in each column (running max/min of region row indices), then a minimum over
    horizontal offsets |o| <= limit of ``o^2 + g(x + o)^2``. Returns (H, W) float32.
    """
    if region.ndim != 2:
        raise ValueError(f"region: expected (H, W), got {tuple(region.shape)}")
    h, w = region.shape
    dev = region.device
    rows = torch.arange(h, device=dev, dtype=torch.float32)[:, None].expand(h, w)
    far = float(4 * (h + w) + 4 * limit + 16)
    above = torch.where(region, rows, torch.full_like(rows, -far)).cummax(dim=0).values
    below = torch.where(region, rows, torch.full_like(rows, 2 * far)).flip(0).cummin(dim=0).values.flip(0)
    g = torch.minimum(rows - above, below - rows)  # vertical distance; > far where a column is empty
    g2 = g * g
    lim = min(int(math.ceil(limit)), w - 1)
    if lim > 0:
        pad = torch.full((h, lim), float("inf"), device=dev)
        windows = torch.cat([pad, g2, pad], dim=1).unfold(1, 2 * lim + 1, 1)   # (H, W, 2*lim+1)
        offs = torch.arange(-lim, lim + 1, device=dev, dtype=torch.float32) ** 2
        best = (windows + offs).amin(dim=-1)
    else:
        best = g2
    return best.sqrt()


def _dedupe(points: torch.Tensor) -> torch.Tensor:
    if points.shape[0] < 2:
        return points
    return torch.unique(points, dim=0)

INTERPOLATIONS = ("shepard", "rbf")
"""Spatial interpolation schemes of :func:`dense_motion`."""


def _interpolator(centres: torch.Tensor, k: int, method: str, side: float, device, work):
    """Per-pixel interpolation weights of the first ``k`` centres (the drags; the rest are
    anchors, whose value is 0). Returns ``f(p (c, 2)) -> (c, k)``; rows reproduce the value at
    each centre exactly (one-hot there)."""
    n = centres.shape[0]
    cen = centres.to(device=device, dtype=work)
    if method == "shepard":
        def weights(p):
            d2 = ((p[:, None, :] - cen[None]) ** 2).sum(-1)                 # (c, n)
            hit = d2 == 0
            inv = 1.0 / torch.where(hit, torch.ones_like(d2), d2)
            inv = torch.where(hit.any(1, keepdim=True), hit.to(work), inv)
            return inv[:, :k] / inv.sum(1, keepdim=True)
        return weights
    # rbf: inverse multiquadric + constant, [[Phi, 1], [1^T, 0]] [lambda; c] = [values; 0]
    cpu = centres.to(torch.float64)
    dist = torch.cdist(cpu, cpu)
    if n > 1:
        nn = (dist + torch.diag(torch.full((n,), float("inf"), dtype=torch.float64))).min(dim=1).values
        eps = float(nn.mean().clamp(side / 16.0, side))
    else:
        eps = side / 4.0
    sys_m = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    sys_m[:n, :n] = 1.0 / torch.sqrt(1.0 + (dist / eps) ** 2)
    sys_m[:n, n] = 1.0
    sys_m[n, :n] = 1.0
    rhs = torch.zeros(n + 1, k, dtype=torch.float64)
    rhs[:k] = torch.eye(k, dtype=torch.float64)
    try:
        coef = torch.linalg.solve(sys_m, rhs)                                # (n+1, k)
    except RuntimeError:
        raise ValueError("tracks: drag starts and anchors are too close together to interpolate between; "
                         "spread them apart") from None
    coef = coef.to(device=device, dtype=work)

    def weights(p):
        psi = 1.0 / torch.sqrt(1.0 + (torch.cdist(p, cen, compute_mode="donot_use_mm_for_euclid_dist") / eps) ** 2)
        return psi @ coef[:n] + coef[n]
    return weights


def motion_bytes(size, frames: int) -> int:
    """Memory in bytes :func:`dense_motion` needs at most for a ``size`` = (W, H) picture: the
    field (F, H, W, 2) float32, per-pixel envelopes, and one block of interpolation weights."""
    w, h = size
    return frames * h * w * 2 * 4 + h * w * 4 * 8 + _PIXEL_CHUNK * (16 + frames * 2) * 8


def dense_motion(tracks: Sequence, size, frames: int, anchors=None, region=None, strength: float = 1.0,
                 easing: str = "ease_in_out", falloff: float | None = None,
                 track_interpolation: str = "linear", interpolation: str = "shepard",
                 device=None, step=None) -> torch.Tensor:
    """Turn drags into a dense motion field.

    tracks: list of (N_i, 2) pixel tracks (x, y), N_i >= 2, point j at time j / (N_i - 1); each
        track's first point (its start) must lie in the image; later points may leave it.
        A parsed ``formats.Tracks`` is accepted too (its anchors are used unless ``anchors``
        is given).
    size: (W, H) of the image.
    frames: number of output frames F, 2..MAX_FRAMES (256).
    anchors: (M, 2) pixels that stay exactly still (rounded to the nearest pixel), or None.
    region: (H, W) (or (1, H, W)) mask, > 0.5 = may move, or None. An all-ones mask is allowed
        and lets the whole image move (one drag then translates the whole image).
    strength: multiplies every displacement; the result is exactly linear in it (the
        neighbourhood sizes below depend only on the drawn drags, never on ``strength``).
    easing: timing curve, one of :data:`EASINGS` (see :func:`ease`).
    falloff: in pixels. With a region: width of the soft edge outside the region (default
        ``max(2, min(W, H) / 32)``, 16 px at 512). Without a region: how far beyond its reach
        each drag's influence extends (default ``max(4, min(W, H) / 8)``, 64 px at 512).
    track_interpolation: ``linear`` (default) or ``pchip``, see :func:`sample_track`.
    interpolation: ``shepard`` (default) or ``rbf``, the spatial scheme (module docstring).
    device: where to compute; default the device of the first track.
    step: called once per block of pixels (e.g. an interrupt check), or None.

    Guarantees (pixel (x, y) sits at integer coordinates x, y):

    - ``flow[0]`` is exactly 0.
    - Without a region, a pixel at a drag start moves along the (eased, strength-scaled) drag;
      with a region, so does a start pixel lying on the region. Anchor pixels have flow exactly 0.
    - Without a region, a disc of radius ``falloff / 4`` around a lone drag's start moves with
      it as a whole.
    - Without a region, pixels farther than ``L_i + falloff`` from every drag start ``s_i``
      (``L_i`` = the drag's reach) have flow exactly 0; with a region, pixels farther than
      ``falloff`` from the region have flow exactly 0.
    - With a region, drags that start farther than ``falloff`` (at least ``START_SNAP`` px) from
      it cannot move anything and are ignored (an error if that leaves none); anchors where the
      flow is 0 anyway are too.

    Returns (F, H, W, 2) float32, pixels, displacement from frame 0.
    """
    w, h = _check_size(size)
    frames = _check_frames(frames)
    _check_choices(easing, track_interpolation, interpolation)
    tracks, anchors = _unpack_tracks(tracks, anchors)
    strength, falloff = _check_strength_falloff(strength, falloff)
    if device is None:
        first = tracks[0]
        device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    # the rbf weights are evaluated in float64 (exact to ~1e-9 px) where the device has it;
    # shepard weights are a normalised ratio and float32 is plenty
    work = torch.float64 if interpolation == "rbf" and device.type != "mps" else torch.float32
    tr, anc = _drag_points(tracks, anchors, w, h)

    # 1. timing: displacements (K, F, 2) in float64 on the CPU (small)
    starts, disp, reach = _drag_timing(tr, frames, easing, track_interpolation)
    # 2. envelope E (H*W,) float32 in [0, 1], and where a drag start can matter
    if region is not None:
        env, near, width = _region_envelope(region, w, h, falloff, device)
    else:
        env, near, width = _drag_envelope(starts, reach, w, h, falloff, device)
    idx, centres, k = _active_centres(starts, anc, env, near, w, width, device)
    # 3. interpolation weights (per pixel, one column per drag), evaluated where E > 0
    weights = _interpolator(centres, k, interpolation, float(min(w, h)), device, work)
    flow = _weighted_field(weights, disp[idx] * strength, env, w, h, frames, device, work, step)
    if anc.shape[0]:
        q = torch.round(anc).long().to(device)
        flow[:, q[:, 1] * w + q[:, 0]] = 0.0
    flow = flow.view(frames, h, w, 2)
    flow[0] = 0.0
    return flow


def _check_choices(easing: str, track_interpolation: str, interpolation: str) -> None:
    if easing not in EASINGS:
        raise ValueError(f"easing: {easing!r} is not a known easing; use one of {', '.join(EASINGS)}")
    if track_interpolation not in TRACK_INTERPOLATIONS:
        raise ValueError(f"track_interpolation: {track_interpolation!r} is not known; use one of "
                         f"{', '.join(TRACK_INTERPOLATIONS)}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation: {interpolation!r} is not known; use one of {', '.join(INTERPOLATIONS)}")


def _unpack_tracks(tracks, anchors):
    """Tracks as a non-empty list, and the anchors (those of a parsed ``formats.Tracks`` unless
    ``anchors`` is given)."""
    if hasattr(tracks, "tracks") and hasattr(tracks, "anchors"):  # a parsed Tracks object
        if anchors is None and tracks.anchors.numel():
            anchors = tracks.anchors
        tracks = tracks.tracks
    if isinstance(tracks, torch.Tensor) and tracks.ndim == 2:
        tracks = [tracks]
    if tracks is None or len(tracks) == 0:
        raise ValueError("tracks: no drags given — draw at least one drag")
    return tracks, anchors


def _check_strength_falloff(strength, falloff) -> tuple[float, float | None]:
    strength = finite_number(strength, "strength")
    if falloff is not None:
        falloff = finite_number(falloff, "falloff", "pixels", minimum=0)
    return strength, falloff


def _drag_points(tracks, anchors, w: int, h: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Checked tracks (float64, CPU; each with a start inside the image and an end) and the
    anchors rounded to pixels without repeats ((M, 2), M may be 0)."""
    tr = [_as_track(t, f"tracks[{i}]", dtype=torch.float64, device="cpu") for i, t in enumerate(tracks)]
    for i, t in enumerate(tr):
        if t.shape[0] < 2:
            raise ValueError(f"tracks[{i}]: has {t.shape[0]} point; a drag needs a start and an end "
                             f"(2 or more points). Use anchors for points that must stay still.")
        _check_inside(t[:1], w, h, f"tracks[{i}] start")
    anc = torch.zeros(0, 2, dtype=torch.float64)
    if anchors is not None and torch.as_tensor(anchors).numel():
        anc = _as_track(torch.as_tensor(anchors), "anchors", dtype=torch.float64, device="cpu")
        _check_inside(anc, w, h, "anchors")
        anc = _dedupe(torch.round(anc))
    return tr, anc


def _drag_timing(tr: list[torch.Tensor], frames: int, easing: str, track_interpolation: str):
    """Starts (K, 2), eased displacements from the start (K, F, 2, zero at frame 0) and each
    drag's reach (K,): the farthest its track gets from its start."""
    tk = ease(frame_times(frames, easing), easing)
    starts = torch.stack([t[0] for t in tr])
    disp = torch.stack([sample_track(t, tk, track_interpolation) - t[0] for t in tr])
    disp[:, 0] = 0.0
    reach = torch.stack([(t - t[0]).norm(dim=-1).max() for t in tr])
    return starts, disp, reach


def _region_envelope(region, w: int, h: int, falloff: float | None, device):
    """Envelope (H*W,) of a region: 1 on it, a smooth bump down to 0 at ``falloff`` px outside;
    ``near`` (H*W,) bool: where a drag start still means the region. Returns (env, near, width)."""
    reg = region_mask(region, (w, h), "region", "select the part of the image that should move, or leave "
                      "the mask out", device=device)
    width = max(2.0, min(w, h) / 32.0) if falloff is None else falloff
    # only the region's bounding box grown by the falloff can be non-zero
    rows = torch.nonzero(reg.any(dim=1)).reshape(-1)
    cols = torch.nonzero(reg.any(dim=0)).reshape(-1)
    grow = int(math.ceil(max(width, START_SNAP))) + 1
    y0, y1 = max(0, int(rows[0]) - grow), min(h - 1, int(rows[-1]) + grow)
    x0, x1 = max(0, int(cols[0]) - grow), min(w - 1, int(cols[-1]) + grow)
    crop = reg[y0:y1 + 1, x0:x1 + 1]
    dist = distance_to_region(crop, width)
    part = _bump(dist / width) if width > 0 else (dist == 0).to(torch.float32)
    env = torch.zeros(h, w, device=device)
    env[y0:y1 + 1, x0:x1 + 1] = torch.where(crop, torch.ones_like(part), part)
    # a drag started just off the region's edge still means the region (clicks are not exact)
    near = torch.zeros(h, w, dtype=torch.bool, device=device)
    snap = max(width, START_SNAP)
    near[y0:y1 + 1, x0:x1 + 1] = (dist if snap == width else distance_to_region(crop, snap)) <= snap
    return env.reshape(-1), near.reshape(-1), width


def _drag_envelope(starts: torch.Tensor, reach: torch.Tensor, w: int, h: int, falloff: float | None, device):
    """Envelope (H*W,) without a region: the union of discs around the drag starts (radius =
    reach + falloff), 1 in a core of a quarter of the falloff. Returns (env, env > 0, width)."""
    width = max(4.0, min(w, h) / 8.0) if falloff is None else falloff
    radius = (reach + width).clamp(min=1.0)                               # (K,)
    core = 0.25 * width
    # only the bounding box of the discs can be non-zero
    x0 = max(0, int(math.floor(float((starts[:, 0] - radius).min()))))
    x1 = min(w - 1, int(math.ceil(float((starts[:, 0] + radius).max()))))
    y0 = max(0, int(math.floor(float((starts[:, 1] - radius).min()))))
    y1 = min(h - 1, int(math.ceil(float((starts[:, 1] + radius).max()))))
    by = torch.arange(y0, y1 + 1, device=device, dtype=torch.float32)[:, None]
    bx = torch.arange(x0, x1 + 1, device=device, dtype=torch.float32)[None, :]
    keep = torch.ones(y1 - y0 + 1, x1 - x0 + 1, device=device)
    for i in range(starts.shape[0]):
        sx, sy = float(starts[i, 0]), float(starts[i, 1])
        r = torch.sqrt((bx - sx) ** 2 + (by - sy) ** 2)
        keep = keep * (1.0 - _bump((r - core) / (float(radius[i]) - core)))
    env = torch.zeros(h, w, device=device)
    env[y0:y1 + 1, x0:x1 + 1] = 1.0 - keep
    env = env.reshape(-1)
    return env, env > 0, width


def _active_centres(starts: torch.Tensor, anc: torch.Tensor, env: torch.Tensor, near: torch.Tensor, w: int,
                    width: float, device):
    """The drags whose start can matter (indices into the tracks) and the interpolation centres:
    their starts, then the anchors inside the envelope. Returns (idx, centres (n, 2), drags k)."""
    q_starts = torch.round(starts).long()
    active = near[(q_starts[:, 1] * w + q_starts[:, 0]).to(device)].cpu()
    if not bool(active.any()):
        raise ValueError(f"tracks: no drag starts on or within {max(width, START_SNAP):g} px of the region mask, "
                         f"so nothing can move; start a drag on the region (or widen the falloff)")
    if anc.shape[0]:
        q = torch.round(anc).long()
        anc = anc[env[(q[:, 1] * w + q[:, 0]).to(device)].cpu() > 0]
    idx = torch.nonzero(active).reshape(-1)
    centres = torch.cat([starts[idx], anc])
    _check_distinct(centres, idx)
    return idx, centres, idx.shape[0]


def _check_distinct(centres: torch.Tensor, idx: torch.Tensor) -> None:
    """Coincident centres make the system singular: refuse a pinned drag start and two drags
    from one pixel. centres: the drag starts (``idx`` of the tracks), then the anchors."""
    k = idx.shape[0]
    if centres.shape[0] < 2:
        return
    dd = torch.cdist(centres, centres)
    dd.fill_diagonal_(float("inf"))
    for a, b in torch.nonzero(dd < 0.5).tolist():
        if a >= b or a >= k:
            continue
        x, y = centres[a].tolist()
        if b >= k:
            raise ValueError(f"anchors: an anchor sits on the start of drag {int(idx[a])} at "
                             f"({x:g}, {y:g}); a pixel cannot be both pinned and dragged — move "
                             f"the anchor or the drag")
        raise ValueError(f"tracks: drags {int(idx[a])} and {int(idx[b])} both start at "
                         f"({x:g}, {y:g}); a pixel can follow only one drag — start them at "
                         f"different points")


def _weighted_field(weights, disp: torch.Tensor, env: torch.Tensor, w: int, h: int, frames: int, device, work,
                    step) -> torch.Tensor:
    """The field (F, H*W, 2) float32: at each pixel where the envelope is positive, the
    interpolation weights times the envelope applied to the drags' displacements (K', F, 2),
    block by block (``step`` called before each)."""
    k = disp.shape[0]
    dflat = disp.reshape(k, frames * 2).to(device=device, dtype=work)      # (K', F*2)
    # written straight into the (F, H*W, 2) layout: no second copy of the field
    flow = torch.zeros(frames, h * w, 2, device=device, dtype=torch.float32)
    sel = torch.nonzero(env > 0).reshape(-1)
    for a in range(0, sel.shape[0], _PIXEL_CHUNK):
        if step is not None:
            step()
        ids = sel[a:a + _PIXEL_CHUNK]
        pix = torch.stack([ids % w, torch.div(ids, w, rounding_mode="floor")], dim=-1).to(work)
        wts = weights(pix) * env[ids, None].to(work)                         # (c, K')
        flow[:, ids] = (wts @ dflat).to(torch.float32).view(-1, frames, 2).transpose(0, 1)
    return flow
