"""Splitting an SD1.5 single-file checkpoint (pipelines/sd_checkpoint.py), checked against
checkpoints written in the original layout by the tests' own writer (tests/ldm_layout.py)."""
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

import tiny_follow_your_click as tiny
from kinema.pipelines import sd_checkpoint
from kinema.pipelines.follow_your_click import sd15
from kinema.runtime import KinemaError
from ldm_layout import text_to_ldm, unet_to_ldm, vae_to_ldm


def _parts(levels: int, layers: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ucfg = tiny.unet2d_config((32, 64, 64)[:levels], layers=layers, cross_attention_dim=32)
    unet = tiny.randomise(UNet2DConditionModel(**ucfg), g)
    vcfg = dict(sd15._sd15_config("vae"), block_out_channels=[32, 32, 64][:levels], layers_per_block=layers,
                down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels)
    vae = tiny.randomise(AutoencoderKL(**vcfg), g)
    text = tiny.randomise(CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                        num_attention_heads=1, projection_dim=32)), g)
    sd = {**unet_to_ldm(unet.state_dict(), ucfg), **vae_to_ldm(vae.state_dict()), **text_to_ldm(text.state_dict())}
    return sd, unet, vae, vcfg, text


@pytest.mark.parametrize("levels, layers", [(2, 1), (3, 2)])
def test_split_gives_every_part_back_under_its_diffusers_name(levels, layers):
    sd, unet, vae, vcfg, text = _parts(levels, layers)
    assert sd_checkpoint.ldm_layers_per_block(sd) == layers
    u, v, t = sd_checkpoint.split(sd, vcfg, "sd.safetensors")
    for got, module in ((u, unet), (v, vae)):
        want = module.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    want = {k: x for k, x in text.state_dict().items() if not k.endswith("position_ids")}
    assert sd_checkpoint.clip_text_layout(t, text).keys() == want.keys()


def test_other_layouts_and_unused_weights():
    sd, unet, _, vcfg, _ = _parts(2, 1)
    # a diffusers-layout UNet file: the UNet as it is (motion modules left out), no VAE or text
    diffusers_file = {**unet.state_dict(), "down_blocks.0.motion_modules.0.x.weight": torch.zeros(1)}
    u, v, t = sd_checkpoint.split(diffusers_file, vcfg)
    assert u.keys() == unet.state_dict().keys() and v == {} and t == {}
    with pytest.raises(KinemaError, match=r"^junk.ckpt: not an SD1.5 checkpoint \(no 'model.diffusion_model.\*'"):
        sd_checkpoint.split({"foo.weight": torch.zeros(1)}, vcfg, "junk.ckpt")
    # a weight the converter would drop is named, not ignored
    with pytest.raises(KinemaError, match=r"^x.ckpt \(UNet\): .* of which only \d+ map to the diffusers UNet"):
        sd_checkpoint.unet_state_dict({**sd, "model.diffusion_model.extra.weight": torch.zeros(1)}, "x.ckpt")
    with pytest.raises(KinemaError, match=r"^x.ckpt \(VAE\): .* of which only \d+ map to the diffusers VAE"):
        sd_checkpoint.vae_state_dict({**sd, "first_stage_model.encoder.extra.weight": torch.zeros(1)}, vcfg, "x.ckpt")


def test_released_vae_attention_convolutions_become_linears():
    sd, _, vae, vcfg, _ = _parts(2, 1)
    conv = {k: x for k, x in sd.items() if k.startswith("first_stage_model.")}
    assert conv["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4      # as the released files hold it
    got = sd_checkpoint.vae_state_dict(conv, vcfg)
    assert torch.equal(got["decoder.mid_block.attentions.0.to_q.weight"],
                       vae.state_dict()["decoder.mid_block.attentions.0.to_q.weight"])
