"""Standalone stand-ins for the few ComfyUI core I/O nodes the example workflows use
(LoadImage, SaveImage, PreviewImage, SaveAnimatedWEBP), with the same inputs, for the
headless runner outside ComfyUI. Inside ComfyUI the real core nodes are used instead;
these are never registered with ComfyUI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence

from .. import runtime
from ..pipelines.images import to_uint8

ASSETS = Path(__file__).resolve().parent.parent / "assets"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _image_choices() -> list[str]:
    folder = runtime.input_dir()
    names = set()
    for root in (folder, ASSETS):
        if root.is_dir():
            names.update(p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    return sorted(names)


def resolve_image_path(name: str) -> Path:
    """A file name in the input folder (or the pack's bundled photos), or a path to a file."""
    p = Path(name)
    for cand in (p, runtime.input_dir() / name, ASSETS / name):
        if cand.is_file():
            return cand
    raise ValueError(f"image: '{name}' not found in {runtime.input_dir()} (nor among the bundled photos "
                     f"{', '.join(_image_choices()) or 'none'})")


def _save_dir(prefix: str) -> tuple[Path, str]:
    out = runtime.output_dir()
    sub = Path(prefix).parent
    folder = (out / sub).resolve()
    if out.resolve() not in (folder, *folder.parents):
        raise ValueError(f"filename_prefix: '{prefix}' points outside the output folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder, Path(prefix).name


def _next_path(folder: Path, stem: str, ext: str) -> Path:
    n = 1
    while (folder / f"{stem}_{n:05d}_.{ext}").exists():
        n += 1
    return folder / f"{stem}_{n:05d}_.{ext}"


class LoadImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (_image_choices(), {"image_upload": True})}}

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    CATEGORY = "image"

    def load_image(self, image):
        path = resolve_image_path(image)
        img = Image.open(path)
        frames, masks, size = [], [], None
        for frame in ImageSequence.Iterator(img):
            frame = ImageOps.exif_transpose(frame)
            rgb = frame.convert("RGB")
            if size is None:
                size = rgb.size
            if rgb.size != size:
                continue
            frames.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0))
            if "A" in frame.getbands():
                masks.append(1.0 - torch.from_numpy(np.asarray(frame.getchannel("A"), dtype=np.float32) / 255.0))
            else:
                masks.append(torch.zeros(size[1], size[0]))
        return torch.stack(frames), torch.stack(masks)


class SaveImage:
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        folder, stem = _save_dir(filename_prefix)
        results = []
        for img in images:
            path = _next_path(folder, stem, "png")
            Image.fromarray(to_uint8(img)).save(path, compress_level=4)
            results.append({"filename": path.name, "subfolder": str(path.parent.relative_to(runtime.output_dir().resolve())),
                            "type": "output", "path": str(path)})
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_images(self, images, filename_prefix="preview", prompt=None, extra_pnginfo=None):
        return {"ui": {"images": []}}  # nothing to show without a front end


class SaveAnimatedWEBP:
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    CATEGORY = "image/animation"
    methods = {"default": 4, "fastest": 0, "slowest": 6}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"}),
                             "fps": ("FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}),
                             "lossless": ("BOOLEAN", {"default": True}),
                             "quality": ("INT", {"default": 80, "min": 0, "max": 100}),
                             "method": (list(cls.methods.keys()),)},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_images(self, images, fps, filename_prefix, lossless, quality, method, prompt=None, extra_pnginfo=None):
        folder, stem = _save_dir(filename_prefix)
        path = _next_path(folder, stem, "webp")
        pil = [Image.fromarray(to_uint8(img)) for img in images]
        exif = pil[0].getexif()
        if prompt is not None:
            exif[0x0110] = "prompt:" + json.dumps(prompt)
        pil[0].save(path, save_all=True, append_images=pil[1:], duration=round(1000.0 / fps), loop=0,
                    lossless=bool(lossless), quality=int(quality), method=self.methods.get(method, 4), exif=exif)
        return {"ui": {"images": [{"filename": path.name, "subfolder": "", "type": "output", "path": str(path)}],
                       "animated": (True,)}}


CORE_NODES = {"LoadImage": LoadImage, "SaveImage": SaveImage, "PreviewImage": PreviewImage,
              "SaveAnimatedWEBP": SaveAnimatedWEBP}
