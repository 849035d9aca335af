"""DynamiCrafter sampled by ComfyUI's own samplers (the native route) agrees with the pack's
reference sampler (pipelines/dynamicrafter: the released DDIM, schedule, guidance and dynamic
rescale, temporal windows), on tiny random checkpoints of each variant.

Both sides get the same conditioning tensors (the native route's), the same starting noise and,
for eta > 0, the same per-step noise; what differs is the implementation: ComfyUI's model
wrapper, CFG, post-CFG patch and sigma table in its variables (x = x_vp * sqrt(1 + sigma^2))
against the reference in the released variance-preserving ones.
"""
import dataclasses

import pytest
import torch

import comfy.sample
import comfy.samplers
import comfy_extras.nodes_custom_sampler as cs
import nodes as comfy_nodes
import tiny_dynamicrafter
from kinema import runtime
from kinema.nodes import dynamicrafter as dn
from kinema.pipelines.dynamicrafter import convert as C
from kinema.pipelines.dynamicrafter import native
from kinema.pipelines.dynamicrafter.model import LATENT_SCALE
from kinema.pipelines.dynamicrafter.pipeline import _Denoiser
from kinema.pipelines.dynamicrafter.sampler import DDIMSampler, DiffusionSchedule

H, W = 32, 48          # latent 4 x 6; the tiny UNet's size step is 16 px
PROMPT, NEGATIVE = "a cat turns its head", "blurry"


@pytest.fixture(scope="module")
def models():
    return {v: C.convert(tiny_dynamicrafter.checkpoint(v, seed=3), f"tiny_{v}.ckpt") for v in ("256", "512", "1024")}


def test_comfyui_schedule_is_the_released_one(models):
    """The MODEL's sigma table (ComfyUI's zero-SNR rescale, in its own code) against the pack's
    float64 schedule (the released code's): alphas_cumprod agree within 1.2e-7 relative for
    t < 999 (measured 1.15e-7 zero-SNR, 9.6e-8 for 256: float32 storage); at t = 999 ComfyUI
    holds 4.9e-8 where the released zero-SNR schedule has 0."""
    for variant in ("512", "256"):
        ms = native.comfy_model(models[variant]).get_model_object("model_sampling")
        ref = DiffusionSchedule(models[variant].schedule_config()).alphas_cumprod64
        ac = 1.0 / (1.0 + ms.sigmas.double() ** 2)
        assert ((ac[:999] - ref[:999]).abs() / ref[:999]).max() < 2e-7
        if variant == "512":
            assert float(ref[999]) == 0.0 and 4e-8 < float(ac[999]) < 6e-8
        else:
            assert abs(float(ac[999] / ref[999]) - 1) < 2e-7


def _image(seed, h=40, w=56):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _noise(frames, seed=7):
    """Standard normal starting noise (frames, 4, h, w) - the released x_T, frame-major."""
    return torch.randn(1, 4, frames, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))[0].transpose(0, 1)


class _Noise:
    """A NOISE for SamplerCustomAdvanced that hands over a given tensor."""

    def __init__(self, noise, seed=0):
        self.noise, self.seed = noise, seed

    def generate_noise(self, latent):
        return self.noise.clone()


def _recording_sampler(record, **options):
    """The DynamiCrafter DDIM SAMPLER, recording each step's latent in the released variables."""
    def fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **kw):
        def cb(d):
            s_next = float(sigmas[d["i"] + 1])
            record.append((d["x"] / (1.0 + s_next ** 2) ** 0.5).float().cpu())
            if callback is not None:
                callback(d)
        return native.sample_ddim(model, x, sigmas, extra_args, cb, disable, **kw)
    return runtime.comfy_sampler(fn, **options)


