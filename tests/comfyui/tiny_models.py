"""Small model files that ComfyUI's own loaders accept, with random weights.

ComfyUI recognises a checkpoint by its tensor shapes, so a file its ``CheckpointLoaderSimple``
takes as SD1.5 needs what the detection looks at: a UNet with 320 base channels and 768-wide
cross-attention (fewer levels and blocks than the release are fine), and the full-size VAE
and CLIP ViT-L text encoder (ComfyUI builds those at their fixed sizes). The UNet and VAE
tensors are laid out by ComfyUI's own modules (the original LDM layout), the text encoder by
``transformers`` (the layout SD1.5 files carry); weights are stored in fp16 to keep files small.

Use from tests that run with ComfyUI in the process (``tests/comfyui``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]

# The tiny SD1.5 UNet, in ComfyUI's (LDM) terms and in diffusers' terms (the pack's reference path).
SD15_UNET = dict(model_channels=320, channel_mult=(1, 2), num_res_blocks=1, context_dim=768, num_heads=8)


def randomise(module: torch.nn.Module, seed: int, scale: float = 0.5) -> torch.nn.Module:
    """Draw every parameter from a seeded generator: matrices ~ N(0, scale^2 / fan_in), norm
    scales ~ 1 + N(0, 0.02^2), other vectors ~ N(0, 0.02^2). ComfyUI's layers skip their own
    initialisation, so this is what gives them defined values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (scale / fan_in ** 0.5))
            elif name.endswith("weight") and ("norm" in name or "ln" in name):
                p.copy_(1.0 + 0.02 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return module.eval()


def sd15_unet_module(seed: int = 0) -> torch.nn.Module:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    levels = len(SD15_UNET["channel_mult"])
    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=SD15_UNET["model_channels"],
                     num_res_blocks=SD15_UNET["num_res_blocks"], channel_mult=SD15_UNET["channel_mult"],
                     num_heads=SD15_UNET["num_heads"], num_head_channels=-1, use_spatial_transformer=True,
                     transformer_depth=[1] * levels * SD15_UNET["num_res_blocks"],
                     transformer_depth_output=[1] * levels * (SD15_UNET["num_res_blocks"] + 1),
                     transformer_depth_middle=1, context_dim=SD15_UNET["context_dim"],
                     use_linear_in_transformer=False, operations=comfy.ops.disable_weight_init)
    return randomise(unet, seed)


def sd15_vae_module(seed: int = 1) -> torch.nn.Module:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    return randomise(AutoencoderKL(ddconfig=ddconfig, embed_dim=4), seed, scale=0.8)


