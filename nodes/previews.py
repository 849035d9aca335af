"""Saving small preview files for the ComfyUI front end (temp folder, never the output folder)."""
from __future__ import annotations

import uuid

import numpy as np
import torch
from PIL import Image

from .. import runtime


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(H, W, 3) float 0-1 -> uint8 array."""
    return (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


def _temp_name(prefix: str, ext: str) -> tuple[str, "runtime.Path"]:
    folder = runtime.temp_dir()
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}.{ext}"
    return name, folder / name


def save_temp_png(image: torch.Tensor, prefix: str = "kinema") -> dict:
    """Save (H, W, 3) float 0-1 as a PNG in the temp folder; return the UI file reference."""
    name, path = _temp_name(prefix, "png")
    Image.fromarray(to_uint8(image)).save(path, compress_level=1)
    return {"filename": name, "subfolder": "", "type": "temp"}


def save_temp_webp(frames: torch.Tensor, fps: float = 8.0, prefix: str = "kinema", max_side: int = 512) -> dict:
    """Save (F, H, W, 3) float 0-1 as a looping animated WEBP preview (downscaled to
    ``max_side``) in the temp folder; return the UI file reference."""
    name, path = _temp_name(prefix, "webp")
    pil = [Image.fromarray(to_uint8(f)) for f in frames]
    w, h = pil[0].size
    scale = min(1.0, max_side / max(w, h))
    if scale < 1.0:
        pil = [p.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR) for p in pil]
    pil[0].save(path, save_all=True, append_images=pil[1:], duration=round(1000 / max(fps, 0.01)),
                loop=0, quality=80, method=0)
    return {"filename": name, "subfolder": "", "type": "temp"}
