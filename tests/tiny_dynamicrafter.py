"""A tiny random DynamiCrafter in the released checkpoint layout (the released architecture with
small widths, tests/configs/dynamicrafter/tiny.json), for tests and benchmarks."""
import json
import re
from pathlib import Path

import torch

from kinema.pipelines.dynamicrafter.convert import PROJ, TEXT, UNET, VAE, VISION, variants
from kinema.pipelines.dynamicrafter.encoders import TextEncoder, VisionEncoder
from kinema.pipelines.dynamicrafter.resampler import Resampler
from kinema.pipelines.dynamicrafter.sampler import DiffusionSchedule, ScheduleConfig
from kinema.pipelines.dynamicrafter.unet import DynamiCrafterUNet, UNetConfig
from ldm_layout import vae_to_ldm

CONFIGS = Path(__file__).resolve().parent / "configs" / "dynamicrafter"


def _count(sd: dict, pattern: str) -> int:
    return len({m.group(1) for k in sd for m in [re.match(pattern, k)] if m})


def checkpoint(variant: str = "512", seed: int = 0) -> dict[str, torch.Tensor]:
    """A random tiny DynamiCrafter state dict in the released layout (``configs/dynamicrafter/tiny.json``),
    with the variant's distinguishing keys and buffers and the keys the models never read."""
    from diffusers import AutoencoderKL

    if variant not in variants()["variants"]:
        raise ValueError(f"variant: '{variant}' is not one of {', '.join(variants()['variants'])}")
    tiny = json.loads((CONFIGS / "tiny.json").read_text())
    torch.manual_seed(seed)
    settings = variants()["variants"][variant]
    ud = dict(variants()["common_unet"])
    ud.update(settings["unet"])
    ud.update(tiny["unet"])
    unet = DynamiCrafterUNet(UNetConfig.from_dict(ud))
    sd = {}
    g = torch.Generator().manual_seed(seed)
    for k, v in unet.state_dict().items():
        # re-randomise everything (zero-initialised output layers included) so all paths matter
        sd[UNET + k] = (torch.randn(v.shape, generator=g) * 0.2 + (1.0 if k.endswith("norm.weight") else 0.0)
                        if v.dim() <= 1 else torch.randn(v.shape, generator=g) / max(1, v[0].numel()) ** 0.5)
    if variant == "256":  # released 256 naming of the fs MLP
        for k in [k for k in sd if ".fps_embedding." in k]:
            sd[k.replace(".fps_embedding.", ".framestride_embed.")] = sd.pop(k)
    for k, v in Resampler(**tiny["resampler"]).state_dict().items():
        sd[PROJ + k] = v
    tc = tiny["text"]
    text = TextEncoder(**tc, skip_last=0)
    for k, v in text.state_dict().items():
        sd[TEXT + k] = v
    sd[TEXT + "text_projection"] = torch.randn(tc["width"], tc["width"], generator=g)
    sd[TEXT + "logit_scale"] = torch.tensor(4.6052)
    vision = VisionEncoder(**tiny["vision"])
    for k, v in vision.state_dict().items():
        sd[VISION + "visual." + k] = v
    vw = tiny["vision"]["width"]
    sd[VISION + "visual.ln_post.weight"], sd[VISION + "visual.ln_post.bias"] = torch.ones(vw), torch.zeros(vw)
    sd[VISION + "visual.proj"] = torch.randn(vw, tc["width"], generator=g)
    for k in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias", "text_projection"):
        sd[VISION + k] = sd[TEXT + k].clone()
    sd[VISION + "logit_scale"] = torch.tensor(4.6052)
    vc = dict(tiny["vae"])
    n = len(vc["block_out_channels"])
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                        norm_num_groups=32, **vc)
    sd.update(vae_to_ldm(vae.state_dict(), VAE))
    sch = DiffusionSchedule(ScheduleConfig.from_dict(settings["schedule"]))
    sd["betas"], sd["alphas_cumprod"] = sch.betas, sch.alphas_cumprod
    sd["alphas_cumprod_prev"] = sch.alphas_cumprod_prev
    sd["sqrt_alphas_cumprod"] = sch.sqrt_alphas_cumprod
    sd["sqrt_one_minus_alphas_cumprod"] = sch.sqrt_one_minus_alphas_cumprod
    eps = sch.cfg.parameterization == "eps"
    ac = sch.alphas_cumprod64
    sd["sqrt_recip_alphas_cumprod"] = (1.0 / ac).sqrt().float() if eps else torch.zeros(len(ac))
    sd["sqrt_recipm1_alphas_cumprod"] = (1.0 / ac - 1).sqrt().float() if eps else torch.zeros(len(ac))
    if sch.scale_arr is not None:
        sd["scale_arr"] = sch.scale_arr
    return {k: v.contiguous() for k, v in sd.items()}