def clip_l_text_module(seed: int = 2) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = json.loads((ROOT / "configs" / "sd15" / "text_encoder.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**cfg)).eval()


def _prefixed(prefix: str, module: torch.nn.Module) -> dict:
    return {prefix + k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()
            if v.is_floating_point()}


def sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write a tiny SD1.5 single-file checkpoint (ComfyUI/LDM layout) to ``path``."""
    path = Path(path)
    if path.exists():
        return path
    sd = {}
    sd.update(_prefixed("model.diffusion_model.", sd15_unet_module(seed)))
    sd.update(_prefixed("first_stage_model.", sd15_vae_module(seed + 1)))
    text = clip_l_text_module(seed + 2)
    # SD1.5 files name the text model "cond_stage_model.transformer.text_model.*"; some
    # transformers versions build CLIPTextModel without the "text_model" level
    wrapped = any(k.startswith("text_model.") for k in text.state_dict())
    sd.update(_prefixed("cond_stage_model.transformer." + ("" if wrapped else "text_model."), text))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def sd15_diffusers_configs() -> dict:
    """Configs of the tiny SD1.5 file for the pack's own (diffusers) reading of it."""
    unet = json.loads((ROOT / "configs" / "sd15" / "unet.json").read_text())
    levels = len(SD15_UNET["channel_mult"])
    unet.update(block_out_channels=[SD15_UNET["model_channels"] * m for m in SD15_UNET["channel_mult"]],
                down_block_types=["CrossAttnDownBlock2D"] * levels, up_block_types=["CrossAttnUpBlock2D"] * levels,
                layers_per_block=SD15_UNET["num_res_blocks"], sample_size=32)
    return {"unet": unet}


def motion_block(path: Path, unet, seed: int = 3) -> Path:
    """Write a Motion-I2V motion block (AnimateDiff v2 layout: ``*.motion_modules.*`` keys) sized
    for ``unet`` (a ComfyUI UNetModel) to ``path`` (.safetensors or .bin)."""
    from kinema.pipelines.motion_i2v.native import MotionModuleSet, unet_places

    path = Path(path)
    mods = randomise(MotionModuleSet(unet_places(unet)), seed, scale=0.3)
    sd = {k: v.detach().contiguous() for k, v in mods.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def svd_vae_module(seed: int = 4) -> torch.nn.Module:
    """SVD's temporal-decoder VAE at its fixed size, in ComfyUI's (sgm) layout."""
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    enc = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
           'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}
    dec = dict(enc, video_kernel_size=[3, 1, 1], alpha=0.0)
    vae = AutoencodingEngine(
        regularizer_config={'target': "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={'target': "comfy.ldm.modules.diffusionmodules.model.Encoder", 'params': enc},
        decoder_config={'target': "comfy.ldm.modules.temporal_ae.VideoDecoder", 'params': dec})
    return randomise(vae, seed, scale=0.8)


def clip_vision(config: dict, seed: int = 5):
    """A ComfyUI CLIP_VISION object (ComfyUI's own class) built from a CLIP ViT ``config`` (the
    transformers config keys ComfyUI's JSON configs use), with random weights."""
    import tempfile

    import comfy.clip_vision

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(dict(config, model_type="clip_vision_model"), fh)
    cv = comfy.clip_vision.ClipVisionModel(fh.name)
    Path(fh.name).unlink()
    randomise(cv.model, seed)
    return cv


def svd_unet_module(seed: int = 6) -> torch.nn.Module:
    """The smallest UNet ComfyUI still recognises as SVD img2vid (320 base channels, four levels
    of two res blocks, attention on the first three, 1024-wide context, 768-wide vector
    conditioning), every level kept at 320 channels."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(image_size=32, in_channels=8, out_channels=4, model_channels=320, num_res_blocks=2,
                     channel_mult=(1, 1, 1, 1), num_heads=-1, num_head_channels=64, use_spatial_transformer=True,
                     transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                     transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
                     context_dim=1024, use_linear_in_transformer=True, adm_in_channels=768, num_classes="sequential",
                     use_temporal_attention=True, use_temporal_resblock=True, extra_ff_mix_layer=True,
                     use_spatial_context=True, merge_strategy="learned_with_images", merge_factor=0.0,
                     video_kernel_size=[3, 1, 1], disable_temporal_crossattention=False,
                     max_ddpm_temb_period=10000, operations=comfy.ops.disable_weight_init)
    return randomise(unet, seed)


def vit_l_visual_module(seed: int = 7) -> torch.nn.Module:
    """OpenCLIP's ViT-L/14 image tower (the smallest CLIP vision ComfyUI's loaders recognise)."""
    import open_clip

    torch.manual_seed(seed)
    return open_clip.create_model("ViT-L-14", pretrained=None).visual.eval()


def svd_checkpoint(path: Path) -> Path:
    """Write a tiny single-file SVD img2vid checkpoint (UNet, temporal VAE, CLIP image encoder in
    the sgm / OpenCLIP layout) that ComfyUI's Image Only Checkpoint Loader accepts."""
    path = Path(path)
    if path.exists():
        return path
    sd = {}
    sd.update(_prefixed("model.diffusion_model.", svd_unet_module()))
    sd.update(_prefixed("first_stage_model.", svd_vae_module()))
    sd.update(_prefixed("conditioner.embedders.0.open_clip.model.visual.", vit_l_visual_module()))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def fyc_unet(path: Path, sd15: Path, train_steps: int = 2, seed: int = 8) -> Path:
    """Write a Follow-Your-Click UNet to ``path``: built from the tiny SD1.5 file and an
    AnimateDiff-v2-layout motion module sized for it (as ``follow_your_click.py build`` does with
    the released files), then trained ``train_steps`` steps on clips made by the warp animator."""
    import tempfile

    from kinema.pipelines.clips import make_warp_clips
    from kinema.pipelines.follow_your_click import convert, train

    path = Path(path)
    if path.exists():
        return path
    with tempfile.TemporaryDirectory(prefix="kinema-fyc-") as tmp:
        work = Path(tmp)
        mm = motion_block(work / "mm_sd_v15_v2.safetensors", sd15_unet_module(seed), seed=seed + 1)
        convert.save_unet(convert.build_from_sd15(sd15, mm), work / "init.safetensors")
        make_warp_clips(work / "clips", count=2, size=64, frames=8, seed=seed, video=True)
        cfg = train.TrainConfig(model=str(work / "init.safetensors"), sd15=str(sd15), clips=str(work / "clips"),
                                out=str(work / "run"), steps=train_steps, frames=4, width=64, height=64,
                                strides=[1, 2], lr=1e-4, save_every=train_steps, device="cpu", seed=seed)
        final = train.Trainer(cfg, log=lambda s: None).run(progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(final.read_bytes())
    return path
