"""Checks and conversions of the ComfyUI inputs that several nodes take."""
from __future__ import annotations

import torch

from .. import runtime
from ..kernels.checks import mask_plane

SEED_MAX = runtime.SEED_MAX

PRECISION_TOOLTIP = ("Precision of the weights. auto: fp16 or bf16 on a GPU, bf16 on a CPU with native bf16 (AMX or "
                     "AVX512-BF16), else fp32 (a ComfyUI precision flag such as --fp32-unet wins). fp16 suits NVIDIA "
                     "GPUs, bf16 recent CPUs and GPUs, fp32 runs everywhere (slowest).")


def seed_input(tooltip: str = "Seed of the noise (the same seed gives the same result).") -> tuple:
    """The ``seed`` input of every sampling node (ComfyUI's range)."""
    return ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "tooltip": tooltip})


def precision_input(note: str = "") -> tuple:
    """The ``precision`` input of every loader: the same choices and tooltip (``note``: what is
    particular to this loader)."""
    return (list(runtime.PRECISIONS), {"default": "auto", "tooltip": PRECISION_TOOLTIP + (" " + note if note else "")})


def first_image(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """IMAGE (B, H, W, 3) -> (H, W, 3) float32: the first frame."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3 or image.shape[0] < 1:
        raise ValueError(f"{name}: expected an IMAGE batch (B, H, W, 3), got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    return image[0, ..., :3].float()


def single_mask(mask: torch.Tensor | None, size: tuple[int, int], name: str = "mask") -> torch.Tensor | None:
    """MASK (B, H, W) or (H, W) -> (H, W) float32 of the image's ``size`` = (W, H) (the first mask)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        raise ValueError(f"{name}: expected a MASK (B, H, W), got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    return mask_plane(mask[0] if mask.ndim == 3 else mask, size, name).float().clamp(0, 1)
