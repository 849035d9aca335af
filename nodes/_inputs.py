"""Checks and conversions of the ComfyUI inputs that several nodes take."""
from __future__ import annotations

import torch

from ..kernels.checks import mask_plane


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