def _reference(model, positive, negative, x_t, steps, cfg, eta, schedule=None, noises=None, comfy_last=None):
    """The pack's sampler on the native route's conditioning: per-step latents and pred_x0.
    ``comfy_last``: alphas_cumprod at t = 999 as ComfyUI's zero-SNR table has it (4.9e-8 for
    the released 0)."""
    info = positive[0][1][native.KEY]
    sched = schedule or model.schedule_config()
    ds = DiffusionSchedule(sched)
    if comfy_last is not None:
        ds.alphas_cumprod[-1] = comfy_last
        ds.sqrt_alphas_cumprod[-1] = comfy_last ** 0.5
        ds.sqrt_one_minus_alphas_cumprod[-1] = (1 - comfy_last) ** 0.5
    sampler = DDIMSampler(ds, steps=steps, eta=eta)
    concat = (info["concat"] * LATENT_SCALE).transpose(0, 1)[None]
    fs = torch.tensor([info["fs"]])
    den = _Denoiser(model, concat, positive[0][0], negative[0][0] if cfg != 1.0 else None, fs, info["window_overlap"])
    xs, x0s = [], []
    noise_fn = (lambda i: noises[len(noises) - 1 - i]) if noises is not None else None

    def record(i, d):
        xs.append(d["x"][0].transpose(0, 1))
        x0s.append(d["pred_x0"][0].transpose(0, 1))

    sampler.sample(den, x_t, cfg=cfg, guidance_rescale=sched.guidance_rescale, noise_fn=noise_fn, callback=record)
    return xs, x0s


def _native(model, positive, negative, latent, steps, cfg, eta, noise, **sampler_options):
    clone = native.comfy_model(model)
    record = []
    guider = cs.CFGGuider().get_guider(clone, positive, negative, cfg)[0]
    sigmas = native.sigmas_for(clone, steps)
    if not runtime.starts_from_max_noise(clone, float(sigmas[0])):
        # released DDIM starts from x_T ~ N(0, 1) in its own variables whatever the first timestep
        noise = noise * (1 + float(sigmas[0]) ** 2) ** 0.5 / float(sigmas[0])
    out, _ = cs.SamplerCustomAdvanced().sample(_Noise(noise), guider,
                                               _recording_sampler(record, eta=eta, **sampler_options), sigmas, latent)
    return out["samples"] * LATENT_SCALE, record


def _comfy_last(model, variant):
    """alphas_cumprod at t = 999 in ComfyUI's table for a zero-SNR variant (None for 256)."""
    if variant == "256":
        return None
    sigma_max = native.comfy_model(model).get_model_object("model_sampling").sigmas[-1].double()
    return float(1.0 / (1.0 + sigma_max ** 2))


def _max_rel(a_list, b_list):
    scale = max(float(b.abs().max()) for b in b_list)
    return max(float((a - b).abs().max()) for a, b in zip(a_list, b_list)) / scale


CASES = {  # variant, frames, interpolate
    "512": ("512", 4, False),
    "256": ("256", 4, False),
    "1024-windows": ("1024", 7, False),     # the tiny model's windows are 4 frames: 4 windows, 3 shared frames
    "512-interp": ("512", 5, True),
}


