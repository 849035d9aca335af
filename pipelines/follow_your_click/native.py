"""Follow-Your-Click as a ComfyUI MODEL, for ComfyUI's own samplers (KSampler,
SamplerCustomAdvanced) and whatever patches them.

- The schedule is the training one as ComfyUI's discrete schedule object: diffusers' "linear"
  betas (ComfyUI's "sqrt_linear") 0.00085-0.012 rescaled to zero terminal SNR, v-prediction.
  ComfyUI's ``ddim_uniform`` scheduler picks the timesteps 1, 1 + 1000 // steps, ... - for steps
  that divide 1000 exactly those of the released "leading, offset 1" DDIM - and its ``ddim`` /
  ``euler`` sampler is deterministic DDIM.
- The video latent is ComfyUI's batch of frame latents, ``frames`` rows per video (one video per
  CFG half). The conditioning (:func:`comfy_conditioning`) carries the 5 channels the UNet input
  adds to each frame's latent (the region mask ``M`` and, on frame 0, the picture's latent ``C``)
  as ``c_concat``, and the frame count, fps and motion strength; both halves of the guidance get
  the same ``M`` and ``C``, as in the released sampler.
- Regional animation is ComfyUI's own: the latent carries the picture's latent on every frame
  and a noise mask (1 inside the region), so the sampler keeps the latent outside the region the
  picture's; core 'ImageCompositeMasked' with the conditioning's ``keep`` mask pastes the picture
  back over the decoded frames, exactly outside the region.

What the released sampler's noise options do (every frame from frame 0's noise, the picture's
latent mixed into the start) is not part of this route: the starting noise is the sampler's.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ... import runtime
from ...kernels.regional import default_feather, fit_mask, latent_keep, paste_alpha
from .pipeline import VAE_FACTOR, FYCModel, prepare_image
from .unet import LATENT_SCALE, FYCUNet, load_config, mask_condition

MAX_FRAMES = 24
_SCHEDULES = {"linear": "sqrt_linear", "scaled_linear": "linear"}   # diffusers' names -> ComfyUI's


class ComfyFYCUNet(nn.Module):
    """The Follow-Your-Click UNet called as ComfyUI calls its UNets: ``x`` (rows, 9, h, w) is the
    scaled noisy latent of each frame with ``c_concat`` appended, rows in groups of
    ``fyc_frames``; per video the first row's timestep, context, fps and strength are used."""

    def __init__(self, unet: FYCUNet):
        super().__init__()
        self.unet = unet

    @property
    def dtype(self):
        return self.unet.dtype

    def forward(self, x, t, context=None, control=None, transformer_options=None, fyc_frames=None, fyc_fps=None,
                fyc_strength=None, **kwargs):
        if fyc_frames is None or x.shape[1] != self.unet.in_channels:
            raise ValueError("Follow-Your-Click: the conditioning carries no picture or region; make it with "
                             "'Follow-Your-Click conditioning'")
        f, rows = int(fyc_frames), x.shape[0]
        if rows % f:
            raise ValueError(f"latent batch: {rows} frames is not a whole number of {f}-frame videos; use the latent "
                             f"of 'Follow-Your-Click conditioning'")
        b = rows // f
        firsts = torch.arange(0, rows, f, device=x.device)
        sample = x.reshape(b, f, *x.shape[1:]).transpose(1, 2)                       # (b, 9, f, h, w)
        out = self.unet(sample, t[firsts], context[firsts], fyc_fps, fyc_strength)   # (b, 4, f, h, w)
        return out.transpose(1, 2).reshape(rows, *out.shape[1:2], *out.shape[3:])


def _fyc_conds(kwargs, c):
    out = {}
    if kwargs.get("fyc_concat") is not None:
        out["c_concat"] = c.noise_shape(kwargs["fyc_concat"])
    for key in ("fyc_frames", "fyc_fps", "fyc_strength"):
        if kwargs.get(key) is not None:
            out[key] = c.constant(int(kwargs[key]))
    return out


def model_sampling():
    """The training schedule as ComfyUI's ``model_sampling`` object (from
    ``configs/follow_your_click/scheduler.json``)."""
    cfg = load_config("scheduler")
    if cfg["beta_schedule"] not in _SCHEDULES:
        raise ValueError(f"scheduler.json: beta_schedule {cfg['beta_schedule']!r} has no ComfyUI counterpart")
    prediction = {"v_prediction": "v", "epsilon": "eps"}[cfg["prediction_type"]]
    return runtime.discrete_model_sampling(prediction, _SCHEDULES[cfg["beta_schedule"]], cfg["beta_start"],
                                           cfg["beta_end"], zero_snr=bool(cfg.get("rescale_betas_zero_snr")),
                                           timesteps=int(cfg["num_train_timesteps"]))


