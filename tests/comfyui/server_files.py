"""The model files the example workflows name, as tiny random-weight files ComfyUI and the pack
accept, for the real-ComfyUI suites. Made once per test session and linked into each server's
models folder.

ComfyUI recognises some models only at (nearly) their released size: its SD1.5 VAE and CLIP-L
text encoder, SVD's temporal VAE and a CLIP vision tower of at least ViT-L. SDXL is recognised
only at its full 2.6B-parameter size, so the SDXL example workflows run here with an SD1.5-family
file under the SDXL name (the story nodes take both families). Wan 2.1's models (a 14B video
model and a 4.7B text encoder) cannot be made small: that example is checked up to its Kinema
part (see test_real_comfyui.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

import tiny_models

SD15_NAMES = ("v1-5-pruned-emaonly.safetensors", "realisticVisionV51_v20Novae.safetensors",
              "sd_xl_base_1.0.safetensors")


def make(cache: Path) -> Path:
    """Write every file under ``cache`` (a models folder layout); returns ``cache``."""
    import tiny_dynamicrafter
    import tiny_motion_i2v
    import tiny_puppet_master

    ck = cache / "checkpoints"
    sd15 = tiny_models.sd15_checkpoint(ck / "tiny_sd15.safetensors")
    for name in SD15_NAMES:
        if not (ck / name).exists():
            os.link(sd15, ck / name)
    tiny_models.svd_checkpoint(ck / "svd.safetensors")
    mi2v = cache / "kinema" / "motion_i2v"
    mi2v.mkdir(parents=True, exist_ok=True)
    if not (mi2v / "motion_block.bin").exists():
        tiny_motion_i2v.save_flow_files(tiny_motion_i2v.flow_model(0, text=False, cross_attention_dim=768), mi2v)
        tiny_models.motion_block(mi2v / "motion_block.bin", tiny_models.sd15_unet_module())
    pm = cache / "kinema" / "puppet_master" / "model.safetensors"
    if not pm.exists():
        pm.parent.mkdir(parents=True, exist_ok=True)
        unet = tiny_puppet_master.unet(0, cross_attention_dim=768)  # the ViT-L image embedding's width
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(pm))
    tiny_models.fyc_unet(cache / "kinema" / "follow_your_click" / "fyc_sd15.safetensors", sd15)
    dc = cache / "kinema" / "dynamicrafter"
    dc.mkdir(parents=True, exist_ok=True)
    for name in ("dynamicrafter_512.ckpt", "dynamicrafter_512_interp.ckpt"):
        if not (dc / name).exists():
            torch.save(tiny_dynamicrafter.checkpoint("512"), dc / name)
    return cache


def link_into(cache: Path, models: Path) -> None:
    """Hard-link (or copy) the files under ``cache`` into a server's ``models`` folder."""
    for src in cache.rglob("*"):
        if src.is_file():
            dst = models / src.relative_to(cache)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                try:
                    os.link(src, dst)
                except OSError:
                    dst.write_bytes(src.read_bytes())


# Per example workflow: inputs changed for a CPU run in CI (smaller sizes, fewer steps). The graph,
# its nodes and links stay as shipped.
SMALL = {
    "KinemaStoryBatch": {"width": 64, "height": 64, "steps": 2},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 2},
    "KinemaMotionI2VPredictMotion": {"width": 64, "height": 64, "steps": 2, "flow_unit": 8},
    "KinemaMotionI2VRender": {"steps": 2},
    "KinemaPuppetMasterAnimate": {"steps": 2, "crop_size": 64},
    "KinemaPuppetMasterConditioning": {"crop_size": 64},
    "KinemaDynamiCrafterAnimate": {"steps": 2, "frames": 4, "width": 64, "height": 64},
    "KinemaFYCAnimate": {"steps": 2, "frames": 4, "width": 96, "height": 64},
    "KinemaDynamiCrafterInterpolate": {"steps": 2, "frames": 4, "width": 64, "height": 64},
    "KinemaStoryTransitions": {"steps": 2, "width": 64, "height": 64},
}


def make_small(api: dict, object_info: dict) -> dict:
    """A copy of an API prompt with the :data:`SMALL` values (only inputs the node has)."""
    out = {}
    for nid, node in api.items():
        node = {**node, "inputs": dict(node["inputs"])}
        spec = object_info[node["class_type"]]["input"]
        known = set(spec.get("required", {})) | set(spec.get("optional", {}))
        for name, value in SMALL.get(node["class_type"], {}).items():
            if name in known and not isinstance(node["inputs"].get(name), list):
                node["inputs"][name] = value
        out[nid] = node
    return out