@pytest.mark.parametrize("case", CASES)
def test_ddim_eta0_matches_reference(models, case):
    """SamplerCustomAdvanced with 'DynamiCrafter DDIM' (eta 0) and 'DynamiCrafter Sigmas' follows
    the pack's sampler step by step: guidance, guidance rescale over the whole video, dynamic
    rescale, fs, the concat latent, temporal windows, interpolation keyframes.

    The reference runs on ComfyUI's sigma table: the same as the released one to float32
    rounding except alphas_cumprod[999], 4.9e-8 for the released 0 (see the next test for what
    that changes). Then both agree to float32 rounding of two orders of evaluation: measured
    <= 3.6e-6 on latents up to 5.4 (8e-7 relative); the bound is 1e-5 relative."""
    variant, frames, interp = CASES[case]
    model = models[variant]
    positive, negative, latent = native.conditioning(
        model, _image(1), PROMPT, NEGATIVE, frames, 0, W, H, end_image=_image(2) if interp else None)
    steps, cfg = 5, 6.0
    got, steps_got = _native(model, positive, negative, latent, steps, cfg, 0.0, _noise(frames))
    xs, x0s = _reference(model, positive, negative, _noise(frames).transpose(0, 1)[None], steps, cfg, 0.0,
                         comfy_last=_comfy_last(model, variant))
    # every step but the last lands where the reference's does; the last goes to sigma 0, i.e.
    # the reference's last x0 (the released sampler stops at alphas_cumprod[0] instead)
    assert _max_rel(steps_got, xs[:-1]) < 1e-5
    assert _max_rel([got], [x0s[-1]]) < 1e-5
    assert got.shape == (frames, 4, H // 8, W // 8)
    assert (got[1:] - got[:1]).abs().max() > 1e-2   # the frames differ: the model moved something


def test_ddim_eta1_same_noise_matches_reference(models):
    """eta 1 with the same per-step noise fed to both: agreement within 1e-4 relative (measured
    4.7e-5, at the first step: with alphas_cumprod[999] near 0 the weight of the noise estimate,
    sqrt(1 - a_next - s^2), is a difference of near-equal numbers, which the released code
    takes in float32 and this sampler in float64).

    Against the released schedule itself (alphas_cumprod[999] = 0, which ComfyUI's zero-SNR
    table cannot hold) the first step keeps sqrt(4.9e-8 / a_next) ~ 1e-3 of the noise estimate
    that the released step drops: measured 1.4e-3 relative at the first step (5e-5 with eta 0),
    falling to 4.5e-4 at the end."""
    model = models["512"]
    frames, steps, cfg = 4, 4, 5.0
    positive, negative, latent = native.conditioning(model, _image(4), PROMPT, NEGATIVE, frames, 20, W, H)
    draws = [torch.randn(1, 4, frames, H // 8, W // 8, generator=torch.Generator().manual_seed(100 + k))
             for k in range(steps)]
    queue = list(draws)
    got, steps_got = _native(model, positive, negative, latent, steps, cfg, 1.0, _noise(frames),
                             noise_sampler=lambda s, s_next: queue.pop(0)[0].transpose(0, 1))
    x_t = _noise(frames).transpose(0, 1)[None]
    xs, x0s = _reference(model, positive, negative, x_t, steps, cfg, 1.0, noises=draws,
                         comfy_last=_comfy_last(model, "512"))
    assert _max_rel(steps_got, xs[:-1]) < 1e-4
    assert _max_rel([got], [x0s[-1]]) < 1e-4
    released, released_x0 = _reference(model, positive, negative, x_t, steps, cfg, 1.0, noises=draws)
    assert 1e-4 < _max_rel(steps_got[:1], released[:1]) < 3e-3
    assert _max_rel([got], [released_x0[-1]]) < 1e-3
    # with its own seeded draws the native run is another sample of the same process
    other, _ = _native(model, positive, negative, latent, steps, cfg, 1.0, _noise(frames))
    assert (other - got).abs().max() > 1e-3


@pytest.mark.parametrize("variant, scheduler", [("512", "simple"), ("256", "ddim_uniform")])
def test_ksampler_ddim_matches_reference_without_dynamic_rescale(models, variant, scheduler):
    """Core KSampler ('ddim' = Euler, which is DDIM with eta 0 in ComfyUI's variables) with the
    scheduler that gives the released timesteps ('simple' = trailing, 'ddim_uniform' = uniform)
    follows the pack's DDIM with eta 0 and the dynamic rescale off (the only part it lacks):
    guidance and guidance rescale come with the MODEL. Measured: 256 within 1e-5 relative (as
    above); 512 7.6e-5 relative, bound 2e-4: Euler's first step from ComfyUI's zero-SNR sigma
    4518.8 adds two latents of size 4518 |x| that nearly cancel, which float32 leaves with
    ~3e-4 absolute error (the DynamiCrafter DDIM sampler writes the step without it)."""
    model = models[variant]
    frames, steps, cfg, seed = 4, 4, 6.0, 11
    positive, negative, latent = native.conditioning(model, _image(5), PROMPT, NEGATIVE, frames, 0, W, H)
    clone = native.comfy_model(model)
    ms = clone.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, steps).cpu()
    assert torch.equal(sigmas, native.sigmas_for(clone, steps))   # the released timesteps
    (out,) = comfy_nodes.KSampler().sample(clone, seed, steps, cfg, "ddim", scheduler, positive, negative, latent)
    # what KSampler starts from, in the released variables
    noise = comfy.sample.prepare_noise(latent["samples"], seed)
    s0 = float(sigmas[0])
    start = 1.0 if runtime.starts_from_max_noise(clone, s0) else s0 / (1 + s0 * s0) ** 0.5
    schedule = dataclasses.replace(model.schedule_config(), base_scale=None)
    _xs, x0s = _reference(model, positive, negative, (noise * start).transpose(0, 1)[None], steps, cfg, 0.0,
                          schedule=schedule, comfy_last=_comfy_last(model, variant))
    assert _max_rel([out["samples"] * LATENT_SCALE], [x0s[-1]]) < (1e-5 if variant == "256" else 2e-4)


def test_mask_keeps_the_picture_latent_outside(models):
    """With a mask the LATENT is the picture's latent in every frame with the mask (at latent
    size) as its noise mask: outside the mask the sampled latent is the picture's, inside it
    moves - with the DynamiCrafter DDIM (eta 1) and with KSampler."""
    model = models["512"]
    frames = 4
    mask = torch.zeros(1, 40, 56)
    mask[:, :, :28] = 1.0                  # the left half of the picture may move
    positive, negative, latent = native.conditioning(model, _image(6), PROMPT, NEGATIVE, frames, 0, W, H,
                                                     mask=mask)
    lat_mask = latent["noise_mask"]
    assert lat_mask.shape == (1, 1, H // 8, W // 8)
    keep = lat_mask[0, 0] == 0
    moves = lat_mask[0, 0] == 1
    assert keep[:, 3:].all() and moves[:, :3].all()
    z = positive[0][1][native.KEY]["concat"]            # the picture's latent, every frame
    assert torch.equal(latent["samples"], z)
    clone = native.comfy_model(model)
    guider = cs.CFGGuider().get_guider(clone, positive, negative, 5.0)[0]
    ddim, _ = cs.SamplerCustomAdvanced().sample(_Noise(_noise(frames)), guider, native.ddim_sampler(1.0),
                                                native.sigmas_for(clone, 4), latent)
    (ks,) = comfy_nodes.KSampler().sample(clone, 3, 4, 5.0, "euler", "simple", positive, negative, latent)
    for out in (ddim["samples"], ks["samples"]):
        assert (out[:, :, keep] - z[:, :, keep]).abs().max() < 1e-5
        assert (out[:, :, moves] - z[:, :, moves]).abs().max() > 1e-2
    # the decoder attends across the picture, so the kept half changes a little after decoding: the
    # node's picture and keep mask paste it back with core ImageCompositeMasked, as the Animate node does
    from comfy_extras.nodes_mask import ImageCompositeMasked
    source = _image(6, H, W)                              # at the output size: the picture is the source
    *_, picture, paste_keep = dn.KinemaDynamiCrafterConditioning().encode(model, source, PROMPT, NEGATIVE, frames,
                                                                          0, mask=mask, width=W, height=H)
    assert (picture - source).abs().max() < 1e-6
    frames_px = native.comfy_vae(model).decode(ks["samples"]).reshape(frames, H, W, 3)
    (pasted,) = ImageCompositeMasked().composite(frames_px.clone(), picture, 0, 0, False, paste_keep)
    outside = paste_keep[0] == 1
    assert bool(outside.any()) and bool((paste_keep[0] < 0.5).any())
    assert torch.equal(pasted[:, outside], picture[0, outside].expand(frames, -1, -1))
    assert (pasted[:, ~outside] - frames_px[:, ~outside]).abs().max() > 0     # inside: the model's frames


def test_vae_is_the_checkpoints(models):
    """'DynamiCrafter to MODEL''s VAE (ComfyUI's implementation, the checkpoint's weights) decodes
    and encodes as the pack's (diffusers') VAE: same weights, two float32 implementations."""
    model = models["512"]
    vae = native.comfy_vae(model)
    z = torch.randn(3, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(2))
    got = vae.decode(z).reshape(3, H, W, 3)
    want = ((model.vae_decode(z * LATENT_SCALE) + 1.0) / 2.0).clamp(0, 1).permute(0, 2, 3, 1)
    assert (got - want).abs().max() < 1e-4
    image = torch.rand(2, H, W, 3, generator=torch.Generator().manual_seed(3))
    mean = model.vae.encode(image.permute(0, 3, 1, 2) * 2.0 - 1.0).latent_dist.mean
    assert (vae.encode(image) - mean).abs().max() < 1e-4


def test_guidance_rescale_is_over_the_whole_video():
    """The MODEL's post-CFG guidance rescale equals the released one (the pack's
    DDIMSampler.guide on (videos, C, F, h, w) v outputs), for a batch of two videos; ComfyUI's
    RescaleCFG, whose std is per batch row (= per frame here), gives something else."""
    frames, videos, cfg, phi = 4, 2, 6.0, 0.7
    g = torch.Generator().manual_seed(0)
    v_c = torch.randn(videos, 4, frames, 3, 5, generator=g) * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1, 1)
    v_u = torch.randn(videos, 4, frames, 3, 5, generator=g)
    rows = lambda v: v.transpose(1, 2).reshape(videos * frames, 4, 3, 5)  # noqa: E731
    sigma = torch.full((videos * frames,), 2.5)
    x = torch.randn(videos * frames, 4, 3, 5, generator=g)
    k = (1 + 2.5 ** 2) ** 0.5
    den = lambda v: x / k ** 2 - rows(v) * 2.5 / k    # ComfyUI's v-prediction denoised  # noqa: E731
    d_c, d_u = den(v_c), den(v_u)
    args = {"denoised": d_u + cfg * (d_c - d_u), "cond_denoised": d_c, "uncond_denoised": d_u, "input": x,
            "sigma": sigma, "cond": [{native.KEY: {"frames": frames}}]}
    got = native.guidance_rescale_patch(phi, "v")(args)
    want = den(DDIMSampler.guide(v_c, v_u, cfg, phi))
    assert (got - want).abs().max() < 1e-5
    per_frame = den(DDIMSampler.guide(rows(v_c), rows(v_u), cfg, phi).reshape(videos, frames, 4, 3, 5).transpose(1, 2))
    assert (got - per_frame).abs().max() > 1e-2
    args["uncond_denoised"] = None        # cfg 1: nothing to rescale
    assert native.guidance_rescale_patch(phi, "v")(args) is args["denoised"]


def test_one_patcher_holds_the_unet_for_both_routes(models):
    """The pack's own nodes and ComfyUI's samplers load the UNet through one ModelPatcher (the
    MODEL's clones share it), so ComfyUI's record of where the weights are is never stale."""
    model = models["512"]
    base = model.managed()["unet"].patcher
    clone = native.comfy_model(model)
    assert clone is not base and clone.is_clone(base)
    assert clone.model.diffusion_model.unet is model.unet
    runtime.load_models(clone)
    runtime.load_models(model.managed()["unet"])
    assert runtime.loaded_model_names().count("DynamiCrafter 512 UNet") == 1


def test_clear_errors(models):
    model = models["512"]
    clone = native.comfy_model(model)
    positive, negative, latent = native.conditioning(model, _image(1), PROMPT, NEGATIVE, 4, 0, W, H)
    text_only = [[torch.zeros(1, 77, 32), {}]]
    with pytest.raises(ValueError, match="DynamiCrafter Conditioning"):
        comfy_nodes.KSampler().sample(clone, 0, 1, 5.0, "euler", "simple", text_only, negative, latent)
    five = {"samples": torch.zeros(5, 4, H // 8, W // 8)}
    with pytest.raises(ValueError, match="not a whole number of 4-frame videos"):
        comfy_nodes.KSampler().sample(clone, 0, 1, 5.0, "euler", "simple", positive, negative, five)
    other = {"samples": torch.zeros(4, 4, H // 8 + 1, W // 8)}
    with pytest.raises(ValueError, match="do not match the conditioning"):
        comfy_nodes.KSampler().sample(clone, 0, 1, 5.0, "euler", "simple", positive, negative, other)
    with pytest.raises(ValueError, match="interpolation needs at least 3"):
        native.conditioning(model, _image(1), PROMPT, NEGATIVE, 2, 0, W, H, end_image=_image(2))
    with pytest.raises(ValueError, match="not with interpolation"):
        native.conditioning(model, _image(1), PROMPT, NEGATIVE, 4, 0, W, H, end_image=_image(2),
                            mask=torch.ones(1, 40, 56))
    with pytest.raises(ValueError, match="multiples of 16"):
        native.conditioning(model, _image(1), PROMPT, NEGATIVE, 4, 0, 40, 32)
    with pytest.raises(ValueError, match="eta"):
        dn.KinemaDynamiCrafterDDIM().get_sampler(1.5)
    with pytest.raises(ValueError, match="spacing"):
        dn.KinemaDynamiCrafterSigmas().get_sigmas(clone, 4, "karras")
    with pytest.raises(ValueError, match="guidance_rescale"):
        dn.KinemaDynamiCrafterToModel().convert(model, 1.5)


def test_nodes(models):
    model = models["512"]
    mdl, vae = dn.KinemaDynamiCrafterToModel().convert(model, -1.0)
    assert mdl.model_options.get("sampler_post_cfg_function")          # the variant's 0.7
    plain, _ = dn.KinemaDynamiCrafterToModel().convert(model, 0.0)
    assert not plain.model_options.get("sampler_post_cfg_function")
    assert mdl.get_model_object("latent_format").__class__.__name__ == "SD15"   # previews
    pos, neg, latent, picture, keep = dn.KinemaDynamiCrafterConditioning().encode(model, _image(1), PROMPT, "", 6, 0,
                                                                                  width=W, height=H)
    assert picture.shape == (1, H, W, 3) and keep.shape == (1, H, W) and float(keep.abs().max()) == 0
    assert latent["samples"].shape == (6, 4, H // 8, W // 8) and "noise_mask" not in latent
    assert pos[0][1][native.KEY]["fs"] == 24 and pos[0][0].shape == neg[0][0].shape
    (sigmas,) = dn.KinemaDynamiCrafterSigmas().get_sigmas(mdl, 3)
    ms = mdl.get_model_object("model_sampling")
    assert torch.equal(sigmas, torch.cat([ms.sigmas[[999, 666, 332]], torch.zeros(1)]))   # trailing
    (sampler,) = dn.KinemaDynamiCrafterDDIM().get_sampler(0.5, True)
    out, denoised = cs.SamplerCustomAdvanced().sample(_Noise(torch.randn(6, 4, H // 8, W // 8)),
                                                      cs.CFGGuider().get_guider(mdl, pos, neg, 4.0)[0], sampler,
                                                      sigmas, latent)
    assert out["samples"].shape == (6, 4, H // 8, W // 8) and torch.isfinite(out["samples"]).all()
    images = vae.decode(out["samples"])
    assert images.reshape(-1, H, W, 3).shape == (6, H, W, 3)


def test_progress_and_interrupt_come_from_comfyui(models):
    """The DynamiCrafter DDIM reports every step to ComfyUI's progress bar (which also shows the
    latent previews), and stops when ComfyUI is interrupted (the server's progress hook raises)."""
    import comfy.model_management as mm
    import comfy.utils
    model = models["512"]
    positive, negative, latent = native.conditioning(model, _image(1), PROMPT, NEGATIVE, 4, 0, W, H)
    clone = native.comfy_model(model)
    seen = []

    def hook(value, total, preview, prompt_id=None, node_id=None):
        seen.append((value, total))
        if value == 2:
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            cs.SamplerCustomAdvanced().sample(_Noise(_noise(4)), cs.CFGGuider().get_guider(clone, positive, negative,
                                                                                          5.0)[0],
                                              native.ddim_sampler(1.0), native.sigmas_for(clone, 5), latent)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        mm.interrupt_current_processing(False)
    assert seen == [(1, 5), (2, 5)]
