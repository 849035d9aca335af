"""Small random SD1.5 single-file checkpoints and AnimateDiff motion modules in the released
layouts, for tests, benchmarks and headless smoke runs (no weights are downloaded).

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

from ..motion_i2v.modules import MotionModule
from .sd15 import LDM_TEXT, LDM_VAE, _sd15_config
from .unet import SD_HEADS

LDM_UNET = "model.diffusion_model."
TINY_UNET = {"block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32}
TINY_VAE = {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 1,
             "projection_dim": 32}


def _randomise(module: torch.nn.Module, generator: torch.Generator, zero_too: bool = True) -> torch.nn.Module:
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


# ------------------------------------------------------------------ diffusers -> original names

def _resnet_to_ldm(prefix: str, sd: dict) -> dict:
    names = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
             "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    out = {}
    for k, v in sd.items():
        head, _, tail = k.partition(".")
        out[f"{prefix}.{names[head]}.{tail}"] = v
    return out


def _sub(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}


def unet_to_ldm(sd: dict, layers: int, levels: int) -> dict:
    """diffusers ``UNet2DConditionModel`` keys -> ``model.diffusion_model.*`` keys (SD1.5 layout)."""
    out = {"time_embed.0.weight": sd["time_embedding.linear_1.weight"], "time_embed.0.bias": sd["time_embedding.linear_1.bias"],
           "time_embed.2.weight": sd["time_embedding.linear_2.weight"], "time_embed.2.bias": sd["time_embedding.linear_2.bias"],
           "input_blocks.0.0.weight": sd["conv_in.weight"], "input_blocks.0.0.bias": sd["conv_in.bias"],
           "out.0.weight": sd["conv_norm_out.weight"], "out.0.bias": sd["conv_norm_out.bias"],
           "out.2.weight": sd["conv_out.weight"], "out.2.bias": sd["conv_out.bias"]}
    for i in range(levels):
        for j in range(layers):
            n = i * (layers + 1) + j + 1
            out.update(_resnet_to_ldm(f"input_blocks.{n}.0", _sub(sd, f"down_blocks.{i}.resnets.{j}")))
            out.update({f"input_blocks.{n}.1.{k}": v for k, v in _sub(sd, f"down_blocks.{i}.attentions.{j}").items()})
        down = _sub(sd, f"down_blocks.{i}.downsamplers.0.conv")
        out.update({f"input_blocks.{(i + 1) * (layers + 1)}.0.op.{k}": v for k, v in down.items()})
    out.update(_resnet_to_ldm("middle_block.0", _sub(sd, "mid_block.resnets.0")))
    out.update({f"middle_block.1.{k}": v for k, v in _sub(sd, "mid_block.attentions.0").items()})
    out.update(_resnet_to_ldm("middle_block.2", _sub(sd, "mid_block.resnets.1")))
    for i in range(levels):
        attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in sd)
        for j in range(layers + 1):
            n = i * (layers + 1) + j
            out.update(_resnet_to_ldm(f"output_blocks.{n}.0", _sub(sd, f"up_blocks.{i}.resnets.{j}")))
            out.update({f"output_blocks.{n}.1.{k}": v for k, v in _sub(sd, f"up_blocks.{i}.attentions.{j}").items()})
        up = _sub(sd, f"up_blocks.{i}.upsamplers.0.conv")
        out.update({f"output_blocks.{i * (layers + 1) + layers}.{2 if attn else 1}.conv.{k}": v for k, v in up.items()})
    return {LDM_UNET + k: v for k, v in out.items()}


def vae_to_ldm(sd: dict, levels: int, layers: int) -> dict:
    """diffusers ``AutoencoderKL`` keys -> ``first_stage_model.*`` keys (SD layout)."""
    def resnet(dst, src):
        for k, v in _sub(sd, src).items():
            out[f"{dst}.{k.replace('conv_shortcut', 'nin_shortcut')}"] = v

    def attention(dst, src):
        names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
        for a, b in names.items():
            for p in ("weight", "bias"):
                v = sd[f"{src}.{a}.{p}"]
                out[f"{dst}.{b}.{p}"] = v[:, :, None, None] if (p == "weight" and v.ndim == 2) else v

    out = {k: sd[k] for k in ("quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias")}
    for part in ("encoder", "decoder"):
        for k in ("conv_in", "conv_out"):
            for p in ("weight", "bias"):
                out[f"{part}.{k}.{p}"] = sd[f"{part}.{k}.{p}"]
        for p in ("weight", "bias"):
            out[f"{part}.norm_out.{p}"] = sd[f"{part}.conv_norm_out.{p}"]
        resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")
        attention(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0")
    for i in range(levels):
        for j in range(layers):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        for p in ("weight", "bias"):
            k = f"encoder.down_blocks.{i}.downsamplers.0.conv.{p}"
            if k in sd:
                out[f"encoder.down.{i}.downsample.conv.{p}"] = sd[k]
        r = levels - 1 - i
        for j in range(layers + 1):
            resnet(f"decoder.up.{r}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}")
        for p in ("weight", "bias"):
            k = f"decoder.up_blocks.{i}.upsamplers.0.conv.{p}"
            if k in sd:
                out[f"decoder.up.{r}.upsample.conv.{p}"] = sd[k]
    return {LDM_VAE + k: v for k, v in out.items()}


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
    torch.manual_seed(seed)
    sd = unet_to_ldm(_randomise(UNet2DConditionModel(**ucfg), g).state_dict(), ucfg["layers_per_block"],
                     len(ucfg["block_out_channels"]))
    vcfg = _sd15_config("vae")
    n = len(TINY_VAE["block_out_channels"])
    vcfg.update(TINY_VAE, down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)
    vmodel = _randomise(AutoencoderKL(**vcfg), g)
    sd.update(vae_to_ldm(vmodel.state_dict(), len(vcfg["block_out_channels"]), vcfg["layers_per_block"]))
    tcfg = _sd15_config("text_encoder")
    tcfg.pop("architectures", None)
    tcfg.pop("model_type", None)
    tcfg.update(TINY_TEXT, hidden_size=ucfg["cross_attention_dim"], projection_dim=ucfg["cross_attention_dim"])
    tmodel = _randomise(CLIPTextModel(CLIPTextConfig(**tcfg)), g)
    sd.update({LDM_TEXT + (k if k.startswith("text_model.") else "text_model." + k): v   # the files' names
               for k, v in tmodel.state_dict().items() if not k.endswith("position_ids")})
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
        mm = _randomise(MotionModule(ch, SD_HEADS, pe), g, zero_too=True)
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

