"""Follow-Your-Click sampling end to end with tiny random files: the schedule, the v-prediction
DDIM loop, the noise inits, regional animation (outside the mask = the input), determinism,
errors, interrupt and progress."""
import numpy as np
import pytest
import torch

from kinema import runtime
import tiny_follow_your_click as tiny
from kinema.pipelines.follow_your_click import convert, sd15
from kinema.pipelines.follow_your_click import pipeline as fyc_pipeline
from kinema.pipelines.follow_your_click.unet import LATENT_SCALE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("fyc_pipe")
    sd_path = tiny.save(tiny.sd15_checkpoint(seed=1), d / "sd.safetensors")
    mm = tiny.save(tiny.motion_module(seed=2), d / "mm.ckpt")
    model = convert.build_from_sd15(sd_path, mm)
    tiny.randomise(model.fps_embedding, torch.Generator().manual_seed(5))     # as if trained: the
    tiny.randomise(model.motion_embedding, torch.Generator().manual_seed(6))  # conditions act
    unet = runtime.ManagedModel(model, "FYC UNet")
    vae = sd15.DiffusersVAE(sd15.load_vae(sd_path))
    text = sd15.TextEncoder(sd15.load_text_encoder(sd_path))
    return unet, vae, text(["a cat turns its head"]), text([""])


def _image(seed=0, h=64, w=64):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _opts(**kw):
    base = dict(frames=4, width=64, height=64, steps=3, cfg=7.5, seed=1)
    base.update(kw)
    return fyc_pipeline.FYCOptions(**base)


def _disc(h, w, cx, cy, r):
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return (((xs - cx) ** 2 + (ys - cy) ** 2) <= r * r).float()[None]


def test_schedule_is_the_official_one(fixtures_dir):
    """Linear betas 0.00085-0.012 rescaled to zero terminal SNR (Algorithm 1 of Lin et al., here in
    float64 numpy), v-prediction, leading spacing with offset 1: 2 steps are [501, 1] as in the fixture."""
    from safetensors.torch import load_file
    fx = load_file(str(fixtures_dir / "follow_your_click" / "conditioning.safetensors"))
    s = fyc_pipeline.scheduler()
    s.set_timesteps(2)
    assert s.timesteps.tolist() == [int(fx["with_mask.timestep_step0"]), int(fx["with_mask.timestep_step1"])] == [501, 1]
    s.set_timesteps(25)
    assert s.timesteps.tolist() == list(range(961, 0, -40))
    betas = np.linspace(0.00085, 0.012, 1000)
    sq = np.sqrt(np.cumprod(1 - betas))
    sq = (sq - sq[-1]) * sq[0] / (sq[0] - sq[-1])
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), sq ** 2, atol=2e-6)
    assert float(s.alphas_cumprod[-1]) == 0.0 and s.config.prediction_type == "v_prediction"


class _Oracle(torch.nn.Module):
    """Predicts the exact v of a known clean latent x0: v = sqrt(a) eps - sqrt(1 - a) x0."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.ac = fyc_pipeline.scheduler().alphas_cumprod
        self.seen, self.inputs = [], []

    dtype = torch.float32
    latent_channels = 4
    max_frames = 24

    def forward(self, x_in, t, ctx, fps, strength):
        self.seen.append((x_in.shape, int(t), fps, strength))
        self.inputs.append(x_in.clone())
        x = x_in[:, :4]
        a = self.ac[int(t)]
        eps = (x - a.sqrt() * self.x0) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * self.x0


@pytest.mark.parametrize("steps,eta", [(1, 0.0), (4, 0.0), (7, 1.0)])
def test_v_prediction_ddim_lands_on_the_clean_latent(steps, eta):
    x0 = torch.randn(1, 4, 3, 5, 6)
    oracle = _Oracle(x0)
    out = fyc_pipeline.sample(runtime.ManagedModel(oracle, "oracle"), torch.randn(1, 4, 5, 6), torch.zeros(1, 2, 8), None,
                   _opts(frames=3, steps=steps, eta=eta, fps=3, strength=6))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    assert oracle.seen[0][0] == (1, 9, 3, 5, 6) and oracle.seen[0][2:] == (3, 6)   # 9-channel input, conditions


@pytest.mark.parametrize("case,seed", [("with_mask", 101), ("no_mask", 111), ("no_mask_partial_first_frame", 121)])
def test_first_noise_is_the_official_draw(fixtures_dir, case, seed):
    """The official pipeline draws its starting latent with torch.randn(B, 4, F, h, w, generator);
    the fixture's generators were seeded 100 / 110 / 120 + 1 (found by matching). The sampler's
    first UNet input holds exactly that draw, the conditioning exactly the fixture's."""
    from safetensors.torch import load_file
    fx = load_file(str(fixtures_dir / "follow_your_click" / "conditioning.safetensors"))
    ref = fx[f"{case}.unet_input_step0"]
    oracle = _Oracle(torch.zeros(1, 4, 16, 8, 8))
    fyc_pipeline.sample(runtime.ManagedModel(oracle, "oracle"), fx[f"{case}.first_image_latents"], torch.zeros(1, 2, 8),
             torch.zeros(1, 2, 8), _opts(frames=16, steps=2, cfg=8.0), generator=torch.Generator().manual_seed(seed),
             partial=fx.get(f"{case}.partial_mask"), mask=None if case != "with_mask" else
             fx["with_mask.first_images_mask"][:, :, 0])
    assert torch.equal(oracle.inputs[0], ref)
    assert [t for _, t, _, _ in oracle.seen] == [501, 1]


