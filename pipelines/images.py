"""The pack's pictures as the uint8 arrays that OpenCV, PIL and PyAV take."""
from __future__ import annotations

import numpy as np
import torch


def to_uint8(image) -> np.ndarray:
    """(..., H, W, C >= 3) float 0-1 (torch or numpy) or uint8 -> (..., H, W, 3) uint8 RGB,
    contiguous; values are rounded and clipped, NaN becomes 0, channels past the third go."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = image.numpy() if image.dtype == torch.uint8 else image.to(torch.float32).numpy()
    arr = np.asarray(image)
    if arr.ndim < 3 or arr.shape[-1] < 3:
        raise ValueError(f"image: expected (H, W, 3) values (or a batch of them), got shape {tuple(arr.shape)}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr[..., :3])
    arr = np.nan_to_num(arr[..., :3].astype(np.float32), nan=0.0)
    return np.ascontiguousarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8))
