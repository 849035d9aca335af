"""Puppet-Master nodes and the example workflow, run headless with tiny random weight files."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageSequence

from kinema import runner
from kinema.nodes import puppet_master as nodes
from kinema.nodes import segment
from kinema.nodes.core_io import CORE_NODES
from kinema.runtime import KinemaError
from test_puppet_master_svd import write_tiny_checkpoints

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "workflows" / "puppet_master_drag_parts.json"
TINY = {"3": {"unet_name": "tiny_pm.safetensors", "svd_checkpoint": "tiny_svd.safetensors",
              "architecture": "tiny", "dtype": "fp32"},
        "4": {"steps": 1}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_tiny_checkpoints(root, seed=0)
    return root


@pytest.fixture()
def env(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KINEMA_MODELS_DIR", str(model_dir))
    monkeypatch.setenv("KINEMA_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("KINEMA_TEMP_DIR", str(tmp_path / "temp"))
    monkeypatch.setenv("KINEMA_INPUT_DIR", str(tmp_path / "in"))
    monkeypatch.setenv("KINEMA_DEVICE", "cpu")
    return tmp_path


def _classes():
    return {**CORE_NODES, **segment.NODE_CLASS_MAPPINGS, **nodes.NODE_CLASS_MAPPINGS}


def test_node_declarations():
    for cls in nodes.NODE_CLASS_MAPPINGS.values():
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, value in spec.get(section, {}).items():
                assert "tooltip" in value[1], f"{cls.__name__}.{name} has no tooltip"
        assert cls.CATEGORY == "Kinema/Puppet-Master" and cls.DESCRIPTION
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
    assert set(nodes.NODE_CLASS_MAPPINGS) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)


def test_workflow_ui_format_maps_widgets():
    api = runner.to_api(runner.load_workflow(WORKFLOW), _classes())
    anim = api["4"]["inputs"]
    assert anim["steps"] == 50 and anim["cfg"] == 5.0 and anim["seed"] == 42 and anim["paste_back"] is False
    assert anim["mask"] == ["2", 0] and anim["puppet_master"] == ["3", 0]
    assert len(json.loads(anim["tracks"])["tracks"]) == 2
    assert api["3"]["inputs"]["unet_name"] == "model.safetensors"


def test_loader_and_missing_files(env, model_dir):
    load = nodes.KinemaPuppetMasterLoader().load
    (model,) = load("tiny_pm.safetensors", "tiny_svd.safetensors", "fp32", "tiny")
    assert model.unet.config.num_drags == 5
    with pytest.raises(KinemaError, match="nope.safetensors"):
        load("nope.safetensors", "tiny_svd.safetensors", "fp32", "tiny")
    # the SVD checkpoint picked as the UNet is refused, naming the file
    shutil.copy(model_dir / "checkpoints" / "tiny_svd.safetensors", model_dir / "kinema" / "puppet_master" / "svd.safetensors")
    with pytest.raises(KinemaError, match="svd.safetensors: not a Puppet-Master UNet"):
        load("svd.safetensors", "tiny_svd.safetensors", "fp32", "tiny")
    # and the UNet picked as the SVD checkpoint
    shutil.copy(model_dir / "kinema" / "puppet_master" / "tiny_pm.safetensors", model_dir / "checkpoints" / "pm.safetensors")
    with pytest.raises(KinemaError, match="pm.safetensors: no 'first_stage_model"):
        load("tiny_pm.safetensors", "pm.safetensors", "fp32", "tiny")


def test_animate_bad_inputs_are_clear(env):
    (model,) = nodes.KinemaPuppetMasterLoader().load("tiny_pm.safetensors", "tiny_svd.safetensors", "fp32", "tiny")
    node = nodes.KinemaPuppetMasterAnimate()
    img = torch.rand(1, 40, 60, 3)
    with pytest.raises(ValueError, match="tracks"):
        node.animate(model, img, '[[[70, 10], [20, 20]]]', 1, 2.0, 0)
    with pytest.raises(ValueError, match="mask: the mask is 10x10 but the image is 60x40"):
        node.animate(model, img, '[[[10, 10], [20, 20]]]', 1, 2.0, 0, mask=torch.ones(1, 10, 10))
    with pytest.raises(ValueError, match="image"):
        node.animate(model, torch.rand(40, 60, 3), '[]', 1, 2.0, 0)
    with pytest.raises(ValueError, match="cfg"):
        node.animate(model, img, '[]', 1, 0.5, 0)


def test_workflow_runs_headless(env):
    api = runner.to_api(runner.load_workflow(WORKFLOW), _classes())
    ui = runner.run(api, _classes(), overrides=TINY)
    files = [Path(i["path"]) for d in ui.values() for i in d.get("images", []) if "path" in i]
    webp = [f for f in files if f.suffix == ".webp"]
    assert len(webp) == 1 and webp[0].stat().st_size > 0
    frames = list(ImageSequence.Iterator(Image.open(webp[0])))
    assert len(frames) == 14