def test_noise_inits():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    shape = (1, 4, 5, 2, 3)
    z = torch.randn(1, 4, 2, 3)
    plain = fyc_pipeline.initial_latents(shape, g())
    shared = fyc_pipeline.initial_latents(shape, g(), shared_noise=True)
    assert torch.equal(shared, plain[:, :, :1].expand(shape))                 # every frame = frame 0's noise
    init = fyc_pipeline.initial_latents(shape, g(), z, image_init=True)
    for i, a in enumerate([5 / 5 / 64, 4 / 5 / 64, 3 / 5 / 64, 2 / 5 / 64, 1 / 5 / 64]):
        torch.testing.assert_close(init[:, :, i], a * z + (1 - a) * plain[:, :, i])
    both = fyc_pipeline.initial_latents(shape, g(), z, shared_noise=True, image_init=True)
    torch.testing.assert_close(both[:, :, 4], z / 320 + (1 - 1 / 320) * plain[:, :, 0])


def test_animate_whole_picture(parts):
    unet, vae, cond, uncond = parts
    img = _image(0, 64, 96)
    seen = []
    frames = fyc_pipeline.animate(unet, vae, img, cond, uncond, _opts(width=96), callback=lambda i, info: seen.append(info))
    assert frames.shape == (4, 64, 96, 3) and frames.dtype == torch.float32
    assert 0 <= float(frames.min()) and float(frames.max()) <= 1
    assert len(seen) == 3 and seen[0]["x"].shape == (1, 4, 4, 8, 12)         # 4 latent channels (noise) ...
    x_in = seen[0]["x_in"]
    assert x_in.shape == (2, 9, 4, 8, 12)                                     # ... 9 into the UNet, CFG batched
    assert torch.equal(x_in[:, 4, 0], torch.ones(2, 8, 12)) and x_in[:, 4, 1:].abs().max() == 0   # no mask: M on frame 0
    z = vae.encode(fyc_pipeline.prepare_image(img, 64, 96)) * LATENT_SCALE
    torch.testing.assert_close(x_in[0, 5:, 0], z[0])                          # C: the image latent on frame 0
    assert x_in[:, 5:, 1:].abs().max() == 0
    again = fyc_pipeline.animate(unet, vae, img, cond, uncond, _opts(width=96))
    assert torch.equal(frames, again)                                         # same seed, same video
    other = fyc_pipeline.animate(unet, vae, img, cond, uncond, _opts(width=96, seed=2))
    assert (other - frames).abs().max() > 1e-3


def test_conditions_change_the_video(parts):
    unet, vae, cond, uncond = parts
    img = _image(1)
    base = fyc_pipeline.animate(unet, vae, img, cond, uncond, _opts())
    for change in (dict(strength=9), dict(fps=8), dict(cfg=1.0), dict(shared_noise=True), dict(image_init=True),
                   dict(first_frame_dropout=0.5)):
        assert (fyc_pipeline.animate(unet, vae, img, cond, uncond, _opts(**change)) - base).abs().max() > 1e-4, change
    assert (fyc_pipeline.animate(unet, vae, img, uncond, uncond, _opts()) - base).abs().max() > 1e-4


