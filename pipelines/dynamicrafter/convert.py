"""Load released DynamiCrafter checkpoints (256, 512, 1024, 512-interp; fp32 or pruned fp16/bf16).

A checkpoint is one LDM-style state dict:

- ``model.diffusion_model.*``  video UNet          -> :class:`DynamiCrafterUNet`
- ``image_proj_model.*``       query transformer   -> :class:`Resampler`
- ``cond_stage_model.model.*`` OpenCLIP text tower -> :class:`TextEncoder`
- ``embedder.model.*``         OpenCLIP ViT-H      -> :class:`VisionEncoder`
- ``first_stage_model.*``      LDM VAE             -> diffusers ``AutoencoderKL``

Architectures are read from the tensor shapes (so the tiny test checkpoints and the released
ones go through the same code); the variant (256 / 512 / 1024) from the keys and the schedule
buffers, never from the file name. Every key is either consumed by a module or on the
commented allow-list :data:`UNUSED`; anything else is an error naming the file.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import torch

from ...runtime import KinemaError
from .. import checkpoint, sd_checkpoint
from .encoders import TextEncoder, VisionEncoder
from .model import CONFIG_DIR, DynamiCrafter, variants
from .resampler import Resampler
from .unet import DynamiCrafterUNet, UNetConfig

UNET = "model.diffusion_model."
PROJ = "image_proj_model."
TEXT = "cond_stage_model.model."
VISION = "embedder.model."
VAE = "first_stage_model."

# Keys a released checkpoint carries that no inference path reads. They may be present or
# absent (pruned copies drop some of them); they are never required.
UNUSED = [
    # Diffusion-schedule buffers of the training wrapper. The schedule is rebuilt from the
    # variant's settings; ``scale_arr`` is only read to tell 512 from 1024.
    r"betas", r"alphas_cumprod", r"alphas_cumprod_prev", r"sqrt_alphas_cumprod",
    r"sqrt_one_minus_alphas_cumprod", r"log_one_minus_alphas_cumprod", r"sqrt_recip_alphas_cumprod",
    r"sqrt_recipm1_alphas_cumprod", r"posterior_variance", r"posterior_log_variance_clipped",
    r"posterior_mean_coef1", r"posterior_mean_coef2", r"scale_arr", r"logvar",
    # Text tower: the conditioning takes per-token features, not the pooled projection ...
    TEXT + r"text_projection", TEXT + r"logit_scale",
    # ... from the penultimate layer, so the last residual block never runs (checked below
    # to be exactly the last one).
    TEXT + r"transformer\.resblocks\.LAST\..*",
    TEXT + r"attn_mask",
    # Image embedder: an OpenCLIP model whose text transformer was deleted; the text pieces left
    # behind are unused, and tokens are taken before the post-LayerNorm and the projection.
    VISION + r"token_embedding\.weight", VISION + r"positional_embedding", VISION + r"ln_final\.(weight|bias)",
    VISION + r"text_projection", VISION + r"logit_scale", VISION + r"attn_mask",
    VISION + r"visual\.ln_post\.(weight|bias)", VISION + r"visual\.proj",
]

# The 256 checkpoint names the fs MLP ``framestride_embed`` (the official loader renames it).
RENAMES = {UNET + "framestride_embed.": UNET + "fps_embedding."}


# ----------------------------------------------------------------------------- reading

EXPECTED = ("a DynamiCrafter checkpoint: model.ckpt of the 256, 512, 1024 or 512-interp release, or a pruned "
            ".safetensors copy of one")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a DynamiCrafter checkpoint, by the pack's one model-file reader (a zip-format
    pickle is memory-mapped, so a 10 GB file is not read into memory before conversion)."""
    return checkpoint.read_state_dict(path, expected=EXPECTED, mmap=True)


# What other model files look like: (every one of these key patterns is found, what it is), in
# order; the first match names the file.
LOOKALIKES = [
    ([r"^model\.diffusion_model\..*temopral_conv"],
     "an LVDM/VideoCrafter video UNet without DynamiCrafter's image-injection layers"),
    ([r"^conditioner\.embedders\.", r"time_stack|time_mixer"], "a Stable Video Diffusion checkpoint"),
    ([r"^conditioner\.embedders\."], "an SDXL-family checkpoint"),
    ([r"^cond_stage_model\.transformer\.(text_model\.|embeddings\.token_embedding\.weight$)"],
     "a Stable Diffusion 1.x checkpoint"),
    ([r"^cond_stage_model\.model\.transformer\.", r"^model\.diffusion_model\."], "a Stable Diffusion 2.x checkpoint"),
    ([r"motion_modules\."], "an AnimateDiff motion module"),
    ([r"^((down_blocks|mid_block|up_blocks)\.|conv_in\.weight$)"],
     "a diffusers-format model (not the released LDM-style DynamiCrafter checkpoint)"),
    ([r"^(encoder\.down|decoder\.up)\."], "a standalone VAE"),
    ([r"^model\.diffusion_model\."], "a latent-diffusion UNet without DynamiCrafter's image-injection layers"),
]


