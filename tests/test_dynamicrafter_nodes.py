"""DynamiCrafter nodes and the example workflows, run headless with tiny checkpoints."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tiny_dynamicrafter
from kinema import runner
from kinema.nodes import dynamicrafter as N
from kinema.pipelines.dynamicrafter import convert as C
from kinema.runtime import KinemaError

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ["dynamicrafter_animate_photo.json", "dynamicrafter_animate_clicked_object.json",
             "dynamicrafter_interpolate_keyframes.json"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "kinema" / "dynamicrafter").mkdir(parents=True)
    (root / "checkpoints").mkdir()
    save_file(tiny_dynamicrafter.checkpoint("512"), str(root / "kinema" / "dynamicrafter" / "tiny_dc.safetensors"))
    save_file(tiny_dynamicrafter.checkpoint("256"), str(root / "checkpoints" / "tiny_dc_other.safetensors"))
    save_file({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(4, 4),
               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 4)},
              str(root / "checkpoints" / "sd15.safetensors"))
    return root


@pytest.fixture
def env(models_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KINEMA_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("KINEMA_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("KINEMA_DEVICE", "cpu")
    monkeypatch.setenv("KINEMA_TEMP_DIR", str(tmp_path / "temp"))
    return tmp_path


def _classes():
    from kinema.nodes import segment
    c = runner.node_classes()
    c.update(segment.NODE_CLASS_MAPPINGS)   # Click to Mask, for the regional workflow
    c.update(N.NODE_CLASS_MAPPINGS)
    return c


def test_node_contract():
    for name, cls in N.NODE_CLASS_MAPPINGS.items():
        assert name.startswith("Kinema") and name in N.NODE_DISPLAY_NAME_MAPPINGS
        assert cls.CATEGORY.startswith("Kinema/") and cls.DESCRIPTION
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for inp, value in spec.get(section, {}).items():
                assert value[1].get("tooltip"), f"{name}.{inp} has no tooltip"


def test_loader_lists_both_folders_and_detects_variant(env):
    files = N.KinemaDynamiCrafterLoader.INPUT_TYPES()["required"]["ckpt_name"][0]
    assert "tiny_dc.safetensors" in files and "tiny_dc_other.safetensors" in files
    (m,) = N.KinemaDynamiCrafterLoader().load("tiny_dc_other.safetensors", "fp32")
    assert m.variant == "256"
    (m,) = N.KinemaDynamiCrafterLoader().load("tiny_dc.safetensors", "bf16")
    assert m.variant == "512" and m.unet.dtype == torch.bfloat16


def test_loader_errors(env):
    with pytest.raises(KinemaError, match="sd15.safetensors.*Stable Diffusion 1.x"):
        N.KinemaDynamiCrafterLoader().load("sd15.safetensors", "fp32")
    with pytest.raises(KinemaError, match="missing.ckpt"):
        N.KinemaDynamiCrafterLoader().load("missing.ckpt", "fp32")
    with pytest.raises(ValueError, match="precision"):
        N.KinemaDynamiCrafterLoader().load("tiny_dc.safetensors", "fp8")


def test_animate_node_validates(env):
    (m,) = N.KinemaDynamiCrafterLoader().load("tiny_dc.safetensors", "fp32")
    node = N.KinemaDynamiCrafterAnimate()
    img = torch.rand(1, 64, 64, 3)
    with pytest.raises(ValueError, match="model"):
        node.run("not a model", img, "p", "", 4, 0, 1, 7.5, 1.0, 0)
    with pytest.raises(ValueError, match="frames"):
        node.run(m, img, "p", "", -1, 0, 1, 7.5, 1.0, 0, width=64, height=64)
    (frames,) = node.run(m, img, "p", "", 4, 0, 2, 7.5, 1.0, 0, width=64, height=64)
    assert frames.shape == (4, 64, 64, 3)


TINY = {"frames": 4, "steps": 2, "width": 64, "height": 64}


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflows_run_headless(env, name):
    wf = json.loads((ROOT / "workflows" / name).read_text())
    classes = _classes()
    api = runner.ui_to_api(wf, classes)
    over = {}
    for nid, node in api.items():
        if node["class_type"] == "KinemaDynamiCrafterLoader":
            over[nid] = {"ckpt_name": "tiny_dc.safetensors"}
        if node["class_type"].startswith("KinemaDynamiCrafter") and "Loader" not in node["class_type"]:
            over[nid] = dict(TINY)
    ui = runner.run(api, classes=classes, overrides=over)
    paths = [Path(i["path"]) for d in ui.values() for i in d.get("images", []) if "path" in i]
    assert paths and all(p.is_file() and p.stat().st_size > 0 for p in paths)
    from PIL import Image
    img = Image.open(paths[0])
    assert img.n_frames == 4 and img.size == (64, 64)
