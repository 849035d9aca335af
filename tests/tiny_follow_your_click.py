"""Small random SD1.5 single-file checkpoints and AnimateDiff motion modules in the released
layouts, for the Follow-Your-Click tests (no weights are downloaded).

:func:`sd15_checkpoint` writes the original (LDM) key layout of ``v1-5-pruned*.safetensors``:
diffusers models with random weights, renamed to the original names (the inverse of diffusers'
single-file converters), with a small VAE and text encoder (ComfyUI's own loader wants the
real-sized ones: ``tests/comfyui/tiny_models.py`` writes such files). :func:`motion_module`
writes the keys of ``mm_sd_v15.ckpt`` (v1) or ``mm_sd_v15_v2.ckpt`` (v2) for a UNet.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from kinema.pipelines.follow_your_click.sd15 import _sd15_config
from ldm_layout import text_to_ldm, unet_to_ldm, vae_to_ldm
from kinema.pipelines.follow_your_click.unet import SD_HEADS
from kinema.pipelines.motion_i2v.modules import MotionModule

TINY_UNET = {"block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32}
TINY_VAE = {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 1,
             "projection_dim": 32}


def randomise(module: torch.nn.Module, generator: torch.Generator, zero_too: bool = True) -> torch.nn.Module:
    """Draw every floating tensor again, so zero-initialised layers carry signal as trained ones do."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5)
            elif name.endswith("weight") and ("norm" in name or "ln" in name):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            elif zero_too or p.abs().sum() > 0:
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))
    return module


# --------------------------------------------------------------------------------- factories

def unet2d_config(channels=(32, 64), layers: int = 1, cross_attention_dim: int = 32) -> dict:
    cfg = _sd15_config("unet")
    n = len(channels)
    cfg.update({"block_out_channels": list(channels), "layers_per_block": layers, "attention_head_dim": SD_HEADS,
                "cross_attention_dim": cross_attention_dim,
                "down_block_types": ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
                "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)})
    return cfg


def sd15_checkpoint(seed: int = 0, unet: dict | None = None) -> dict[str, torch.Tensor]:
    """A random SD1.5 single-file state dict in the original layout with a small VAE and text
    encoder. ``unet``: overrides of :data:`TINY_UNET` (``block_out_channels``,
    ``layers_per_block``, ``cross_attention_dim``; the text encoder follows the last)."""
    g = torch.Generator().manual_seed(seed)
    u = dict(TINY_UNET, **(unet or {}))
    ucfg = unet2d_config(u["block_out_channels"], u["layers_per_block"], u["cross_attention_dim"])
    sd = unet_to_ldm(randomise(UNet2DConditionModel(**ucfg), g).state_dict(), ucfg)
    vcfg = _sd15_config("vae")
    n = len(TINY_VAE["block_out_channels"])
    vcfg.update(TINY_VAE, down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)
    vmodel = randomise(AutoencoderKL(**vcfg), g)
    sd.update(vae_to_ldm(vmodel.state_dict()))
    tcfg = _sd15_config("text_encoder")
    tcfg.pop("architectures", None)
    tcfg.pop("model_type", None)
    tcfg.update(TINY_TEXT, hidden_size=ucfg["cross_attention_dim"], projection_dim=ucfg["cross_attention_dim"])
    tmodel = randomise(CLIPTextModel(CLIPTextConfig(**tcfg)), g)
    sd.update(text_to_ldm(tmodel.state_dict()))
    return sd


def motion_module(channels=(32, 64), layers: int = 1, version: int = 1, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A random AnimateDiff motion-module state dict for a UNet with ``channels`` per level:
    v1 (``mm_sd_v15.ckpt``: position table 24, no mid block) or v2 (``mm_sd_v15_v2.ckpt``: 32,
    and a mid-block module). The last level has modules too, as in the released files."""
    if version not in (1, 2):
        raise ValueError(f"version: {version} is not 1 or 2")
    g = torch.Generator().manual_seed(seed)
    pe = 24 if version == 1 else 32
    sd = {}

    def add(prefix, ch):
        mm = randomise(MotionModule(ch, SD_HEADS, pe), g, zero_too=True)
        sd.update({f"{prefix}.{k}": v for k, v in mm.state_dict().items()})

    n = len(channels)
    for i, ch in enumerate(channels):
        for j in range(layers):
            add(f"down_blocks.{i}.motion_modules.{j}", ch)
    for i, ch in enumerate(reversed(channels)):
        for j in range(layers + 1):
            add(f"up_blocks.{i}.motion_modules.{j}", ch)
    if version == 2:
        add("mid_block.motion_modules.0", channels[n - 1])
    return {k: v.to(dtype) for k, v in sd.items()}


def save(sd: dict, path) -> Path:
    """Write a state dict as ``.safetensors`` or (other suffixes) a torch pickle."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, str(path))
    return path

