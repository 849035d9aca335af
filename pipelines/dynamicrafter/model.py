"""The loaded DynamiCrafter model: UNet, resampler, OpenCLIP encoders and VAE, with encode /
decode helpers. Each part is a :class:`~...runtime.ManagedModel` (ComfyUI loads it right before
use and may unload it to make room for others)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ... import runtime
from .sampler import ScheduleConfig

LATENT_SCALE = 0.18215
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "dynamicrafter"


def variants() -> dict:
    """The released variants' UNet settings, schedules and defaults (``configs/dynamicrafter``)."""
    with open(CONFIG_DIR / "variants.json") as f:
        return json.load(f)


class DynamiCrafter(nn.Module):
    """Parts: ``unet``, ``image_proj`` (resampler), ``text_encoder``, ``image_encoder``, ``vae``.

    ``variant`` is "256", "512" or "1024" (512-interp loads as "512"); ``info`` records the
    configs read from the checkpoint.
    """

    def __init__(self, unet, image_proj, text_encoder, image_encoder, vae, variant: str, info: dict):
        super().__init__()
        self.unet = unet
        self.image_proj = image_proj
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.vae = vae
        self.variant = variant
        self.info = info
        self._managed = None

    def managed(self) -> dict:
        """The parts under model management: ``unet``, ``text`` (text encoder), ``image`` (image
        encoder + resampler) and ``vae`` (made once, on first use). Inside ComfyUI the UNet's
        patcher is the ComfyUI MODEL that KSampler samples (see :mod:`.native`)."""
        if self._managed is None:
            from .native import managed_unet
            tag = f"DynamiCrafter {self.variant}"
            self._managed = {
                "unet": managed_unet(self, f"{tag} UNet"),  # inside ComfyUI: held by its MODEL
                "text": runtime.ManagedModel(self.text_encoder, f"{tag} text encoder"),
                "image": runtime.ManagedModel(nn.ModuleDict({"encoder": self.image_encoder, "resampler": self.image_proj}),
                                              f"{tag} image encoder"),
                "vae": runtime.ManagedModel(self.vae, f"{tag} VAE"),
            }
        return self._managed

    # -- settings ----------------------------------------------------------------------
    def settings(self) -> dict:
        return variants()["variants"][self.variant]

    def schedule_config(self) -> ScheduleConfig:
        return ScheduleConfig.from_dict(self.settings()["schedule"])

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def temporal_length(self) -> int:
        return int(self.image_proj.video_length or 16)

    def to(self, *args, **kwargs):
        out = super().to(*args, **kwargs)
        # The KL VAE overflows in float16; keep it in float32 then.
        if self.vae is not None and self.vae.dtype == torch.float16:
            self.vae.to(torch.float32)
        return out

    # -- conditioning ------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """-> (B, 77, C) penultimate-layer OpenCLIP token features."""
        part = self.managed()["text"]
        runtime.load_models(part)
        return self.text_encoder.encode(prompts, device=part.device)

    @torch.no_grad()
    def encode_image_context(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, H, W) in [-1, 1] -> (B, num_queries * video_length, C) image context."""
        return self.resample_image_tokens(self.encode_image_tokens(image))

    @torch.no_grad()
    def encode_image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, H, W) in [-1, 1] -> (B, 1 + patches, width) CLIP vision tokens before
        ``ln_post`` (what the resampler reads), on the image part's device."""
        part = self.managed()["image"]
        runtime.load_models(part)
        return self.image_encoder(image.to(part.device))

    @torch.no_grad()
    def resample_image_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP vision tokens (B, 1 + patches, width) -> (B, num_queries * video_length, C) image context."""
        part = self.managed()["image"]
        runtime.load_models(part)
        return self.image_proj(tokens.to(part.device, self.image_proj.latents.dtype))

    @torch.no_grad()
    def vae_encode(self, frames: torch.Tensor, generator: torch.Generator | None = None,
                   chunk: int = 4) -> torch.Tensor:
        """frames (N, 3, H, W) in [-1, 1] -> (N, 4, H/8, W/8): a posterior sample times 0.18215."""
        out = []
        part = self.managed()["vae"]
        runtime.load_models(part)
        dev, dt = part.device, self.vae.dtype
        for i in range(0, frames.shape[0], chunk):
            dist = self.vae.encode(frames[i:i + chunk].to(dev, dt)).latent_dist
            noise = torch.randn(dist.mean.shape, generator=generator,
                                device=generator.device if generator is not None else dev, dtype=torch.float32)
            out.append((dist.mean.float() + dist.std.float() * noise.to(dev)) * LATENT_SCALE)
        return torch.cat(out)

    @torch.no_grad()
    def vae_decode(self, z: torch.Tensor, chunk: int = 4) -> torch.Tensor:
        """z (N, 4, h, w) -> (N, 3, 8h, 8w) in [-1, 1]."""
        out = []
        part = self.managed()["vae"]
        runtime.load_models(part)
        dev, dt = part.device, self.vae.dtype
        for i in range(0, z.shape[0], chunk):
            out.append(self.vae.decode((z[i:i + chunk] / LATENT_SCALE).to(dev, dt)).sample.float())
        return torch.cat(out)
