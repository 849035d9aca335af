"""Assemble stage-1 / stage-2 models from files, or with random weights (tests, benchmarks).

``arch`` picks the config set: ``"sd15"`` (the released sizes) or ``"tiny"`` (small random
networks of the same structure, for tests and headless smoke runs).
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from ...runtime import KinemaError
from . import loading
from .pipeline import DTYPES, FlowModel, RenderModel
from .text import TextEncoder

ARCHS = ("sd15", "tiny")


def _names(arch: str) -> dict:
    if arch not in ARCHS:
        raise ValueError(f"architecture: must be one of {ARCHS}, got {arch!r}")
    p = "tiny_" if arch == "tiny" else ""
    return {"flow_unet": p + "stage1_flow_unet", "render_unet": p + "stage2_unet", "flow_vae": p + "flow_vae",
            "image_vae": p + "image_vae", "text": p + "text_encoder"}


def _dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype: must be one of {tuple(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _sd_parts(checkpoint, arch: str):
    """(unet 2D keys, image VAE, text encoder or None) from an SD1.5 single-file checkpoint."""
    names = _names(arch)
    path = Path(checkpoint)
    sd = loading.read_state_dict(path)
    unet_cfg = loading.load_config(names["render_unet"])
    vae_cfg = loading.load_config(names["image_vae"])
    unet_sd, vae_sd, text_sd = loading.split_sd_checkpoint(sd, unet_cfg, vae_cfg, path.name)
    if not vae_sd:
        raise KinemaError(f"{path.name}: holds no VAE weights ('first_stage_model.*'); use a full SD1.5 checkpoint")
    vae = loading.load_into(loading.build_vae(vae_cfg), vae_sd, f"{path.name} (VAE)")
    text = TextEncoder(loading.load_config(names["text"]), text_sd, path.name) if text_sd else None
    return unet_sd, vae.eval().requires_grad_(False), text


def load_flow_model(flow_unet, controlnet, flow_vae, checkpoint, dtype="fp32", arch="sd15") -> FlowModel:
    """Stage 1 from the released files (+ the SD1.5 checkpoint for the image VAE and CLIP)."""
    names = _names(arch)
    unet = loading.load_flow_unet(flow_unet, controlnet, names["flow_unet"])
    fvae = loading.load_flow_vae(flow_vae, names["flow_vae"])
    _, ivae, text = _sd_parts(checkpoint, arch)
    return FlowModel(unet, fvae, ivae, text, _dtype(dtype))


def load_render_model(checkpoint, motion_files: list, dtype="fp32", arch="sd15") -> RenderModel:
    """Stage 2: SD1.5 checkpoint + motion files in order (e.g. AnimateDiff v2, then motion_block.bin)."""
    names = _names(arch)
    unet_sd, vae, text = _sd_parts(checkpoint, arch)
    motion = [(Path(p).name, loading.read_state_dict(p)) for p in motion_files]
    unet = loading.load_render_unet(unet_sd, motion, names["render_unet"], Path(checkpoint).name)
    return RenderModel(unet, vae, text, _dtype(dtype))


def random_text_encoder(arch: str, seed: int = 0) -> TextEncoder:
    cfg = loading.load_config(_names(arch)["text"])
    torch.manual_seed(seed)
    sd = CLIPTextModel(CLIPTextConfig(**cfg)).state_dict()
    return TextEncoder(cfg, sd, "random")


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw every parameter (including zero-initialised outputs) so all paths carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module.eval().requires_grad_(False)


def random_flow_model(arch: str = "tiny", seed: int = 0, dtype="fp32", text: bool = True) -> FlowModel:
    n = _names(arch)
    unet = _randomise(loading.build_flow_unet(n["flow_unet"], "cpu"), seed)
    fvae = _randomise(loading.build_vae(n["flow_vae"], "cpu"), seed + 1)
    ivae = _randomise(loading.build_vae(n["image_vae"], "cpu"), seed + 2)
    return FlowModel(unet, fvae, ivae, random_text_encoder(arch, seed) if text else None, _dtype(dtype))


def random_render_model(arch: str = "tiny", seed: int = 0, dtype="fp32", text: bool = True) -> RenderModel:
    n = _names(arch)
    unet = _randomise(loading.build_render_unet(n["render_unet"], "cpu"), seed)
    vae = _randomise(loading.build_vae(n["image_vae"], "cpu"), seed + 2)
    return RenderModel(unet, vae, random_text_encoder(arch, seed) if text else None, _dtype(dtype))


__all__ = ["ARCHS", "load_flow_model", "load_render_model", "random_flow_model", "random_render_model",
           "random_text_encoder"]
