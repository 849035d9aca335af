"""Assemble Motion-I2V models from files, sized by the files themselves.

- :func:`load_flow_model`: stage 1 from the released flow UNet, ControlNet and flow VAE.
- :func:`load_reference_render_model`: stage 2 as the released code builds it (an SD1.5
  single-file checkpoint converted to diffusers plus the motion files): the reference the
  ComfyUI route (``native``) is checked against, and the standalone path.
"""
from __future__ import annotations

from pathlib import Path


from ...runtime import KinemaError, dtype_named
from .. import sd_checkpoint
from ..checkpoint import load_strict
from . import loading
from .pipeline import FlowModel, RenderModel
from .text import TextEncoder


def load_flow_model(flow_unet, controlnet, flow_vae, dtype="fp32") -> FlowModel:
    """Stage 1 from the released files (the SD1.5 image VAE and text encoder come from ComfyUI's
    loaders, see ``predict_motion``'s ``image_latent`` and ``cond``)."""
    unet = loading.load_flow_unet(flow_unet, controlnet)
    fvae = loading.load_flow_vae(flow_vae)
    return FlowModel(unet, fvae, dtype=dtype_named(dtype, what="dtype"))


def load_reference_render_model(checkpoint, motion_files: list, dtype="fp32") -> RenderModel:
    """Stage 2 the way the released code builds it: an SD1.5 single-file checkpoint (its UNet,
    VAE and text encoder through diffusers' converters) plus motion files in order (e.g.
    AnimateDiff v2, then Motion-I2V's motion block; later ones override)."""
    path = Path(checkpoint)
    sd = loading.read_state_dict(path)
    if not sd_checkpoint.is_ldm(sd):
        raise KinemaError(f"{path.name}: not an SD1.5 single-file checkpoint (no 'model.diffusion_model.*' keys)")
    unet_sd, vae_sd, text_sd = sd_checkpoint.split(sd, loading.load_config("image_vae"), path.name)
    if not vae_sd:
        raise KinemaError(f"{path.name}: holds no VAE weights ('first_stage_model.*'); use a full SD1.5 checkpoint")
    motion = [(Path(p).name, loading.read_state_dict(p)) for p in motion_files]
    merged = dict(unet_sd)
    for name, msd in motion:
        merged.update(loading.motion_block_state_dict(msd, name))
    unet_cfg = loading.unet_config(merged, "stage2_unet", path.name)
    unet = loading.load_render_unet(unet_sd, motion, unet_cfg, path.name)
    vae = load_strict(loading.build_vae(loading.vae_config(vae_sd, "image_vae", path.name)), vae_sd,
                            f"{path.name} (VAE)")
    text = TextEncoder(loading.load_config("text_encoder"), text_sd, path.name) if text_sd else None
    return RenderModel(unet, vae.eval().requires_grad_(False), text, dtype_named(dtype, what="dtype"))


__all__ = ["load_flow_model", "load_reference_render_model"]
