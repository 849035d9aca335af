"""The headless runner: UI -> API conversion, execution order, overrides, clear errors."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kinema import runner, runtime
from kinema.nodes.core_io import CORE_NODES
from kinema.nodes.segment import KinemaClickToMask


class Brighten:
    CATEGORY = "test"
    FUNCTION = "go"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "amount": ("FLOAT", {"default": 0.1}),
                             "seed": ("INT", {"default": 0}), "mode": (["add", "mul"],)},
                "optional": {"note": ("STRING", {"forceInput": True})}}

    def go(self, image, amount, seed, mode, note=None):
        return ((image + amount).clamp(0, 1) if mode == "add" else image * amount,)


def _classes():
    c = dict(CORE_NODES)
    c["Brighten"] = Brighten
    return c


def _ui_workflow():
    return {
        "nodes": [
            {"id": 1, "type": "LoadImage", "mode": 0, "inputs": [], "widgets_values": ["chelsea.jpg", "image"],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}]},
            {"id": 2, "type": "Brighten", "mode": 0, "widgets_values": [0.5, 123, "randomize", "mul"],
             "inputs": [{"name": "image", "type": "IMAGE", "link": 2}]},
            {"id": 5, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 1}],
             "outputs": [{"links": [2]}]},
            {"id": 3, "type": "SaveImage", "mode": 0, "widgets_values": ["test/out"],
             "inputs": [{"name": "images", "type": "IMAGE", "link": 3}]},
            {"id": 4, "type": "Note", "mode": 0, "widgets_values": ["hello"]},
        ],
        "links": [[1, 1, 0, 5, 0, "IMAGE"], [2, 5, 0, 2, 0, "IMAGE"], [3, 2, 0, 3, 0, "IMAGE"]],
    }


def test_ui_to_api_maps_widgets_links_and_reroutes():
    api = runner.ui_to_api(_ui_workflow(), _classes())
    assert set(api) == {"1", "2", "3"}
    assert api["1"]["inputs"] == {"image": "chelsea.jpg"}
    # the seed's control_after_generate value is skipped
    assert api["2"]["inputs"] == {"amount": 0.5, "seed": 123, "mode": "mul", "image": ["1", 0]}
    assert api["3"]["inputs"] == {"filename_prefix": "test/out", "images": ["2", 0]}


def test_run_saves_and_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("KINEMA_OUTPUT_DIR", str(tmp_path))
    api = runner.ui_to_api(_ui_workflow(), _classes())
    ui = runner.run(api, _classes(), overrides={"2": {"amount": 1.0}})
    paths = [i["path"] for i in ui["3"]["images"]]
    assert len(paths) == 1 and paths[0].startswith(str(tmp_path))
    from PIL import Image
    out = torch.from_numpy(__import__("numpy").asarray(Image.open(paths[0]), dtype="float32") / 255)
    src, _ = CORE_NODES["LoadImage"]().load_image("chelsea.jpg")
    assert torch.allclose(out, src[0], atol=1 / 255 + 1e-6)  # amount 1.0 * image == image


def test_api_format_passes_through_and_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("KINEMA_OUTPUT_DIR", str(tmp_path))
    api = runner.ui_to_api(_ui_workflow(), _classes())
    assert runner.to_api(api, _classes()) is api
    with pytest.raises(runner.WorkflowError, match="unknown node type 'Nope'"):
        runner.run({"1": {"class_type": "Nope", "inputs": {}}}, _classes())
    with pytest.raises(runner.WorkflowError, match="no node with id 9"):
        runner.run(api, _classes(), overrides={"9": {"x": 1}})
    with pytest.raises(runner.WorkflowError, match="no output node"):
        runner.run({"1": api["1"]}, _classes())
    with pytest.raises(runner.WorkflowError, match="neither the UI format"):
        runner.to_api({"foo": 1}, _classes())
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(runner.WorkflowError, match="not valid JSON"):
        runner.load_workflow(bad)


def test_missing_image_names_the_input():
    with pytest.raises(ValueError, match="image: 'missing.png' not found"):
        CORE_NODES["LoadImage"]().load_image("missing.png")


def test_save_prefix_cannot_escape_output(tmp_path, monkeypatch):
    monkeypatch.setenv("KINEMA_OUTPUT_DIR", str(tmp_path / "out"))
    with pytest.raises(ValueError, match="outside the output folder"):
        CORE_NODES["SaveImage"]().save_images(torch.zeros(1, 4, 4, 3), "../../evil")


def test_primitive_node_value_and_server_input_types():
    wf = _ui_workflow()
    wf["nodes"].append({"id": 7, "type": "PrimitiveNode", "mode": 0, "widgets_values": [0.25, "fixed"],
                        "outputs": [{"name": "FLOAT", "type": "FLOAT", "links": [9]}]})
    wf["nodes"][1]["inputs"].append({"name": "amount", "type": "FLOAT", "link": 9, "widget": {"name": "amount"}})
    wf["links"].append([9, 7, 0, 2, 1, "FLOAT"])
    api = runner.ui_to_api(wf, _classes())
    assert api["2"]["inputs"]["amount"] == 0.25 and "7" not in api
    # the same conversion driven by a server's /object_info "input" entries
    served = {name: cls.INPUT_TYPES() for name, cls in _classes().items()}
    assert runner.ui_to_api(wf, input_types=served) == api


# ----------------------------------------------------------------------------- the command line

ROOT = Path(__file__).resolve().parent.parent
RUN = [sys.executable, str(ROOT / "run_workflow.py")]
STORY_CORE = ["CheckpointLoaderSimple", "EmptyLatentImage", "KSampler", "PrimitiveStringMultiline", "VAEDecode"]


def _env(**extra):
    """The environment of a fresh shell: no ComfyUI unless given, bytecode writes allowed."""
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_DIR", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    env.update(HF_HUB_OFFLINE="1", KINEMA_PROGRESS="0", **extra)
    return env


def _cli(args, cwd, **env):
    return subprocess.run(RUN + [str(a) for a in args], cwd=cwd, env=_env(**env), capture_output=True,
                          text=True, timeout=600)


def test_workflow_with_core_nodes_says_it_needs_comfyui(tmp_path):
    r = _cli([ROOT / "workflows" / "story_native_ksampler.json"], tmp_path)
    assert r.returncode == 2, r.stderr
    assert "needs ComfyUI" in r.stderr and "COMFYUI_DIR" in r.stderr, r.stderr
    for name in STORY_CORE:
        assert name in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture
def comfyui_copy(tmp_path):
    src = os.environ.get("COMFYUI_DIR")
    if not src:
        pytest.skip("COMFYUI_DIR is not set (a ComfyUI checkout; see docs/testing.md)")
    dst = tmp_path / "comfyui"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", ".git"))
    return dst


CORE_PROMPT = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "chelsea.jpg"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},                    # nodes.py (classic)
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "t/inverted"}},
    "4": {"class_type": "PrimitiveStringMultiline",                                        # comfy_extras, v3 API
          "inputs": {"value": '{"positive": [[262, 240]], "negative": [], "box": null}'}},
    "5": {"class_type": "KinemaClickToMask", "inputs": {"image": ["1", 0], "points": ["4", 0], "multimask": True,
                                                        "grow": 0, "feather": 0}},
    "6": {"class_type": "MaskToImage", "inputs": {"mask": ["5", 0]}},                       # comfy_extras
    "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "t/mask"}},
    "8": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}},                      # a text output
}


def test_core_nodes_run_in_process_with_comfyui(tmp_path, comfyui_copy):
    import numpy as np
    from PIL import Image

    wf = tmp_path / "core.json"
    wf.write_text(json.dumps(CORE_PROMPT))
    before = _tree(comfyui_copy)
    r = _cli([wf, "--output-dir", "out", "--models-dir", "models"], tmp_path, COMFYUI_DIR=str(comfyui_copy))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ComfyUI 0.3" in r.stderr or "ComfyUI" in r.stderr
    files = [Path(line) for line in r.stdout.splitlines() if line.endswith(".png")]
    assert [f.name for f in files] == ["inverted_00001_.png", "mask_00001_.png"], r.stdout
    assert all(tmp_path / "out" in f.parents for f in files)
    # ComfyUI's ImageInvert, checked against PIL
    src = np.asarray(Image.open(ROOT / "assets" / "chelsea.jpg").convert("RGB"), dtype=np.int16)
    inv = np.asarray(Image.open(files[0]).convert("RGB"), dtype=np.int16)
    assert np.abs(inv - (255 - src)).max() <= 1
    # the v3 primitive fed the pack's node; its mask, through ComfyUI's MaskToImage, is what the
    # node gives on its own
    own, _ = KinemaClickToMask().run(CORE_NODES["LoadImage"]().load_image("chelsea.jpg")[0],
                                     CORE_PROMPT["4"]["inputs"]["value"])["result"]
    got = np.asarray(Image.open(files[1]).convert("L"), dtype=np.float32) / 255
    assert np.abs(got - own[0].numpy()).max() <= 1 / 255 + 1e-6 and got[240, 262] == 1.0
    # the text output is shown and saved
    value = CORE_PROMPT["4"]["inputs"]["value"]
    assert f"node 8 (PreviewAny): {value}" in r.stdout
    saved = list((tmp_path / "out").glob("core_text_*.txt"))
    assert len(saved) == 1 and value in saved[0].read_text()
    # the checkout was only read (no __pycache__, no input/ or output/ files)
    assert _tree(comfyui_copy) == before


def test_ui_workflow_with_core_nodes_names_the_missing_model(tmp_path, comfyui_copy):
    r = _cli([ROOT / "workflows" / "story_native_ksampler.json", "--models-dir", "models"], tmp_path,
             COMFYUI_DIR=str(comfyui_copy))
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.splitlines()[-1]
    assert err.startswith("error: node 1 (CheckpointLoaderSimple): ckpt_name 'sd_xl_base_1.0.safetensors'"), err
    assert str(tmp_path / "models") in err


def _readme_command(heading: str, index: int = 0) -> list[str]:
    """The index-th ```bash block under a README heading, as argv (continuations joined)."""
    import re
    import shlex
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return shlex.split(blocks[index].replace("\\\n", " "))


def _as_test_argv(argv: list[str]) -> list[str]:
    """README argv (run from the repository root) -> argv for this interpreter from any folder."""
    assert argv[0] == ".venv/bin/python" and argv[1] == "run_workflow.py", argv
    out = []
    for a in argv[2:]:
        key, eq, value = a.partition("=")
        if (ROOT / a).is_file():
            a = str(ROOT / a)
        elif eq and (ROOT / value).is_file():
            a = f"{key}={ROOT / value}"
        out.append(a)
    return out


def test_readme_command_for_your_own_photo(tmp_path):
    import numpy as np
    from PIL import Image, ImageSequence

    listing = _cli(_as_test_argv(_readme_command("### Your own photo", 0)), tmp_path)
    assert listing.returncode == 0, listing.stderr
    for line in ("1.image [COMBO]", "2.points [STRING]", "3.tracks [STRING]", "5.filename_prefix [STRING]",
                 "6.filename_prefix [STRING]"):
        assert line in listing.stdout, listing.stdout
    r = _cli(_as_test_argv(_readme_command("### Your own photo", 1)), tmp_path)
    assert r.returncode == 0, r.stderr
    anim, motion = tmp_path / "out" / "cat" / "animation_00001_.webp", tmp_path / "out" / "cat" / "motion_00001_.png"
    assert r.stdout.split() == [str(anim), str(motion)]
    frames = [np.asarray(f.convert("RGB"), dtype=np.float32) for f in ImageSequence.Iterator(Image.open(anim))]
    assert len(frames) == 16 and frames[0].shape == (300, 451, 3)
    # the nose (clicked at 262, 240) ends 20 px higher: the last frame there shows the first
    # frame's nose, and not what was there before
    first, last = frames[0], frames[-1]
    patch = lambda im, x, y: im[y - 6:y + 7, x - 6:x + 7]
    moved = np.abs(patch(last, 262, 220) - patch(first, 262, 240)).mean()
    stayed = np.abs(patch(last, 262, 220) - patch(first, 262, 220)).mean()
    assert moved < 0.4 * stayed, (moved, stayed)
    # the photo's far corner does not move
    assert np.abs(last[:40, :40] - first[:40, :40]).mean() < 2.0


@pytest.fixture
def main(tmp_path, monkeypatch, capsys):
    """runner.main in this process (fast), from tmp_path, its environment restored after."""
    for key in ("KINEMA_OUTPUT_DIR", "KINEMA_INPUT_DIR", "KINEMA_MODELS_DIR", "KINEMA_DEVICE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)

    def call(args):
        try:
            rc = runner.main([str(a) for a in args])
        except SystemExit as e:  # argparse
            rc = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out, err)
    return call


def test_mistyped_input_names_the_real_inputs(main):
    wf = ROOT / "workflows" / "click_drag_animate.json"
    r = main([wf, "--set", "2.pointz=[]"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert ("--set 2.pointz: node 2 (Click to Mask, KinemaClickToMask) has no input 'pointz'; did you mean "
            "'points'? Its inputs: image, points, multimask, grow, feather, sam, negative_points") in r.stderr
    for bad, said in [("3.frames=abc", "--set 3.frames: 'abc' is not a whole number"),
                      ("3.frames=1", "--set 3.frames: 1 is outside 2..256"),
                      ("3.easing=bounce", "--set 3.easing: 'bounce' is not one of its choices: linear"),
                      ("9.image=x.jpg", "--set: no node with id 9 in the workflow (nodes: 1 (LoadImage), 2 (Click to Mask)"),
                      ("3.mask=1", "--set 3.mask: 1 cannot be set on the command line: input 'mask' takes a MASK")]:
        r = main([wf, "--set", bad])
        assert r.returncode == 2 and said in r.stderr, (bad, r.stderr)


def test_device_option_is_checked(main, monkeypatch):
    wf = ROOT / "workflows" / "measure_motion_strength.json"
    for bad in ("tpu", "cpu:1", "cuda"):
        if bad == "cuda" and torch.cuda.is_available():
            continue
        r = main([wf, "--device", bad])
        assert r.returncode == 2 and "--device" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "use cpu, cuda, cuda:N, mps or xpu" in main([wf, "--device", "tpu"]).stderr
    monkeypatch.setenv("KINEMA_DEVICE", "tpu")
    with pytest.raises(ValueError, match="KINEMA_DEVICE: 'tpu' is not a device"):
        runtime.device()


def test_weights_free_nodes_compute_on_the_chosen_device(monkeypatch):
    """The motion nodes ask the runtime for the device and hand their work to the kernels
    there; what they return is on the CPU, as ComfyUI expects."""
    from kinema.nodes import motion as motion_nodes
    want = torch.device("cpu")
    asked, seen = [], []
    monkeypatch.setattr(runtime, "device", lambda: asked.append(1) or want)
    dense, anim = motion_nodes.dense_motion, motion_nodes.animate

    def spy_dense(*a, **k):
        seen.append(("dense", k["device"], None if k["region"] is None else k["region"].device))
        return dense(*a, **k)

    def spy_anim(image, *a, **k):
        seen.append(("animate", image.device, k["mask"].device))
        return anim(image, *a, **k)

    monkeypatch.setattr(motion_nodes, "dense_motion", spy_dense)
    monkeypatch.setattr(motion_nodes, "animate", spy_anim)
    image = torch.rand(1, 32, 48, 3)
    mask = torch.zeros(1, 32, 48)
    mask[:, 8:24, 8:24] = 1
    tracks = json.dumps({"tracks": [[{"x": 16, "y": 16}, {"x": 30, "y": 16}]], "anchors": []})
    field, preview, _ = motion_nodes.KinemaMotionFromDrags().build(image, tracks, 4, 1.0, "linear", 0, mask=mask)["result"]
    (frames,) = motion_nodes.KinemaAnimateWarp().render(image, field, "inpaint", False, mask=mask)["result"]
    motion_nodes.KinemaMotionStrength().measure(90.0, mask=mask, motion=field)
    assert len(asked) == 3
    assert seen == [("dense", want, want), ("animate", want, want)]
    assert field.flow.device.type == frames.device.type == preview.device.type == "cpu"


def test_text_results_are_shown_and_saved(main, tmp_path):
    r = main([ROOT / "workflows" / "measure_motion_strength.json", "--output-dir", "out", "--quiet"])
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("node ")]
    assert [l.split(":")[0] for l in lines] == ["node 5 (Strength of the drawn motion)",
                                               "node 6 (Strength measured from the video (optical flow))"]
    import re
    for line in lines:
        assert re.search(r": mean \d+\.\d\d px/frame, p90 \d+\.\d\d px/frame, bucket \d+$", line), line
    saved = list((tmp_path / "out").glob("measure_motion_strength_text_*.txt"))
    assert len(saved) == 1 and saved[0].read_text().splitlines() == lines
