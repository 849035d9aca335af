"""Motion-I2V stage 2 on ComfyUI's own SD1.5 MODEL.

The render model is a clone of the MODEL a checkpoint loader gives (LoRAs and other patches
upstream apply) with Motion-I2V's motion modules - AnimateDiff v2's layout, with
motion-augmented temporal attention - put into its UNet while ComfyUI has it loaded, and taken
out when ComfyUI unloads it or loads another clone of the same model (AnimateDiff-Evolved's
lifecycle). The modules are their own model under ComfyUI's model management, loaded with the
UNet. ComfyUI's sampler drives it; what Motion-I2V needs on top travels with the clone:

- the motion field, in ``transformer_options``, read by each motion module (a
  ``forward_timestep_embed_patch``);
- frame 0 enters the UNet as the clean image latent at timestep 1 (a UNet function wrapper),
  and the sampler keeps frame 0 equal to the image latent (its denoise mask);
- Motion-I2V's noise schedule (diffusers' "linear" betas, ComfyUI's "sqrt_linear") instead of
  SD1.5's, and the official DDIM timesteps (:mod:`..ddim`).

The video latent is a batch of F frame latents, as ComfyUI's video models use.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from ... import runtime
from ...kernels.field import MotionField
from ...kernels.motion_attention import MAX_FRAMES, FlowSplats
from ...kernels.regional import default_feather, paste_alpha
from ..ddim import ddim_sigmas
from .loading import load_config, motion_block_state_dict
from .modules import MOTION_AUGMENTED, MotionModule

OPTIONS_KEY = "kinema_motion_i2v"
INJECTION_KEY = "kinema_motion_i2v"
MOTION_HEADS = 8  # AnimateDiff's motion modules use 8 heads; shapes do not tell

_KEY = re.compile(r"^(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?motion_modules\.(\d+)\.")


class _Slot(nn.Module):
    """One UNet block's motion modules (``motion_modules.<j>``)."""

    def __init__(self, modules: dict):
        super().__init__()
        n = max(modules) + 1 if modules else 0
        self.motion_modules = nn.ModuleList([modules.get(j, nn.Identity()) for j in range(n)])


class MotionModuleSet(nn.Module):
    """Motion modules keyed as in AnimateDiff / Motion-I2V files: ``down_blocks.<i>.``,
    ``mid_block.`` and ``up_blocks.<i>.motion_modules.<j>.*``. ``places`` maps (kind, i, j)
    -> channels."""

    def __init__(self, places: dict, heads: int = MOTION_HEADS, pe_len: int = 32, n_blocks: int = 1):
        super().__init__()
        self.places = dict(places)
        made = {key: MotionModule(ch, heads, pe_len, n_blocks, MOTION_AUGMENTED) for key, ch in places.items()}
        for kind in ("down", "up"):
            levels = sorted({i for k, i, _ in places if k == kind})
            slots = [_Slot({j: m for (k, i, j), m in made.items() if k == kind and i == lvl})
                     for lvl in range(max(levels) + 1 if levels else 0)]
            setattr(self, f"{kind}_blocks", nn.ModuleList(slots))
        self.mid_block = _Slot({j: m for (k, _i, j), m in made.items() if k == "mid"})
        self.by_place = made

    def modules_at(self):
        return list(self.by_place.items())


def unet_places(unet) -> dict:
    """(kind, level, j) -> channels of every block of a ComfyUI ``UNetModel`` that AnimateDiff
    puts a motion module after: each down level's res blocks, the middle, each up level's
    (res blocks + 1), up levels counted from the deepest."""
    mc = int(unet.model_channels)
    mult = list(unet.channel_mult)
    nrb = list(unet.num_res_blocks)
    places = {}
    for lvl, m in enumerate(mult):
        for j in range(nrb[lvl]):
            places[("down", lvl, j)] = mc * m
    places[("mid", 0, 0)] = mc * mult[-1]
    for up, lvl in enumerate(reversed(range(len(mult)))):
        for j in range(nrb[lvl] + 1):
            places[("up", up, j)] = mc * mult[lvl]
    return places


