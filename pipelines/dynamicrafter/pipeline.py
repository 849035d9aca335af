"""DynamiCrafter image animation and keyframe interpolation.

Conditioning (as the released models were trained):

- context = ``cat[text (77 tokens, OpenCLIP penultimate), image context (resampler over the
  CLIP ViT-H tokens of the whole first frame)]``; unconditional = ``cat[text(negative or ""),
  resampler(CLIP(zero image))]``;
- UNet input = ``cat[z_t, image latent repeated over frames]`` (interpolation: the two keyframe
  latents at the first and last frame, zeros between);
- ``fs``: frames per second (512/1024) or frame stride (256).

Sampling is DDIM with the variant's schedule. Optional: a region mask (only the masked part
moves: outside it the latent is reset to the noised input latent after each step and the
decoded frames are pasted over the input with a feathered alpha, see ``kernels/regional.py``)
and temporal windows for more frames than the model's native length. Each part is loaded right before it is used, under
ComfyUI's model management (which may unload the others to make room).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import runtime
from ...kernels.dual_attention import per_frame_context
from ...kernels.regional import cover_crop, default_feather, fit_mask, latent_keep, paste, paste_alpha
from .model import DynamiCrafter, variants
from .sampler import DDIMSampler, DiffusionSchedule


@dataclass
class AnimateOptions:
    prompt: str = ""
    negative: str = ""
    frames: int = 16
    fs: int | None = None          # None: the variant's default
    steps: int = 50
    cfg: float = 7.5
    eta: float = 1.0
    seed: int = 0
    height: int = 0                # 0: the variant's default
    width: int = 0
    window_overlap: int = 4        # frames shared by neighbouring temporal windows


def _multiple(model: DynamiCrafter) -> int:
    """Pixel sizes must be multiples of this (VAE factor x UNet downsampling)."""
    levels = len(model.unet.cfg.channel_mult)
    vae_factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    return vae_factor * 2 ** (levels - 1)


def _check_size(model: DynamiCrafter, height: int, width: int) -> tuple[int, int]:
    d = model.settings()["defaults"]
    height = int(height) or int(d["height"])
    width = int(width) or int(d["width"])
    m = _multiple(model)
    if height % m or width % m or height < m or width < m:
        raise ValueError(f"width/height: {width}x{height} must be positive multiples of {m} for this model")
    return height, width


def prepare_image(image: torch.Tensor, height: int, width: int, name: str = "image") -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, 3) or (H, W, 3) in [0, 1] -> (1, 3, height, width) in [-1, 1] (first image)."""
    if not torch.is_tensor(image) or image.dim() not in (3, 4) or image.shape[-1] not in (3, 4):
        shape = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
        raise ValueError(f"{name}: expected an IMAGE of shape (B, H, W, 3), got {shape}")
    if image.dim() == 3:
        image = image[None]
    x = image[:1, ..., :3].permute(0, 3, 1, 2).float().clamp(0, 1)
    return cover_crop(x, height, width) * 2.0 - 1.0


def default_fs(model: DynamiCrafter, fs: int | None, interpolate: bool = False) -> int:
    """``fs`` when given (> 0), else the variant's default (5 when interpolating, as the official
    interpolation script conditions on)."""
    if fs is not None and int(fs) > 0:
        return int(fs)
    if interpolate:
        return int(variants()["variants"]["512_interp"]["defaults"]["fs"])
    return int(model.settings()["defaults"]["fs"])


def _window_starts(frames: int, length: int, overlap: int) -> list[int]:
    if frames <= length:
        return [0]
    stride = max(1, length - max(0, min(overlap, length - 1)))
    starts = list(range(0, frames - length + 1, stride))
    if starts[-1] != frames - length:
        starts.append(frames - length)
    return starts


