"""Follow-Your-Click weights: read FYC-format checkpoints, and make one from files a user can get.

No Follow-Your-Click weights are released. :func:`build_from_sd15` initialises a model exactly
as the official code does before its training (``UNet3DConditionModel.from_pretrained_2d`` plus
the motion-module checkpoint): the SD1.5 UNet, the AnimateDiff motion modules, ``conv_in``
widened to 9 input channels with the SD weights in channels 0-3 and zeros elsewhere, and the
fps / motion-strength embeddings with a zero output layer. Such a model samples like the
image-conditioned AnimateDiff it starts from; ``train.py`` fine-tunes it into Follow-Your-Click.

Differences from the official initialisation, each on purpose:

- the official loader overwrites both ``conv_in`` entries of the SD state dict with the new
  model's, so the SD ``conv_in`` *bias* is replaced by a fresh random init; here it is kept
  (the widened layer then computes exactly the SD layer on ``[z, 0, 0]``);
- an AnimateDiff v2 module (``mm_sd_v15_v2``) is accepted too: its position table is cut to the
  24 rows of the v1 layout (the rows are the same sinusoid) and its mid-block module, which has
  no place in Follow-Your-Click's layout, is left out.

FYC-format checkpoint: the UNet's ``state_dict`` with the official key names (torch ``.ckpt``,
maybe under ``state_dict``, ``module.`` prefixes stripped, or ``.safetensors``). The loader checks
every key and shape (no missing, no unexpected keys) and says what a wrong file is.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ...runtime import KinemaError
from .. import sd_checkpoint
from ..checkpoint import check_keys, load_strict, read_state_dict
from ..weights_init import default_init
from .unet import SD_HEADS, FYCUNet, load_config

LDM_UNET = sd_checkpoint.LDM_UNET
MOTION = ".motion_modules."
NEW_KEYS = ("fps_embedding.", "motion_embedding.")   # what neither SD1.5 nor AnimateDiff provides
FORMAT = "follow-your-click-unet"


# ------------------------------------------------------------------------- configs from shapes

def _count(sd: dict, prefix: str) -> int:
    """Number of consecutive sub-modules ``prefix.0``, ``prefix.1``, ... present in the keys."""
    n = 0
    while any(k.startswith(f"{prefix}.{n}.") for k in sd):
        n += 1
    return n


def config_from_state_dict(sd: dict, what: str, pe_len: int | None = None) -> dict:
    """The UNet config of a diffusers-named SD1.5-family UNet state dict (2-D, or FYC with motion
    modules), read from its shapes. Head counts are not visible in shapes: SD1.5's 8 are used."""
    if "conv_in.weight" not in sd or "down_blocks.0.resnets.0.conv1.weight" not in sd:
        raise KinemaError(f"{what}: not a UNet in diffusers names (no conv_in / down_blocks keys), found e.g. "
                          f"{', '.join(list(sd)[:3]) or 'nothing'}")
    levels = _count(sd, "down_blocks")
    ch = [int(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(levels)]
    cross = [k for k in sd if k.endswith(".attn2.to_k.weight")]
    if not cross:
        raise KinemaError(f"{what}: has no cross-attention layers; expected an SD1.5-family UNet")
    base = load_config("unet")
    pe = [v for k, v in sd.items() if k.endswith("pos_encoder.pe")]
    cfg = dict(base)
    cfg.update({
        "block_out_channels": ch,
        "layers_per_block": _count(sd, "down_blocks.0.resnets"),
        "attention_head_dim": SD_HEADS,
        "cross_attention_dim": int(sd[cross[0]].shape[1]),
        "down_block_types": ["CrossAttnDownBlock3D" if f"down_blocks.{i}.attentions.0.norm.weight" in sd
                             else "DownBlock3D" for i in range(levels)],
        "up_block_types": ["CrossAttnUpBlock3D" if f"up_blocks.{i}.attentions.0.norm.weight" in sd
                           else "UpBlock3D" for i in range(levels)],
        "motion_module_resolutions": [2 ** i for i in range(levels) if f"down_blocks.{i}{MOTION}0.temporal_transformer.norm.weight"
                                      in sd] or list(base["motion_module_resolutions"][:levels]),
        "motion_pe_len": int(pe_len if pe_len is not None else (pe[0].shape[1] if pe else base["motion_pe_len"])),
    })
    return cfg


def build_unet(cfg: dict, device="meta") -> FYCUNet:
    with torch.device(device):
        return FYCUNet(cfg)


def expected_shapes(cfg: dict) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in build_unet(cfg).state_dict().items()}


# ---------------------------------------------------------------------------- FYC-format files

def _describe_wrong(sd: dict, name: str) -> str | None:
    """What a file that is not an FYC UNet is, when that can be told."""
    if any(k.startswith(LDM_UNET) for k in sd):
        return (f"{name}: is a Stable Diffusion single-file checkpoint (model.diffusion_model.*), not a "
                f"Follow-Your-Click UNet; make one from it with 'python follow_your_click.py build'")
    if sd and all(MOTION in k for k in sd):
        return (f"{name}: holds only motion modules (an AnimateDiff motion module?), not a whole "
                f"Follow-Your-Click UNet; make one with 'python follow_your_click.py build'")
    w = sd.get("conv_in.weight")
    if w is not None and w.ndim == 4 and w.shape[1] != 9:
        return (f"{name}: conv_in takes {w.shape[1]} input channels; a Follow-Your-Click UNet takes 9 "
                f"([latent 4, mask 1, image latent 4])")
    if "conv_in.weight" in sd and "fps_embedding.linear_1.weight" not in sd:
        return f"{name}: has no fps / motion-strength embeddings; expected a Follow-Your-Click UNet"
    return None


