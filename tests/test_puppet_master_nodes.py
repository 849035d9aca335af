"""Puppet-Master nodes: declarations, the loader's file checks and the input checks that come
before any model runs (with ComfyUI's VAE and CLIP vision: tests/comfyui/test_puppet_master_core.py)."""
import pytest
import torch
from safetensors.torch import save_file

import tiny_puppet_master
from kinema.nodes import puppet_master as nodes
from kinema.runtime import KinemaError


def test_node_declarations():
    for cls in nodes.NODE_CLASS_MAPPINGS.values():
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, value in spec.get(section, {}).items():
                assert "tooltip" in value[1], f"{cls.__name__}.{name} has no tooltip"
        assert cls.CATEGORY.startswith("Kinema/") and cls.DESCRIPTION
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
    assert set(nodes.NODE_CLASS_MAPPINGS) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)


@pytest.fixture()
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("KINEMA_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("KINEMA_DEVICE", "cpu")
    d = tmp_path / "kinema" / "puppet_master"
    d.mkdir(parents=True)
    return d


def test_loader_sizes_the_unet_by_the_file_and_names_wrong_files(folder):
    load = nodes.KinemaPuppetMasterLoader().load
    assert nodes.KinemaPuppetMasterLoader.INPUT_TYPES()["required"]["unet_name"][0] == \
        ["(no files in models/kinema/puppet_master/)"]
    sd = tiny_puppet_master.unet(0).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "tiny_pm.safetensors"))
    (model,) = load("tiny_pm.safetensors", "fp32")
    assert model.unet.config.num_drags == 5 and list(model.unet.config.block_out_channels) == [32, 32, 32, 32]
    with pytest.raises(KinemaError, match="nope.safetensors' not found"):
        load("nope.safetensors", "fp32")
    # a stock SVD UNet (no drag layers) is named as such
    stock = {k: v.contiguous() for k, v in sd.items() if ".flow_convs." not in k and ".drag_token_mlps." not in k}
    save_file(stock, str(folder / "svd_unet.safetensors"))
    with pytest.raises(KinemaError, match=r"svd_unet.safetensors \(Puppet-Master UNet\): does not match .*stock SVD UNet"):
        load("svd_unet.safetensors", "fp32")
    save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(2, 3, 3, 3)}, str(folder / "vae.safetensors"))
    with pytest.raises(KinemaError, match="vae.safetensors: not a Puppet-Master UNet checkpoint"):
        load("vae.safetensors", "fp32")
    with pytest.raises(ValueError, match="precision: .fp8. is not one of auto, fp32, fp16, bf16"):
        load("tiny_pm.safetensors", "fp8")


def test_animate_bad_inputs_are_clear(folder):
    node = nodes.KinemaPuppetMasterAnimate()
    img = torch.rand(1, 40, 60, 3)
    with pytest.raises(ValueError, match="tracks"):
        node.animate(None, None, None, img, '[[[70, 10], [20, 20]]]', 1, 2.0, 0)
    with pytest.raises(ValueError, match="mask: the mask is 10x10 but the image is 60x40"):
        node.animate(None, None, None, img, '[[[10, 10], [20, 20]]]', 1, 2.0, 0, mask=torch.ones(1, 10, 10))
    with pytest.raises(ValueError, match="image"):
        node.animate(None, None, None, torch.rand(40, 60, 3), '[]', 1, 2.0, 0)
    with pytest.raises(ValueError, match="cfg"):
        node.animate(None, None, None, img, '[]', 1, 0.5, 0)
    with pytest.raises(ValueError, match="vae: connect"):
        node.animate(None, None, None, img, '[]', 1, 2.0, 0)
