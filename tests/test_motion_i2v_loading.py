"""Motion-I2V module trees against the released key manifests (built on the meta device),
the motion module against the fixture, and the loaders' checks."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kinema.pipelines.motion_i2v import loading
from kinema.pipelines.motion_i2v.modules import MOTION_AUGMENTED, MotionModule
from kinema.runtime import KinemaError


def _manifest(fixtures_dir, name):
    return json.loads((fixtures_dir / "motion_i2v" / f"key_manifest_{name}.json").read_text())


def _shapes(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def _meta_sd(keys):
    return {k: torch.empty(s, device="meta") for k, s in keys.items()}


def test_stage1_tree_equals_manifest(fixtures_dir):
    ref = _manifest(fixtures_dir, "stage1_flow_unet")["keys"]
    assert _shapes(loading.build_flow_unet()) == ref


def test_stage2_tree_equals_manifest(fixtures_dir):
    m = _manifest(fixtures_dir, "stage2_motion_block")
    ours = _shapes(loading.build_render_unet())
    assert {k: v for k, v in ours.items() if ".motion_modules." in k} == m["keys"]
    assert {k: v for k, v in ours.items() if ".motion_modules." not in k} == m["non_motion_keys_full_stage2_unet"]


def test_flow_vae_conversion_equals_manifest(fixtures_dir):
    ref = _manifest(fixtures_dir, "flow_vae")["keys"]
    converted = loading.flow_vae_state_dict(_meta_sd(ref))
    vae = loading.build_vae("flow_vae")
    assert {k: list(v.shape) for k, v in converted.items()} == _shapes(vae)
    loading.check_keys({k: v.shape for k, v in vae.state_dict().items()}, converted, "vae_flow")


def test_stage1_files_split_and_merge(fixtures_dir):
    ref = _manifest(fixtures_dir, "stage1_flow_unet")["keys"]
    unet = _meta_sd({k: s for k, s in ref.items() if not k.startswith("controlnet.")})
    ctrl = _meta_sd({k: s for k, s in ref.items() if k.startswith("controlnet.")})
    assert len(unet) == 1278 and len(ctrl) == 584
    expected = {k: torch.Size(s) for k, s in ref.items()}
    loading.check_keys(expected, loading.flow_unet_state_dict(unet, ctrl), "stage 1")
    # a ControlNet saved without its prefix is recognised, not silently loaded into the UNet encoder
    bare = {k[len("controlnet."):]: v for k, v in ctrl.items()}
    merged = loading.flow_unet_state_dict(unet, bare)
    loading.check_keys(expected, merged, "stage 1")
    with pytest.raises(KinemaError, match="controlnet.bin: expected 'controlnet"):
        loading.flow_unet_state_dict(unet, {"foo.weight": torch.zeros(1)}, "unet.bin", "controlnet.bin")
    with pytest.raises(KinemaError, match="ControlNet file"):
        loading.flow_unet_state_dict(unet, None, "unet.bin")
    missing = dict(unet)
    missing.pop("stride_embedding.linear_1.weight")
    with pytest.raises(KinemaError, match="1 missing .*stride_embedding"):
        loading.check_keys(expected, loading.flow_unet_state_dict(missing, ctrl), "unet.bin + controlnet.bin")


def test_motion_block_checks(fixtures_dir):
    keys = _manifest(fixtures_dir, "stage2_motion_block")["keys"]
    sd = _meta_sd(keys)
    assert loading.motion_block_state_dict(sd) == sd
    pe_key = next(k for k in keys if k.endswith("pos_encoder.pe"))
    v1 = dict(sd)
    v1[pe_key] = torch.empty(1, 24, keys[pe_key][2], device="meta")
    with pytest.raises(KinemaError, match="length 24, expected 32"):
        loading.motion_block_state_dict(v1, "mm_sd_v15.ckpt")
    with pytest.raises(KinemaError, match="only '\\*.motion_modules"):
        loading.motion_block_state_dict({**sd, "conv_in.weight": torch.zeros(1)}, "motion_block.bin")


def test_motion_module_matches_fixture(fixtures_dir):
    t = load_file(str(fixtures_dir / "motion_i2v" / "motion_attention.safetensors"))
    m = MotionModule(64, heads=2, pe_len=32, processor=MOTION_AUGMENTED)
    m.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("param.")}, strict=True)
    for c in ("A_zero_flow", "B_integer_flow", "C_batch2_integer_flow"):
        x = t[f"{c}.hidden_states_in"]
        b = x.shape[0]
        flow = t[f"{c}.flow_pre"].permute(0, 1, 3, 4, 2)
        out = m(x.permute(0, 2, 1, 3, 4).reshape(b * 4, 64, 8, 8), 4, flow)
        out = out.reshape(b, 4, 64, 8, 8).permute(0, 2, 1, 3, 4)
        ref = t[f"{c}.output_per_sample"] if b > 1 else t[f"{c}.output"]
        assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), c


def test_tiny_stage1_round_trip_bin_and_safetensors(tmp_path):
    import tiny_motion_i2v
    cfg = tiny_motion_i2v.config("stage1_flow_unet")
    torch.manual_seed(0)
    model = loading.build_flow_unet(cfg, "cpu")
    sd = model.state_dict()
    torch.save({k: v for k, v in sd.items() if not k.startswith("controlnet.")}, tmp_path / "unet.bin")
    save_file({k: v.contiguous() for k, v in sd.items() if k.startswith("controlnet.")},
              str(tmp_path / "controlnet.safetensors"))
    loaded = loading.load_flow_unet(tmp_path / "unet.bin", tmp_path / "controlnet.safetensors")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(KinemaError, match="broken.ckpt.*could not be read: it is neither a torch checkpoint.*flow UNet"):
        loading.load_flow_unet(tmp_path / "broken.ckpt", tmp_path / "controlnet.safetensors")
