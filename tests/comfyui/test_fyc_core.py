"""Follow-Your-Click as a ComfyUI MODEL: ComfyUI's own sampler with the conditioning node equals
the pack's released DDIM loop (same noise, same timesteps); KSampler keeps the picture outside
the clicked region; the MODEL and the Animate node share one patcher; wrong inputs are named."""
import pytest
import torch

import server_files
from kinema import runtime
from kinema.nodes import follow_your_click as fyc_nodes
from kinema.pipelines.follow_your_click import pipeline as fyc_pipeline
import tiny_follow_your_click as tiny

FYC = "fyc_sd15.safetensors"
SD = "v1-5-pruned-emaonly.safetensors"


@pytest.fixture(scope="module")
def parts(model_files, models_dir):
    import nodes as comfy_nodes
    server_files.link_into(model_files, models_dir)
    _, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(SD)[:3]
    cond = lambda text: comfy_nodes.CLIPTextEncode().encode(clip, text)[0]  # noqa: E731
    return vae, cond("the cat turns its head"), cond("")


def _model():
    (fyc,) = fyc_nodes.KinemaFYCLoader().load(FYC, "fp32")
    # the tiny file is trained two steps only: give the fps and strength terms signal, as if trained
    tiny.randomise(fyc.unet.fps_embedding, torch.Generator().manual_seed(5))
    tiny.randomise(fyc.unet.motion_embedding, torch.Generator().manual_seed(6))
    return fyc


def _picture():
    return torch.rand(1, 48, 80, 3, generator=torch.Generator().manual_seed(3))


def test_ksampler_agrees_with_the_released_ddim(parts):
    """Core KSampler with the ddim sampler and the ddim_uniform scheduler (4 steps: timesteps 751,
    501, 251, 1 - the released 'leading, offset 1' ones) equals pipeline.sample, the released
    v-prediction DDIM with classifier-free guidance, started from KSampler's own noise."""
    import comfy.sample
    import comfy.samplers
    import nodes as comfy_nodes

    vae, pos, neg = parts
    fyc = _model()
    pos_c, neg_c, latent, picture, keep = fyc_nodes.KinemaFYCConditioning().encode(vae, pos, neg, _picture(), 6, 3, 4, 64, 64)
    assert latent["samples"].shape == (4, 4, 8, 8) and picture.shape == (1, 64, 64, 3) and float(keep.max()) == 0
    z = vae.encode(picture).float()[:1] * 0.18215
    concat = pos_c[0][1]["fyc_concat"]
    assert torch.equal(concat[0, 1:], z[0]) and float(concat[1:, 1:].abs().max()) == 0     # C on frame 0 only
    assert concat[0, 0].eq(1).all() and float(concat[1:, 0].abs().max()) == 0             # no mask: M = frame 0
    assert neg_c[0][1]["fyc_concat"] is concat                                             # both halves: M and C

    (model,) = fyc_nodes.KinemaFYCModel().convert(fyc)
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "ddim_uniform", 4)
    assert sampling.timestep(sigmas[:-1]).tolist() == [751, 501, 251, 1] and float(sigmas[-1]) == 0
    (out,) = comfy_nodes.common_ksampler(model, 21, 4, 5.0, "ddim", "ddim_uniform", pos_c, neg_c, latent)
    got = out["samples"] * 0.18215                                   # ComfyUI's latents are in the VAE's scale

    # KSampler's x_T is noise * s0 in ComfyUI's variables: noise * s0 / sqrt(1 + s0^2) in DDIM's
    s0 = float(sigmas[0])
    start = comfy.sample.prepare_noise(latent["samples"], 21) * (s0 / (1 + s0 * s0) ** 0.5)
    opts = fyc_pipeline.FYCOptions(frames=4, width=64, height=64, steps=4, cfg=5.0, fps=3, strength=6)
    want = fyc_pipeline.sample(fyc, z, pos[0][0], neg[0][0], opts, noise=start.transpose(0, 1)[None])[0].transpose(0, 1)
    # float32 throughout: what differs is the order of operations (DDIM's alpha form, ComfyUI's sigma
    # form) on latents of size ~1
    err = float((got - want).abs().max())
    print(f"KSampler vs released DDIM: max abs difference {err:.2e}, latent max {float(want.abs().max()):.2f}")
    assert err < 1e-5 * float(want.abs().max()), err      # measured 9e-7 of the latent's scale
    assert float((want[1:] - want[:1]).abs().max()) > 1e-2                             # the frames differ


