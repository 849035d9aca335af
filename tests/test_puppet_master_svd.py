"""Tiny random Puppet-Master checkpoints in the released layouts, for tests and the demo workflow test."""
from pathlib import Path

import torch
from diffusers import AutoencoderKLTemporalDecoder
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from kinema.pipelines.puppet_master import (
    SVD_CLIP_PREFIX, SVD_VAE_PREFIX, build_unet, model_configs, svd_clip_key_map, svd_vae_key_map,
)


def tiny_models(seed: int = 0):
    cfg = model_configs("tiny")
    torch.manual_seed(seed)
    unet = build_unet(cfg["unet"])
    with torch.no_grad():  # zero-initialised layers get small values so every path matters
        for name, p in unet.named_parameters():
            if (".conv_out." in name and ".flow_convs." in name) or name.endswith("mix_factor"):
                p.add_(torch.randn_like(p) * 0.05)
    vae = AutoencoderKLTemporalDecoder(**cfg["vae"])
    with torch.no_grad():
        c = vae.quant_conv.weight.shape[0]
        vae.quant_conv.weight.copy_(torch.eye(c).reshape(c, c, 1, 1))
        vae.quant_conv.bias.zero_()
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["image_encoder"]))
    return cfg, unet.eval(), vae.eval(), enc.eval()


def svd_single_file_state(vae, enc, cfg) -> dict:
    """The tensors of a single-file SVD checkpoint (sgm/OpenCLIP names) for these modules."""
    out = {}
    vsd = vae.state_dict()
    for dif, ldm in svd_vae_key_map(cfg["vae"]).items():
        v = vsd[dif]
        if ".mid_block.attentions." in dif and dif.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # sgm attention projections are 1x1 convs
        out[SVD_VAE_PREFIX + ldm] = v.clone().contiguous()
    esd = enc.state_dict()
    fused = {}
    for dif, ldm in svd_clip_key_map(cfg["image_encoder"]["num_hidden_layers"]).items():
        base, _, part = ldm.partition("#")
        if part:
            fused.setdefault(base, {})[int(part)] = esd[dif]
        elif dif == "visual_projection.weight":
            out[SVD_CLIP_PREFIX + base] = esd[dif].t().contiguous()
        else:
            out[SVD_CLIP_PREFIX + base] = esd[dif].clone().contiguous()
    for base, parts in fused.items():
        out[SVD_CLIP_PREFIX + base] = torch.cat([parts[0], parts[1], parts[2]], dim=0).contiguous()
    # a real SVD file also holds the diffusion model, which this loader ignores
    out["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 8, 3, 3)
    return out


def write_tiny_checkpoints(models_dir: Path, seed: int = 0):
    """models/kinema/puppet_master/tiny_pm.safetensors and models/checkpoints/tiny_svd.safetensors."""
    cfg, unet, vae, enc = tiny_models(seed)
    pm = Path(models_dir) / "kinema" / "puppet_master"
    ck = Path(models_dir) / "checkpoints"
    pm.mkdir(parents=True, exist_ok=True)
    ck.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(pm / "tiny_pm.safetensors"))
    save_file(svd_single_file_state(vae, enc, cfg), str(ck / "tiny_svd.safetensors"))
    return cfg, unet, vae, enc


# ---------------------------------------------------------------- tests of the single-file conversion
import pytest  # noqa: E402

from kinema.pipelines.puppet_master import convert_svd_clip, convert_svd_vae, load_svd_components  # noqa: E402
from kinema.runtime import KinemaError  # noqa: E402


def test_vae_key_map_uses_sgm_names():
    cfg = model_configs("released")["vae"]
    m = svd_vae_key_map(cfg)
    # spot checks against the names of sgm's VideoDecoder / Encoder
    assert m["decoder.up_blocks.0.resnets.0.temporal_res_block.conv1.weight"] == "decoder.up.3.block.0.time_stack.in_layers.2.weight"
    assert m["decoder.up_blocks.3.resnets.2.time_mixer.mix_factor"] == "decoder.up.0.block.2.mix_factor"
    assert m["decoder.up_blocks.2.resnets.0.spatial_res_block.conv_shortcut.weight"] == "decoder.up.1.block.0.nin_shortcut.weight"
    assert m["decoder.time_conv_out.weight"] == "decoder.conv_out.time_mix_conv.weight"
    assert m["encoder.down_blocks.1.resnets.0.conv_shortcut.bias"] == "encoder.down.1.block.0.nin_shortcut.bias"
    assert m["encoder.mid_block.attentions.0.to_out.0.weight"] == "encoder.mid.attn_1.proj_out.weight"
    assert m["decoder.up_blocks.1.upsamplers.0.conv.weight"] == "decoder.up.2.upsample.conv.weight"
    assert m["encoder.conv_norm_out.weight"] == "encoder.norm_out.weight"
    # every diffusers key but quant_conv has a source
    from diffusers import AutoencoderKLTemporalDecoder as VAE
    with torch.device("meta"):
        keys = set(VAE(**cfg).state_dict())
    assert keys - set(m) == {"quant_conv.weight", "quant_conv.bias"}
    # SVD-size decoder: 2 mid + 4 x 3 up temporal resnets, as in the released checkpoint
    assert sum(k.endswith(".mix_factor") for k in m.values()) == 14


def test_clip_key_map_uses_open_clip_names():
    m = svd_clip_key_map(32)
    assert m["vision_model.encoder.layers.31.self_attn.k_proj.weight"] == "transformer.resblocks.31.attn.in_proj_weight#1"
    assert m["vision_model.pre_layrnorm.bias"] == "ln_pre.bias"
    assert m["visual_projection.weight"] == "proj"


def test_single_file_round_trip(tmp_path):
    cfg, _, vae, enc = tiny_models(3)
    sd = svd_single_file_state(vae, enc, cfg)
    # the sgm autoencoder has no quant_conv: the converter supplies the identity
    assert not any("quant_conv" in k for k in sd)
    path = tmp_path / "svd.safetensors"
    save_file(sd, str(path))
    vae2, enc2 = load_svd_components(path, cfg["vae"], cfg["image_encoder"])
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(vae2.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean, atol=1e-5)
        z = torch.randn(3, 4, 8, 8)
        assert torch.allclose(vae2.decode(z, num_frames=3).sample, vae.decode(z, num_frames=3).sample, atol=1e-5)
        px = torch.randn(1, 3, 28, 28)
        assert torch.allclose(enc2(pixel_values=px).image_embeds, enc(pixel_values=px).image_embeds, atol=1e-5)


def test_wrong_single_file_is_named(tmp_path):
    cfg, _, vae, enc = tiny_models(4)
    sd = svd_single_file_state(vae, enc, cfg)
    with pytest.raises(KinemaError, match="my.safetensors.*not a single-file SVD"):
        convert_svd_vae({k: v for k, v in sd.items() if not k.startswith(SVD_VAE_PREFIX)}, cfg["vae"], "my.safetensors")
    del sd[SVD_CLIP_PREFIX + "ln_post.weight"]
    with pytest.raises(KinemaError, match="ln_post"):
        convert_svd_clip(sd, cfg["image_encoder"], "my.safetensors")
    with pytest.raises(KinemaError, match="VAE"):  # a 512-channel SVD VAE does not fit the tiny config
        convert_svd_vae(sd, model_configs("released")["vae"], "my.safetensors")
