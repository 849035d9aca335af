"""Puppet-Master nodes: load the released UNet with an SVD checkpoint's VAE and image encoder,
animate parts of an object from drags. Thin: validate, call ``pipelines.puppet_master``."""
from __future__ import annotations

import torch

from .. import formats, runtime
from ._ui import save_temp_png
from ._inputs import precision_input, seed_input

MODEL = "KINEMA_PUPPET_MASTER"
CATEGORY = "Kinema/Puppet-Master"
FOLDER = "kinema/puppet_master"


def _checked_inputs(image, tracks, mask, crop_size):
    """(picture (H, W, 3), parsed tracks, mask (H, W) or None) after the checks every
    Puppet-Master node makes, each error naming the input."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"image: expected an IMAGE batch (B, H, W, 3), got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    img = image[0, ..., :3].float().cpu()
    h, w = img.shape[:2]
    tr = formats.parse_tracks(tracks, size=(w, h))
    m = None
    if mask is not None:
        m = mask[0] if mask.ndim == 3 else mask
        if tuple(m.shape) != (h, w):
            raise ValueError(f"mask: the mask is {m.shape[-1]}x{m.shape[-2]} but the image is {w}x{h}; "
                             f"use a mask made on this image")
        m = m.float().cpu()
    if int(crop_size) < 64 or int(crop_size) % 64:
        raise ValueError(f"crop_size: {crop_size} must be a multiple of 64 (the UNet's size step at 8 latent pixels)")
    return img, tr, m


class KinemaPuppetMasterLoader:
    DESCRIPTION = ("Load Puppet-Master: the drag-conditioned SVD UNet (model.safetensors from the Puppet-Master "
                   "release, in models/kinema/puppet_master). The SVD VAE and CLIP image encoder come from "
                   "ComfyUI's loaders (Image Only Checkpoint Loader on an SVD img2vid file).")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("puppet_master",)
    OUTPUT_TOOLTIPS = ("The loaded Puppet-Master; connect it to 'Puppet-Master animate'.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "unet_name": (runtime.model_choices(FOLDER), {
                    "tooltip": "The Puppet-Master UNet in models/kinema/puppet_master (the released "
                               "ckpts/model.safetensors)."}),
                "precision": precision_input(),
            },
        }

    def load(self, unet_name, precision="auto"):
        from ..pipelines.puppet_master import load_puppet_master

        dtype = runtime.dtype_named(precision, params=1_700_000_000)
        return (load_puppet_master(runtime.model_path(FOLDER, unet_name), dtype=dtype),)


class KinemaPuppetMasterAnimate:
    DESCRIPTION = ("Drag parts of an object and get part-level motion (a drawer sliding out, a tail swinging): "
                   "Puppet-Master animates a 256x256 crop around the subject on a white background into 14 frames. "
                   "Each drag is a start and an end; up to 5 drags (more: the 5 longest are used). Give the object's "
                   "mask (e.g. from 'Click to mask') so the crop and white background follow the object.")
    CATEGORY = CATEGORY
    FUNCTION = "animate"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("14 frames: the animated subject crop, or the whole image with the crop pasted back.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "puppet_master": (MODEL, {"tooltip": "From 'Puppet-Master loader'."}),
                "vae": ("VAE", {"tooltip": "The SVD img2vid checkpoint's VAE (Image Only Checkpoint Loader)."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "The SVD img2vid checkpoint's CLIP image encoder (Image "
                                                           "Only Checkpoint Loader, or Load CLIP Vision with "
                                                           "CLIP-ViT-H-14)."}),
                "image": ("IMAGE", {"tooltip": "The picture (the first image of a batch is used)."}),
                "tracks": ("STRING", {
                    "multiline": True, "default": '{"tracks": [], "anchors": []}',
                    "tooltip": "Drags in image pixels from the drag editor (or KJNodes / WanTrackToVideo track "
                               "JSON). A 2-point drag moves its end linearly over the 14 frames; a longer track is "
                               "followed point by point. Anchors become drags that stay still."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 200,
                                  "tooltip": "Euler steps (the official demo uses 50)."}),
                "cfg": ("FLOAT", {"default": 5.0, "min": 1.0, "max": 20.0, "step": 0.1,
                                  "tooltip": "Guidance at the last frame; it rises linearly from 1 at frame 0."}),
                "seed": seed_input("Seed of the starting noise."),
                "paste_back": ("BOOLEAN", {"default": False,
                                           "tooltip": "On: put the animated crop back into the full image (its "
                                                      "white background keyed out). Off: the 256x256 crop."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "The object (from 'Click to mask' or any mask). Without it the whole "
                                             "picture is used, padded to a square with white."}),
                "crop_size": ("INT", {"default": 256, "min": 64, "max": 512, "step": 64,
                                      "tooltip": "Side of the square the subject is animated in. The model was trained "
                                                 "at 256; smaller is a faster, rougher preview."}),
            },
        }

    def animate(self, puppet_master, vae, clip_vision, image, tracks, steps, cfg, seed, paste_back=False, mask=None,
                crop_size=256):
        from ..pipelines.puppet_master import ComfyCodec, PuppetMaster

        img, tr, m = _checked_inputs(image, tracks, mask, crop_size)
        if int(steps) < 1:
            raise ValueError(f"steps: {steps} must be at least 1")
        if not float(cfg) >= 1.0:
            raise ValueError(f"cfg: {cfg} must be 1 or more")
        codec = ComfyCodec(vae, clip_vision)
        if not isinstance(puppet_master, PuppetMaster):
            raise ValueError("puppet_master: connect the output of 'Puppet-Master loader'")
        frames = puppet_master.animate(img, tr.tracks, codec, m, steps=int(steps),
                                       cfg=float(cfg), seed=int(seed), paste=bool(paste_back),
                                       anchors=tr.anchors, size=int(crop_size))
        return {"ui": {"kinema_bg": [save_temp_png(img, "kinema_bg")]}, "result": (frames.float(),)}


class KinemaPuppetMasterModel:
    DESCRIPTION = ("Puppet-Master as a ComfyUI MODEL, for ComfyUI's own samplers: KSampler with the euler sampler "
                   "and the karras scheduler is the released sampler; put core 'VideoLinearCFGGuidance' (min_cfg 1) "
                   "in front for its per-frame guidance ramp. Conditioning and latent come from 'Puppet-Master "
                   "conditioning'.")
    CATEGORY = CATEGORY
    FUNCTION = "convert"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The drag-conditioned SVD UNet as a MODEL (continuous EDM, v-prediction).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"puppet_master": (MODEL, {"tooltip": "From 'Puppet-Master loader'."})}}

    def convert(self, puppet_master):
        from ..pipelines.puppet_master import PuppetMaster, comfy_model
        if not isinstance(puppet_master, PuppetMaster):
            raise ValueError("puppet_master: connect the output of 'Puppet-Master loader'")
        return (comfy_model(puppet_master),)


class KinemaPuppetMasterConditioning:
    DESCRIPTION = ("Drags and the picture as conditioning for the Puppet-Master MODEL and ComfyUI's samplers: the "
                   "subject crop on white (from the mask), its SVD VAE latent and CLIP image embedding, and the "
                   "drags; the negative is the released unconditional branch (all zero). The latent is empty, "
                   "14 frames.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT", "IMAGE")
    RETURN_NAMES = ("positive", "negative", "latent", "crop")
    OUTPUT_TOOLTIPS = ("The crop, its embedding and the drags.", "The unconditional branch (zeros).",
                       "An empty 14-frame latent at the crop's size.", "The subject crop the model animates.")

    @classmethod
    def INPUT_TYPES(cls):
        spec = KinemaPuppetMasterAnimate.INPUT_TYPES()
        req = {k: spec["required"][k] for k in ("puppet_master", "vae", "clip_vision", "image", "tracks")}
        return {"required": req, "optional": dict(spec["optional"])}

    def encode(self, puppet_master, vae, clip_vision, image, tracks, mask=None, crop_size=256):
        from ..pipelines.puppet_master import ComfyCodec, PuppetMaster, comfy_conditioning
        img, tr, m = _checked_inputs(image, tracks, mask, crop_size)
        codec = ComfyCodec(vae, clip_vision)
        if not isinstance(puppet_master, PuppetMaster):
            raise ValueError("puppet_master: connect the output of 'Puppet-Master loader'")
        pos, neg, latent, crop = comfy_conditioning(puppet_master, img, tr.tracks, codec, m, size=int(crop_size),
                                                    anchors=tr.anchors)
        return (pos, neg, latent, crop[None])


NODE_CLASS_MAPPINGS = {
    "KinemaPuppetMasterLoader": KinemaPuppetMasterLoader,
    "KinemaPuppetMasterAnimate": KinemaPuppetMasterAnimate,
    "KinemaPuppetMasterModel": KinemaPuppetMasterModel,
    "KinemaPuppetMasterConditioning": KinemaPuppetMasterConditioning,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KinemaPuppetMasterLoader": "Puppet-Master loader",
    "KinemaPuppetMasterAnimate": "Puppet-Master animate (drag parts)",
    "KinemaPuppetMasterModel": "Puppet-Master as MODEL (for KSampler)",
    "KinemaPuppetMasterConditioning": "Puppet-Master conditioning (drag parts)",
}
