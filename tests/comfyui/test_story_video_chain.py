"""workflows/story_to_video.json end to end with tiny model files: story text -> consistent panels
(ComfyUI's own checkpoint loader) -> comic page, and panels -> semantic motion -> transitions
-> one video. Headless (the pack's runner, ComfyUI in this process) and through a real server's
/prompt (the test writes the tiny files into that server's models folder)."""
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageSequence
from safetensors.torch import save_file

import harness
import tiny_models
import tiny_dynamicrafter
import tiny_story_video
from kinema import runner
from kinema.pipelines.story_video import predictor as story_predictor

WORKFLOW = harness.ROOT / "workflows" / "story_to_video.json"
ARTIFACTS = harness.ROOT / "test-artifacts" / "story_video"
FRAMES, HOLD, SIZE, PANELS = 4, 1, 64, 3
VIDEO_FRAMES = PANELS * (1 + HOLD) + (PANELS - 1) * (FRAMES - 2)


def _tiny_files(models: Path) -> None:
    tiny_models.sd15_checkpoint(models / "checkpoints" / "tiny_sd15.safetensors")
    dc = models / "kinema" / "dynamicrafter" / "tiny_dc_interp.safetensors"
    if not dc.exists():
        dc.parent.mkdir(parents=True, exist_ok=True)
        save_file(tiny_dynamicrafter.checkpoint("512"), str(dc))
    pred = models / "kinema" / "story_diffusion" / "tiny_predictor.safetensors"
    if not pred.exists():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            m = story_predictor.SemanticMotionPredictor(tiny_story_video.predictor_config())
            torch.nn.init.normal_(m.proj_out.weight, std=0.5)
        story_predictor.save_predictor(m, pred)


def _tiny_api(api: dict, learned: bool) -> dict:
    """The workflow on the tiny files at 64 x 64 with 2 steps; ``learned`` connects a predictor."""
    pred_node = None
    for nid, node in api.items():
        t, inp = node["class_type"], node["inputs"]
        if t == "CheckpointLoaderSimple":
            inp["ckpt_name"] = "tiny_sd15.safetensors"
        elif t == "KinemaStoryBatch":
            inp.update(width=SIZE, height=SIZE, steps=2)
        elif t == "KinemaDynamiCrafterLoader":
            inp["ckpt_name"] = "tiny_dc_interp.safetensors"
        elif t == "KinemaSemanticMotionPredictor":
            inp.update(frames=FRAMES, width=SIZE, height=SIZE)
            pred_node = nid
        elif t == "KinemaStoryTransitions":
            inp.update(steps=2, hold_frames=HOLD)
    if learned:
        api["100"] = {"class_type": "KinemaMotionPredictorLoader",
                      "inputs": {"predictor_name": "tiny_predictor.safetensors"}}
        api[pred_node]["inputs"]["predictor"] = ["100", 0]
    return api


def _webp_frames(data, fps: float = 8.0) -> list:
    """The video's frames; an animated WEBP stores a run of identical frames (a held panel) as one
    longer frame, so each is repeated by its duration."""
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    out = []
    for f in ImageSequence.Iterator(img):
        out += [f.convert("RGB")] * round(f.info["duration"] * fps / 1000.0)
    return out


def _contact_sheet(frames, path: Path) -> None:
    w, h = frames[0].size
    sheet = Image.new("RGB", (w * len(frames), h), "white")
    for i, f in enumerate(frames):
        sheet.paste(f, (i * w, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


@pytest.mark.parametrize("learned", [False, True], ids=["interpolation", "learned"])
def test_chain_runs_headless(models_dir, learned):
    import folder_paths
    import nodes
    _tiny_files(models_dir)
    classes = dict(runner.node_classes(), CheckpointLoaderSimple=nodes.CheckpointLoaderSimple)
    api = _tiny_api(runner.ui_to_api(json.loads(WORKFLOW.read_text()), classes), learned)
    ui = runner.run(api, classes=classes)
    out = Path(folder_paths.get_output_directory())
    by_type = {api[nid]["class_type"]: items for nid, items in ui.items()}
    video = by_type["SaveAnimatedWEBP"]["images"]
    comic = by_type["SaveImage"]["images"]
    assert len(video) == 1 and len(comic) == 1
    frames = _webp_frames(Path(video[0]["path"]))
    assert len(frames) == VIDEO_FRAMES and frames[0].size == (SIZE, SIZE)
    page = Image.open(out / comic[0]["subfolder"] / comic[0]["filename"])
    assert page.size[0] > PANELS * SIZE                       # three panels side by side, with gaps
    _contact_sheet(frames, ARTIFACTS / f"headless_{'learned' if learned else 'interpolation'}.png")


def test_chain_runs_through_prompt(comfy, object_info):
    _tiny_files(comfy.base / "models")
    api = _tiny_api(harness.ui_to_api(json.loads(WORKFLOW.read_text()), object_info), learned=True)
    pid = comfy.queue(api)
    entry = comfy.wait(pid, timeout=900)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"].get("messages", []))[-3000:]
    outputs = {api[nid]["class_type"]: out for nid, out in entry["outputs"].items()}
    assert set(outputs) >= {"SaveAnimatedWEBP", "SaveImage", "PreviewImage"}
    (item,) = outputs["SaveAnimatedWEBP"]["images"]
    status, body = comfy.request("/view?" + harness.view_url(comfy, item).split("?", 1)[1])
    assert status == 200
    frames = _webp_frames(body)
    assert len(frames) == VIDEO_FRAMES and frames[0].size == (SIZE, SIZE)
    _contact_sheet(frames, ARTIFACTS / "server_learned.png")
    for kind in ("SaveImage", "PreviewImage"):          # the comic page and the predictor's chart
        (img,) = outputs[kind]["images"]
        status, body = comfy.request("/view?" + harness.view_url(comfy, img).split("?", 1)[1])
        assert status == 200 and len(body) > 100