def identify(keys) -> str | None:
    """What a non-DynamiCrafter state dict looks like (None if it looks like DynamiCrafter)."""
    keys = list(keys)
    has = lambda pat: any(re.search(pat, k) for k in keys)  # noqa: E731
    if has(r"^model\.diffusion_model\..*attn2\.to_k_ip\.weight$"):
        return None
    for patterns, what in LOOKALIKES:
        if all(has(p) for p in patterns):
            return what
    sample = ", ".join(sorted(keys)[:3])
    return f"an unrecognised state dict ({len(keys)} keys, e.g. {sample})"


def detect_variant(sd: dict[str, torch.Tensor]) -> tuple[str, str]:
    """(variant, reason) from the keys and buffers of a DynamiCrafter state dict.

    - 256: learned image-attention gates (``attn2.alpha``) or the ``framestride_embed`` names,
      or eps-prediction buffers (non-zero ``sqrt_recip_alphas_cumprod``).
    - 512 / 1024: v-prediction; the dynamic-rescale base in ``scale_arr`` (0.7 / 0.3) tells
      them apart. The 512-interp model has exactly the 512 keys and buffers, so it loads as
      512; the interpolate node drives any 512-type model as an interpolator.
    - Without buffers (pruned copies) a v-model is reported as 512.
    """
    keys = sd.keys()
    if any(k.endswith(".attn2.alpha") for k in keys) or any("framestride_embed" in k for k in keys):
        return "256", "learned image-attention gates / framestride_embed keys"
    rec = sd.get("sqrt_recip_alphas_cumprod")
    if rec is not None and rec.device.type != "meta" and float(rec.float().abs().max()) > 0:
        return "256", "eps-prediction schedule buffers"
    arr = sd.get("scale_arr")
    if arr is not None and arr.device.type != "meta":
        base = float(arr.float()[-1])
        known = {name: v["schedule"]["base_scale"] for name, v in variants()["variants"].items()
                 if v["schedule"]["base_scale"] is not None and name != "512_interp"}
        name = min(known, key=lambda n: abs(known[n] - base))
        if abs(known[name] - base) < 1e-3:
            return name, f"dynamic-rescale base {base:.2f} in scale_arr"
    return "512", "v-prediction model; no schedule buffers to tell 512 from 1024, assuming 512"


# ----------------------------------------------------------------------------- architectures

def _count(sd, pattern) -> int:
    idx = {int(m.group(1)) for k in sd for m in [re.match(pattern, k)] if m}
    return max(idx) + 1 if idx else 0


