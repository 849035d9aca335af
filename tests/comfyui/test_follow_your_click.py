"""Follow-Your-Click inside ComfyUI: a tiny model built from the ComfyUI-loadable tiny SD1.5 file
(``tiny_models.py``) and an AnimateDiff motion module sized for it, trained a few steps on clips
the pack makes itself, then

- headless in this process, with ComfyUI's own VAE and CLIP from its checkpoint loader, under
  its model management: outside the clicked region every frame is the picture;
- through a real server's API: workflows/follow_your_click.json and the two-backend workflow
  (with a tiny DynamiCrafter checkpoint), at a small size.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

import harness
from kinema.pipelines.follow_your_click import convert, data, tiny, train

FYC = "kinema_tiny_fyc.safetensors"
DC = "kinema_tiny_dc512.safetensors"


@pytest.fixture(scope="module")
def made(tmp_path_factory, models_dir, tiny_sd15):
    """The tiny files, made and trained once, in a folder of their own."""
    import tiny_models
    d = tmp_path_factory.mktemp("fyc_comfy")
    sd = d / tiny_sd15
    sd.symlink_to(models_dir / "checkpoints" / tiny_sd15)
    channels = [tiny_models.SD15_UNET["model_channels"] * m for m in tiny_models.SD15_UNET["channel_mult"]]
    mm = tiny.save(tiny.motion_module(channels=channels, layers=tiny_models.SD15_UNET["num_res_blocks"], version=2,
                                      seed=1), d / "mm_sd_v15_v2.ckpt")
    convert.save_unet(convert.build_from_sd15(sd, mm), d / "init.safetensors")
    data.synthetic_clips(d / "clips", count=2, frames=8, size=64, seed=0)
    cfg = train.TrainConfig(model=str(d / "init.safetensors"), sd15=str(sd), clips=str(d / "clips"), out=str(d / "run"),
                            steps=2, frames=4, width=64, height=64, strides=[1, 2], lr=1e-4, save_every=100,
                            device="cpu")
    final = train.Trainer(cfg, log=lambda s: None).run(progress=False)
    shutil.copy(final, d / FYC)
    import tiny_dynamicrafter
    from safetensors.torch import save_file
    save_file(tiny_dynamicrafter.checkpoint("512"), str(d / DC))
    return d


def _install(made: Path, models: Path, sd: str) -> None:
    for name, folder in ((sd, "checkpoints"), (FYC, "kinema/follow_your_click"), (DC, "kinema/dynamicrafter")):
        (models / folder).mkdir(parents=True, exist_ok=True)
        target = models / folder / name
        if not target.exists():
            target.symlink_to((made / name).resolve())


def test_headless_with_comfyui_vae_and_clip(made, models_dir, tiny_sd15, sd15_core):
    from kinema.nodes import follow_your_click as N
    from kinema.nodes.segment import KinemaClickToMask

    _install(made, models_dir, tiny_sd15)
    _, clip, vae = sd15_core
    (fyc,) = N.KinemaFYCLoader().load(FYC, "auto")
    assert fyc.patcher is not None                                   # held by a ModelPatcher
    cond = lambda text: [[clip.encode_from_tokens(clip.tokenize(text)), {}]]  # noqa: E731
    from kinema.nodes.core_io import LoadImage
    image, _ = LoadImage().load_image("chelsea.jpg")
    mask, _ = KinemaClickToMask().run(image, json.dumps({"positive": [[230, 140]], "negative": [], "box": None}),
                                      True, 8, 0)["result"]
    with torch.inference_mode():
        out = N.KinemaFYCAnimate().run(fyc, vae, cond("the cat turns its head"), cond(""), image, 6, 2, 4, 96, 64, 2,
                                       7.5, 0, mask=mask)["result"][0]
    assert out.shape == (4, 64, 96, 3)
    from kinema.kernels.regional import cover_crop, fit_mask
    img = cover_crop(image.permute(0, 3, 1, 2), 64, 96).permute(0, 2, 3, 1)[0].clamp(0, 1)
    outside = fit_mask(mask, 64, 96)[0, 0] == 0
    assert bool(outside.any()) and (out - img)[:, outside].abs().max() <= 1 / 255


def _run(comfy, made, sd: str, workflow: str, overrides: dict) -> dict:
    _install(made, comfy.base / "models", sd)
    object_info = comfy.get("/object_info", timeout=120)   # fetched after the files are in place
    wf = json.loads((harness.ROOT / "workflows" / workflow).read_text())
    api = harness.ui_to_api(wf, object_info)
    by_type = {}
    for nid, node in api.items():
        by_type.setdefault(node["class_type"], []).append(nid)
    for ctype, values in overrides.items():
        for nid in by_type[ctype]:
            api[nid]["inputs"].update(values)
    assert not harness.missing_choices(api, object_info)
    entry = comfy.wait(comfy.queue(api), timeout=900)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"].get("messages", []))[-3000:]
    return {api[nid]["_meta"]["title"]: items for nid, items in entry["outputs"].items()}


def _frames(comfy, item) -> int:
    from PIL import Image, ImageSequence
    status, body = comfy.request("/view?" + harness.view_url(comfy, item).split("?", 1)[1])
    assert status == 200
    return len(list(ImageSequence.Iterator(Image.open(io.BytesIO(body)))))


SMALL_FYC = {"frames": 4, "width": 96, "height": 64, "steps": 2}


def test_follow_your_click_workflow_through_the_api(comfy, made, tiny_sd15):
    outs = _run(comfy, made, tiny_sd15, "follow_your_click.json", {
        "CheckpointLoaderSimple": {"ckpt_name": tiny_sd15}, "KinemaFYCLoader": {"unet_name": FYC},
        "KinemaFYCAnimate": SMALL_FYC})
    video = outs["Follow-Your-Click video"]["images"]
    assert len(video) == 1 and _frames(comfy, video[0]) == 4


def test_two_backend_workflow_through_the_api(comfy, made, tiny_sd15):
    outs = _run(comfy, made, tiny_sd15, "click_strength_two_backends.json", {
        "CheckpointLoaderSimple": {"ckpt_name": tiny_sd15}, "KinemaFYCLoader": {"unet_name": FYC},
        "KinemaFYCAnimate": SMALL_FYC, "KinemaDynamiCrafterLoader": {"ckpt_name": DC, "precision": "fp32"},
        "KinemaDynamiCrafterAnimate": {"frames": 4, "width": 64, "height": 64, "steps": 2}})
    for title, frames in (("Follow-Your-Click video", 4), ("DynamiCrafter video", 4), ("warp video (no model)", 16)):
        items = outs[title]["images"]
        assert len(items) == 1 and _frames(comfy, items[0]) == frames, title


@pytest.mark.xfail(strict=True, reason="the runner does not use --models-dir once it has loaded ComfyUI: "
                   "runtime.models_dir() then answers ComfyUI's own folder, so _point_folders points the folders at "
                   "themselves (tests/test_runner.py's two core-node tests fail the same way)")
def test_follow_your_click_workflow_with_the_headless_runner(made, models_dir, tiny_sd15, tmp_path):
    """The same workflow file through the pack's headless runner (run_workflow.py, which loads
    ComfyUI into its own process for the core loaders): the video it writes has the frames asked for."""
    import os
    import subprocess
    import sys

    from PIL import Image, ImageSequence

    models = tmp_path / "models"
    _install(made, models, tiny_sd15)
    (models / "checkpoints" / tiny_sd15).unlink()
    (models / "checkpoints" / tiny_sd15).symlink_to(models_dir / "checkpoints" / tiny_sd15)
    wf = harness.ROOT / "workflows" / "follow_your_click.json"
    ids = {node["type"]: node["id"] for node in json.loads(wf.read_text())["nodes"]}
    sets = [f"{ids['CheckpointLoaderSimple']}.ckpt_name={tiny_sd15}", f"{ids['KinemaFYCLoader']}.unet_name={FYC}"]
    sets += [f"{ids['KinemaFYCAnimate']}.{k}={v}" for k, v in SMALL_FYC.items()]
    env = {k: v for k, v in os.environ.items() if k != "KINEMA_IN_COMFYUI"}
    env.update(COMFYUI_DIR=str(harness.comfyui_dir()), KINEMA_PROGRESS="0", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, str(harness.ROOT / "run_workflow.py"), str(wf), "--models-dir", str(models),
                        "--output-dir", str(tmp_path / "out"), "--device", "cpu"] + sum((["--set", x] for x in sets), []),
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    videos = [Path(line) for line in r.stdout.splitlines() if line.endswith(".webp")]
    assert len(videos) == 1 and (tmp_path / "out") in videos[0].parents
    assert len(list(ImageSequence.Iterator(Image.open(videos[0])))) == 4
