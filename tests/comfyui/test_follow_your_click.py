"""Follow-Your-Click inside ComfyUI, with the session's tiny model files (``server_files``: the
Follow-Your-Click UNet is built from the tiny SD1.5 file and an AnimateDiff-v2-layout motion
module, then trained two steps on clips the warp animator made, ``tiny_models.fyc_unet``):

- headless in this process with ComfyUI's own VAE and CLIP from its checkpoint loader, under its
  model management: outside the clicked region every frame is the picture;
- the pack's headless runner on workflows/follow_your_click.json.

The example workflows (follow_your_click.json, click_strength_two_backends.json) run through a
real server's API in test_real_comfyui.py, like every example workflow.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import harness
import server_files

FYC = "fyc_sd15.safetensors"
SD = "v1-5-pruned-emaonly.safetensors"


def test_headless_with_comfyui_vae_and_clip(model_files, models_dir):
    import nodes as comfy_nodes

    from kinema.kernels.regional import cover_crop, fit_mask
    from kinema.nodes import follow_your_click as N
    from kinema.nodes.core_io import LoadImage
    from kinema.nodes.segment import KinemaClickToMask

    server_files.link_into(model_files, models_dir)
    _, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(SD)[:3]
    (fyc,) = N.KinemaFYCLoader().load(FYC, "auto")
    assert fyc.patcher is not None                                   # held by a ModelPatcher
    cond = lambda text: comfy_nodes.CLIPTextEncode().encode(clip, text)[0]  # noqa: E731
    image, _ = LoadImage().load_image("chelsea.jpg")
    mask, _ = KinemaClickToMask().run(image, json.dumps({"positive": [[230, 140]], "negative": [], "box": None}),
                                      True, 8, 0)["result"]
    with torch.inference_mode():
        out = N.KinemaFYCAnimate().run(fyc, vae, cond("the cat turns its head"), cond(""), image, 6, 2, 4, 96, 64, 2,
                                       7.5, 0, mask=mask)["result"][0]
    assert out.shape == (4, 64, 96, 3)
    img = cover_crop(image.permute(0, 3, 1, 2), 64, 96).permute(0, 2, 3, 1)[0].clamp(0, 1)
    outside = fit_mask(mask, 64, 96)[0, 0] == 0
    assert bool(outside.any()) and (out - img)[:, outside].abs().max() <= 1 / 255
    assert (out[1:] - out[:1])[:, ~outside].abs().max() > 1e-3       # the region is generated


def test_follow_your_click_workflow_with_the_headless_runner(model_files, tmp_path):
    """workflows/follow_your_click.json through run_workflow.py (which loads ComfyUI into its own
    process for the core loaders): the video it writes has the frames asked for."""
    import os
    import subprocess
    import sys

    from PIL import Image, ImageSequence

    wf = harness.ROOT / "workflows" / "follow_your_click.json"
    ids = {node["type"]: node["id"] for node in json.loads(wf.read_text())["nodes"]}
    sets = [f"{ids['KinemaFYCAnimate']}.{k}={v}" for k, v in server_files.SMALL["KinemaFYCAnimate"].items()]
    env = {k: v for k, v in os.environ.items() if k != "KINEMA_IN_COMFYUI"}
    env.update(COMFYUI_DIR=str(harness.comfyui_dir()), KINEMA_PROGRESS="0", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, str(harness.ROOT / "run_workflow.py"), str(wf), "--models-dir",
                        str(model_files), "--output-dir", str(tmp_path / "out"), "--device", "cpu"]
                       + sum((["--set", x] for x in sets), []),
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    videos = [Path(line) for line in r.stdout.splitlines() if line.endswith(".webp")]
    assert len(videos) == 1 and (tmp_path / "out") in videos[0].parents
    assert len(list(ImageSequence.Iterator(Image.open(videos[0])))) == 4