def _file_places(sd: dict, name: str) -> dict:
    """(kind, level, j) -> channels of the motion modules a motion file holds."""
    out = {}
    for k, v in sd.items():
        m = _KEY.match(k)
        if not m:
            raise runtime.KinemaError(f"{name}: '{k}' is not a motion-module key (expected "
                                      f"'down_blocks.<i>.motion_modules.<j>.*' and the like)")
        if k.endswith("temporal_transformer.proj_in.weight"):
            kind = {"down_blocks": "down", "up_blocks": "up", "mid_block": "mid"}[m.group(1)]
            out[(kind, int(m.group(2) or 0), int(m.group(3)))] = int(v.shape[0])
    return out


def build_motion_modules(unet, motion_files: list, dtype=torch.float32) -> MotionModuleSet:
    """The motion modules for ``unet`` (a ComfyUI UNetModel) from motion files applied in order
    (``[(name, state_dict)]``, e.g. AnimateDiff v2 then Motion-I2V's motion block; later ones
    override). Every module the UNet takes must be covered, with its channel count."""
    from ..checkpoint import load_strict
    if not motion_files:
        raise runtime.KinemaError("motion files: none given; pick Motion-I2V's motion_block.bin")
    merged, names = {}, []
    for name, sd in motion_files:
        merged.update(motion_block_state_dict(sd, name))
        names.append(name)
    label = " + ".join(names)
    want = unet_places(unet)
    have = _file_places(merged, label)
    for place, ch in sorted(have.items()):
        if place not in want:
            raise runtime.KinemaError(f"{label}: has a motion module at {place[0]} block {place[1]}.{place[2]}, "
                                      f"which this model's UNet does not have; use an SD1.5 model")
        if want[place] != ch:
            raise runtime.KinemaError(f"{label}: the motion module at {place[0]} block {place[1]}.{place[2]} has "
                                      f"{ch} channels, the UNet there {want[place]}; this motion file is for "
                                      f"another model family (SD1.5 motion modules need an SD1.5 model)")
    missing = sorted(set(want) - set(have))
    if missing:
        raise runtime.KinemaError(f"{label}: no motion modules for {len(missing)} UNet blocks (e.g. {missing[0]}); "
                                  f"Motion-I2V's motion_block.bin (or AnimateDiff v2 + it) covers every block")
    pe = next(v for k, v in merged.items() if k.endswith("pos_encoder.pe"))
    n_blocks = 1 + max(int(m.group(1)) for k in merged
                       for m in [re.search(r"temporal_transformer\.transformer_blocks\.(\d+)\.", k)] if m)
    with torch.device("meta"):
        mods = MotionModuleSet(want, MOTION_HEADS, int(pe.shape[1]), n_blocks)
    load_strict(mods, {k: v.to(dtype) for k, v in merged.items()}, label)
    return mods.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- into the UNet

def _target(unet, place) -> tuple:
    """(the UNet's TimestepEmbedSequential, index to insert at) for a motion module place."""
    kind, lvl, j = place
    nrb = list(unet.num_res_blocks)
    if kind == "down":
        seq = unet.input_blocks[1 + sum(n + 1 for n in nrb[:lvl]) + j]
        return seq, len(seq)
    if kind == "mid":
        seq = unet.middle_block
        attn = [i for i, layer in enumerate(seq) if hasattr(layer, "transformer_blocks")]
        return seq, (attn[-1] + 1) if attn else 1
    levels = list(reversed(range(len(nrb))))
    seq = unet.output_blocks[sum(nrb[lv] + 1 for lv in levels[:lvl]) + j]
    last = list(seq)[-1]
    return seq, len(seq) - 1 if type(last).__name__ == "Upsample" else len(seq)


def _set_layers(seq: nn.Sequential, layers: list) -> None:
    seq._modules.clear()
    for i, layer in enumerate(layers):
        seq._modules[str(i)] = layer


def inject(unet, modules: MotionModuleSet) -> None:
    """Put the motion modules into a ComfyUI UNet (idempotent)."""
    for place, module in modules.modules_at():
        seq, at = _target(unet, place)
        layers = list(seq)
        if any(layer is module for layer in layers):
            continue
        _set_layers(seq, layers[:at] + [module] + layers[at:])


