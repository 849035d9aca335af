"""Motion-augmented temporal attention and Motion-I2V's flow conditioning (pure torch).

Motion-I2V (Shi et al., SIGGRAPH 2024) animates an image in two stages: a diffusion model
predicts per-frame displacement fields from frame 0, then a video model renders frames whose
temporal attention also sees frame-0 features forward-splatted along those fields.

Attention (one call per attention block of a motion module):

1. the flow at image resolution is resized bilinearly to the token grid and rescaled to
   token units (:func:`resize_flow`);
2. the block's normalised frame-0 features are forward-splatted by each frame's flow
   (average normalisation, holes 0) giving ``W_1 .. W_{F-1}`` (:func:`splat_first_frame`);
3. the sequence ``[x_0, W_1, x_1, ..., W_{F-1}, x_{F-1}]`` (length 2F-1) is built
   (:func:`interleave_warped`) and the sinusoidal position encoding is added to it, i.e. after
   interleaving;
4. queries come from the frame tokens only (even positions), keys and values from all 2F-1.

The stock AnimateDiff temporal attention (:func:`temporal_self_attention`) is kept next to it
for the flow-free stage-1 network and for comparisons.

Conditioning helpers reproduce the released demo's rules: tracks are resampled to 16 points
with PCHIP (``motion.resample_track(track, 16, method="pchip")``) and rasterised as squares
around their first point (:func:`rasterise_tracks_motion_i2v`); flows are normalised by the image size into [0, 1]
for the flow VAE (:func:`normalise_flow`) and mapped back (:func:`denormalise_flow`).

Conventions: flows in pixels, x then y, displacement from frame 0; shapes in docstrings.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from .attention import check_heads, multihead_attention
from .motion import resample_track
from .warp import soft_splat, splat_operator

Proj = Callable[[torch.Tensor], torch.Tensor]

MAX_FRAMES = 16  # 2F-1 interleaved positions must fit the 32-long position encoding


# ----------------------------------------------------------------------------- attention

def sinusoidal_position_encoding(length: int, dim: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(1, length, dim): sin on even channels, cos on odd channels, base 10000."""
    pos = torch.arange(length, dtype=torch.float32, device=device).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, length, dim, dtype=torch.float32, device=device)
    pe[0, :, 0::2] = torch.sin(pos * div)
    pe[0, :, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return pe.to(dtype)


def resize_flow(flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a flow to a token grid and express it in token units.

    flow (B, F, H0, W0, 2) pixels -> (B, F, h, w, 2) with ``size = (h, w)``. Bilinear,
    ``align_corners=False``, no antialiasing; dx is divided by W0/w and dy by H0/h.
    """
    if flow.ndim != 5 or flow.shape[-1] != 2:
        raise ValueError(f"flow: expected (B, F, H, W, 2), got {tuple(flow.shape)}")
    b, f, h0, w0, _ = flow.shape
    h, w = int(size[0]), int(size[1])
    x = flow.permute(0, 1, 4, 2, 3).reshape(b * f, 2, h0, w0).float()
    if (h, w) != (h0, w0):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    scale = torch.tensor([w0 / w, h0 / h], dtype=x.dtype, device=x.device).view(1, 2, 1, 1)
    x = x / scale
    return x.reshape(b, f, 2, h, w).permute(0, 1, 3, 4, 2)


def splat_first_frame(z0: torch.Tensor, flow: torch.Tensor, *, official_batch_tiling: bool = False) -> torch.Tensor:
    """Forward-splat frame-0 features along every later frame's flow.

    z0 (B, C, h, w); flow (B, F-1, h, w, 2) token units (frames 1..F-1) -> (B, F-1, C, h, w).
    Average normalisation (sum / (weight + 1e-7)), holes 0, sources leaving the grid dropped.
    The splat runs in float32 and the result is cast back to ``z0.dtype``.

    ``official_batch_tiling`` reproduces the released code, which tiles the sources over the
    batch (slot b*(F-1)+j takes ``z0[(b*(F-1)+j) % B]``), so for B > 1 batch items borrow each
    other's frame 0. The default pairs every flow with its own item's frame 0.
    """
    if z0.ndim != 4 or flow.ndim != 5 or flow.shape[-1] != 2:
        raise ValueError(f"splat_first_frame: z0 must be (B, C, h, w) and flow (B, F-1, h, w, 2); "
                         f"got {tuple(z0.shape)} and {tuple(flow.shape)}")
    b, c, h, w = z0.shape
    if flow.shape[0] != b or tuple(flow.shape[2:4]) != (h, w):
        raise ValueError(f"splat_first_frame: flow {tuple(flow.shape)} does not match features {tuple(z0.shape)}")
    n = flow.shape[1]
    src = z0.detach().float()
    if official_batch_tiling:
        src = src.repeat(n, 1, 1, 1)
    else:
        src = src.repeat_interleave(n, dim=0)
    out = soft_splat(src, flow.reshape(b * n, h, w, 2).float(), mode="avg")
    return out.reshape(b, n, c, h, w).to(z0.dtype)


def interleave_warped(frames: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """frames (B, F, N, C), warped (B, F-1, N, C) -> (B, 2F-1, N, C) = [x0, W1, x1, ..., W_{F-1}, x_{F-1}]."""
    b, f, n, c = frames.shape
    if tuple(warped.shape) != (b, f - 1, n, c):
        raise ValueError(f"interleave_warped: warped must be {(b, f - 1, n, c)}, got {tuple(warped.shape)}")
    out = frames.new_empty(b, 2 * f - 1, n, c)
    out[:, 0::2] = frames
    out[:, 1::2] = warped.to(frames.dtype)
    return out


def _check_tokens(x: torch.Tensor, frames: int, name: str) -> tuple[int, int, int]:
    if x.ndim != 3:
        raise ValueError(f"{name}: hidden states must be (B*F, N, C), got {tuple(x.shape)}")
    bf, n, c = x.shape
    if frames < 1 or bf % frames:
        raise ValueError(f"{name}: {bf} rows are not a whole number of {frames}-frame clips")
    return bf // frames, n, c


def temporal_self_attention(x: torch.Tensor, frames: int, to_q: Proj, to_k: Proj, to_v: Proj, to_out: Proj,
                            heads: int, pe: torch.Tensor | None = None) -> torch.Tensor:
    """Stock AnimateDiff temporal self-attention.

    x (B*F, N, C) -> (B*F, N, C): every token attends over its own F frames; the position
    encoding ``pe`` (1, L >= F, C) is added to the length-F sequence.
    """
    b, n, c = _check_tokens(x, frames, "temporal attention")
    seq = x.reshape(b, frames, n, c).permute(0, 2, 1, 3).reshape(b * n, frames, c)
    if pe is not None:
        if pe.shape[1] < frames:
            raise ValueError(f"temporal attention: {frames} frames exceed the position encoding length {pe.shape[1]}")
        seq = seq + pe[:, :frames].to(seq.dtype)
    out = to_out(multihead_attention(to_q(seq), to_k(seq), to_v(seq), heads))
    return out.reshape(b, n, frames, c).permute(0, 2, 1, 3).reshape(b * frames, n, c)


class FirstFrameSplat:
    """Frame 0 forward-splatted along frames 1..F-1 of a flow at one token grid, as a sparse
    map built once (positions and bilinear weights depend on the flow only) and applied to any
    per-token features of frame 0.

    flow_tokens (B, F-1, h, w, 2) in token units. Applied to z0 (B, N, C) (N = h*w tokens of
    frame 0 of each clip) it gives (B, N, F-1, C): token n of warped frame j, the same numbers
    as :func:`splat_first_frame` (average normalisation, holes 0) in the attention's layout.
    ``official_batch_tiling`` as in :func:`splat_first_frame`.
    """

    def __init__(self, flow_tokens: torch.Tensor, official_batch_tiling: bool = False, eps: float = 1e-7):
        if flow_tokens.ndim != 5 or flow_tokens.shape[-1] != 2:
            raise ValueError(f"flow tokens: expected (B, F-1, h, w, 2), got {tuple(flow_tokens.shape)}")
        b, m, h, w, _ = flow_tokens.shape
        n = h * w
        op = splat_operator(flow_tokens.reshape(b * m, h, w, 2), eps)  # slot b*m + j, block diagonal
        target, source = op.indices()
        slot = target // n
        clip, j = slot // m, slot % m
        src_clip = slot % b if official_batch_tiling else clip
        rows = (clip * n + target % n) * m + j
        order = torch.argsort(rows, stable=True)
        self.columns = (src_clip * n + source % n)[order].contiguous()
        self.weights = op.values()[order].contiguous()
        counts = torch.bincount(rows, minlength=b * n * m)
        self.offsets = (torch.cumsum(counts, 0) - counts).contiguous()  # start of each output row
        self.shape = (b, n, m)

    def __call__(self, z0: torch.Tensor) -> torch.Tensor:
        b, n, m = self.shape
        if z0.ndim != 3 or tuple(z0.shape[:2]) != (b, n):
            raise ValueError(f"first-frame splat: features must be ({b}, {n}, C), got {tuple(z0.shape)}")
        # a weighted sum of a few rows per output row: embedding_bag is the fast CSR x dense on every device
        out = F.embedding_bag(self.columns, z0.reshape(b * n, -1), self.offsets, mode="sum",
                              per_sample_weights=self.weights.to(z0.dtype))
        return out.view(b, n, m, -1)


class FlowSplats:
    """The :class:`FirstFrameSplat` of one run's motion field at each token grid, built by the
    first motion module that needs it and reused by every other module and denoising step.

    Keyed by the flow tensor's identity and the grid (plus clip count, device and batch
    mode); the flow is held with its splats, so a key stays unique while cached. One object
    per run (the sampler makes it, or the model's forward makes one per call); :meth:`clear`
    or dropping the object releases everything.
    """

    def __init__(self):
        self._plans: dict = {}

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        self._plans.clear()

    def get(self, flow: torch.Tensor, hw: tuple[int, int], clips: int, device,
            official_batch_tiling: bool = False) -> FirstFrameSplat:
        """flow (1 or clips, F, H0, W0, 2) pixels -> the splat of its frames 1..F-1 at grid ``hw``."""
        key = (id(flow), tuple(flow.shape), (int(hw[0]), int(hw[1])), int(clips), torch.device(device),
               bool(official_batch_tiling))
        found = self._plans.get(key)
        if found is None or found[0] is not flow:
            ftok = resize_flow(flow.to(device), hw)[:, 1:]
            if ftok.shape[0] != clips:
                ftok = ftok.expand(clips, -1, -1, -1, -1)
            found = (flow, FirstFrameSplat(ftok, official_batch_tiling))
            self._plans[key] = found
        return found[1]


def motion_augmented_attention(x: torch.Tensor, flow: torch.Tensor, hw: tuple[int, int], frames: int,
                               to_q: Proj, to_k: Proj, to_v: Proj, to_out: Proj, heads: int,
                               pe: torch.Tensor | None = None, *, warped: torch.Tensor | None = None,
                               official_batch_tiling: bool = False, intermediates: dict | None = None,
                               splats: FlowSplats | None = None) -> torch.Tensor:
    """Motion-I2V's temporal attention with frame 0 warped in between the frames.

    x (B*F, N, C) with N = h*w tokens of the grid ``hw = (h, w)``; flow (B or 1, F, H0, W0, 2)
    pixels at image resolution (frame 0's flow is ignored). Returns (B*F, N, C).
    ``pe`` (1, L >= 2F-1, C) is added after interleaving. ``warped`` (B, F-1, C, h, w) replaces
    the splat (to test the attention alone). ``splats`` caches the splat of ``flow`` per grid
    across calls (see :class:`FlowSplats`; default: built for this call). ``intermediates``,
    when a dict, receives ``flow_tokens``, ``splat_src``, ``warped`` and ``seq_pe`` (the
    interleaved sequence, built for inspection only).

    The projections must be affine (e.g. ``nn.Linear``): they are applied to the frames' own
    tokens and to frame 0 only, and the splat, being linear and channel-wise, is applied after
    them (``to_k(splat(z0)) = splat(to_k(z0) - to_k(0)) + to_k(0)``), as are the position
    encodings (``to_k(x + p) = to_k(x) + to_k(p) - to_k(0)``). The keys of the warped frames
    then cost a sparse weighted sum instead of projections of F-1 more frames, and the
    attention needs no interleaved copy: keys and values are [frames, warped frames], an order
    attention does not depend on.
    """
    b, n, c = _check_tokens(x, frames, "motion-augmented attention")
    h, w = int(hw[0]), int(hw[1])
    if h * w != n:
        raise ValueError(f"motion-augmented attention: grid {h}x{w} does not hold {n} tokens")
    if frames > MAX_FRAMES:
        raise ValueError(f"motion-augmented attention: {frames} frames; at most {MAX_FRAMES} fit "
                         f"(2F-1 = {2 * frames - 1} positions > 32)")
    if flow.ndim != 5 or flow.shape[1] != frames or flow.shape[-1] != 2:
        raise ValueError(f"motion-augmented attention: flow must be (B, {frames}, H, W, 2), got {tuple(flow.shape)}")
    if flow.shape[0] not in (1, b):
        raise ValueError(f"motion-augmented attention: flow batch {flow.shape[0]} does not match {b} clips")
    seq_len = 2 * frames - 1
    if pe is not None and pe.shape[1] < seq_len:
        raise ValueError(f"motion-augmented attention: {seq_len} positions exceed the position "
                         f"encoding length {pe.shape[1]}")
    check_heads(c, heads, "motion-augmented attention")
    warp = frames - 1
    if warp and warped is None:
        plan = (splats if splats is not None else FlowSplats()).get(flow, (h, w), b, x.device, official_batch_tiling)
    zero = x.new_zeros(1, c)
    # frame j sits at position 2j of the interleaved sequence, warped frame j at 2j - 1
    pe_seq = pe[0, :seq_len].to(device=x.device, dtype=x.dtype) if pe is not None else None

    def parts(proj, m):
        """(B, N, F + m, C): the frames, then m warped frames (0 or F-1), each plus its position."""
        at0 = proj(zero)
        y = proj(x).view(b, frames, n, c).transpose(1, 2)
        if not m:
            pass
        elif warped is not None:
            wy = proj(warped.reshape(b, warp, c, n).transpose(2, 3).to(x.dtype)).transpose(1, 2)
        else:
            z0 = y[:, :, 0]
            wy = plan(z0 - at0) + at0 if bool(at0.any()) else plan(z0)
        buf = torch.empty(b, n, frames + m, c, dtype=y.dtype, device=y.device)
        if pe_seq is None:
            buf[:, :, :frames] = y
            if m:
                buf[:, :, frames:] = wy
        else:
            _add_into(buf[:, :, :frames], y, proj(pe_seq[0::2]) - at0)
            if m:
                _add_into(buf[:, :, frames:], wy, proj(pe_seq[1::2]) - at0)
        return buf

    q, k, v = parts(to_q, 0), parts(to_k, warp), parts(to_v, warp)
    out = multihead_attention(q.view(b * n, frames, c), k.view(b * n, seq_len, c), v.view(b * n, seq_len, c), heads)
    out = rearrange(out, "(b n) f c -> (b f) n c", b=b)
    if intermediates is not None:
        _inspect(intermediates, x, flow, (h, w), frames, pe, warped, official_batch_tiling,
                 None if warped is not None or not warp else plan)
    return to_out(out)


def _add_into(dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """dst = a + b, in one pass where autograd allows it."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        dst.copy_(a + b)
    else:
        torch.add(a, b, out=dst)


def _inspect(found: dict, x, flow, hw, frames, pe, warped, official_batch_tiling, plan) -> None:
    """The intermediate tensors of the official formulation, for inspection and tests."""
    b, n, c = x.shape[0] // frames, x.shape[1], x.shape[2]
    h, w = hw
    frames_tok = x.reshape(b, frames, n, c)
    seq = frames_tok
    if frames > 1:
        ftok = resize_flow(flow.to(x.device), hw)[:, 1:]
        found["flow_tokens"] = ftok.expand(b, -1, -1, -1, -1) if ftok.shape[0] != b else ftok
        found["splat_src"] = frames_tok[:, 0].reshape(b, h, w, c).permute(0, 3, 1, 2)
        if warped is None:
            warped = plan(frames_tok[:, 0].float()).to(x.dtype).permute(0, 2, 3, 1).reshape(b, frames - 1, c, h, w)
        seq = interleave_warped(frames_tok, warped.reshape(b, frames - 1, c, n).transpose(2, 3))
    seq = seq.permute(0, 2, 1, 3).reshape(b * n, 2 * frames - 1, c)
    if pe is not None:
        seq = seq + pe[:, :2 * frames - 1].to(seq.dtype)
    found["warped"] = warped
    found["seq_pe"] = seq


# ------------------------------------------------------------------ flow normalisation

def normalise_flow(flow: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(..., 2) pixels -> (..., 2) in [0, 1] for the flow VAE: ``(flow / [W, H] + 1) / 2``."""
    scale = torch.tensor([float(width), float(height)], dtype=flow.dtype, device=flow.device)
    return (flow / scale + 1.0) / 2.0


def sparse_vae_input(normalised: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What the flow VAE encodes for the ControlNet condition.

    normalised (F, H, W, 2) in [0, 1], mask (F, H, W, 1) or (F, H, W) -> (F, 2, H, W):
    ``(v - 0.5) * mask + 0.5`` (unknown pixels read as zero motion).
    """
    if mask.ndim == normalised.ndim - 1:
        mask = mask.unsqueeze(-1)
    v = (normalised - 0.5) * mask + 0.5
    return v.permute(0, 3, 1, 2).contiguous()


def denormalise_flow(decoded: torch.Tensor, width: int, height: int,
                     static: torch.Tensor | None = None) -> torch.Tensor:
    """Flow VAE output -> pixels, with the zero frame 0 prepended.

    decoded (F-1, 2, H, W) (no clamp applied yet) -> (F, H, W, 2) pixels:
    ``(x * 2 - 1).clamp(-1, 1) * (1 - static) * [W, H]``; ``static`` (H, W), 1 = keep still.
    """
    if decoded.ndim != 4 or decoded.shape[1] != 2:
        raise ValueError(f"decoded flow: expected (F-1, 2, H, W), got {tuple(decoded.shape)}")
    f = (decoded * 2.0 - 1.0).clamp(-1.0, 1.0)
    if static is not None:
        f = f * (1.0 - static.to(f.dtype))
    scale = torch.tensor([float(width), float(height)], dtype=f.dtype, device=f.device).view(1, 2, 1, 1)
    f = (f * scale).permute(0, 2, 3, 1)
    return torch.cat([torch.zeros_like(f[:1]), f], dim=0)


def frame_strides(frames: int = MAX_FRAMES, step: int = 8) -> torch.Tensor:
    """(1, F-1) int64: the stage-1 per-frame stride condition ``8, 16, ..., 8*(F-1)``."""
    return torch.arange(1, frames, dtype=torch.int64).mul(step).unsqueeze(0)


# ------------------------------------------------------------- sparse-condition rasters

def tracks_to_grid(tracks: Sequence[torch.Tensor], source_size: tuple[int, int],
                   grid_size: tuple[int, int]) -> list[torch.Tensor]:
    """Map track points from a ``source_size`` = (width, height) image onto the model grid
    ``grid_size`` = (width, height) the way the released demo maps its canvas:
    ``(int(x * W / Ws), int(y * H / Hs))``. Returns int64 (N_i, 2) tensors."""
    sw, sh = source_size
    gw, gh = grid_size
    out = []
    for t in tracks:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 2)
        out.append(torch.stack([(t[:, 0] * gw / sw).trunc(), (t[:, 1] * gh / sh).trunc()], dim=1).long())
    return out


def rasterise_tracks_motion_i2v(tracks: Sequence[torch.Tensor], height: int, width: int, flow_unit: int,
                                frames: int = MAX_FRAMES, anchors: torch.Tensor | None = None,
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Motion-I2V's sparse trajectory condition.

    tracks: grid-pixel tracks (N_i, 2) (see :func:`tracks_to_grid`); a single-point track
    becomes ``[p, p + (1, 1)]`` as in the released demo. Each track is resampled with PCHIP to
    ``frames`` points; for frame i = 1..F-1 the displacement ``p_i - p_0`` (float) is written in
    the square rows ``[max(int(y0) - u, 0), int(y0) + u)`` and columns
    ``[max(int(x0) - u, 0), int(x0 + u))`` around the *first* point, with mask 1; later tracks
    overwrite earlier ones. ``anchors`` (M, 2) grid pixels are drawn last with zero motion.

    Returns sparse (F-1, H, W, 2) pixels and mask (F-1, H, W, 1).
    """
    u = int(flow_unit)
    if u < 1:
        raise ValueError(f"flow_unit: must be >= 1 pixel, got {flow_unit}")
    sparse = torch.zeros(frames - 1, height, width, 2, dtype=torch.float32)
    mask = torch.zeros(frames - 1, height, width, 1, dtype=torch.float32)

    def square(x0: float, y0: float):
        return slice(max(int(y0) - u, 0), max(int(y0) + u, 0)), slice(max(int(x0) - u, 0), max(int(x0 + u), 0))

    for tr in tracks:
        p = torch.as_tensor(tr, dtype=torch.float64).reshape(-1, 2)
        if p.shape[0] == 0:
            continue
        if p.shape[0] == 1:
            p = torch.cat([p, p + 1.0])
        pts = resample_track(p, frames, method="pchip")
        sx, sy = float(pts[0, 0]), float(pts[0, 1])
        rows, cols = square(sx, sy)
        for i in range(frames - 1):
            sparse[i, rows, cols, 0] = float(pts[i + 1, 0]) - sx
            sparse[i, rows, cols, 1] = float(pts[i + 1, 1]) - sy
            mask[i, rows, cols] = 1.0
    if anchors is not None:
        for x0, y0 in torch.as_tensor(anchors, dtype=torch.float64).reshape(-1, 2).tolist():
            rows, cols = square(x0, y0)
            sparse[:, rows, cols] = 0.0
            mask[:, rows, cols] = 1.0
    return sparse, mask


def brush_to_static(painted: torch.Tensor) -> torch.Tensor:
    """Motion-brush strokes -> static mask (H, W) float, 1 = keep still.

    painted: (H, W) in [0, 1] (1 = brushed = may move) or (H, W, 3) uint8 strokes (channel 0
    read as ``/255 > 0.5``). Everything not painted is static; if nothing is painted the whole
    image may move (all zeros)."""
    if painted.dtype == torch.uint8:
        moving = (painted[..., 0].float() / 255.0) > 0.5 if painted.ndim == 3 else (painted.float() / 255.0) > 0.5
    else:
        moving = painted.float() > 0.5
    if not bool(moving.any()):
        return torch.zeros(moving.shape, dtype=torch.float32)
    return (~moving).float()


def apply_static(sparse: torch.Tensor, mask: torch.Tensor, static: torch.Tensor | None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Static regions get flow 0 and mask 1. sparse (F-1, H, W, 2), mask (F-1, H, W, 1), static (H, W)."""
    if static is None:
        return sparse, mask
    s = static.to(sparse.dtype)[None, :, :, None]
    return sparse * (1.0 - s), torch.where(s > 0, torch.ones_like(mask), mask)
