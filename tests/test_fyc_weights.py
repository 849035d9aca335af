"""Follow-Your-Click weights: a model built from an SD1.5 checkpoint and an AnimateDiff motion
module exactly as the official code initialises one, FYC-format files (.safetensors and .ckpt),
clear errors for wrong files, and the SD1.5 readers (diffusers' converters) the trainer uses."""
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

import tiny_follow_your_click as tiny
from ldm_layout import text_to_ldm, unet_to_ldm, vae_to_ldm
from kinema.pipelines.follow_your_click import convert, sd15
from kinema.pipelines.follow_your_click.unet import FYCUNet
from kinema.runtime import KinemaError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fyc_files")
    sd = tiny.sd15_checkpoint(seed=3)
    return {"dir": d, "sd": sd,
            "sd15": tiny.save(sd, d / "tiny_sd15.safetensors"),
            "mm1": tiny.save(tiny.motion_module(version=1, seed=4), d / "mm_sd_v15.ckpt"),
            "mm2": tiny.save(tiny.motion_module(version=2, seed=4), d / "mm_sd_v15_v2.ckpt")}


def test_built_model_is_initialised_as_the_official_code_does(files):
    model = convert.build_from_sd15(files["sd15"], files["mm1"])
    sd = model.state_dict()
    ldm = files["sd"]
    w = ldm["model.diffusion_model.input_blocks.0.0.weight"]
    assert torch.equal(sd["conv_in.weight"][:, :4], w)                       # SD weights in channels 0-3
    assert torch.equal(sd["conv_in.weight"][:, 4:], torch.zeros_like(sd["conv_in.weight"][:, 4:]))
    for name in ("fps_embedding", "motion_embedding"):                     # zero output layer
        assert sd[f"{name}.linear_2.weight"].abs().max() == 0 and sd[f"{name}.linear_2.bias"].abs().max() == 0
        assert sd[f"{name}.linear_1.weight"].abs().max() > 0
    mm = torch.load(files["mm1"], weights_only=True)
    assert all(torch.equal(sd[k], v) for k, v in mm.items())                # every motion tensor from the file
    assert torch.equal(sd["time_embedding.linear_1.weight"], ldm["model.diffusion_model.time_embed.0.weight"])
    # the built model is deterministic
    again = convert.build_from_sd15(files["sd15"], files["mm1"])
    assert all(torch.equal(a, b) for a, b in zip(sd.values(), again.state_dict().values()))


def test_quirk_sd_conv_in_bias_is_kept(files):
    """Official: the SD conv_in bias is overwritten by the new layer's random init. Kept here, so
    on [z, 0, 0] the widened layer is exactly the SD layer (the fresh bias would shift it)."""
    model = convert.build_from_sd15(files["sd15"], files["mm1"])
    ldm = files["sd"]
    w, b = ldm["model.diffusion_model.input_blocks.0.0.weight"], ldm["model.diffusion_model.input_blocks.0.0.bias"]
    assert torch.equal(model.conv_in.bias, b)
    z = torch.randn(2, 4, 8, 8)
    x = torch.cat([z, torch.zeros(2, 5, 8, 8)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model.conv_in(x), torch.nn.functional.conv2d(z, w, b, padding=1), atol=1e-6, rtol=0)
        fresh = FYCUNet(model.config).conv_in.bias                              # what the official loader keeps
        assert (fresh - b).abs().max() > 1e-3


def test_fps_and_strength_start_without_effect(files):
    """Zero-initialised last layers: before training, fps and strength change nothing."""
    model = convert.build_from_sd15(files["sd15"], files["mm1"])
    with torch.no_grad():
        a = model.embedding(301, 2, 4, batch=1)
        b = model.embedding(301, 8, 0, batch=1)
    assert torch.equal(a, b)


def test_v2_motion_module_fits_the_v1_layout(files):
    m1 = convert.build_from_sd15(files["sd15"], files["mm1"]).state_dict()
    m2 = convert.build_from_sd15(files["sd15"], files["mm2"]).state_dict()
    v2 = torch.load(files["mm2"], weights_only=True)
    assert not any(k.startswith("mid_block.motion_modules") for k in m2)
    pe = [k for k in m2 if k.endswith("pos_encoder.pe")]
    assert pe and all(m2[k].shape[1] == 24 and torch.equal(m2[k], v2[k][:, :24]) for k in pe)
    assert all(torch.equal(m1[k], m2[k]) for k in pe)                        # the same sinusoid as v1's
    assert all(torch.equal(m2[k], v) for k, v in v2.items() if not k.startswith("mid_block") and not k.endswith(".pe"))


def test_fyc_files_round_trip(files):
    model = convert.build_from_sd15(files["sd15"], files["mm1"])
    d = files["dir"]
    st = convert.save_unet(model, d / "fyc.safetensors")
    back = convert.load_unet(st)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    # the official training saves a torch .ckpt, maybe under 'state_dict', with DDP's 'module.' prefixes
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "global_step": 7},
               d / "official.ckpt")
    ck = convert.load_unet(d / "official.ckpt", dtype=torch.bfloat16)
    assert ck.dtype == torch.bfloat16
    assert torch.equal(ck.conv_in.weight, model.conv_in.weight.to(torch.bfloat16))


