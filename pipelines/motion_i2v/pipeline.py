"""Motion-I2V sampling: stage 1 predicts a motion field, stage 2 renders the video.

Stage 1 (``predict_motion``): the sparse trajectory / brush condition is normalised, encoded
by the flow VAE (no latent scaling) and joined with the mask at latent size; the flow UNet
denoises 15 flow latents next to the repeated image latent (the image enters the SD VAE in
[0, 1] here, as the released pipeline does) with per-frame strides 8..120; DDIM, eps,
classifier-free guidance. The flow VAE decodes frame by frame; values map back to pixels
and a zero frame 0 is prepended -> ``MotionField`` (16 frames).

Stage 2 (``render_video``): AnimateDiff-v2 UNet with motion-augmented temporal attention
driven by the motion field; frame 0 is replaced by the image latent before every step and
brushed-static regions are blended with the re-noised image latent after every step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler

from ... import runtime
from ...kernels.field import MotionField
from ...kernels.motion_attention import (MAX_FRAMES, FlowSplats, apply_static, denormalise_flow, frame_strides,
                                         normalise_flow, sparse_vae_input)
from .loading import load_config
from .modules import MotionUNet3D
from .text import TextEncoder



def _managed(model, parts: dict) -> dict:
    if model._managed is None:
        model._managed = {k: runtime.ManagedModel(m, f"Motion-I2V {k}") for k, m in parts.items() if m is not None}
    return model._managed


def _place(dtype: torch.dtype, unet, text, *vaes) -> None:
    """The UNet and text encoder in ``dtype``, the VAEs in float32."""
    unet.to(dtype)
    for vae in vaes:
        if vae is not None:
            vae.to(torch.float32)
    if text is not None:
        text.model.to(dtype)


@dataclass
class FlowModel:
    """Stage-1 weights: flow UNet (+ ControlNet) and flow VAE; the SD image VAE and text encoder
    only for the standalone reference path (inside ComfyUI they come from its loaders).
    The UNet runs in ``dtype``, the VAEs in float32 (SD's VAE overflows in fp16, and they are a
    small part of the work)."""
    unet: MotionUNet3D
    flow_vae: AutoencoderKL
    image_vae: AutoencoderKL | None = None
    text: TextEncoder | None = None
    dtype: torch.dtype = torch.float32
    defaults: dict = field(default_factory=lambda: load_config("defaults"))
    _managed: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        _place(self.dtype, self.unet, self.text, self.flow_vae, self.image_vae)

    def managed(self) -> dict:
        """The parts under model management (made once)."""
        return _managed(self, {"flow UNet": self.unet, "flow VAE": self.flow_vae, "image VAE": self.image_vae,
                               "text encoder": None if self.text is None else self.text.model})


@dataclass
class RenderModel:
    """Stage-2 reference weights: UNet with Motion-I2V motion modules, SD VAE, optional text
    encoder (the diffusers-based reference of the released code; inside ComfyUI stage 2 runs on
    ComfyUI's own SD1.5 model, see ``native``)."""
    unet: MotionUNet3D
    vae: AutoencoderKL
    text: TextEncoder | None = None
    dtype: torch.dtype = torch.float32
    defaults: dict = field(default_factory=lambda: load_config("defaults"))
    _managed: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        _place(self.dtype, self.unet, self.text, self.vae)

    def managed(self) -> dict:
        return _managed(self, {"render UNet": self.unet, "VAE": self.vae,
                               "text encoder": None if self.text is None else self.text.model})


@dataclass
class RenderResult:
    frames: torch.Tensor   # (F, H, W, 3) in [0, 1]
    latents: torch.Tensor  # (1, 4, F, H/8, W/8), scaled by 0.18215
    image_latent: torch.Tensor  # (1, 4, 1, H/8, W/8)


def make_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**load_config("scheduler"))


