"""DynamiCrafter sampled by ComfyUI: the pack's LVDM UNet as a ComfyUI MODEL.

Inside ComfyUI the UNet of a loaded DynamiCrafter is held by one ``ModelPatcher`` over a
``BaseModel`` (:func:`managed_unet`): the pack's own sampler and ComfyUI's KSampler /
SamplerCustomAdvanced load the same weights through it. What the MODEL carries:

- the variant's noise schedule: 512 / 1024 / 512-interp v-prediction with zero-terminal-SNR
  betas, 256 eps-prediction with plain betas (ComfyUI's "linear", i.e. squared-linspace betas
  0.00085-0.012). ComfyUI's sigma table equals the released one to float32 rounding (relative
  1.2e-7 in alphas_cumprod) except at t = 999, where ComfyUI puts alphas_cumprod 4.9e-8
  (sigma 4518.8) for the released 0, so its first x0 estimate carries sqrt(4.9e-8) = 2.2e-4 of
  the noisy latent;
- the conditioning hook: a CONDITIONING of :func:`conditioning` holds the text + image context
  (``cross_attn``) and, under :data:`KEY`, the concat latent, the frame count, ``fs`` and the
  window overlap;
- :class:`NativeUNet`: ComfyUI's video latent is a batch of F frame latents; the rows of each
  video (F at a time; cond and uncond are batched by ComfyUI) go to the UNet together, with the
  video's context once (the UNet hands frame t image tokens 16t..16t+15) and in overlapping
  windows of the model's 16 frames when there are more;
- guidance rescale (0.7 for 512 / 1024) as a post-CFG function, with the std over each whole
  video (:func:`guidance_rescale_patch`; ComfyUI's RescaleCFG takes it per frame, since each of
  its batch rows is a frame).

The released sampler's dynamic rescale of x0 changes x0 but not the noise estimate of a DDIM
step, which no model patch can express: :func:`sample_ddim` is a ComfyUI sampler doing the
released DDIM step (eta, dynamic rescale) on ComfyUI's denoiser, and :func:`official_sigmas`
gives the released timesteps.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ... import runtime
from ...kernels.regional import default_feather, fit_mask, latent_keep, paste_alpha
from .model import LATENT_SCALE, DynamiCrafter
from .pipeline import _check_size, blend_windows, default_fs, prepare_image
from .sampler import DiffusionSchedule, ScheduleConfig, ddim_timesteps

KEY = "dynamicrafter"            # the conditioning entry this MODEL reads
SETTINGS = "kinema_dynamicrafter"  # the BaseModel attribute holding the variant's ScheduleConfig


class NativeUNet(nn.Module):
    """The LVDM UNet called as ComfyUI calls its UNets.

    x (N, 8, h, w): N = videos x ``frames`` rows, frame-major within each video, the noisy
    latent with the concat latent appended; timesteps (N,); context (N, L, C) (every row of a
    video holds the same); ``frames``, ``fs``, ``window_overlap`` from the conditioning.
    Returns (N, 4, h, w).
    """

    def __init__(self, unet: nn.Module, temporal_length: int):
        super().__init__()
        self.unet = unet
        self.temporal_length = int(temporal_length)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, x, timesteps, context=None, control=None, transformer_options=None, frames=None, fs=None,
                window_overlap=4, **_unused):
        if frames is None or fs is None or context is None:
            raise ValueError("positive/negative: the DynamiCrafter MODEL needs the CONDITIONING of "
                             "'DynamiCrafter Conditioning'")
        if control is not None:
            raise ValueError("DynamiCrafter's UNet takes no ControlNet; remove it from the conditioning")
        n, c, h, w = x.shape
        if n % int(frames):
            raise ValueError(f"latent_image: {n} frame latents are not a whole number of {frames}-frame videos")
        videos = n // int(frames)
        xv = x.reshape(videos, int(frames), c, h, w).transpose(1, 2)
        t = timesteps.reshape(videos, int(frames))[:, 0]
        ctx = context.reshape(videos, int(frames), *context.shape[1:])[:, 0]
        fs_v = torch.full((videos,), int(fs), dtype=torch.long, device=x.device)

        def run(window, _start):
            return self.unet(window, t, ctx, fs_v).float()

        out = blend_windows(run, xv, self.temporal_length, int(window_overlap))
        return out.transpose(1, 2).reshape(n, -1, h, w)


def _conds(kwargs: dict, c) -> dict:
    """ComfyUI's conditioning hook: a CONDITIONING entry -> the UNet's inputs."""
    info = kwargs.get(KEY)
    if info is None or kwargs.get("cross_attn") is None:
        raise ValueError("positive/negative: the DynamiCrafter MODEL needs the CONDITIONING of 'DynamiCrafter "
                         "Conditioning' (text encoders of other models do not fit it)")
    noise = kwargs["noise"]
    frames = int(info["frames"])
    concat = info["concat"]
    if noise.shape[0] % frames:
        raise ValueError(f"latent_image: {noise.shape[0]} frame latents are not a whole number of {frames}-frame "
                         f"videos; use the LATENT of 'DynamiCrafter Conditioning' (or a batch of whole copies)")
    if tuple(noise.shape[1:]) != tuple(concat.shape[1:]):
        raise ValueError(f"latent_image: latents of shape {tuple(noise.shape[1:])} do not match the conditioning's "
                         f"{tuple(concat.shape[1:])}; use the LATENT made with the conditioning")
    concat = concat.repeat(noise.shape[0] // frames, 1, 1, 1) * LATENT_SCALE
    return {"c_crossattn": c.cross_attn(kwargs["cross_attn"]), "c_concat": c.noise_shape(concat),
            "frames": c.constant(frames), "fs": c.constant(int(info["fs"])),
            "window_overlap": c.constant(int(info["window_overlap"]))}


def managed_unet(model: DynamiCrafter, name: str) -> runtime.ManagedModel:
    """The UNet under model management: inside ComfyUI held by a ComfyUI MODEL (a ModelPatcher
    over a BaseModel with the variant's schedule and :func:`_conds`); a plain ManagedModel
    outside."""
    if not runtime.in_comfyui():
        return runtime.ManagedModel(model.unet, name)
    cfg = model.schedule_config()
    sampling = runtime.discrete_model_sampling(cfg.parameterization, "linear", cfg.linear_start, cfg.linear_end,
                                               zero_snr=cfg.zero_snr, timesteps=cfg.num_timesteps)
    patcher = runtime.comfy_model(NativeUNet(model.unet, model.temporal_length), name, sampling, conds=_conds,
                                  latent_format="SD15")
    setattr(patcher.model, SETTINGS, cfg)
    return runtime.ManagedModel(model.unet, name, patcher=patcher)


def _settings(patcher) -> ScheduleConfig | None:
    return getattr(patcher.model, SETTINGS, None)


# ----------------------------------------------------------------------------- MODEL and VAE

def comfy_model(model: DynamiCrafter, guidance_rescale: float | None = None):
    """A MODEL for KSampler: a clone of the UNet's MODEL with guidance rescale (``None``: the
    variant's, 0.7 for 512 / 1024, off for 256) as a post-CFG function."""
    patcher = model.managed()["unet"].patcher
    if patcher is None or _settings(patcher) is None:
        raise runtime.KinemaError("this DynamiCrafter model was loaded outside ComfyUI; load it again inside "
                                  "ComfyUI (or the headless runner with COMFYUI_DIR set) to sample it natively")
    cfg = _settings(patcher)
    phi = float(cfg.guidance_rescale if guidance_rescale is None else guidance_rescale)
    if not 0.0 <= phi <= 1.0:
        raise ValueError(f"guidance_rescale: {phi} must be between 0 and 1")
    clone = patcher.clone()
    if phi > 0:
        clone.set_model_sampler_post_cfg_function(guidance_rescale_patch(phi, cfg.parameterization))
    return clone


def comfy_vae(model: DynamiCrafter):
    """The checkpoint's VAE as a ComfyUI VAE (a copy of its weights) for VAE Decode / Encode."""
    if model.vae is None:
        raise runtime.KinemaError("this DynamiCrafter model was loaded without its VAE")
    cfg = model.vae.config
    chans = list(cfg.block_out_channels)
    ddconfig = {"double_z": True, "z_channels": int(cfg.latent_channels), "resolution": 256, "in_channels": 3,
                "out_ch": 3, "ch": chans[0], "ch_mult": [ch // chans[0] for ch in chans],
                "num_res_blocks": int(cfg.layers_per_block), "attn_resolutions": [], "dropout": 0.0}
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.vae.state_dict().items()}
    return runtime.comfy_vae(sd, ddconfig, int(cfg.latent_channels))


def guidance_rescale_patch(multiplier: float, parameterization: str = "v"):
    """A post-CFG function: the released guidance rescale, ``o = m * o * std(o_cond) / std(o) +
    (1 - m) * o`` on the model output (v or eps) with unbiased std over each whole video (C, F, h,
    w), the video's frame count read from the conditioning."""
    m = float(multiplier)

    def patch(args):
        denoised, uncond = args["denoised"], args["uncond_denoised"]
        if uncond is None or m == 0.0:   # cfg 1: no guidance to rescale
            return denoised
        x, cond = args["input"], args["cond_denoised"]
        sigma = args["sigma"].reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        to_out, from_out = _output_conversion(x, sigma, parameterization)
        o, o_c = to_out(denoised), to_out(cond)
        frames = _frames(args.get("cond")) or x.shape[0]
        videos = x.shape[0] // frames if x.shape[0] % frames == 0 else 1
        std = lambda t: t.reshape(videos, -1).std(dim=1).view(videos, 1, *([1] * (x.dim() - 1)))  # noqa: E731
        ov = o.reshape(videos, -1, *o.shape[1:])
        factor = std(o_c) / std(o)
        ov = m * (ov * factor) + (1.0 - m) * ov
        return from_out(ov.reshape(o.shape))

    return patch


def _output_conversion(x, sigma, parameterization):
    """(denoised -> model output, model output -> denoised) at noise level sigma, in ComfyUI's
    variables (x = x_vp * sqrt(1 + sigma^2))."""
    if parameterization == "v":
        k = (sigma * sigma + 1.0).sqrt()
        return (lambda d: (x / (k * k) - d) * k / sigma), (lambda v: x / (k * k) - v * sigma / k)
    return (lambda d: (x - d) / sigma), (lambda e: x - e * sigma)


def _frames(conds) -> int | None:
    for c in conds or []:
        info = c.get(KEY) if isinstance(c, dict) else None
        if info is not None:
            return int(info["frames"])
    return None


# ----------------------------------------------------------------------------- conditioning

@torch.no_grad()
def _encode(model: DynamiCrafter, images: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """images (K, 3, H, W) in [-1, 1] -> (K, 4, h, w) posterior means in the VAE's space (what
    ComfyUI's VAE Encode gives; the released code draws a posterior sample instead)."""
    part = model.managed()["vae"]
    runtime.load_models(part)
    out = []
    for i in range(0, images.shape[0], chunk):
        dist = model.vae.encode(images[i:i + chunk].to(part.device, model.vae.dtype)).latent_dist
        out.append(dist.mean.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def conditioning(model: DynamiCrafter, image: torch.Tensor, prompt: str, negative: str, frames: int, fs: int = 0,
                 width: int = 0, height: int = 0, end_image: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, window_overlap: int = 4):
    """(positive, negative, latent) for sampling the DynamiCrafter MODEL.

    ``image``: IMAGE to animate (the first of a batch), scaled and centre-cropped to
    ``width`` x ``height`` (0: the variant's size); ``end_image``: the last keyframe
    (interpolation: the concat latent holds the two keyframes, zeros between); ``mask``: MASK,
    1 where the picture may move - the LATENT then holds the image latent in every frame with
    the mask at latent size as its ``noise_mask``, which ComfyUI's samplers keep outside it.
    ``fs``: 0 for the variant's default (5 when interpolating, as the released script).
    """
    frames = int(frames)
    if frames < (3 if end_image is not None else 1):
        raise ValueError(f"frames: {frames} is too few" + (" (interpolation needs at least 3)" if end_image is not None
                                                            else ""))
    if mask is not None and end_image is not None:
        raise ValueError("mask: regional animation works with one image, not with interpolation")
    if int(window_overlap) < 0:
        raise ValueError(f"window_overlap: {window_overlap} must not be negative")
    height, width = _check_size(model, height, width)
    fs_value = default_fs(model, fs, interpolate=end_image is not None)
    imgs = [prepare_image(image, height, width)]
    if end_image is not None:
        imgs.append(prepare_image(end_image, height, width, name="end_image"))
    ctx_c = torch.cat([model.encode_text([prompt or ""]), model.encode_image_context(imgs[0])], dim=1)
    ctx_u = torch.cat([model.encode_text([negative or ""]),
                       model.encode_image_context(torch.zeros_like(imgs[0]))], dim=1)
    z = _encode(model, torch.cat(imgs))                                    # (K, 4, h, w)
    h, w = z.shape[-2:]
    if end_image is None:
        concat = z[:1].expand(frames, -1, -1, -1).clone()
    else:
        concat = torch.zeros(frames, *z.shape[1:])
        concat[0], concat[-1] = z[0], z[1]
    info = {"concat": concat, "frames": frames, "fs": fs_value, "window_overlap": int(window_overlap)}
    positive = [[ctx_c.float().cpu(), {KEY: info}]]
    negative_c = [[ctx_u.float().cpu(), {KEY: info}]]
    latent = {"samples": torch.zeros(frames, *z.shape[1:])}
    if mask is not None:
        lat_mask = 1.0 - latent_keep(fit_mask(mask, height, width), (h, w))[:, :, 0]   # (1, 1, h, w)
        latent = {"samples": concat.clone(), "noise_mask": lat_mask}
    return positive, negative_c, latent


def paste_inputs(model: DynamiCrafter, image: torch.Tensor, width: int = 0, height: int = 0,
                 mask: torch.Tensor | None = None):
    """(picture (1, H, W, 3) in [0, 1], keep (1, H, W)) to paste the picture back over the decoded
    frames with core ImageCompositeMasked (destination: frames, source: picture, mask: keep), as
    the pack's Animate node does: ``keep`` is 1 outside the mask and falls to 0 over the
    variant's feather inside it; all 0 without a mask."""
    height, width = _check_size(model, height, width)
    picture = ((prepare_image(image, height, width) + 1.0) / 2.0).clamp(0, 1).permute(0, 2, 3, 1).cpu()
    if mask is None:
        return picture, torch.zeros(1, height, width)
    alpha = paste_alpha(fit_mask(mask, height, width), default_feather(height, width))
    return picture, (1.0 - alpha)[None].cpu()


# ----------------------------------------------------------------------------- the released DDIM

def official_sigmas(model_sampling, steps: int, spacing: str, num_timesteps: int = 1000) -> torch.Tensor:
    """(steps + 1,) noise levels: the released sampler's timesteps (``spacing``: "uniform_trailing"
    for 512 / 1024 / interp, "uniform" for 256) on the model's sigma table, then 0. The released
    sampler stops at alphas_cumprod[0] instead (sigma 0.029), leaving that much noise in the
    latent it decodes; ending at 0 gives the clean latent, which keeps masked-out regions exact."""
    table = model_sampling.sigmas.float().cpu()
    if table.shape[0] != num_timesteps:
        raise ValueError(f"model: its noise schedule has {table.shape[0]} levels, not {num_timesteps}")
    ts = torch.from_numpy(ddim_timesteps(int(steps), spacing, num_timesteps)).flip(0)
    return torch.cat([table[ts], torch.zeros(1)])


def _noise_sampler(x: torch.Tensor, seed):
    gen = None
    if seed is not None:
        gen = torch.Generator(device=x.device)
        gen.manual_seed(int(seed))
    return lambda sigma, sigma_next: torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=gen)


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta: float = 1.0,
                dynamic_rescale: bool = True, noise_sampler=None):
    """The released DDIM step on ComfyUI's denoiser (a ComfyUI sampler function).

    With a = 1 / (1 + sigma^2): x0 = the guided denoised latent, e = (x - x0) / sigma, and (in
    the variance-preserving variables x * sqrt(a)) ``x_next = sqrt(a_next) x0' + sqrt(1 - a_next
    - s^2) e + s z``, s = eta sqrt((1 - a_next) / (1 - a) (1 - a / a_next)); x0' = x0 times the
    dynamic rescale ratio scale[t_next] / scale[t] of a DynamiCrafter MODEL (the released
    ``scale_arr``: 1 down to base_scale over the first 400 timesteps, base_scale above). A last
    step to sigma 0 returns x0. eta 0 is exactly Euler. On other models: DDIM with eta.
    """
    extra_args = {} if extra_args is None else extra_args
    # ComfyUI's sampler protocol: model is KSamplerX0Inpaint, model.inner_model the guider
    patcher = model.inner_model.model_patcher
    ms = patcher.get_model_object("model_sampling")
    cfg = _settings(patcher)
    scale = None
    if dynamic_rescale and cfg is not None and cfg.base_scale is not None:
        scale = DiffusionSchedule(cfg).scale_arr
    if noise_sampler is None:
        noise_sampler = _noise_sampler(x, extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, s * s_in, **extra_args)
        x0 = denoised
        if float(s_next) == 0.0:
            x = x0
        else:
            e = (x - denoised) / s
            if scale is not None:
                t, t_next = (int(ms.timestep(v.reshape(1))) for v in (s, s_next))
                x0 = x0 * (scale[t_next] / scale[t]).item()
            a, a_next = 1.0 / (1.0 + float(s) ** 2), 1.0 / (1.0 + float(s_next) ** 2)
            sd = float(eta) * math.sqrt(max(0.0, (1.0 - a_next) / (1.0 - a) * (1.0 - a / a_next)))
            # x_next * sqrt(a_next) = sqrt(a_next) x0 + sqrt(1 - a_next - sd^2) e + sd z
            x = x0 + math.sqrt(max(0.0, 1.0 - a_next - sd * sd) / a_next) * e
            if sd > 0:
                x = x + (sd / math.sqrt(a_next)) * noise_sampler(s, s_next)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": s, "sigma_hat": s, "denoised": x0})
    return x


def ddim_sampler(eta: float = 1.0, dynamic_rescale: bool = True):
    """The SAMPLER of :func:`sample_ddim`."""
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta: {eta} must be between 0 and 1")
    return runtime.comfy_sampler(sample_ddim, eta=float(eta), dynamic_rescale=bool(dynamic_rescale))


def sigmas_for(model, steps: int, spacing: str = "auto") -> torch.Tensor:
    """The SIGMAS of :func:`official_sigmas` for a MODEL; ``spacing`` "auto" takes the
    DynamiCrafter variant's."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: {steps!r} must be a whole number of at least 1")
    cfg = _settings(model)
    if spacing == "auto":
        if cfg is None:
            raise ValueError("spacing: 'auto' needs a MODEL from 'DynamiCrafter to MODEL'; choose uniform_trailing "
                             "or uniform for another model")
        spacing = cfg.spacing
    if spacing not in ("uniform_trailing", "uniform"):
        raise ValueError(f"spacing: {spacing!r} is not one of auto, uniform_trailing, uniform")
    ms = model.get_model_object("model_sampling")
    n = cfg.num_timesteps if cfg is not None else int(ms.sigmas.shape[0])
    if steps > n:
        raise ValueError(f"steps: {steps} is more than the model's {n} noise levels")
    return official_sigmas(ms, steps, spacing, n)
