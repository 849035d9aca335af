"""Motion-I2V on ComfyUI's own SD1.5 model: the motion modules injected into ComfyUI's UNet and
sampled by ComfyUI's sampler agree with the reference (the released code's structure: the
SD1.5 file converted to diffusers, the 3D UNet with motion modules, diffusers' DDIM)."""
import math

import pytest
import torch

import nodes as comfy_nodes
import tiny_models
import tiny_motion_i2v
from kinema import runtime
from kinema.kernels.field import MotionField
from kinema.nodes import motion_i2v as mnodes
from kinema.pipelines.ddim import ddim_sigmas
from kinema.pipelines.motion_i2v import build, native
from kinema.pipelines.motion_i2v.loading import load_config
from kinema.pipelines.motion_i2v.pipeline import render_video

F, H, W = 6, 32, 48


@pytest.fixture(scope="module")
def motion_file(sd15_core, models_dir):
    model = sd15_core[0]
    return tiny_models.motion_block(models_dir / "kinema" / "motion_i2v" / "motion_block.safetensors",
                                    model.get_model_object("diffusion_model"))


@pytest.fixture(scope="module")
def conds(sd15_core):
    clip = sd15_core[1]
    enc = comfy_nodes.CLIPTextEncode()
    return enc.encode(clip, "a boat on a lake")[0], enc.encode(clip, "blurry")[0]


def _scene():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(H, W, 3, generator=g)
    flow = torch.zeros(F, H, W, 2)
    for k in range(F):
        flow[k, :, :24, 0] = 1.5 * k       # the left half drifts right
    static = torch.zeros(H, W)
    static[:, 32:] = 1.0                   # the right third stays
    return image, MotionField(flow), static


def test_render_loader_injects_and_ejects(sd15_core, motion_file):
    model = sd15_core[0]
    (render,) = mnodes.KinemaMotionI2VRenderLoader().load(model, motion_file.name, "none")
    unet = model.get_model_object("diffusion_model")
    count = lambda: sum(isinstance(m, native.MotionModule) for m in unet.modules())  # noqa: E731
    assert count() == 0 and render is not model
    runtime.load_models(render)
    assert count() == len(native.unet_places(unet)) == 7  # 2 down, 1 mid, 4 up in the tiny UNet
    assert "Motion-I2V motion modules" in runtime.loaded_model_names()
    runtime.load_models(model)          # loading another clone of the same model takes them out
    assert count() == 0
    with pytest.raises(runtime.KinemaError, match="motion_modules"):
        native.build_motion_modules(unet, [("bad.bin", {"conv_in.weight": torch.zeros(1)})])