def eject(unet) -> None:
    """Take every motion module out of a ComfyUI UNet."""
    for seq in list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks):
        layers = list(seq)
        kept = [layer for layer in layers if not isinstance(layer, MotionModule)]
        if len(kept) != len(layers):
            _set_layers(seq, kept)


def _run_motion_module(layer, x, emb, context, transformer_options, *_rest):
    """``forward_timestep_embed_patch`` handler: a motion module with the run's frames and flow."""
    info = transformer_options.get(OPTIONS_KEY)
    if info is None:
        raise runtime.KinemaError("Motion-I2V motion modules ran without a motion field: sample this model "
                                  "through 'Motion-I2V render video' (or 'Motion-I2V apply motion')")
    p = next(layer.parameters())
    out = layer(x.to(p.dtype), info["frames"], info["flow"], info.get("splats"))
    return out.to(x.dtype)


def render_model(model, motion: runtime.ManagedModel):
    """A clone of an SD1.5 MODEL that carries Motion-I2V's motion modules (``motion`` holds a
    :class:`MotionModuleSet`) and Motion-I2V's noise schedule."""
    unet = model.get_model_object("diffusion_model")
    if not hasattr(unet, "input_blocks") or not hasattr(unet, "num_res_blocks"):
        raise ValueError("model: Motion-I2V renders with an SD1.5 UNet; this MODEL has another architecture")
    clone = model.clone()
    modules = motion.module
    runtime.add_injection(clone, INJECTION_KEY,
                          lambda patcher: inject(patcher.model.diffusion_model, modules),
                          lambda patcher: eject(patcher.model.diffusion_model))
    clone.set_additional_models(INJECTION_KEY, [motion.patcher])
    clone.set_model_forward_timestep_embed_patch((MotionModule, _run_motion_module))
    sched = load_config("scheduler")
    beta = {"linear": "sqrt_linear", "scaled_linear": "linear"}[sched["beta_schedule"]]
    clone.add_object_patch("model_sampling", runtime.discrete_model_sampling(
        "eps", beta, sched["beta_start"], sched["beta_end"]))
    return clone


def _clean_first_frame(frames: int, z_img: torch.Tensor, sigma_clean: float):
    """UNet function wrapper: frame 0 of every clip goes in as the clean image latent at
    timestep 1 (Motion-I2V embeds frame 0 so); ComfyUI's input is x / sqrt(sigma^2 + 1)."""
    def wrapper(apply_model, args):
        x, sigma = args["input"], args["timestep"]
        rows = torch.arange(0, x.shape[0], frames, device=x.device)
        x = x.clone()
        sigma = sigma.clone()
        x[rows] = (z_img.to(x.device, x.dtype) * (sigma_clean ** 2 + 1) ** 0.5).expand(len(rows), -1, -1, -1)
        sigma[rows] = sigma_clean
        return apply_model(x, sigma, **args["c"])
    return wrapper


def _first_step_mask(frame0_mask: torch.Tensor):
    """``denoise_mask_function``: at the first step (the run's largest sigma) only frame 0 is
    held; the official loop blends the still regions after each step, i.e. from the second on."""
    def fn(sigma, denoise_mask, extra_options):
        sigmas = extra_options.get("sigmas")
        first = float(sigmas[0]) if sigmas is not None else float("inf")
        if float(sigma.max()) >= first * (1 - 1e-6):
            return frame0_mask.to(denoise_mask.device, denoise_mask.dtype).reshape(-1, 1, *denoise_mask.shape[2:]) \
                .expand_as(denoise_mask)
        return denoise_mask
    return fn


