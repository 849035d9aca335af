"""Reading the released Motion-I2V files and SD1.5 checkpoints into our modules.

Every conversion checks missing / unexpected keys and shapes and raises ``KinemaError``
naming the file, what was expected and what was found. Files are read with safetensors or
``torch.load(weights_only=True)``; nothing from a model file is executed.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ...runtime import KinemaError
from .modules import MotionUNet3D
from ..checkpoint import check_keys, load_strict, read_state_dict

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "motion_i2v"

# diffusers <= 0.13 saved the VAE mid-block attention under these names.
_OLD_VAE_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def load_config(name: str) -> dict:
    """A JSON config from ``configs/motion_i2v`` (``name`` without ``.json``)."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise KinemaError(f"config '{path}' is missing from the pack; reinstall it")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- configs from files

def _levels(sd: dict, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in sd for m in [re.match(pattern, k)] if m})


def _count(sd: dict, pattern: str) -> int:
    return len({m.group(1) for k in sd for m in [re.match(pattern, k)] if m})


def unet_config(sd: dict, base: str, name: str) -> dict:
    """The config of a Motion-I2V-style 3D UNet state dict (stage 1 or 2): the released config
    ``base`` with every size the tensors show (levels and channels, blocks per level, where
    cross-attention and motion modules are, input/output/control channels, position-encoding
    length) taken from the file. Head counts (8) and group norms (32) are SD's: shapes do not
    tell them."""
    cfg = dict(load_config(base))
    levels = _levels(sd, r"^down_blocks\.(\d+)\.resnets\.0\.conv1\.weight$")
    if not levels or "conv_in.weight" not in sd:
        raise KinemaError(f"{name}: not a Motion-I2V / AnimateDiff UNet (no 'conv_in.weight' and "
                          f"'down_blocks.<i>.resnets.0.conv1.weight' keys; found e.g. {next(iter(sd), 'nothing')})")
    n = len(levels)
    cfg["block_out_channels"] = [int(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in levels]
    cfg["layers_per_block"] = _count(sd, r"^down_blocks\.0\.resnets\.(\d+)\.")
    cross = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in sd) for i in levels]
    cfg["down_block_types"] = ["CrossAttnDownBlock3D" if c else "DownBlock3D" for c in cross]
    cfg["up_block_types"] = ["CrossAttnUpBlock3D" if any(k.startswith(f"up_blocks.{i}.attentions.") for k in sd)
                             else "UpBlock3D" for i in range(n)]
    cfg["motion_module_resolutions"] = [2 ** i for i in levels
                                        if any(k.startswith(f"down_blocks.{i}.motion_modules.") for k in sd)]
    cfg["motion_module_mid_block"] = any(k.startswith("mid_block.motion_modules.") for k in sd)
    to_k = next((v for k, v in sd.items() if re.match(r"^down_blocks\.\d+\.attentions\.0\.transformer_blocks\.0"
                                                       r"\.attn2\.to_k\.weight$", k)), None)
    if to_k is not None:
        cfg["cross_attention_dim"] = int(to_k.shape[1])
    cfg["in_channels"] = int(sd["conv_in.weight"].shape[1])
    if "conv_out.weight" in sd:
        cfg["out_channels"] = int(sd["conv_out.weight"].shape[0])
    pe = next((v for k, v in sd.items() if k.endswith("pos_encoder.pe")), None)
    if pe is not None:
        cfg["motion_pe_len"] = int(pe.shape[1])
    cfg["motion_blocks"] = max(1, _count(sd, r"^(?:down|up)_blocks\.\d+\.motion_modules\.0\.temporal_transformer"
                                             r"\.transformer_blocks\.(\d+)\."))
    cfg["stride_embedding"] = "stride_embedding.linear_1.weight" in sd
    cond = sd.get("controlnet.controlnet_cond_embedding.layers.0.weight")
    cfg["controlnet"] = cond is not None
    if cond is not None:
        cfg["control_hidden"], cfg["control_channels"] = int(cond.shape[0]), int(cond.shape[1])
    return cfg