def text_condition(model, prompt: str | None, negative: str | None, cond: torch.Tensor | None,
                   uncond: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """(B, 77, D) context: ``[uncond, cond]`` when guidance > 1, else ``cond``.

    ``cond`` / ``uncond`` are encoder states from ComfyUI CONDITIONING (1, L, D); missing ones
    are encoded from ``prompt`` / ``negative`` with the checkpoint's text encoder.
    """
    d = model.unet.config["cross_attention_dim"]
    if cond is None or (guidance > 1.0 and uncond is None):
        if model.text is None:
            raise ValueError("prompt: this model has no text encoder (checkpoint without CLIP weights); "
                             "connect positive and negative CONDITIONING from a CLIP Text Encode node")
        texts = [] if cond is not None else [prompt or ""]
        need_un = guidance > 1.0 and uncond is None
        part = model.managed()["text encoder"]
        runtime.load_models(part)
        enc = model.text.encode(texts + ([negative or ""] if need_un else []), device=part.device)
        if cond is None:
            cond = enc[:1]
        if need_un:
            uncond = enc[-1:]
    for name, t in (("positive", cond), ("negative", uncond)):
        if t is not None and (t.ndim != 3 or t.shape[-1] != d):
            raise ValueError(f"{name} conditioning: expected (1, tokens, {d}) from an SD1.5 text encoder, "
                             f"got {tuple(t.shape)}; use the SD1.5 CLIP")
    if guidance > 1.0:
        if uncond.shape[1] != cond.shape[1]:
            n = max(cond.shape[1], uncond.shape[1])
            cond, uncond = (_pad_tokens(cond, n), _pad_tokens(uncond, n))
        return torch.cat([uncond[:1], cond[:1]])
    return cond[:1]


def _pad_tokens(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[1] == n:
        return t
    reps = -(-n // t.shape[1])
    return t.repeat(1, reps, 1)[:, :n]


def _check_image(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """image (H, W, 3) or (1, H, W, 3) in [0, 1] -> (1, 3, H, W) resized to the model size."""
    if image.ndim == 4:
        image = image[0]
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image: expected (H, W, 3), got {tuple(image.shape)}")
    if width % 8 or height % 8:
        raise ValueError(f"size: width and height must be multiples of 8, got {width}x{height}")
    x = image.permute(2, 0, 1)[None].float()
    if tuple(x.shape[-2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0, 1)


def _encode(part: runtime.ManagedModel, x: torch.Tensor, generator, dtype) -> torch.Tensor:
    """x (N, C, H, W) -> latent sample (N, 4, H/8, W/8) in ``dtype`` (the VAE runs in its own dtype)."""
    runtime.load_models(part)
    vae = part.module
    dist = vae.encode(x.to(device=part.device, dtype=part.dtype)).latent_dist
    return dist.sample(generator=generator).to(dtype)


def _decode(part: runtime.ManagedModel, z: torch.Tensor) -> torch.Tensor:
    """z (N, 4, h, w), frame by frame -> (N, C, H, W) float32."""
    runtime.load_models(part)
    vae = part.module
    return torch.cat([vae.decode(z[i:i + 1].to(part.device, part.dtype)).sample.float() for i in range(z.shape[0])])


def _randn(shape, generator, device, dtype):
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


@torch.no_grad()
def predict_motion(model: FlowModel, image: torch.Tensor, sparse: torch.Tensor, mask: torch.Tensor,
                   static: torch.Tensor | None = None, *, prompt: str = "", negative: str | None = None,
                   cond=None, uncond=None, image_latent: torch.Tensor | None = None, steps: int = 25,
                   guidance: float = 7.0, seed: int = 0, control_scale: float = 1.0, eta: float = 0.0) -> MotionField:
    """Stage 1.

    image (H, W, 3) in [0, 1] (resized to the condition size); sparse (F-1, H, W, 2) pixels and
    mask (F-1, H, W, 1) from :func:`~kinema.kernels.motion_attention.rasterise_tracks_motion_i2v`;
    static (H, W), 1 = keep still. ``image_latent`` (1, 4, h, w): the SD VAE latent of the image
    as the released code makes it (the image in [0, 1], not [-1, 1]), unscaled; default: a
    sample from ``model.image_vae``. Returns a MotionField with flow (F, H, W, 2), flow[0] = 0.
    """
    if sparse.ndim != 4 or sparse.shape[-1] != 2:
        raise ValueError(f"sparse flow: expected (F-1, H, W, 2), got {tuple(sparse.shape)}")
    frames = sparse.shape[0] + 1
    if frames > MAX_FRAMES:
        raise ValueError(f"frames: {frames} requested; Motion-I2V predicts at most {MAX_FRAMES} frames")
    n, height, width, _ = sparse.shape
    if tuple(mask.shape[:3]) != (n, height, width):
        raise ValueError(f"mask: {tuple(mask.shape)} does not match the sparse flow {tuple(sparse.shape)}")
    if static is not None and tuple(static.shape) != (height, width):
        raise ValueError(f"brush: mask {tuple(static.shape)} does not match the {width}x{height} condition")
    parts = model.managed()
    unet_part = parts["flow UNet"]
    device = unet_part.device
    dtype = model.dtype
    g = torch.Generator().manual_seed(int(seed))
    img = _check_image(image, width, height)
    sparse, mask = apply_static(sparse.float(), mask.reshape(n, height, width, 1).float(), static)
    vae_in = sparse_vae_input(normalise_flow(sparse, width, height), mask)          # (F-1, 2, H, W)
    scheduler = make_scheduler()
    ctx = text_condition(model, prompt, negative, cond, uncond, guidance).to(device, dtype)
    z_ctrl = _encode(parts["flow VAE"], vae_in, g, dtype).to(device)
    h, w = z_ctrl.shape[-2:]
    m_lat = mask[:, ::8, ::8, 0][:, :h, :w]                                           # nearest, pixel [8i, 8j]
    control = torch.cat([z_ctrl.permute(1, 0, 2, 3)[None], m_lat[None, None].to(device, dtype)], dim=1)
    if image_latent is None:
        if model.image_vae is None:
            raise ValueError("image: no image latent given and this flow model has no image VAE; connect the "
                             "SD1.5 checkpoint's VAE")
        z_img = _encode(parts["image VAE"], img, g, dtype).to(device)
    else:
        z_img = image_latent.to(device, dtype)
    z_img = (z_img * model.defaults["latent_scale"])[:, :, None].expand(-1, -1, n, -1, -1)
    stride = frame_strides(frames).to(device)
    latents = _randn((1, 8, n, h, w), g, device, dtype)[:, :4] * scheduler.init_noise_sigma
    scheduler.set_timesteps(int(steps), device=device)
    cfg = guidance > 1.0
    runtime.load_models(unet_part, memory_required=runtime.inference_memory(
        ((2 if cfg else 1) * n, 8, h, w), dtype, factor=2.0))
    bar = runtime.ProgressBar(len(scheduler.timesteps), "Motion-I2V motion")
    for t in scheduler.timesteps:
        runtime.check_interrupt()
        x = torch.cat([z_img, latents], dim=1)
        x = torch.cat([x, x]) if cfg else x
        c = torch.cat([control, control]) if cfg else control
        eps = model.unet(scheduler.scale_model_input(x, t), t, ctx, stride=stride, control=c,
                         control_scale=control_scale)
        if cfg:
            un, co = eps.chunk(2)
            eps = un + guidance * (co - un)
        latents = scheduler.step(eps, t, latents, eta=eta, generator=g).prev_sample
        bar.update()
    z = latents[0].permute(1, 0, 2, 3) / model.defaults["latent_scale"]
    decoded = _decode(parts["flow VAE"], z).cpu()
    flow = denormalise_flow(decoded, width, height, static)
    return MotionField(flow=flow, mask=None if static is None else (1.0 - static.float()))


@torch.no_grad()
def render_video(model: RenderModel, image: torch.Tensor, motion: MotionField, static: torch.Tensor | None = None,
                 *, prompt: str = "", negative: str | None = None, cond=None, uncond=None, steps: int = 25,
                 guidance: float = 7.0, seed: int = 0, eta: float = 0.0, keep_static_exact: bool = True,
                 image_latent: torch.Tensor | None = None, latents: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None) -> RenderResult:
    """Stage 2 (the reference loop of the released code).

    image (H, W, 3) in [0, 1]; motion: flow (F, H, W, 2) pixels at the render size (F <= 16);
    static (H, W), 1 = keep still (blended with the re-noised image latent after every step;
    with ``keep_static_exact`` also after the last step, so those latents equal the image's).
    Optional, as diffusers pipelines take them: ``image_latent`` (1, 4, h, w) the image's VAE
    latent (unscaled; default: a sample from the VAE), ``noise`` (1, 4, F, h, w) the standard
    normal noise the still regions are re-noised with, ``latents`` (1, 4, F, h, w) the starting
    latents (default: ``noise``); otherwise both come from ``seed``.
    """
    flow = motion.flow
    frames, height, width, _ = flow.shape
    if frames > MAX_FRAMES:
        raise ValueError(f"motion field: {frames} frames; Motion-I2V renders at most {MAX_FRAMES} "
                         f"(2F-1 interleaved positions must fit 32)")
    if frames < 2:
        raise ValueError(f"motion field: needs at least 2 frames, got {frames}")
    if width % 8 or height % 8:
        raise ValueError(f"motion field: size {width}x{height} must be a multiple of 8")
    if static is not None and tuple(static.shape) != (height, width):
        raise ValueError(f"brush: mask {tuple(static.shape)[::-1]} does not match the motion field "
                         f"{width}x{height}; resize one of them")
    parts = model.managed()
    unet_part = parts["render UNet"]
    device = unet_part.device
    dtype = model.dtype
    g = torch.Generator().manual_seed(int(seed))
    img = _check_image(image, width, height) * 2.0 - 1.0
    scale = model.defaults["latent_scale"]
    scheduler = make_scheduler()
    ctx = text_condition(model, prompt, negative, cond, uncond, guidance).to(device, dtype)
    if image_latent is None:
        z_img = (_encode(parts["VAE"], img, g, dtype).to(device) * scale)[:, :, None]  # (1, 4, 1, h, w)
    else:
        z_img = (image_latent.to(device, dtype) * scale)[:, :, None]
    h, w = z_img.shape[-2:]
    noise = _randn((1, 4, frames, h, w), g, device, dtype) if noise is None else noise.to(device, dtype)
    latents = noise * scheduler.init_noise_sigma if latents is None else latents.to(device, dtype).clone()
    s_lat = None
    if static is not None:
        s_lat = static.float()[::8, ::8][:h, :w].to(device, dtype)[None, None, None]
    flow_d = flow[None].to(device=device, dtype=torch.float32)
    splats = FlowSplats()  # the flow's splat per token grid, built at the first step, freed with the run
    scheduler.set_timesteps(int(steps), device=device)
    ts = scheduler.timesteps
    cfg = guidance > 1.0
    runtime.load_models(unet_part, memory_required=runtime.inference_memory(
        ((2 if cfg else 1) * frames, 4, h, w), dtype, factor=2.0))
    bar = runtime.ProgressBar(len(ts), "Motion-I2V video")
    for i, t in enumerate(ts):
        runtime.check_interrupt()
        latents[:, :, :1] = z_img
        x = torch.cat([latents, latents]) if cfg else latents
        eps = model.unet(scheduler.scale_model_input(x, t), t, ctx, flow=flow_d, splats=splats)
        if cfg:
            un, co = eps.chunk(2)
            eps = un + guidance * (co - un)
        latents = scheduler.step(eps, t, latents, eta=eta, generator=g).prev_sample
        if s_lat is not None and i < len(ts) - 1:
            renoised = scheduler.add_noise(z_img.expand_as(noise), noise, ts[i + 1:i + 2])
            latents = renoised * s_lat + latents * (1 - s_lat)
        bar.update()
    latents[:, :, :1] = z_img
    if s_lat is not None and keep_static_exact:
        latents = z_img * s_lat + latents * (1 - s_lat)
    z = latents[0].permute(1, 0, 2, 3) / scale
    video = _decode(parts["VAE"], z)
    frames_out = (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()
    return RenderResult(frames_out, latents.float().cpu(), z_img.float().cpu())
