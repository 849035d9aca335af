"""Small helpers for what nodes send back to the ComfyUI front end."""
from __future__ import annotations

import hashlib
import os
import re

from PIL import Image

from .. import runtime
from ..pipelines.images import to_uint8

_PREFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def save_temp_png(image, prefix: str = "kinema") -> dict:
    """Save ``image`` (H, W, 3) float 0-1 (torch or numpy) as a PNG in ComfyUI's temp folder.

    The name is ``<prefix>_<content hash>.png``, so the same picture is written once.
    Returns the reference the front end uses to show it:
    ``{"filename": ..., "subfolder": "", "type": "temp"}``.
    """
    if not _PREFIX.match(prefix):
        raise ValueError(f"prefix: {prefix!r} must be 1-64 letters, digits, '_' or '-'")
    rgb = to_uint8(image)
    if rgb.ndim != 3:
        raise ValueError(f"image: expected one (H, W, 3) picture, got shape {tuple(rgb.shape)}")
    digest = hashlib.blake2b(repr(rgb.shape).encode() + rgb.tobytes(), digest_size=10).hexdigest()
    return _write_temp(f"{prefix}_{digest}.png",
                       lambda part: Image.fromarray(rgb).save(part, format="PNG", compress_level=1))


def save_temp_webp(frames, fps: float = 8.0, prefix: str = "kinema", max_side: int = 512) -> dict:
    """Save (F, H, W, 3) float 0-1 as a looping animated WEBP preview (downscaled so the
    longer side is at most ``max_side``) in the temp folder; return the UI file reference."""
    if not _PREFIX.match(prefix):
        raise ValueError(f"prefix: {prefix!r} must be 1-64 letters, digits, '_' or '-'")
    pil = [Image.fromarray(to_uint8(f)) for f in frames]
    w, h = pil[0].size
    scale = min(1.0, max_side / max(w, h))
    if scale < 1.0:
        pil = [p.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR) for p in pil]
    digest = hashlib.blake2b(b"".join(p.tobytes() for p in pil) + repr(fps).encode(), digest_size=10).hexdigest()
    return _write_temp(f"{prefix}_{digest}.webp",
                       lambda part: pil[0].save(part, format="WEBP", save_all=True, append_images=pil[1:],
                                                duration=round(1000 / max(fps, 0.01)), loop=0, quality=80, method=0))


def _write_temp(filename: str, write) -> dict:
    """Write a content-named file into the temp folder once (``write(path)`` to a part file, then
    renamed, so a reader never sees half a file); return the UI file reference."""
    folder = runtime.temp_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    if not path.is_file():
        part = folder / f".{filename}.{os.getpid()}.part"
        write(part)
        os.replace(part, path)
    return {"filename": filename, "subfolder": "", "type": "temp"}
