"""The SD1.5 VAE and text encoder outside ComfyUI (the trainer, the command line, tests).

Inside ComfyUI the nodes take ComfyUI's own ``VAE`` and ``CONDITIONING``; the trainer runs
without ComfyUI and reads them from the same SD1.5 single-file checkpoint with diffusers'
converters. Configs come from ``configs/sd15`` with the sizes read from the tensors, so smaller
test checkpoints of the same layout load too.

:class:`DiffusersVAE` offers ComfyUI's VAE interface (``encode`` / ``decode`` on (B, H, W, 3)
pixels in [0, 1], unscaled latents), so the sampler takes either.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel

from ... import runtime
from ...runtime import KinemaError
from .. import sd_checkpoint
from ..checkpoint import load_strict, read_state_dict
from ..text_encoding import clip_tokenizer

SD15_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "sd15"
LDM_VAE = sd_checkpoint.LDM_VAE
LDM_TEXT = sd_checkpoint.LDM_TEXT


def _sd15_config(name: str) -> dict:
    cfg = json.loads((SD15_CONFIGS / f"{name}.json").read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _levels(sd: dict, prefix: str) -> int:
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in sd):
        n += 1
    return n


def _read(path: Path, prefix: str, what: str) -> dict:
    sd = read_state_dict(path, prefixes=(prefix,)) if path.suffix.lower() == ".safetensors" else \
        {k: v for k, v in read_state_dict(path).items() if k.startswith(prefix)}
    if not sd:
        raise KinemaError(f"{path.name}: holds no {what} ('{prefix}*' keys); use a full SD1.5 single-file checkpoint")
    return sd


def vae_config(sd: dict) -> dict:
    """AutoencoderKL config of an LDM-layout SD VAE state dict (keys without the prefix)."""
    levels = _levels(sd, "encoder.down.")
    cfg = _sd15_config("vae")
    cfg.update({
        "block_out_channels": [int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels)],
        "layers_per_block": _levels(sd, "encoder.down.0.block."),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "latent_channels": int(sd["quant_conv.weight"].shape[0]) // 2,
    })
    return cfg


def text_config(sd: dict) -> dict:
    """CLIPTextConfig kwargs of a CLIP text state dict in the checkpoints' names (``text_model.*``).
    SD1.5's CLIP-L has 64-dim heads (768 / 12); smaller test encoders use the same rule (at least
    one head)."""
    tok = sd["text_model.embeddings.token_embedding.weight"]
    hidden = int(tok.shape[1])
    cfg = _sd15_config("text_encoder")
    cfg.pop("architectures", None)
    cfg.pop("model_type", None)
    cfg.update({
        "vocab_size": int(tok.shape[0]),
        "hidden_size": hidden,
        "projection_dim": hidden,
        "intermediate_size": int(sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "num_hidden_layers": _levels(sd, "text_model.encoder.layers."),
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": int(sd["text_model.embeddings.position_embedding.weight"].shape[0]),
    })
    return cfg


def load_vae(path) -> AutoencoderKL:
    """The VAE of an SD1.5 single-file checkpoint (original layout)."""
    path = Path(path)
    ldm = _read(path, LDM_VAE, "VAE")
    cfg = vae_config({k[len(LDM_VAE):]: v for k, v in ldm.items()})
    with torch.device("meta"):
        vae = AutoencoderKL(**cfg)
    return load_strict(vae, sd_checkpoint.vae_state_dict(ldm, cfg, path.name), f"{path.name} (VAE)").eval().requires_grad_(False)


def load_text_encoder(path) -> CLIPTextModel:
    """The CLIP text encoder of an SD1.5 single-file checkpoint (original layout)."""
    path = Path(path)
    sd = sd_checkpoint.text_state_dict(_read(path, LDM_TEXT, "text encoder"))
    if "text_model.embeddings.token_embedding.weight" not in sd:
        raise KinemaError(f"{path.name}: the text encoder has no 'text_model.embeddings.token_embedding.weight'; "
                          f"expected SD1.5's CLIP text model")
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**text_config(sd)))
    return load_strict(model, sd_checkpoint.clip_text_layout(sd, model),
                       f"{path.name} (text encoder)").eval().requires_grad_(False)


class TextEncoder:
    """Prompts -> (B, 77, D) last-layer features, as SD1.5 conditions its UNet."""

    def __init__(self, model: CLIPTextModel, name: str = "text encoder", device=None):
        self.model = model
        self.tokenizer = clip_tokenizer()
        self.managed = runtime.ManagedModel(model, name, load_device=device)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        runtime.load_models(self.managed)
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids.to(self.managed.device)
        return self.model(ids).last_hidden_state.float()


class DiffusersVAE:
    """A diffusers ``AutoencoderKL`` behind ComfyUI's VAE interface."""

    def __init__(self, vae: AutoencoderKL, name: str = "SD1.5 VAE", chunk: int = 4, device=None):
        self.vae = vae
        self.chunk = chunk
        self.managed = runtime.ManagedModel(vae, name, load_device=device)

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, H, W, 3) in [0, 1] -> (B, C, H/8, W/8) unscaled latent: the posterior mean, or a
        sample drawn with ``generator``."""
        runtime.load_models(self.managed)
        dev, dt = self.managed.device, self.vae.dtype
        out = []
        with torch.no_grad():
            for i in range(0, pixels.shape[0], self.chunk):
                x = pixels[i:i + self.chunk, ..., :3].permute(0, 3, 1, 2).to(dev, dt) * 2.0 - 1.0
                dist = self.vae.encode(x).latent_dist
                z = dist.mean.float()
                if generator is not None:
                    z = z + dist.std.float() * torch.randn(z.shape, generator=generator).to(dev)
                out.append(z.cpu())
        return torch.cat(out)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) unscaled latent -> (B, 8h, 8w, 3) in [0, 1]."""
        runtime.load_models(self.managed)
        dev, dt = self.managed.device, self.vae.dtype
        out = []
        with torch.no_grad():
            for i in range(0, latents.shape[0], self.chunk):
                x = self.vae.decode(latents[i:i + self.chunk].to(dev, dt)).sample.float()
                out.append(((x + 1.0) / 2.0).clamp(0, 1).permute(0, 2, 3, 1).cpu())
        return torch.cat(out)