def unet_config(sd: dict, variant: str) -> UNetConfig:
    """UNet architecture from the ``model.diffusion_model.*`` shapes (prefix stripped)."""
    d = dict(variants()["common_unet"])
    d.update(variants()["variants"][variant]["unet"])
    w = sd["input_blocks.0.0.weight"]
    mc, d["in_channels"] = w.shape[0], w.shape[1]
    d["model_channels"] = mc
    d["out_channels"] = sd["out.2.weight"].shape[0]
    d["num_head_channels"] = sd["init_attn.0.proj_in.weight"].shape[0] // d.get("init_attn_heads", 8) \
        if "init_attn.0.proj_in.weight" in sd else d["num_head_channels"]
    d["addition_attention"] = "init_attn.0.proj_in.weight" in sd
    d["fs_condition"] = "fps_embedding.0.weight" in sd
    ctx = [v for k, v in sd.items() if k.endswith("attn2.to_k_ip.weight")]
    d["context_dim"] = ctx[0].shape[1]
    d["image_cross_attention_scale_learnable"] = any(k.endswith("attn2.alpha") for k in sd)
    d["temporal_conv"] = any("temopral_conv" in k for k in sd)
    d["transformer_depth"] = _count(sd, r"input_blocks\.\d+\.1\.transformer_blocks\.(\d+)\.") or 1
    # Level structure: input block i>0 is a ResBlock (has in_layers) or a Downsample (op).
    n_in = _count(sd, r"input_blocks\.(\d+)\.")
    levels, cur = [], []
    for i in range(1, n_in):
        if f"input_blocks.{i}.0.op.weight" in sd:
            levels.append(cur)
            cur = []
        else:
            cur.append(i)
    levels.append(cur)
    d["num_res_blocks"] = len(levels[0])
    d["channel_mult"] = [sd[f"input_blocks.{lv[0]}.0.in_layers.2.weight"].shape[0] // mc for lv in levels]
    d["attention_resolutions"] = [2 ** li for li, lv in enumerate(levels) if f"input_blocks.{lv[0]}.1.norm.weight" in sd]
    d["temporal_attention"] = any(re.match(r"input_blocks\.\d+\.2\.norm\.weight", k) for k in sd) or \
        "middle_block.2.norm.weight" in sd and "middle_block.2.proj_in.weight" in sd
    return UNetConfig.from_dict(d)


def resampler_config(sd: dict) -> dict:
    """Resampler config from ``image_proj_model.*`` shapes (prefix stripped). Heads are 64 wide."""
    lat = sd["latents"]
    inner = sd["layers.0.0.to_q.weight"].shape[0]
    dim_head = 64 if inner % 64 == 0 else inner
    tokens = lat.shape[1]
    nq = 16 if tokens % 16 == 0 else tokens
    return {"dim": lat.shape[2], "depth": _count(sd, r"layers\.(\d+)\."), "dim_head": dim_head,
            "heads": inner // dim_head, "num_queries": nq, "embedding_dim": sd["proj_in.weight"].shape[1],
            "output_dim": sd["proj_out.weight"].shape[0],
            "ff_mult": sd["layers.0.1.1.weight"].shape[0] // lat.shape[2], "video_length": tokens // nq}


def _heads(width: int, head_width: int) -> int:
    return max(1, width // head_width) if width % head_width == 0 else 1


# OpenCLIP ViT-H/14's text tower (width 1024) has 24 blocks; a pruned copy may already lack the
# unused last one.
VIT_H_TEXT_LAYERS = {1024: 24}


def _text_layers(text_sd: dict) -> tuple[int, bool]:
    """(blocks in the full tower, whether the file still holds the last one)."""
    present = _count(text_sd, r"transformer\.resblocks\.(\d+)\.")
    tok = text_sd.get("token_embedding.weight")
    full = VIT_H_TEXT_LAYERS.get(tok.shape[1]) if tok is not None else None
    if full is not None and present == full - 1:
        return full, False
    return present, True


def text_config(sd: dict) -> dict:
    tok = sd["token_embedding.weight"]
    width = tok.shape[1]
    return {"width": width, "layers": _text_layers(sd)[0], "heads": _heads(width, 64),
            "vocab_size": tok.shape[0], "context_length": sd["positional_embedding"].shape[0],
            "mlp_ratio": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width}


def vision_config(sd: dict) -> dict:
    conv = sd["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[2]
    grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    # ViT-H/14 has 16 heads of 80; other widths use 64-wide heads.
    return {"width": width, "layers": _count(sd, r"visual\.transformer\.resblocks\.(\d+)\."),
            "heads": 16 if width == 1280 else _heads(width, 64), "patch_size": patch, "image_size": grid * patch,
            "mlp_ratio": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width}


def vae_config(sd: dict) -> dict:
    """diffusers AutoencoderKL config from LDM ``first_stage_model.*`` shapes (prefix stripped)."""
    n = _count(sd, r"encoder\.down\.(\d+)\.")
    chans = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(n)]
    with open(CONFIG_DIR / "vae.json") as f:
        cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    cfg.update(block_out_channels=chans, layers_per_block=_count(sd, r"encoder\.down\.0\.block\.(\d+)\."),
               latent_channels=sd["post_quant_conv.weight"].shape[0],
               down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
               norm_num_groups=min(32, min(chans)))
    return cfg


# ----------------------------------------------------------------------------- loading

def _split(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _unused_patterns(sd: dict) -> list[re.Pattern]:
    last = _text_layers(_split(sd, TEXT))[0] - 1
    return [re.compile("^" + p.replace("LAST", str(last)) + "$") for p in UNUSED]


def convert(sd: dict[str, torch.Tensor], fname: str = "checkpoint", dtype: torch.dtype = torch.float32,
            variant: str = "auto", load_vae: bool = True):
    """Build a :class:`~.model.DynamiCrafter` from a released state dict (tensors may be on meta)."""
    from diffusers import AutoencoderKL

    what = identify(sd.keys())
    if what is not None:
        raise KinemaError(f"'{fname}' is not a DynamiCrafter checkpoint: it looks like {what}. "
                          "Expected the released model.ckpt (keys model.diffusion_model.*, image_proj_model.*, "
                          "cond_stage_model.*, embedder.*, first_stage_model.*)")
    sd = dict(sd)
    for old, new in RENAMES.items():
        for k in [k for k in sd if k.startswith(old)]:
            sd[new + k[len(old):]] = sd.pop(k)
    detected, reason = detect_variant(sd)
    if variant == "auto":
        variant = detected
    elif variant not in variants()["variants"]:
        raise ValueError(f"variant: '{variant}' is not one of auto, {', '.join(variants()['variants'])}")
    elif (variant == "256") != (detected == "256"):
        raise KinemaError(f"'{fname}' is a DynamiCrafter {detected} model ({reason}), not {variant}")
    required = {UNET: "video UNet", PROJ: "image resampler", TEXT: "text encoder", VISION: "image encoder"}
    if load_vae:
        required[VAE] = "VAE"
    absent = [f"{p}* ({name})" for p, name in required.items() if not any(k.startswith(p) for k in sd)]
    if absent:
        raise KinemaError(f"'{fname}' is a partial DynamiCrafter checkpoint: it has no {', '.join(absent)}. "
                          "Use the full released model.ckpt (or a pruned copy that keeps every part)")

    unet_sd, proj_sd = _split(sd, UNET), _split(sd, PROJ)
    text_sd, vis_sd = _split(sd, TEXT), _split(sd, VISION)
    unused = _unused_patterns(sd)
    is_unused = lambda k: any(p.match(k) for p in unused)  # noqa: E731
    text_sd = {k: v for k, v in text_sd.items() if not is_unused(TEXT + k)}
    vis_sd = {k[len("visual."):]: v for k, v in vis_sd.items() if not is_unused(VISION + k)}
    leftovers = [k for k in sd if not k.startswith((UNET, PROJ, TEXT, VISION, VAE)) and not is_unused(k)]
    if leftovers:
        raise KinemaError(f"'{fname}': unexpected keys for a DynamiCrafter checkpoint: {leftovers[:8]}")

    ucfg = unet_config(unet_sd, variant)
    pcfg = resampler_config(proj_sd)
    tcfg = text_config({k: v for k, v in _split(sd, TEXT).items()})
    vcfg = vision_config(_split(sd, VISION))
    with torch.device("meta"):
        unet = DynamiCrafterUNet(ucfg)
        proj = Resampler(**pcfg)
        text = TextEncoder(**tcfg)
        vision = VisionEncoder(**vcfg)
    advice = ("Use the released DynamiCrafter model.ckpt (or a pruned copy of it); the weights must fit the "
              "architecture its shapes describe")
    for module, part_sd, what in ((unet, unet_sd, "video UNet, model.diffusion_model.*"),
                                  (proj, proj_sd, "resampler, image_proj_model.*"),
                                  (text, text_sd, "text encoder, cond_stage_model.*"),
                                  (vision, vis_sd, "image encoder, embedder.*")):
        checkpoint.load_strict(module, part_sd, f"'{fname}' ({what})", advice=advice)
    vae = None
    if load_vae:
        vae_sd = _split(sd, VAE)
        vae_cfg = vae_config(vae_sd)
        with torch.device("meta"):
            vae = AutoencoderKL(**vae_cfg)
        checkpoint.load_strict(vae, sd_checkpoint.vae_state_dict(sd, vae_cfg, f"'{fname}'"),
                               f"'{fname}' (VAE, first_stage_model.*)", advice=advice)
    info = {"variant": variant, "detected": detected, "reason": reason, "unet": asdict(ucfg), "resampler": pcfg,
            "text": tcfg, "vision": vcfg}
    model = DynamiCrafter(unet, proj, text, vision, vae, variant, info)
    if not any(v.device.type == "meta" for v in sd.values()):
        model.to(dtype)
    return model


def load_dynamicrafter(path: str | Path, dtype: torch.dtype = torch.float32, variant: str = "auto"):
    """Read and convert a checkpoint file; errors name the file."""
    path = Path(path)
    sd = read_state_dict(path)
    return convert(sd, path.name, dtype=dtype, variant=variant)


# ----------------------------------------------------------------------------- writing