def load_unet(path, dtype: torch.dtype = torch.float32) -> FYCUNet:
    """An FYC-format checkpoint (.ckpt / .pt / .pth / .bin / .safetensors) -> FYCUNet in ``dtype``."""
    path = Path(path)
    sd = read_state_dict(path, expected="a Follow-Your-Click UNet (an FYC-format checkpoint made by "
                                        "'python follow_your_click.py build' or its trainer)")
    wrong = _describe_wrong(sd, path.name)
    if wrong:
        raise KinemaError(wrong)
    cfg = config_from_state_dict(sd, path.name)
    if any(k.startswith("mid_block" + MOTION) for k in sd):
        raise KinemaError(f"{path.name}: has a mid-block motion module; Follow-Your-Click's layout (AnimateDiff v1) "
                          f"has none")
    model = load_strict(build_unet(cfg), sd, path.name)
    return model.to(dtype).eval().requires_grad_(False)


def save_unet(model: FYCUNet, path, metadata: dict | None = None) -> Path:
    """Write an FYC-format checkpoint (.safetensors, or a torch .ckpt for other suffixes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path), metadata={"format": FORMAT, **{k: str(v) for k, v in (metadata or {}).items()}})
    else:
        torch.save(sd, str(path))
    return path


# -------------------------------------------------------------------- SD1.5 + AnimateDiff -> FYC

def sd15_unet_state_dict(path) -> dict:
    """The 2-D UNet of an SD1.5 checkpoint in diffusers names: a single file in the original layout
    (``model.diffusion_model.*``, converted with diffusers' converter) or a diffusers UNet file."""
    path = Path(path)
    sd = read_state_dict(path, prefixes=(LDM_UNET,)) if path.suffix.lower() == ".safetensors" else read_state_dict(path)
    if not sd and path.suffix.lower() == ".safetensors":
        sd = read_state_dict(path)
    if "conv_in.weight" in sd and any(MOTION in k for k in sd):
        raise KinemaError(f"{path.name}: already holds motion modules; expected an SD1.5 image checkpoint")
    return sd_checkpoint.unet_state_dict(sd, path.name)


def motion_module_state_dict(path, pe_len: int) -> dict:
    """The ``*.motion_modules.*`` tensors of an AnimateDiff v1 / v2 file (``mm_sd_v15*.ckpt``),
    in Follow-Your-Click's v1 layout: position tables cut to ``pe_len`` rows, and a v2 mid-block
    module left out (the only key family that is dropped)."""
    path = Path(path)
    sd = read_state_dict(path)
    other = [k for k in sd if MOTION not in k]
    if other:
        raise KinemaError(f"{path.name}: expected an AnimateDiff motion module (only '*.motion_modules.*' keys), "
                          f"found e.g. {other[0]}")
    out = {}
    for k, v in sd.items():
        if k.startswith("mid_block" + MOTION):
            continue  # AnimateDiff v2's mid-block module: Follow-Your-Click (v1 layout) has none
        if k.endswith("pos_encoder.pe"):
            if v.ndim != 3 or v.shape[1] < pe_len:
                raise KinemaError(f"{path.name}: position table {k} has shape {tuple(v.shape)}; expected "
                                  f"(1, >= {pe_len}, C)")
            v = v[:, :pe_len].clone()
        out[k] = v
    return out


def build_from_sd15(sd15_path, motion_path, seed: int = 0, dtype: torch.dtype = torch.float32) -> FYCUNet:
    """A Follow-Your-Click UNet initialised from an SD1.5 checkpoint and an AnimateDiff motion module.

    Every tensor is accounted for: SD1.5 gives all 2-D layers (``conv_in`` in input channels 0-3,
    its bias kept), the motion file all ``*.motion_modules.*``; ``conv_in`` channels 4-8 are zero;
    the fps and motion-strength embeddings are new (first layer PyTorch's default init from
    ``seed``, last layer zero). The key sets are checked exactly."""
    sd15_path, motion_path = Path(sd15_path), Path(motion_path)
    unet2d = sd15_unet_state_dict(sd15_path)
    cfg = config_from_state_dict(unet2d, sd15_path.name, pe_len=int(load_config("unet")["motion_pe_len"]))
    motion = motion_module_state_dict(motion_path, cfg["motion_pe_len"])
    cfg["motion_module_resolutions"] = sorted({2 ** int(k.split(".")[1]) for k in motion if k.startswith("down_blocks.")})
    expected = expected_shapes(cfg)
    image_keys = {k: s for k, s in expected.items() if MOTION not in k and not k.startswith(NEW_KEYS)}
    image_keys["conv_in.weight"] = torch.Size([cfg["block_out_channels"][0], 4, 3, 3])  # SD1.5: a 4-channel input
    check_keys(image_keys, unet2d, f"{sd15_path.name} (UNet)")
    w = unet2d["conv_in.weight"]
    check_keys({k: s for k, s in expected.items() if MOTION in k}, motion, motion_path.name)

    model = build_unet(cfg)      # on meta: every tensor comes from the files or from `generator` below
    generator = torch.Generator().manual_seed(int(seed))
    new = {}
    for name in NEW_KEYS:        # fresh embeddings: PyTorch's default first layer, a zero output layer
        emb = default_init(getattr(model, name.rstrip(".")), generator)
        torch.nn.init.zeros_(emb.linear_2.weight)
        torch.nn.init.zeros_(emb.linear_2.bias)
        new.update({name + k: v for k, v in emb.state_dict().items()})
    conv_in = torch.zeros(expected["conv_in.weight"], dtype=w.dtype)
    conv_in[:, :4] = w
    full = {**unet2d, **motion, **new, "conv_in.weight": conv_in}
    return load_strict(model, full, f"{sd15_path.name} + {motion_path.name}").to(dtype).eval().requires_grad_(False)