def _window_weight(length: int, start: int, frames: int, overlap: int, device) -> torch.Tensor:
    """Blending weights (length,) of a temporal window: linear ramps over the frames it shares
    with its neighbours, 1 elsewhere."""
    w = torch.ones(length, device=device)
    k = max(0, min(overlap, length - 1))
    if k:
        ramp = torch.arange(1, k + 1, device=device, dtype=torch.float32) / (k + 1)
        if start > 0:
            w[:k] = torch.minimum(w[:k], ramp)
        if start + length < frames:
            w[-k:] = torch.minimum(w[-k:], ramp.flip(0))
    return w


class FrameContext:
    """A different image context for every frame: ``text`` (1, 77, C) and ``images`` (frames, K, C),
    the resampler's output for each frame's CLIP tokens.

    :meth:`window` gives the per-frame context (1, n, 77 + k, C) of frames ``start .. start+n-1``
    laid out as the UNet splits a shared context: frame j of the window takes tokens
    ``[k*j, k*(j+1))`` of its own image context when ``K == k * n`` (k tokens per frame), else the
    whole of it. When every frame has the same image context this equals the shared
    ``cat[text, image context]`` the UNet would split itself, value for value.
    """

    def __init__(self, text: torch.Tensor, images: torch.Tensor, tokens_per_frame: int):
        self.text, self.images, self.tokens_per_frame = text, images, int(tokens_per_frame)

    def window(self, start: int, n: int) -> torch.Tensor:
        imgs = self.images[start:start + n]
        k = self.tokens_per_frame
        if imgs.shape[1] == k * n:
            imgs = torch.stack([imgs[j, k * j:k * (j + 1)] for j in range(n)])
        return torch.cat([self.text.expand(n, -1, -1), imgs], dim=1)[None]


def _as_frame_windows(ctx: torch.Tensor, n: int, text_len: int, tokens_per_frame: int) -> torch.Tensor:
    """A shared context (1, L, C) as the per-frame context (1, n, L', C) the UNet would derive."""
    per = per_frame_context(ctx, n, text_len, tokens_per_frame)
    return per.reshape(ctx.shape[0], n, per.shape[1], per.shape[2])


class _Denoiser:
    """UNet call with cond/uncond batched together and optional temporal windows.

    ``ctx_cond`` is a shared context (1, L, C) or a :class:`FrameContext`; ``ctx_uncond`` is shared
    (or None without guidance)."""

    def __init__(self, model: DynamiCrafter, c_concat, ctx_cond, ctx_uncond, fs, overlap):
        self.unet = model.unet
        self.c_concat, self.ctx_c, self.ctx_u, self.fs = c_concat, ctx_cond, ctx_uncond, fs
        self.length = model.temporal_length
        self.overlap = overlap

    def _context(self, start: int, n: int):
        if not isinstance(self.ctx_c, FrameContext):
            return self.ctx_c, self.ctx_u
        cfg = self.unet.cfg
        ctx_u = None if self.ctx_u is None else _as_frame_windows(self.ctx_u, n, cfg.text_context_len,
                                                                   cfg.image_tokens_per_frame)
        return self.ctx_c.window(start, n), ctx_u

    def _run(self, x, c_concat, t, start=0):
        """The UNet on a window: (B, ...) outputs, then the B unconditional ones with guidance."""
        dt = self.unet.dtype
        xin = torch.cat([x, c_concat], dim=1).to(dt)
        ctx_c, ctx_u = self._context(start, x.shape[2])
        if ctx_u is not None:
            xin = torch.cat([xin, xin])
            ctx = torch.cat([ctx_c, ctx_u])
        else:
            ctx = ctx_c
        n = xin.shape[0]
        ts = torch.full((n,), t, dtype=torch.long, device=x.device)
        fs = self.fs.expand(n)
        with torch.no_grad():
            return self.unet(xin, ts, ctx.to(dt), fs).float()

    def __call__(self, x, t):
        b = x.shape[0]

        def run(window, start):
            return self._run(window, self.c_concat[:, :, start:start + window.shape[2]], t, start)

        out = blend_windows(run, x, self.length, self.overlap)
        return (out[:b], out[b:]) if self.ctx_u is not None else (out, None)