def test_regional_animation_keeps_outside_the_input(parts):
    """Outside the mask every frame is the input (<= 1/255). The latent blending alone keeps the
    latent cells outside the mask equal to the image latent after the last step; decoding them
    alone does not give the picture back (VAE error), the paste does."""
    unet, vae, cond, uncond = parts
    img = _image(2)
    mask = _disc(64, 64, 40.0, 30.0, 14.0)
    seen = {}
    frames = fyc_pipeline.animate(unet, vae, img, cond, uncond, _opts(steps=4), mask=mask,
                       callback=lambda i, info: seen.__setitem__(i, info))
    outside = mask[0] == 0
    assert (frames - img[0])[:, outside].abs().max() <= 1 / 255
    assert (frames[1:] - frames[:1])[:, ~outside].abs().max() > 1e-3          # the region moves

    z = vae.encode(img) * LATENT_SCALE
    free_cells = torch.nn.functional.avg_pool2d(mask[None], 8)[0, 0] == 0
    final = seen[3]["x"][0]
    assert torch.equal(final[:, :, free_cells], z[0][:, None, free_cells].expand(-1, 4, -1))
    assert (seen[1]["x"][0][:, :, free_cells] - z[0][:, None, free_cells]).abs().max() > 1e-2   # noised before
    decoded = vae.decode(final.transpose(0, 1) / LATENT_SCALE)
    assert (decoded - img[0])[:, outside].abs().max() > 4 / 255
    m = seen[0]["x_in"][0, 4]                                                  # M: the mask on every frame
    assert torch.equal(m, m[:1].expand_as(m)) and 0 < float(m.mean()) < 1

    loose = fyc_pipeline.animate(unet, vae, img, cond, uncond, _opts(steps=4, keep_outside=False), mask=mask)
    assert (loose - img[0])[:, outside].abs().max() > 4 / 255                 # the model alone does not keep it


def test_bad_inputs(parts):
    unet, vae, cond, uncond = parts
    img = _image()
    for opts, match in ((_opts(frames=25), "frames: 25; Follow-Your-Click makes 2 to 24"),
                        (_opts(width=100), "width: 100 must be a multiple of 8"),
                        (_opts(cfg=0.5), "cfg: 0.5 must be at least 1.0"),
                        (_opts(steps=0), "steps: 0"),
                        (_opts(first_frame_dropout=1.0), "first_frame_dropout")):
        with pytest.raises(ValueError, match=match):
            fyc_pipeline.animate(unet, vae, img, cond, uncond, opts)
    with pytest.raises(ValueError, match="mask: the mask is empty"):
        fyc_pipeline.animate(unet, vae, img, cond, uncond, _opts(), mask=torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match="image: expected an IMAGE"):
        fyc_pipeline.animate(unet, vae, img[0], cond, uncond, _opts())

    class HalfVAE:
        def encode(self, pixels):
            return torch.zeros(1, 4, 16, 16)
    with pytest.raises(ValueError, match="vae: encoded a 64x64 picture to"):
        fyc_pipeline.animate(unet, HalfVAE(), img, cond, uncond, _opts())


def test_interrupt_and_progress(parts, monkeypatch):
    unet, vae, cond, uncond = parts
    bars = []

    class Bar:
        def __init__(self, total, desc=""):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n=1):
            self.n += n

    monkeypatch.setattr(runtime, "ProgressBar", Bar)
    fyc_pipeline.animate(unet, vae, _image(), cond, uncond, _opts(steps=3))
    assert [(b.total, b.n) for b in bars] == [(3, 3)]
    calls = []

    def stop():
        calls.append(1)
        if len(calls) == 3:
            raise runtime.Interrupted()
    monkeypatch.setattr(runtime, "check_interrupt", stop)
    with pytest.raises(runtime.Interrupted):
        fyc_pipeline.animate(unet, vae, _image(), cond, uncond, _opts(steps=5))
    assert len(calls) == 3


def test_the_largest_step_count_stays_on_the_schedule():
    """"Leading" DDIM timesteps with offset 1 at the node's largest step count start at the
    schedule's last timestep (999); one more step would start past it, and is refused."""
    import dataclasses

    from kinema.nodes.follow_your_click import KinemaFYCAnimate
    biggest = KinemaFYCAnimate.INPUT_TYPES()["required"]["steps"][1]["max"]
    sched = fyc_pipeline.scheduler()
    sched.set_timesteps(biggest)
    assert int(sched.timesteps.max()) == sched.config.num_train_timesteps - 1 == 999
    with pytest.raises(ValueError, match=f"steps: {biggest + 1} must be between 1 and {biggest}"):
        fyc_pipeline.check_options(dataclasses.replace(fyc_pipeline.FYCOptions(), steps=biggest + 1))
