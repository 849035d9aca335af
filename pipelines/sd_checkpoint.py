"""Splitting a Stable Diffusion 1.x single-file checkpoint (the original LDM layout) into its
UNet, VAE and CLIP text encoder in diffusers names, with diffusers' own converters.

The one home of this job for every system that starts from an SD1.5 file outside ComfyUI
(Motion-I2V's reference stage 2, Follow-Your-Click's initialisation and trainer, StoryDiffusion's
standalone loader). Inside ComfyUI the nodes take ComfyUI's MODEL / CLIP / VAE instead.
"""
from __future__ import annotations

import re

import torch

from ..runtime import KinemaError

LDM_UNET = "model.diffusion_model."
LDM_VAE = "first_stage_model."
LDM_TEXT = "cond_stage_model.transformer."
MOTION = ".motion_modules."


def ldm_layers_per_block(sd: dict) -> int:
    """Res blocks per level of an LDM UNet: its input blocks are ``conv_in``, then per level
    ``layers`` res blocks and (except on the last level) a downsampler (``.op``)."""
    blocks = {int(m.group(1)) for k in sd for m in [re.match(r"model\.diffusion_model\.input_blocks\.(\d+)\.", k)] if m}
    downs = {int(m.group(1)) for k in sd
             for m in [re.match(r"model\.diffusion_model\.input_blocks\.(\d+)\.0\.op\.", k)] if m}
    return (len(blocks) - 1 - len(downs)) // (len(downs) + 1)


def _all_used(sd: dict, prefix: str, converted: dict, what: str, name: str) -> dict:
    """diffusers' converters map keys one to one and drop what they do not know: fewer keys out
    than in means the file holds weights that would be silently ignored."""
    source = sum(1 for k in sd if k.startswith(prefix))
    if source != len(converted):
        raise KinemaError(f"{name} ({what}): does not match the expected layout: {source} '{prefix}*' keys, of which "
                          f"only {len(converted)} map to the diffusers {what}: the file holds {what} layers this model does not "
                          f"have. Use a Stable Diffusion checkpoint of the original single-file layout")
    return converted


def is_ldm(sd: dict) -> bool:
    return any(k.startswith(LDM_UNET) for k in sd)


def unet_state_dict(sd: dict, name: str = "checkpoint", config: dict | None = None) -> dict:
    """The 2-D UNet in diffusers names: converted from an LDM single file (``config``: the
    diffusers UNet config; by default SD1.5's with the block count read from the file), or
    taken as it is from a diffusers-layout UNet file (``conv_in.weight`` ...)."""
    if is_ldm(sd):
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
        cfg = dict(config) if config is not None else {
            "layers_per_block": ldm_layers_per_block(sd), "class_embed_type": None, "num_class_embeds": None,
            "addition_embed_type": None}
        return _all_used(sd, LDM_UNET, convert_ldm_unet_checkpoint(sd, cfg), "UNet", name)
    if "conv_in.weight" in sd:
        return {k: v for k, v in sd.items() if MOTION not in k}
    raise KinemaError(f"{name}: not an SD1.5 checkpoint (no '{LDM_UNET}*' and no 'conv_in.weight' keys); expected "
                      f"e.g. v1-5-pruned-emaonly.safetensors")


def vae_state_dict(sd: dict, config: dict, name: str = "checkpoint") -> dict:
    """The ``first_stage_model.*`` VAE in diffusers ``AutoencoderKL`` names ({} if the file has
    none), with diffusers' converter; every ``first_stage_model.*`` tensor must be used."""
    if not any(k.startswith(LDM_VAE) for k in sd):
        return {}
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    out = convert_ldm_vae_checkpoint(sd, config)
    # The released files keep the mid-block attention projections as 1x1 convolutions; current
    # diffusers' converter turns them into linears itself, and this line does the same for the
    # older releases the requirements still allow (a no-op otherwise).
    out = {k: (v[:, :, 0, 0] if v.ndim == 4 and ".attentions." in k and "to_" in k else v) for k, v in out.items()}
    return _all_used(sd, LDM_VAE, out, "VAE", name)


def text_state_dict(sd: dict, module: torch.nn.Module | None = None) -> dict:
    """The CLIP-L text encoder (``cond_stage_model.transformer.*``, SDXL's
    ``conditioner.embedders.0.transformer.*``) in transformers' names ({} if the file has none), without the ``position_ids`` index buffer that only some files carry. With
    ``module``, keys follow its layout (some transformers versions build ``CLIPTextModel``
    without the ``text_model.`` wrapper)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    return clip_text_layout(convert_ldm_clip_checkpoint(sd), module)


def clip_text_layout(sd: dict, module: torch.nn.Module | None = None) -> dict:
    """A CLIP text state dict (``text_model.*`` names) without ``position_ids``, in ``module``'s
    layout (with or without the ``text_model.`` prefix)."""
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    if module is None or any(k.startswith("text_model.") for k in module.state_dict()):
        return sd
    return {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in sd.items()}


def split(sd: dict, vae_config: dict, name: str = "checkpoint") -> tuple[dict, dict, dict]:
    """An SD1.5 single-file checkpoint -> (UNet, VAE, text encoder) state dicts in diffusers /
    transformers names; the VAE and text encoder are {} for a diffusers-layout UNet file."""
    return unet_state_dict(sd, name), vae_state_dict(sd, vae_config, name), text_state_dict(sd)