def test_wrong_files_are_named_and_explained(files):
    d = files["dir"]
    good = convert.build_from_sd15(files["sd15"], files["mm1"]).state_dict()

    def bad(name, sd, match):
        save_file({k: v.clone() for k, v in sd.items()}, str(d / name))
        with pytest.raises(KinemaError, match=match):
            convert.load_unet(d / name)

    with pytest.raises(KinemaError, match="tiny_sd15.safetensors: is a Stable Diffusion single-file checkpoint"):
        convert.load_unet(files["sd15"])
    with pytest.raises(KinemaError, match="mm_sd_v15.ckpt: holds only motion modules"):
        convert.load_unet(files["mm1"])
    bad("four.safetensors", {**good, "conv_in.weight": good["conv_in.weight"][:, :4]}, "four.safetensors: conv_in takes 4")
    bad("missing.safetensors", {k: v for k, v in good.items() if "up_blocks.1.resnets.0.conv1" not in k},
        r"missing.safetensors: does not match the expected layout: 2 missing \(e.g. up_blocks.1.resnets.0.conv1")
    bad("extra.safetensors", {**good, "image_proj_model.proj.weight": torch.zeros(2, 2)},
        r"extra.safetensors: does not match .*1 unexpected \(e.g. image_proj_model")
    bad("shape.safetensors", {**good, "motion_embedding.linear_2.bias": torch.zeros(7)},
        r"1 with other shapes \(e.g. motion_embedding.linear_2.bias: found \(7,\), expected \(128,\)")
    bad("mid.safetensors", {**good, **{k.replace("down_blocks.1", "mid_block"): v for k, v in good.items()
                                       if k.startswith("down_blocks.1.motion_modules.")}}, "mid-block motion module")
    (d / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(KinemaError, match="junk.ckpt.* could not be read: it is neither a torch checkpoint"):
        convert.load_unet(d / "junk.ckpt")
    with pytest.raises(KinemaError, match="nothing.safetensors' in .*: file not found"):
        convert.load_unet(d / "nothing.safetensors")


def test_build_rejects_wrong_inputs(files):
    d = files["dir"]
    with pytest.raises(KinemaError, match="mm_sd_v15.ckpt: not an SD1.5 checkpoint"):
        convert.build_from_sd15(files["mm1"], files["mm1"])
    with pytest.raises(KinemaError, match="tiny_sd15.safetensors: expected an AnimateDiff motion module"):
        convert.build_from_sd15(files["sd15"], files["sd15"])
    big = tiny.save(tiny.motion_module(channels=(64, 128), version=1), d / "mm_other_size.ckpt")
    with pytest.raises(KinemaError, match=r"mm_other_size.ckpt: does not match .*other shapes"):
        convert.build_from_sd15(files["sd15"], big)
    inpaint = dict(files["sd"])
    inpaint["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    p = tiny.save(inpaint, d / "inpainting.safetensors")
    with pytest.raises(KinemaError, match=r"inpainting.safetensors \(UNet\): .*conv_in.weight: found \(32, 9, 3, 3\), expected \(32, 4, 3, 3\)"):
        convert.build_from_sd15(p, files["mm1"])


def test_original_layout_round_trips_through_diffusers_converters(tmp_path):
    """tiny.py writes the original names by inverting diffusers' single-file converters; reading
    the file back with those converters gives every tensor back under its diffusers name."""
    g = torch.Generator().manual_seed(0)
    ucfg = tiny.unet2d_config((32, 64, 64), layers=2, cross_attention_dim=32)
    unet = tiny.randomise(UNet2DConditionModel(**ucfg), g)
    vcfg = dict(sd15._sd15_config("vae"), block_out_channels=[32, 32, 64], layers_per_block=2,
                down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3)
    vae = tiny.randomise(AutoencoderKL(**vcfg), g)
    text = tiny.randomise(CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                        num_attention_heads=1, projection_dim=64)), g)
    sd = {**unet_to_ldm(unet.state_dict(), ucfg), **vae_to_ldm(vae.state_dict()), **text_to_ldm(text.state_dict())}
    path = tiny.save(sd, tmp_path / "roundtrip.safetensors")
    assert convert.sd15_unet_state_dict(path).keys() == unet.state_dict().keys()
    assert all(torch.equal(convert.sd15_unet_state_dict(path)[k], v) for k, v in unet.state_dict().items())
    back = sd15.load_vae(path)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in vae.state_dict().items())
    tb = sd15.load_text_encoder(path)
    ids = torch.randint(0, 49408, (2, 77))
    with torch.no_grad():
        torch.testing.assert_close(tb(ids).last_hidden_state, text(ids).last_hidden_state)
    with pytest.raises(KinemaError, match="mm.ckpt: holds no VAE"):
        sd15.load_vae(tiny.save(tiny.motion_module(), tmp_path / "mm.ckpt"))


def test_real_sized_build_has_the_manifest_layout(fixtures_dir):
    """The SD1.5 + AnimateDiff v1 key sets at real size (meta tensors) give exactly the manifest."""
    import json
    manifest = json.loads((fixtures_dir / "follow_your_click" / "key_manifest.json").read_text())["keys"]
    motion = {k for k in manifest if ".motion_modules." in k}
    new = {k for k in manifest if k.startswith(convert.NEW_KEYS)}
    image = set(manifest) - motion - new
    assert len(motion) == 560 and len(new) == 8 and len(image) == 686
    assert not any(k.startswith("mid_block.motion_modules") for k in manifest)
    cfg = convert.config_from_state_dict({k: torch.empty(manifest[k], device="meta") for k in image}, "sd", pe_len=24)
    assert {k: list(v) for k, v in convert.expected_shapes(cfg).items()} == manifest
