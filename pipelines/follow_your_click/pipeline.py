"""Follow-Your-Click sampling: image + region mask + prompt + motion strength -> video.

The reference sampler of the pack (a ComfyUI-KSampler route can be tested against it):

- DDIM over the training schedule: linear betas 0.00085-0.012 rescaled to zero terminal SNR,
  v-prediction, "leading" timesteps with offset 1 (``configs/follow_your_click/scheduler.json``;
  diffusers' ``DDIMScheduler`` does the arithmetic);
- at every step the UNet gets ``cat[z_t, M, C]`` (``unet.conditioning_input``), the fps and the
  motion-strength conditions; classifier-free guidance batches [negative; positive] with the
  same ``M`` and ``C`` in both halves;
- optional noise inits of the official pipeline: every frame starts from frame 0's noise
  (``shared_noise``), and/or frame i starts from ``a_i z_img + (1 - a_i) eps`` with
  ``a_i = (F - i) / F / 64`` (``image_init``);
- with a mask, the region animation of ``kernels/regional.py``: the latent outside the mask is
  reset to the (noised) image latent after every step, and the decoded frames are pasted over
  the input with a feathered alpha, so outside the mask every frame is the input.

The VAE is ComfyUI's ``VAE`` object (or :class:`~.sd15.DiffusersVAE` outside ComfyUI):
``encode(pixels (B, H, W, 3) in [0, 1]) -> latent mean`` and ``decode(latent) -> pixels``;
latents are scaled by 0.18215 for the UNet, as in SD1.5.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler

from ... import runtime
from ...kernels.regional import blend, cover_crop, default_feather, fit_mask, latent_keep, paste, paste_alpha
from .unet import LATENT_SCALE, FYCUNet, conditioning_input, load_config, mask_condition

VAE_FACTOR = 8


# "Leading" timesteps with offset 1 are 1 + k * (1000 // steps): at 1000 steps the first would be
# timestep 1000, one past the schedule's last (999).
MAX_STEPS = 999


@dataclass
class FYCOptions:
    frames: int = 16
    width: int = 512
    height: int = 512
    steps: int = 25
    cfg: float = 7.5
    eta: float = 0.0
    fps: int = 2                    # the frame stride the model was conditioned on (official default 2)
    strength: int = 4               # motion-strength bucket (official default 4; see kernels/flow.strength_bucket)
    seed: int = 0
    shared_noise: bool = False      # every frame starts from frame 0's noise
    image_init: bool = False        # frame i starts from a_i * z_img + (1 - a_i) * noise, a_i = (F - i) / F / 64
    first_frame_dropout: float = 0.0  # share of image-latent cells zeroed (official --mask_first_frame: 0.5)
    keep_outside: bool = True       # with a mask: outside it every frame is the input


@dataclass
class FYCModel:
    """A loaded Follow-Your-Click UNet. Under model management it is one patcher whichever route
    samples it: inside ComfyUI the patcher of its ComfyUI MODEL (``native.comfy_model``), outside
    a :class:`~kinema.runtime.ManagedModel`."""
    unet: FYCUNet
    name: str = "Follow-Your-Click UNet"
    _managed: object = field(default=None, repr=False)
    _comfy: object = field(default=None, repr=False)

    def managed(self):
        """(what :func:`runtime.load_models` takes, the device inputs go to)."""
        if runtime.in_comfyui():
            from .native import comfy_model
            patcher = comfy_model(self)
            return patcher, patcher.load_device
        if self._managed is None:
            self._managed = runtime.ManagedModel(self.unet, self.name)
        return self._managed, self._managed.device


def _parts(unet):
    """(managed part, device, the network) of an :class:`FYCModel` or a ManagedModel."""
    if isinstance(unet, FYCModel):
        part, device = unet.managed()
        return part, device, unet.unet
    return unet, unet.device, unet.module


def scheduler() -> DDIMScheduler:
    return DDIMScheduler(**load_config("scheduler"))


def check_options(opts: FYCOptions, max_frames: int = 24) -> None:
    for name in ("frames", "width", "height", "steps", "fps", "strength", "seed"):
        v = getattr(opts, name)
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{name}: {v!r} must be a whole number")
    if not 2 <= opts.frames <= max_frames:
        raise ValueError(f"frames: {opts.frames}; Follow-Your-Click makes 2 to {max_frames} frames")
    for name in ("width", "height"):
        v = getattr(opts, name)
        if v < 64 or v % VAE_FACTOR:
            raise ValueError(f"{name}: {v} must be a multiple of {VAE_FACTOR} and at least 64")
    if not 1 <= opts.steps <= MAX_STEPS:
        raise ValueError(f"steps: {opts.steps} must be between 1 and {MAX_STEPS}")
    if opts.cfg < 1.0:
        raise ValueError(f"cfg: {opts.cfg} must be at least 1.0 (1.0 turns guidance off)")
    if not 0.0 <= opts.eta <= 1.0:
        raise ValueError(f"eta: {opts.eta} must be between 0 and 1")
    if opts.fps < 0 or opts.strength < 0:
        raise ValueError("fps / strength: must be >= 0")
    if not 0.0 <= opts.first_frame_dropout < 1.0:
        raise ValueError(f"first_frame_dropout: {opts.first_frame_dropout} must be in [0, 1)")


def initial_latents(shape, generator: torch.Generator, image_latent: torch.Tensor | None = None,
                    shared_noise: bool = False, image_init: bool = False) -> torch.Tensor:
    """Starting latent (B, C, F, h, w) in float32 on the CPU: standard normal noise, optionally
    the same for every frame (frame 0's), optionally pulled towards the image latent (B, C, h, w)
    by ``a_i = (F - i) / F / 64`` on frame i."""
    x = torch.randn(shape, generator=generator, dtype=torch.float32)
    if shared_noise:
        x = x[:, :, :1].expand(shape).clone()
    if image_init:
        if image_latent is None:
            raise ValueError("image_init needs the image latent")
        f = shape[2]
        a = (f - torch.arange(f, dtype=torch.float32)) / f / 64.0
        a = a.view(1, 1, f, 1, 1)
        x = a * image_latent.float().cpu()[:, :, None] + (1 - a) * x
    return x


def _randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)


def sample(unet: FYCModel | runtime.ManagedModel, image_latent: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
           opts: FYCOptions, mask: torch.Tensor | None = None, keep: torch.Tensor | None = None,
           generator: torch.Generator | None = None, callback=None, partial: torch.Tensor | None = None,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """The denoising loop.

    image_latent (1, 4, h, w) scaled; cond / uncond (1, L, D) text features (uncond None: no
    guidance); mask (1, 1, h, w) from ``mask_condition`` or None; keep (1, 1, 1, h, w) the latent
    keep weight of regional animation or None; partial (1, 1, h, w) a 0/1 map on the image latent
    (else one is drawn when ``opts.first_frame_dropout`` > 0). Returns the final latent
    (1, 4, F, h, w) float32. noise (1, 4, F, h, w): the starting latent x_T (default: drawn from the
    generator with the noise options).
    ``callback(i, info)`` sees ``x`` (after the step), ``t`` and ``x_in`` (the UNet input).
    """
    part, dev, model = _parts(unet)
    check_options(opts, model.max_frames)
    gen = generator if generator is not None else torch.Generator().manual_seed(int(opts.seed) & runtime.SEED_MAX)
    dt = model.dtype
    h, w = image_latent.shape[-2:]
    shape = (1, model.latent_channels, int(opts.frames), h, w)
    z_img = image_latent.to(dev, torch.float32)
    if partial is None and opts.first_frame_dropout > 0:
        partial = (torch.rand((1, 1, h, w), generator=gen) >= opts.first_frame_dropout).float()
    partial = partial.to(dev) if partial is not None else None
    if noise is None:
        x = initial_latents(shape, gen, z_img, opts.shared_noise, opts.image_init).to(dev)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise: expected {shape}, got {tuple(noise.shape)}")
    else:
        x = noise.to(dev, torch.float32)
    sched = scheduler()
    sched.set_timesteps(int(opts.steps))
    use_cfg = uncond is not None and float(opts.cfg) != 1.0
    ctx = torch.cat([uncond, cond]) if use_cfg else cond
    ctx = ctx.to(dev, dt)
    batch = 2 if use_cfg else 1
    runtime.load_models(part, memory_required=runtime.inference_memory((batch * shape[2], shape[1], h, w), dt))
    bar = runtime.ProgressBar(len(sched.timesteps), "Follow-Your-Click")
    target = z_img[:, :, None].expand(shape)
    for i, t in enumerate(sched.timesteps):
        runtime.check_interrupt()
        x_in = conditioning_input(x, z_img, mask, partial)
        x_in = torch.cat([x_in] * batch)
        with torch.no_grad():
            out = model(x_in.to(dt), t.to(dev), ctx, opts.fps, opts.strength).float()
        if use_cfg:
            out_u, out_c = out.chunk(2)
            out = out_u + float(opts.cfg) * (out_c - out_u)
        step = sched.step(out, t, x, eta=float(opts.eta),
                          variance_noise=_randn_like(x, gen) if opts.eta > 0 else None)
        x = step.prev_sample.float()
        if keep is not None:
            prev_t = int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
            if prev_t >= 0:
                noised = sched.add_noise(target, _randn_like(x, gen), torch.tensor([prev_t]))
            else:
                noised = target      # after the last step: the image latent itself
            x = blend(x, noised, keep.to(dev))
        if callback is not None:
            callback(i, {"x": x, "t": int(t), "x_in": x_in})
        bar.update()
    return x


def prepare_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """IMAGE (B, H, W, 3) -> (1, height, width, 3) in [0, 1]: the first picture, scaled to cover
    and centre-cropped."""
    if not torch.is_tensor(image) or image.dim() != 4 or image.shape[-1] not in (3, 4) or image.shape[0] < 1:
        raise ValueError(f"image: expected an IMAGE of shape (B, H, W, 3), got "
                         f"{tuple(image.shape) if torch.is_tensor(image) else type(image).__name__}")
    x = image[:1, ..., :3].permute(0, 3, 1, 2).float().clamp(0, 1)
    return cover_crop(x, height, width).clamp(0, 1).permute(0, 2, 3, 1)


@torch.no_grad()
def animate(unet: FYCModel | runtime.ManagedModel, vae, image: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
            opts: FYCOptions, mask: torch.Tensor | None = None, callback=None) -> torch.Tensor:
    """Frames (F, height, width, 3) in [0, 1].

    ``unet``: the FYC UNet (:class:`FYCModel` or a ManagedModel); ``vae``: the SD1.5 VAE (ComfyUI ``VAE`` or
    ``DiffusersVAE``); ``image`` IMAGE (B, H, W, 3); ``cond`` / ``uncond`` (1, 77, 768) text
    features of the prompt and the negative prompt (uncond None: no guidance); ``mask`` MASK
    (B, H, W), 1 = the region that moves, or None (the whole picture may move).
    """
    network = _parts(unet)[2]
    check_options(opts, network.max_frames)
    height, width = int(opts.height), int(opts.width)
    pixels = prepare_image(image, height, width)
    pix_mask = fit_mask(mask, height, width) if mask is not None else None
    gen = torch.Generator().manual_seed(int(opts.seed) & runtime.SEED_MAX)
    runtime.check_interrupt()
    z = vae.encode(pixels).float()
    if tuple(z.shape[-2:]) != (height // VAE_FACTOR, width // VAE_FACTOR) or z.shape[1] != network.latent_channels:
        raise ValueError(f"vae: encoded a {width}x{height} picture to {tuple(z.shape)}; Follow-Your-Click needs the "
                         f"SD1.5 VAE ({network.latent_channels} channels at 1/{VAE_FACTOR} size)")
    z_img = z[:1] * LATENT_SCALE
    h, w = z_img.shape[-2:]
    m_lat = mask_condition(pix_mask[:, 0], (h, w)) if pix_mask is not None else None
    keep = latent_keep(pix_mask, (h, w)) if pix_mask is not None and opts.keep_outside else None
    latents = sample(unet, z_img, cond, uncond, opts, m_lat, keep, gen, callback)
    runtime.check_interrupt()
    frames = vae.decode(latents[0].transpose(0, 1).cpu() / LATENT_SCALE).float().clamp(0, 1).cpu()
    if frames.shape[1:3] != (height, width):
        raise ValueError(f"vae: decoded frames are {tuple(frames.shape)}, expected {width}x{height}")
    if keep is not None:   # the VAE does not reproduce the picture exactly: paste it back outside the mask
        frames = paste(frames, pixels[0].cpu(), paste_alpha(pix_mask.cpu(), default_feather(height, width)))
    return frames