def vae_config(sd: dict, base: str, name: str) -> dict:
    """The config of a diffusers AutoencoderKL state dict: ``base`` with the sizes the tensors
    show (levels, channels, blocks per level, image and latent channels)."""
    cfg = dict(load_config(base))
    levels = _levels(sd, r"^encoder\.down_blocks\.(\d+)\.resnets\.0\.conv1\.weight$")
    if not levels or "encoder.conv_in.weight" not in sd or "quant_conv.weight" not in sd:
        raise KinemaError(f"{name}: not a diffusers VAE (no 'encoder.conv_in.weight', "
                          f"'encoder.down_blocks.<i>.resnets.0.conv1.weight' and 'quant_conv.weight' keys)")
    cfg["block_out_channels"] = [int(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in levels]
    cfg["layers_per_block"] = _count(sd, r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    cfg["down_block_types"] = ["DownEncoderBlock2D"] * len(levels)
    cfg["up_block_types"] = ["UpDecoderBlock2D"] * len(levels)
    cfg["in_channels"] = int(sd["encoder.conv_in.weight"].shape[1])
    cfg["out_channels"] = int(sd["decoder.conv_out.weight"].shape[0]) if "decoder.conv_out.weight" in sd \
        else cfg["in_channels"]
    cfg["latent_channels"] = int(sd["quant_conv.weight"].shape[0]) // 2
    return cfg


# --------------------------------------------------------------------------- stage 1

def flow_unet_state_dict(unet_sd: dict, controlnet_sd: dict | None, unet_name: str = "unet",
                         controlnet_name: str = "controlnet") -> dict:
    """Merge the released ``unet/diffusion_pytorch_model.bin`` and ``controlnet/controlnet.bin``.

    The ControlNet file must carry the ``controlnet.`` prefix (it is loaded into the UNet that
    owns it). A ControlNet saved without the prefix would, in the released loader, silently
    overwrite the UNet encoder and leave the ControlNet at zero: here its keys are prefixed.
    """
    if any(k.startswith("controlnet.") for k in unet_sd) and controlnet_sd is None:
        return dict(unet_sd)  # one merged file
    if controlnet_sd is None:
        raise KinemaError(f"{unet_name}: holds no 'controlnet.*' keys; pick the ControlNet file too "
                          f"(controlnet.bin from the Motion-I2V stage-1 release)")
    bad = [k for k in unet_sd if k.startswith("controlnet.")]
    if bad:
        raise KinemaError(f"{unet_name}: expected the flow UNet only, found ControlNet keys (e.g. {bad[0]})")
    if not any(k.startswith("controlnet.") for k in controlnet_sd):
        if not any(k.startswith("controlnet_cond_embedding.") for k in controlnet_sd):
            raise KinemaError(f"{controlnet_name}: expected 'controlnet.*' keys (or a bare ControlNet with "
                              f"'controlnet_cond_embedding.*'), found e.g. {next(iter(controlnet_sd), 'nothing')}")
        controlnet_sd = {f"controlnet.{k}": v for k, v in controlnet_sd.items()}
    return {**unet_sd, **controlnet_sd}


def flow_vae_state_dict(sd: dict) -> dict:
    """Rename the VAE mid-block attention of older diffusers saves to the current names."""
    out = {}
    for k, v in sd.items():
        nk = k
        if ".mid_block.attentions." in k:
            for old, new in _OLD_VAE_ATTENTION.items():
                nk = nk.replace(old, new)
            if v.ndim == 4 and v.shape[-1] == 1 and ("to_" in nk):
                v = v[:, :, 0, 0]  # 1x1 conv layout -> linear
        out[nk] = v
    return out


def build_flow_unet(config: dict | str = "stage1_flow_unet", device="meta") -> MotionUNet3D:
    cfg = load_config(config) if isinstance(config, str) else config
    with torch.device(device):
        return MotionUNet3D(cfg)


def build_vae(config: dict | str, device="meta") -> AutoencoderKL:
    cfg = load_config(config) if isinstance(config, str) else config
    with torch.device(device):
        return AutoencoderKL(**cfg)


def load_flow_unet(unet_path, controlnet_path=None) -> MotionUNet3D:
    """The stage-1 flow UNet with its ControlNet, sized by the files (the released sizes, or
    any smaller network of the same structure)."""
    unet_path = Path(unet_path)
    usd = read_state_dict(unet_path, expected="Motion-I2V's stage-1 flow UNet (unet/diffusion_pytorch_model.bin "
                                              "of the release)")
    csd = read_state_dict(controlnet_path, expected="Motion-I2V's stage-1 ControlNet (controlnet/controlnet.bin of "
                                                    "the release)") if controlnet_path else None
    sd = flow_unet_state_dict(usd, csd, unet_path.name, Path(controlnet_path).name if controlnet_path else "")
    label = f"{unet_path.name} + {Path(controlnet_path).name if controlnet_path else ''}".rstrip(" +")
    cfg = unet_config(sd, "stage1_flow_unet", label)
    if not cfg["stride_embedding"] or not cfg["controlnet"] or cfg["in_channels"] != 8:
        raise KinemaError(f"{label}: not Motion-I2V's stage-1 flow UNet (it takes 8 input channels and has a "
                          f"stride embedding and a ControlNet; found {cfg['in_channels']} channels"
                          f"{'' if cfg['stride_embedding'] else ', no stride embedding'}"
                          f"{'' if cfg['controlnet'] else ', no ControlNet'})")
    model = build_flow_unet(cfg)
    load_strict(model, sd, label)
    return model.eval().requires_grad_(False)


def load_flow_vae(path) -> AutoencoderKL:
    """The 2-channel flow VAE, sized by the file."""
    path = Path(path)
    sd = flow_vae_state_dict(read_state_dict(path, expected="Motion-I2V's flow VAE (vae_flow/"
                                                            "diffusion_pytorch_model.bin of the release)"))
    cfg = vae_config(sd, "flow_vae", path.name)
    if cfg["in_channels"] != 2:
        raise KinemaError(f"{path.name}: a VAE for {cfg['in_channels']}-channel pictures; Motion-I2V's flow VAE "
                          f"(vae_flow) encodes 2-channel flows")
    vae = build_vae(cfg)
    load_strict(vae, sd, path.name)
    return vae.eval().requires_grad_(False)


# --------------------------------------------------------------------------- stage 2

def motion_block_state_dict(sd: dict, name: str = "motion block") -> dict:
    """The ``*.motion_modules.*`` keys of an AnimateDiff-v2 / Motion-I2V motion file."""
    others = [k for k in sd if ".motion_modules." not in k]
    if others:
        raise KinemaError(f"{name}: expected only '*.motion_modules.*' keys, found e.g. {others[0]}")
    for k, v in sd.items():
        if k.endswith("pos_encoder.pe") and v.shape[1] != 32:
            raise KinemaError(f"{name}: position encoding {k} has length {v.shape[1]}, expected 32 "
                              f"(AnimateDiff v2 layout; v1 motion modules have 24 and do not fit)")
    return dict(sd)


def build_render_unet(config="stage2_unet", device="meta") -> MotionUNet3D:
    cfg = load_config(config) if isinstance(config, str) else config
    with torch.device(device):
        return MotionUNet3D(cfg)


def load_render_unet(unet_sd: dict, motion_sds: list[tuple[str, dict]], config="stage2_unet",
                     unet_name: str = "checkpoint") -> MotionUNet3D:
    """Stage-2 UNet from SD 2D weights plus motion files applied in order (later ones override).
    Together they must cover every key."""
    model = build_render_unet(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_keys({k: s for k, s in expected.items() if ".motion_modules." not in k}, unet_sd, unet_name)
    motion: dict = {}
    for name, sd in motion_sds:
        sd = motion_block_state_dict(sd, name)
        check_keys({k: s for k, s in expected.items() if ".motion_modules." in k}, sd, name,
                   allow_missing=("down_blocks", "mid_block", "up_blocks"))
        motion.update(sd)
    names = " + ".join(n for n, _ in motion_sds) or "motion block"
    check_keys({k: s for k, s in expected.items() if ".motion_modules." in k}, motion, names)
    load_strict(model, {**unet_sd, **motion}, f"{unet_name} + {names}")
    return model.eval().requires_grad_(False)