def test_ksampler_keeps_the_picture_outside_the_region(parts):
    """Core KSampler (ddim, ddim_uniform) with the conditioning's latent and noise mask, decoded by
    core VAE Decode and pasted with core ImageCompositeMasked and the 'keep' mask: outside the
    region every frame is the picture, bit for bit; inside, the frames move."""
    import nodes as comfy_nodes
    from comfy_extras.nodes_mask import ImageCompositeMasked

    vae, pos, neg = parts
    fyc = _model()
    mask = torch.zeros(1, 48, 80)
    mask[:, 8:40, 24:56] = 1.0
    pos_c, neg_c, latent, picture, keep = fyc_nodes.KinemaFYCConditioning().encode(vae, pos, neg, _picture(), 4, 2, 4, 64, 64,
                                                                          mask=mask)
    inside = pos_c[0][1]["fyc_concat"][:, 0]
    assert inside.shape == (4, 8, 8) and torch.equal(inside[0], inside[3]) and 0 < float(inside.mean()) < 1
    (model,) = fyc_nodes.KinemaFYCModel().convert(fyc)
    (out,) = comfy_nodes.common_ksampler(model, 5, 2, 7.5, "ddim", "ddim_uniform", pos_c, neg_c, latent)
    outside_cells = latent["noise_mask"][0, 0] == 0
    assert bool(outside_cells.any())
    # the picture's latent (up to ComfyUI's scaling in and out of the model's latent space)
    assert torch.allclose(out["samples"][:, :, outside_cells], latent["samples"][:, :, outside_cells], atol=1e-6)
    (frames,) = comfy_nodes.VAEDecode().decode(vae, out)
    (pasted,) = ImageCompositeMasked().composite(frames.clone(), picture, 0, 0, False, keep)
    outside = keep[0] == 1
    assert bool(outside.any())
    assert torch.equal(pasted[:, outside], picture[0, outside].expand(4, -1, -1))
    assert float((pasted[1:] - pasted[:1])[:, keep[0] < 0.5].abs().max()) > 1e-3


def test_one_patcher_for_both_routes(parts):
    """The MODEL's patcher is what the Animate node loads: one entry in ComfyUI's loaded list."""
    vae, pos, neg = parts
    (fyc,) = fyc_nodes.KinemaFYCLoader().load(FYC, "fp32")
    (model,) = fyc_nodes.KinemaFYCModel().convert(fyc)
    assert fyc_nodes.KinemaFYCModel().convert(fyc)[0] is model and fyc.managed()[0] is model
    fyc_nodes.KinemaFYCAnimate().run(fyc, vae, pos, neg, _picture(), 4, 2, 2, 64, 64, 1, 1.0, 0)
    assert runtime.loaded_model_names().count(fyc.name) == 1


def test_wrong_inputs_are_named(parts):
    import nodes as comfy_nodes

    vae, pos, neg = parts
    fyc = _model()
    (model,) = fyc_nodes.KinemaFYCModel().convert(fyc)
    empty = {"samples": torch.zeros(4, 4, 8, 8)}
    with pytest.raises(ValueError, match="make it with 'Follow-Your-Click conditioning'"):
        comfy_nodes.common_ksampler(model, 0, 1, 1.0, "ddim", "ddim_uniform", pos, neg, empty)
    pos_c, neg_c, _, _, _ = fyc_nodes.KinemaFYCConditioning().encode(vae, pos, neg, _picture(), 4, 2, 4, 64, 64)
    with pytest.raises(ValueError, match="latent batch: 6 frames is not a whole number of 4-frame videos"):
        comfy_nodes.common_ksampler(model, 0, 1, 1.0, "ddim", "ddim_uniform", pos_c, neg_c,
                                    {"samples": torch.zeros(6, 4, 8, 8)})
    with pytest.raises(ValueError, match="fyc_model: expected a model from Load Follow-Your-Click Model"):
        fyc_nodes.KinemaFYCModel().convert(model)
    with pytest.raises(ValueError, match="frames: 30"):
        fyc_nodes.KinemaFYCConditioning().encode(vae, pos, neg, _picture(), 4, 2, 30, 64, 64)
    with pytest.raises(ValueError, match="width: 100 must be a multiple of 8"):
        fyc_nodes.KinemaFYCConditioning().encode(vae, pos, neg, _picture(), 4, 2, 4, 100, 64)
    with pytest.raises(ValueError, match="mask: the mask is empty"):
        fyc_nodes.KinemaFYCConditioning().encode(vae, pos, neg, _picture(), 4, 2, 4, 64, 64, mask=torch.zeros(1, 48, 80))
    with pytest.raises(ValueError, match="positive: expected a CONDITIONING"):
        fyc_nodes.KinemaFYCConditioning().encode(vae, [], neg, _picture(), 4, 2, 4, 64, 64)
