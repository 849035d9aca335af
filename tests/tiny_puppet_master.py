"""A small random Puppet-Master (the released UNet structure) and a codec of small diffusers /
transformers SVD-style image models, for tests without ComfyUI (inside ComfyUI the VAE and
image encoder are ComfyUI's: tests/comfyui)."""
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLTemporalDecoder
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from kinema.pipelines.puppet_master import CLIP_MEAN, CLIP_STD, EDMEuler, PuppetMaster, build_unet, load_json

CONFIGS = Path(__file__).resolve().parent / "configs"


def configs() -> dict:
    return {"unet": json.loads((CONFIGS / "puppet_master_tiny" / "unet.json").read_text()),
            "vae": json.loads((CONFIGS / "svd_tiny" / "vae.json").read_text()),
            "image_encoder": json.loads((CONFIGS / "svd_tiny" / "image_encoder.json").read_text())}


def unet(seed: int = 0, cross_attention_dim: int | None = None):
    """``cross_attention_dim``: the image-embedding width (1024 for ViT-H, 768 for ViT-L)."""
    torch.manual_seed(seed)
    cfg = configs()["unet"]
    if cross_attention_dim:
        cfg["cross_attention_dim"] = cross_attention_dim
    u = build_unet(cfg)
    with torch.no_grad():  # zero-initialised layers get small values so every path matters
        for name, p in u.named_parameters():
            if (".conv_out." in name and ".flow_convs." in name) or name.endswith("mix_factor"):
                p.add_(torch.randn_like(p) * 0.05)
    return u.eval()


class DiffusersCodec:
    """The released pipeline's image side: the SVD temporal-decoder VAE (mean latent, unscaled)
    and CLIP ViT image embeddings of the crop resized bicubic with antialiasing."""

    def __init__(self, vae, encoder):
        self.vae, self.encoder = vae, encoder

    @torch.no_grad()
    def encode(self, crop):
        x = crop.permute(2, 0, 1)[None].float()
        latent = self.vae.encode(x * 2 - 1).latent_dist.mean.float()
        size = self.encoder.config.image_size
        c = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        c = (c.clamp(0, 1) - torch.tensor(CLIP_MEAN)[None, :, None, None]) / torch.tensor(CLIP_STD)[None, :, None, None]
        return latent, self.encoder(pixel_values=c).image_embeds[:, None].float()

    @torch.no_grad()
    def decode(self, latents):
        img = self.vae.decode(latents[0].float() / self.vae.config.scaling_factor, num_frames=latents.shape[1]).sample
        return ((img.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)


def codec(seed: int = 0) -> DiffusersCodec:
    cfg = configs()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLTemporalDecoder(**cfg["vae"])
    with torch.no_grad():
        c = vae.quant_conv.weight.shape[0]
        vae.quant_conv.weight.copy_(torch.eye(c).reshape(c, c, 1, 1))
        vae.quant_conv.bias.zero_()
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["image_encoder"]))
    return DiffusersCodec(vae.eval(), enc.eval())


def puppet_master(seed: int = 0) -> PuppetMaster:
    return PuppetMaster(unet(seed), EDMEuler.from_config(load_json("svd/scheduler.json")))