def blend_windows(run, x: torch.Tensor, length: int, overlap: int) -> torch.Tensor:
    """``run(window, start)`` over overlapping temporal windows of ``length`` frames of
    x (B, C, T, h, w) -> its outputs (B', C', T, h, w) blended with linear ramps over the shared
    frames (float32); one call on all of x when T <= length."""
    frames = x.shape[2]
    starts = _window_starts(frames, length, overlap)
    if len(starts) == 1:
        return run(x, 0)
    acc, wsum = None, torch.zeros(frames, device=x.device)
    for s in starts:
        sl = slice(s, s + length)
        out = run(x[:, :, sl], s)
        if acc is None:
            acc = torch.zeros(*out.shape[:2], frames, *out.shape[3:], device=x.device, dtype=torch.float32)
        w = _window_weight(length, s, frames, overlap, x.device)
        acc[:, :, sl] += out.float() * w.view(1, 1, -1, 1, 1)
        wsum[sl] += w
        runtime.check_interrupt()
    return acc / wsum.view(1, 1, -1, 1, 1)


def generate(model: DynamiCrafter, keyframes: list[torch.Tensor], opts: AnimateOptions,
             mask: torch.Tensor | None = None, callback=None,
             frame_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Frames (T, H, W, 3) in [0, 1].

    ``keyframes``: one IMAGE (animate) or two (interpolate: the first and the last frame).
    ``mask``: MASK, 1 where the picture may move (animate only).
    ``frame_tokens``: (T, 1 + patches, width) CLIP vision tokens for every frame (e.g. from the
    semantic motion predictor): frame t's image context is then the resampler's output for
    ``frame_tokens[t]`` (see :class:`FrameContext`) instead of the first keyframe's for all.
    """
    if not 1 <= len(keyframes) <= 2:
        raise ValueError("keyframes: give one image to animate or two to interpolate between")
    if int(opts.frames) < (3 if len(keyframes) == 2 else 1):
        raise ValueError(f"frames: {opts.frames} is too few (interpolation needs at least 3)")
    if int(opts.steps) < 1:
        raise ValueError(f"steps: {opts.steps} must be at least 1")
    if opts.cfg < 1.0:
        raise ValueError(f"cfg: {opts.cfg} must be at least 1.0 (1.0 turns guidance off)")
    settings = model.settings()
    height, width = _check_size(model, opts.height, opts.width)
    fs_value = default_fs(model, opts.fs, interpolate=len(keyframes) == 2)
    frames = int(opts.frames)
    gen = torch.Generator("cpu").manual_seed(int(opts.seed) & runtime.SEED_MAX)
    imgs = [prepare_image(k, height, width, name="image" if i == 0 else "image_end")
            for i, k in enumerate(keyframes)]
    parts = model.managed()
    device = parts["unet"].device

    # conditioning
    use_cfg = float(opts.cfg) != 1.0
    text_c = model.encode_text([opts.prompt or ""])
    if frame_tokens is None:
        img_c = model.encode_image_context(imgs[0])
        ctx_c = torch.cat([text_c, img_c], dim=1)
    else:
        _check_frame_tokens(model, frame_tokens, frames)
        img_c = torch.cat([model.resample_image_tokens(frame_tokens[f:f + 1]) for f in range(frames)])
        ctx_c = FrameContext(text_c, img_c, model.unet.cfg.image_tokens_per_frame)
    ctx_u = None
    if use_cfg:
        text_u = model.encode_text([opts.negative or ""])
        img_u = model.encode_image_context(torch.zeros_like(imgs[0]))
        ctx_u = torch.cat([text_u, img_u], dim=1)
    runtime.check_interrupt()

    # image latents
    z = model.vae_encode(torch.cat(imgs), generator=gen).to(device)       # (K, 4, h, w)
    h, w = z.shape[-2:]
    if len(imgs) == 1:
        c_concat = z[:1, :, None].expand(1, z.shape[1], frames, h, w).contiguous()
    else:
        c_concat = torch.zeros(1, z.shape[1], frames, h, w, device=device)
        c_concat[:, :, 0] = z[0]
        c_concat[:, :, -1] = z[1]
    keep_mask = keep_latent = pix_mask = None
    if mask is not None:
        if len(imgs) != 1:
            raise ValueError("mask: regional animation works with one image, not with interpolation")
        pix_mask = fit_mask(mask, height, width).to(device)
        keep_mask = latent_keep(pix_mask, (h, w))                          # (1, 1, 1, h, w)
        keep_latent = c_concat.float()

    # sampling
    batch = 2 if use_cfg else 1
    window = min(frames, model.temporal_length)
    runtime.load_models(parts["unet"], memory_required=runtime.inference_memory(
        (batch * window, z.shape[1], h, w), model.unet.dtype))
    sampler = DDIMSampler(DiffusionSchedule(model.schedule_config()), steps=int(opts.steps), eta=float(opts.eta))
    fs = torch.tensor([fs_value], dtype=torch.long, device=device)
    if isinstance(ctx_c, FrameContext):
        ctx_c = FrameContext(ctx_c.text.to(device), ctx_c.images.to(device), ctx_c.tokens_per_frame)
    else:
        ctx_c = ctx_c.to(device)
    denoise = _Denoiser(model, c_concat.to(model.unet.dtype), ctx_c, None if ctx_u is None else ctx_u.to(device),
                        fs, int(opts.window_overlap))
    x_T = torch.randn((1, z.shape[1], frames, h, w), generator=gen, dtype=torch.float32).to(device)
    latents = sampler.sample(denoise, x_T, cfg=float(opts.cfg),
                             guidance_rescale=float(settings["schedule"].get("guidance_rescale", 0.0)),
                             generator=gen, keep_mask=keep_mask, keep_latent=keep_latent, callback=callback)
    runtime.check_interrupt()

    # decode
    video = model.vae_decode(latents[0].transpose(0, 1))                    # (T, 3, H, W) in [-1, 1]
    video = ((video.float() + 1.0) / 2.0).clamp(0, 1).permute(0, 2, 3, 1).cpu()
    if pix_mask is not None:   # the VAE does not reproduce the input exactly: paste it back outside
        src = ((imgs[0][0] + 1.0) / 2.0).clamp(0, 1).permute(1, 2, 0).cpu()
        video = paste(video, src, paste_alpha(pix_mask.cpu(), default_feather(height, width)))
    return video


def _check_frame_tokens(model: DynamiCrafter, tokens, frames: int) -> None:
    enc = model.image_encoder
    want = (enc.positional_embedding.shape[0], enc.conv1.weight.shape[0])
    if not torch.is_tensor(tokens) or tokens.dim() != 3:
        got = tuple(tokens.shape) if torch.is_tensor(tokens) else type(tokens).__name__
        raise ValueError(f"frame_tokens: expected CLIP vision tokens (frames, {want[0]}, {want[1]}), got {got}")
    if tokens.shape[0] != frames or tuple(tokens.shape[1:]) != want:
        raise ValueError(f"frame_tokens: {tuple(tokens.shape)} does not fit {frames} frames of this model's "
                         f"image encoder ({frames}, {want[0]}, {want[1]})")


def animate(model: DynamiCrafter, image: torch.Tensor, opts: AnimateOptions,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """IMAGE (B, H, W, 3) -> frames (T, H, W, 3); ``mask`` (B, H, W): 1 where it may move."""
    return generate(model, [image], opts, mask=mask)


def interpolate(model: DynamiCrafter, start: torch.Tensor, end: torch.Tensor, opts: AnimateOptions) -> torch.Tensor:
    """Two IMAGEs -> frames (T, H, W, 3) from ``start`` to ``end`` (the 512-interp model)."""
    return generate(model, [start, end], opts)
