"""Motion-I2V nodes and example workflows, run headless with tiny random weight files."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kinema import runner
from kinema.kernels.field import MotionField
from kinema.nodes import motion_i2v as nodes
from kinema.nodes.core_io import CORE_NODES
from kinema.pipelines.motion_i2v import build
from kinema.runtime import KinemaError
from test_motion_i2v_pipeline import _write_sd_checkpoint

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = {"text": "motion_i2v_text_motion_video.json", "drag": "motion_i2v_drag_video.json",
             "brush": "motion_i2v_motion_brush.json"}
TINY = {"2": {"architecture": "tiny", "dtype": "fp32"}, "3": {"architecture": "tiny", "dtype": "fp32"},
        "4": {"width": 48, "height": 32, "flow_unit": 4, "steps": 1, "guidance": 2.0},
        "5": {"steps": 1, "guidance": 2.0}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    mi2v = root / "kinema" / "motion_i2v"
    mi2v.mkdir(parents=True)
    (root / "checkpoints").mkdir()
    fm = build.random_flow_model("tiny", 0)
    rm = build.random_render_model("tiny", 0)
    usd = fm.unet.state_dict()
    torch.save({k: v for k, v in usd.items() if not k.startswith("controlnet.")}, mi2v / "flow_unet.bin")
    torch.save({k: v for k, v in usd.items() if k.startswith("controlnet.")}, mi2v / "controlnet.bin")
    torch.save(fm.flow_vae.state_dict(), mi2v / "vae_flow.bin")
    torch.save({k: v for k, v in rm.unet.state_dict().items() if ".motion_modules." in k}, mi2v / "motion_block.bin")
    _write_sd_checkpoint(root / "checkpoints" / "v1-5-pruned-emaonly.safetensors", rm)
    _write_sd_checkpoint(root / "checkpoints" / "realisticVisionV51_v20Novae.safetensors", rm)
    return root


@pytest.fixture()
def env(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KINEMA_MODELS_DIR", str(model_dir))
    monkeypatch.setenv("KINEMA_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("KINEMA_INPUT_DIR", str(tmp_path / "in"))
    monkeypatch.setenv("KINEMA_DEVICE", "cpu")
    (tmp_path / "in").mkdir()
    return tmp_path


def _classes():
    return {**CORE_NODES, **nodes.NODE_CLASS_MAPPINGS}


def _run(name, overrides):
    wf = json.loads((ROOT / "workflows" / WORKFLOWS[name]).read_text())
    api = runner.ui_to_api(wf, _classes())
    ui = runner.run(api, _classes(), overrides=overrides)
    path = Path(ui["6"]["images"][0]["path"])
    frames = Image.open(path)
    return api, frames.n_frames


@pytest.mark.parametrize("name", ["text", "drag"])
def test_workflow_runs_headless(env, name):
    api, n = _run(name, TINY)
    assert n == 16
    assert api["4"]["class_type"] == "KinemaMotionI2VPredictMotion"
    assert api["4"]["inputs"]["seed"] == 42 and api["2"]["inputs"]["architecture"] == "sd15"  # shipped values


def test_brush_workflow_keeps_unpainted_region(env):
    rgba = np.zeros((32, 48, 4), dtype=np.uint8)
    rgba[..., :3] = 120
    rgba[..., 3] = 255
    rgba[8:24, 24:40, 3] = 0  # painted in the mask editor (alpha 0 -> MASK 1)
    Image.fromarray(rgba, "RGBA").save(env / "in" / "brushed.png")
    api, n = _run("brush", {**TINY, "1": {"image": "brushed.png"}})
    assert n == 16
    assert api["4"]["inputs"]["brush"] == ["1", 1] and api["5"]["inputs"]["brush"] == ["1", 1]


def test_predict_node_brush_and_errors(env):
    fm = build.random_flow_model("tiny", 0)
    img = torch.rand(1, 32, 48, 3)
    node = nodes.KinemaMotionI2VPredictMotion()
    brush = torch.zeros(1, 32, 48)
    brush[:, :, 24:] = 1
    args = dict(flow_model=fm, image=img, width=48, height=32, flow_unit=4, steps=1, guidance=1.0,
                control_scale=1.0, seed=0, prompt="x", negative_prompt="")
    (field,) = node.predict(tracks='[[[30, 10], [40, 20]]]', brush=brush, **args)
    assert isinstance(field, MotionField) and field.flow.shape == (16, 32, 48, 2)
    assert field.flow[:, :, :24].abs().max() == 0 and field.mask[:, 24:].min() == 1
    with pytest.raises(ValueError, match="tracks"):
        node.predict(tracks='[[[300, 10], [40, 20]]]', **args)
    with pytest.raises(ValueError, match="brush: the mask is 10x10"):
        node.predict(tracks="[]", brush=torch.ones(1, 10, 10), **args)
    with pytest.raises(ValueError, match="multiples of 8"):
        node.predict(tracks="[]", **{**args, "width": 50})


def test_render_node_errors(env):
    rm = build.random_render_model("tiny", 0)
    node = nodes.KinemaMotionI2VRender()
    args = dict(render_model=rm, steps=1, guidance=1.0, seed=0, keep_still_outside_motion_mask=True,
                prompt="x", negative_prompt="")
    with pytest.raises(ValueError, match="at most 16"):
        node.render(image=torch.rand(1, 32, 48, 3), motion=MotionField(torch.zeros(20, 32, 48, 2)), **args)
    with pytest.raises(ValueError, match="shape of the motion field"):
        node.render(image=torch.rand(1, 48, 32, 3), motion=MotionField(torch.zeros(16, 32, 48, 2)), **args)
    with pytest.raises(ValueError, match="Kinema motion field"):
        node.render(image=torch.rand(1, 32, 48, 3), motion=torch.zeros(16, 32, 48, 2), **args)
    cond = [[torch.randn(1, 77, 32), {}]]
    (frames,) = node.render(image=torch.rand(1, 32, 48, 3), motion=MotionField(torch.zeros(4, 32, 48, 2)),
                            positive=cond, negative=cond, **args)
    assert frames.shape == (4, 32, 48, 3)


def test_loader_errors_name_the_file(env):
    with pytest.raises(KinemaError, match="not found"):
        nodes.KinemaMotionI2VRenderLoader().load("missing.safetensors", "motion_block.bin", "none", "fp32", "tiny")
    with pytest.raises(KinemaError, match="flow_unet.bin .*does not match"):  # tiny files, released sizes
        nodes.KinemaMotionI2VFlowLoader().load("flow_unet.bin", "controlnet.bin", "vae_flow.bin",
                                               "v1-5-pruned-emaonly.safetensors", "fp32", "sd15")


def test_node_metadata():
    for cls in nodes.NODE_CLASS_MAPPINGS.values():
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, v in spec.get(section, {}).items():
                assert "tooltip" in v[1], (cls.__name__, name)
        assert cls.CATEGORY.startswith("Kinema/") and cls.DESCRIPTION and len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