@torch.no_grad()
def prepare_render(model, vae, image: torch.Tensor, motion: MotionField, static: torch.Tensor | None = None):
    """What ComfyUI's samplers need to render a video: (a clone of ``model`` carrying the motion
    field, frame 0's clean image latent and the first-step mask, the LATENT: F frames of the image
    latent with a ``noise_mask`` that holds frame 0 and the still region). Sample it with any
    sampler; ``ddim_uniform`` (or :func:`ddim_sigmas`) gives the released timesteps.

    model: from :func:`render_model`; vae: the SD1.5 VAE; image (H, W, 3) in [0, 1]; motion:
    flow (F, H, W, 2) pixels at the render size; static (H, W), 1 = keep still.
    """
    from .pipeline import _check_image
    flow = motion.flow
    frames, height, width, _ = flow.shape
    if not 2 <= frames <= MAX_FRAMES:
        raise ValueError(f"motion field: {frames} frames; Motion-I2V renders 2 to {MAX_FRAMES}")
    if width % 8 or height % 8:
        raise ValueError(f"motion field: size {width}x{height} must be a multiple of 8")
    if static is not None and tuple(static.shape) != (height, width):
        raise ValueError(f"brush: mask {tuple(static.shape)[::-1]} does not match the motion field {width}x{height}")
    if INJECTION_KEY not in getattr(model, "injections", {}):
        raise ValueError("model: connect the MODEL of 'Motion-I2V stage-2 loader' (it carries the motion modules)")
    img = _check_image(image, width, height)                                   # (1, 3, H, W) in [0, 1]
    z = vae.encode(img.permute(0, 2, 3, 1)).float().cpu()                      # (1, 4, h, w), VAE space
    h, w = z.shape[-2:]
    ms = model.get_model_object("model_sampling")
    mask = torch.ones(frames, 1, h, w)
    mask[0] = 0.0
    frame0_mask = mask.clone()
    if static is not None:
        s = static.float()[::8, ::8][:h, :w]
        mask[1:] = mask[1:] * (1.0 - s)
    clone = model.clone()
    to = clone.model_options.setdefault("transformer_options", {})
    # the flow's splat per token grid: built by the first motion module that needs it, reused by
    # every module and step of a sampling, emptied when the sampling ends
    splats = FlowSplats()
    to[OPTIONS_KEY] = {"frames": frames, "flow": flow[None].float(), "splats": splats}
    runtime.on_sampling_end(clone, splats.clear)
    z_model = model.get_model_object("latent_format").process_in(z)
    clone.set_model_unet_function_wrapper(_clean_first_frame(frames, z_model, float(ms.sigmas[1])))
    clone.set_model_denoise_mask_function(_first_step_mask(frame0_mask))
    return clone, {"samples": z.expand(frames, -1, -1, -1).contiguous(), "noise_mask": mask}


def paste_inputs(image: torch.Tensor, motion: MotionField, static: torch.Tensor | None = None):
    """(picture (1, H, W, 3) in [0, 1] at the motion field's size, keep (1, H, W)) to paste the
    picture back over the decoded frames: ``keep`` is exactly 1 in the still region and falls to 0
    over a feather (1/64 of the short side) into the moving region; all 0 when nothing is held
    still. Core ImageCompositeMasked (destination: frames, source: picture, mask: keep) then gives
    the picture bit for bit where the video must not move, as the render node does."""
    from .pipeline import _check_image
    _, height, width, _ = motion.flow.shape
    picture = _check_image(image, width, height).permute(0, 2, 3, 1).cpu()
    if static is None:
        return picture, torch.zeros(1, height, width)
    alpha = paste_alpha(1.0 - static.float().cpu(), default_feather(height, width))
    return picture, (1.0 - alpha)[None]


@torch.no_grad()
def render_video_comfy(model, vae, positive, negative, image: torch.Tensor, motion: MotionField,
                       static: torch.Tensor | None = None, *, steps: int = 25, guidance: float = 7.0,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2 with ComfyUI's sampler on the released DDIM timesteps: (frames (F, H, W, 3) in
    [0, 1], latents (F, 4, h, w) in the VAE's space). See :func:`prepare_render`."""
    clone, latent = prepare_render(model, vae, image, motion, static)
    frames = latent["samples"].shape[0]
    h, w = latent["samples"].shape[-2:]
    sigmas = ddim_sigmas(clone.get_model_object("model_sampling").sigmas, steps, load_config("scheduler"))
    noise = torch.randn((1, 4, frames, h, w), generator=torch.Generator().manual_seed(int(seed)))[0].transpose(0, 1)
    out = runtime.sample(clone, noise.contiguous(), positive, negative, sigmas, guidance, latent=latent["samples"],
                         denoise_mask=latent["noise_mask"], seed=seed)
    video = vae.decode(out)
    return video.reshape(-1, *video.shape[-3:]).float().cpu().clamp(0, 1), out.float().cpu()