def comfy_model(model: FYCModel):
    """The Follow-Your-Click UNet as a ComfyUI MODEL (made once per loaded model)."""
    if not isinstance(model, FYCModel):
        raise ValueError("fyc_model: connect the output of 'Load Follow-Your-Click Model'")
    if model._comfy is None:
        model._comfy = runtime.comfy_model(ComfyFYCUNet(model.unet), model.name, model_sampling(),
                                           conds=_fyc_conds, latent_format="SD15")
    return model._comfy


def _with(conditioning, name: str, extra: dict):
    if not isinstance(conditioning, list) or not conditioning or not all(
            isinstance(c, (list, tuple)) and len(c) == 2 and torch.is_tensor(c[0]) for c in conditioning):
        raise ValueError(f"{name}: expected a CONDITIONING (from CLIP Text Encode)")
    return [[c[0], dict(c[1], **extra)] for c in conditioning]


@torch.no_grad()
def comfy_conditioning(vae, image: torch.Tensor, positive, negative, *, frames: int = 16, width: int = 512,
                       height: int = 512, fps: int = 2, strength: int = 4, mask: torch.Tensor | None = None,
                       keep_outside: bool = True):
    """(positive, negative, latent, picture (1, H, W, 3), keep (1, H, W)) for sampling
    :func:`comfy_model` with ComfyUI.

    ``image`` IMAGE, scaled to cover width x height and centre-cropped (``picture``); ``mask``
    MASK, 1 = the region that moves, or None. ``latent``: ``frames`` empty frame latents, or with
    a mask and ``keep_outside`` the picture's latent on every frame with a noise mask (the
    region's share of each latent cell). ``keep``: the compositing mask that puts the picture back
    over the decoded frames (1 outside the region, feathered 0 inside; all 0 without a mask or
    without ``keep_outside``).
    """
    for name, v, low, high in (("frames", frames, 2, MAX_FRAMES), ("width", width, 64, 8192),
                               ("height", height, 64, 8192), ("fps", fps, 0, 1000), ("motion_strength", strength, 0, 1000)):
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            raise ValueError(f"{name}: {v!r} must be a whole number from {low} to {high}")
    for name, v in (("width", width), ("height", height)):
        if v % VAE_FACTOR:
            raise ValueError(f"{name}: {v} must be a multiple of {VAE_FACTOR}")
    pixels = prepare_image(image, height, width)
    pix_mask = fit_mask(mask, height, width) if mask is not None else None
    z = vae.encode(pixels).float().cpu()
    h, w = height // VAE_FACTOR, width // VAE_FACTOR
    if z.ndim != 4 or tuple(z.shape[1:]) != (4, h, w):
        raise ValueError(f"vae: encoded a {width}x{height} picture to {tuple(z.shape)}; Follow-Your-Click needs the "
                         f"SD1.5 VAE (4 channels at 1/{VAE_FACTOR} size)")
    z = z[:1]
    concat = torch.zeros(frames, 5, h, w)
    if pix_mask is None:
        concat[0, 0] = 1.0                                 # no region: M is 1 on frame 0 only
    else:
        concat[:, 0] = mask_condition(pix_mask[:, 0], (h, w))[0, 0]
    concat[0, 1:] = z[0] * LATENT_SCALE
    extra = {"fyc_concat": concat, "fyc_frames": frames, "fyc_fps": fps, "fyc_strength": strength}
    pos, neg = _with(positive, "positive", extra), _with(negative, "negative", extra)
    keep_pix = torch.zeros(1, height, width)
    if pix_mask is not None and keep_outside:
        latent = {"samples": z.expand(frames, -1, -1, -1).contiguous(),
                  "noise_mask": 1.0 - latent_keep(pix_mask, (h, w))[:, :, 0]}
        keep_pix = (1.0 - paste_alpha(pix_mask, default_feather(height, width)))[None]
    else:
        latent = {"samples": torch.zeros(frames, 4, h, w)}
    return pos, neg, latent, pixels.cpu(), keep_pix
