"""Puppet-Master with ComfyUI's own SVD VAE and CLIP image encoder (its classes, random
weights): the loader manages the UNet, the animate node runs the released sampler on top."""
import pytest
import torch
from safetensors.torch import save_file

import comfy.sd
import tiny_models
import tiny_puppet_master
from kinema import runtime
from kinema.nodes import puppet_master as pm_nodes
from kinema.pipelines.puppet_master import ComfyCodec

VIT = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
       "image_size": 224, "patch_size": 14, "projection_dim": 32, "hidden_act": "quick_gelu",
       "layer_norm_eps": 1e-5, "num_channels": 3}


@pytest.fixture(scope="module")
def svd_parts():
    vae = comfy.sd.VAE(sd={k: v.detach() for k, v in tiny_models.svd_vae_module().state_dict().items()})
    return vae, tiny_models.clip_vision(VIT)


@pytest.fixture(scope="module")
def unet_file(models_dir):
    path = models_dir / "kinema" / "puppet_master" / "tiny_pm.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tiny_puppet_master.unet(0).state_dict().items()}, str(path))
    return path.name


def _inputs():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 48, 64, 3, generator=g)
    mask = torch.zeros(1, 48, 64)
    mask[:, 8:40, 12:44] = 1
    tracks = '{"tracks": [[{"x": 20, "y": 20}, {"x": 30, "y": 25}]], "anchors": [{"x": 36, "y": 30}]}'
    return img, mask, tracks


def test_codec_uses_comfy_objects(svd_parts):
    vae, cv = svd_parts
    codec = ComfyCodec(vae, cv)
    crop = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(1))
    latent, embed = codec.encode(crop)
    assert latent.shape == (1, 4, 8, 8) and embed.shape == (1, 1, 32)
    assert torch.allclose(latent, vae.encode(crop[None]).float())  # the VAE mean, unscaled
    frames = codec.decode(torch.randn(1, 3, 4, 8, 8) * 0.18215)
    assert frames.shape == (3, 64, 64, 3) and 0 <= float(frames.min()) <= float(frames.max()) <= 1
    with pytest.raises(ValueError, match="clip_vision: connect"):
        ComfyCodec(vae, None)


def test_animate_node_with_comfy_parts(svd_parts, unet_file):
    vae, cv = svd_parts
    (pm,) = pm_nodes.KinemaPuppetMasterLoader().load(unet_file, "fp32")
    img, mask, tracks = _inputs()
    node = pm_nodes.KinemaPuppetMasterAnimate()
    out = node.animate(pm, vae, cv, img, tracks, 2, 3.0, 7, paste_back=True, mask=mask)
    frames = out["result"][0]
    assert frames.shape == (14, 48, 64, 3)
    assert torch.equal(frames[:, 0, 0], img[0, 0, 0].expand(14, 3))  # outside the subject crop: the picture
    assert "Puppet-Master UNet" in runtime.loaded_model_names()
    again = node.animate(pm, vae, cv, img, tracks, 2, 3.0, 7, paste_back=True, mask=mask)["result"][0]
    assert torch.equal(frames, again)


def test_native_route_agrees_with_the_released_sampler(svd_parts, unet_file):
    """Puppet-Master as a MODEL, sampled by ComfyUI's KSampler (euler, karras) behind core
    VideoLinearCFGGuidance, equals the pack's EDM Euler loop with per-frame guidance: same noise
    (ComfyUI's seed), same sigmas, same v-prediction maths."""
    from comfy_extras.nodes_video_model import VideoLinearCFGGuidance

    import nodes as comfy_nodes
    from kinema.pipelines import puppet_master as P

    vae, cv = svd_parts
    (pm,) = pm_nodes.KinemaPuppetMasterLoader().load(unet_file, "fp32")
    img, mask, tracks = _inputs()
    pos, neg, latent, crop = pm_nodes.KinemaPuppetMasterConditioning().encode(pm, vae, cv, img, tracks, mask,
                                                                              crop_size=64)
    assert crop.shape == (1, 64, 64, 3) and latent["samples"].shape == (14, 4, 8, 8)
    (model,) = pm_nodes.KinemaPuppetMasterModel().convert(pm)
    (guided,) = VideoLinearCFGGuidance().patch(model, 1.0)
    (out,) = comfy_nodes.common_ksampler(guided, 11, 3, 4.0, "euler", "karras", pos, neg, latent)
    got = out["samples"] * 0.18215                       # ComfyUI's latents are in the VAE's scale

    codec = P.ComfyCodec(vae, cv)
    lat, emb = codec.encode(crop[0])
    drags, valid = pos[0][1]["pm_drags"][None], pos[0][1]["pm_valid"][None].bool()
    want = P.denoise(pm.unet, lat, emb, drags, 3, 4.0, torch.Generator().manual_seed(11), pm.sampler, valid,
                     progress=False)[0]
    # float32 throughout; the start is noise x 700 (sigma_max), whose rounding in two orders of
    # operations carries through to about 1e-4 on latents of size ~1
    assert (got - want).abs().max() < 5e-4, (got - want).abs().max()
    assert (want[-1] - want[0]).abs().max() > 1e-3       # the frames differ (the drags move)