def test_render_matches_reference(sd15_core, conds, motion_file, models_dir, tiny_sd15):
    model, _clip, vae = sd15_core
    positive, negative = conds
    image, motion, static = _scene()
    (render,) = mnodes.KinemaMotionI2VRenderLoader().load(model, motion_file.name, "none")
    got, latents = native.render_video_comfy(render, vae, positive, negative, image, motion, static, steps=4,
                                             guidance=3.0, seed=5)
    assert got.shape == (F, H, W, 3)

    # the reference, fed what ComfyUI's sampler starts from: the image latent (the VAE mean),
    # the same noise, and ComfyUI's masked start (image latent + sigma_T * noise)
    ref = build.load_reference_render_model(models_dir / "checkpoints" / tiny_sd15, [motion_file], "fp32")
    z = vae.encode(image[None]).float()
    noise = torch.randn((1, 4, F, H // 8, W // 8), generator=torch.Generator().manual_seed(5))
    s0 = float(ddim_sigmas(render.get_model_object("model_sampling").sigmas, 4, load_config("scheduler"))[0])
    start = ((z * 0.18215)[:, :, None] + s0 * noise) / math.sqrt(1 + s0 * s0)
    want = render_video(ref, image, motion, static, cond=positive[0][0], uncond=negative[0][0], steps=4,
                        guidance=3.0, image_latent=z, latents=start, noise=noise)
    # same weights, two implementations in float32 (ComfyUI's UNet with injected modules and
    # its sampler; diffusers' blocks and DDIM): equal to rounding
    assert (got - want.frames).abs().max() < 2e-3
    assert (latents - want.latents[0].transpose(0, 1) / 0.18215).abs().max() < 2e-3
    # frame 0 and the still third (latent columns 4-5) are the picture's latent in every frame;
    # the rest moves
    assert (latents[0] - z[0]).abs().max() < 1e-6
    assert (latents[:, :, :, 4:] - z[:, :, :, 4:]).abs().max() < 1e-6
    assert (latents[1:, :, :, :3] - z[:, :, :, :3]).abs().max() > 1e-2


def test_render_builds_each_splat_once_and_releases_it(sd15_core, conds, motion_file, monkeypatch):
    """On ComfyUI's UNet the motion modules find the run's splat cache in the options: each
    token grid's splat is built once for all modules and steps, and the cache is emptied when
    the run ends."""
    model, _clip, vae = sd15_core
    positive, negative = conds
    image, motion, static = _scene()
    runs, built = tiny_motion_i2v.record_splats(monkeypatch, native)
    (render,) = mnodes.KinemaMotionI2VRenderLoader().load(model, motion_file.name, "none")
    native.render_video_comfy(render, vae, positive, negative, image, motion, static, steps=3, guidance=2.0, seed=1)
    assert len(runs) == 1 and len(runs[0]) == 0          # one cache for the run, empty afterwards
    assert len(built) == len(set(built)) == 2            # the tiny UNet's two grids, once each
    assert set(built) == {(H // 8, W // 8), (H // 16, W // 16)}


def test_render_node(sd15_core, conds, motion_file):
    model, _clip, vae = sd15_core
    positive, negative = conds
    image, motion, _ = _scene()
    (render,) = mnodes.KinemaMotionI2VRenderLoader().load(model, motion_file.name, "none")
    node = mnodes.KinemaMotionI2VRender()
    frames, latent = node.render(render, vae, positive, negative, image[None], motion, 2, 2.0, 3, True)
    assert frames.shape == (F, H, W, 3) and latent["samples"].shape == (F, 4, H // 8, W // 8)
    with pytest.raises(ValueError, match="at most 16"):
        node.render(render, vae, positive, negative, image[None], MotionField(torch.zeros(17, H, W, 2)), 2, 2.0, 3,
                    True)


def test_render_node_keeps_the_still_region_the_picture(sd15_core, conds, motion_file):
    """With a brush, the render node's frames are the picture itself (not its VAE round trip)
    wherever the brush leaves the picture still, every frame; inside the brushed region they move."""
    model, _clip, vae = sd15_core
    positive, negative = conds
    image, motion, static = _scene()
    (render,) = mnodes.KinemaMotionI2VRenderLoader().load(model, motion_file.name, "none")
    node = mnodes.KinemaMotionI2VRender()
    brush = (1 - static)[None]
    frames, _ = node.render(render, vae, positive, negative, image[None], motion, 2, 2.0, 3, True, brush=brush)
    still = static == 1
    assert torch.equal(frames[:, still], image[still].expand(F, -1, -1))
    # the VAE alone is far from the picture there (what the paste corrects), and the moving half moves
    with torch.no_grad():
        decoded = vae.decode(vae.encode(image[None]).float()).float().reshape(H, W, 3)
    assert float((decoded[still] - image[still]).abs().max()) > 1 / 255
    assert float((frames[1:, :, :24] - frames[:1, :, :24]).abs().max()) > 1e-3
    # a 4-pixel feather (1/64 of 32 px, at least 1) inside the brushed edge: column 31 is blended
    assert float((frames[:, :, :31] - image[None, :, :31]).abs().max()) > 0


def test_ksampler_route_pastes_with_core_image_composite(sd15_core, conds, motion_file):
    """KSampler + VAE Decode + core ImageCompositeMasked with the conditioning's picture and keep:
    the still region is the picture bit for bit; nothing held still gives an all-0 keep."""
    from comfy_extras.nodes_mask import ImageCompositeMasked

    model, _clip, vae = sd15_core
    positive, negative = conds
    image, motion, static = _scene()
    (render,) = mnodes.KinemaMotionI2VRenderLoader().load(model, motion_file.name, "none")
    cond = mnodes.KinemaMotionI2VMotionConditioning()
    m, latent, picture, keep = cond.apply(render, vae, image[None], motion, True, (1 - static)[None])
    assert picture.shape == (1, H, W, 3) and keep.shape == (1, H, W)
    assert torch.equal(keep[0][static == 1], torch.ones(int(static.sum())))
    assert float(keep[0][static == 0].max()) < 1 and float(keep[0, :, :20].max()) < 1e-6  # deep inside: moves
    (out,) = comfy_nodes.common_ksampler(m, 4, 2, 2.0, "euler", "ddim_uniform", positive, negative, latent)
    (frames,) = comfy_nodes.VAEDecode().decode(vae, out)
    (pasted,) = ImageCompositeMasked().composite(frames.clone(), picture, 0, 0, False, keep)
    still = static == 1
    assert torch.equal(pasted[:, still], picture[0, still].expand(F, -1, -1))
    _m, _l, _p, none_kept = cond.apply(render, vae, image[None], motion, False, None)
    assert torch.equal(none_kept, torch.zeros(1, H, W))


def test_predict_node_with_comfy_vae_and_conditioning(sd15_core, conds, tmp_path):
    import tiny_motion_i2v as tiny
    from kinema.pipelines.motion_i2v import pipeline
    _model, _clip, vae = sd15_core
    positive, negative = conds
    fm = tiny.flow_model(0, text=False)
    files = tiny.save_flow_files(fm, tmp_path)
    flow_model = build.load_flow_model(files["flow_unet"], files["controlnet"], files["flow_vae"], "fp32")
    # the tiny flow network attends to 32-wide text: stand in a matching conditioning
    pos = [[torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1)), {}]]
    neg = [[torch.zeros(1, 77, 32), {}]]
    image = torch.rand(1, 32, 48, 3, generator=torch.Generator().manual_seed(2))
    brush = torch.zeros(1, 32, 48)
    brush[:, :, 24:] = 1
    node = mnodes.KinemaMotionI2VPredictMotion()
    (field,) = node.predict(flow_model, vae, pos, neg, image, '[[[30, 10], [40, 20]]]', 48, 32, 4, 2, 2.0, 1.0,
                            7, brush=brush)
    assert isinstance(field, MotionField) and field.flow.shape == (16, 32, 48, 2)
    assert field.flow[:, :, :24].abs().max() == 0 and field.flow[:, :, 24:].abs().max() > 0
    # the picture reaches the predictor as the released code encodes it: in [0, 1], through the VAE
    x = image.clone()
    latent = vae.encode((x + 1) / 2).float()
    ref = pipeline.predict_motion(flow_model, image[0], *_sparse(), static=1 - brush[0], cond=pos[0][0],
                                  uncond=neg[0][0], image_latent=latent, steps=2, guidance=2.0, seed=7)
    assert torch.allclose(ref.flow, field.flow, atol=1e-5)


def _sparse():
    from kinema.kernels.motion_attention import rasterise_tracks_motion_i2v
    return rasterise_tracks_motion_i2v([torch.tensor([[30.0, 10.0], [40.0, 20.0]])], 32, 48, 4, 16)


def test_ksampler_route_agrees_with_the_reference(sd15_core, conds, motion_file, models_dir, tiny_sd15):
    """'Motion-I2V motion conditioning' + core KSampler (euler, ddim_uniform: the released DDIM
    timesteps for 4 steps, 1 251 501 751, ending at 0) equals the reference loop fed ComfyUI's
    noise (KSampler's seed) and ComfyUI's masked start."""
    model, _clip, vae = sd15_core
    positive, negative = conds
    image, motion, static = _scene()
    (render,) = mnodes.KinemaMotionI2VRenderLoader().load(model, motion_file.name, "none")
    brush = (1 - static)[None]
    m, latent, _picture, _keep = mnodes.KinemaMotionI2VMotionConditioning().apply(render, vae, image[None], motion,
                                                                                  True, brush)
    assert latent["samples"].shape == (F, 4, H // 8, W // 8) and latent["noise_mask"][0].max() == 0
    (out,) = comfy_nodes.common_ksampler(m, 9, 4, 3.0, "euler", "ddim_uniform", positive, negative, latent)
    got = out["samples"]

    ref = build.load_reference_render_model(models_dir / "checkpoints" / tiny_sd15, [motion_file], "fp32")
    z = vae.encode(image[None]).float()
    torch.manual_seed(9)  # ComfyUI's noise for seed 9: one draw for the (F, 4, h, w) latent
    noise = torch.randn(F, 4, H // 8, W // 8).transpose(0, 1)[None]
    s0 = float(m.get_model_object("model_sampling").sigmas[751])
    start = ((z * 0.18215)[:, :, None] + s0 * noise) / math.sqrt(1 + s0 * s0)
    want = render_video(ref, image, motion, static, cond=positive[0][0], uncond=negative[0][0], steps=4,
                        guidance=3.0, image_latent=z, latents=start, noise=noise)
    assert (got - want.latents[0].transpose(0, 1) / 0.18215).abs().max() < 2e-3
