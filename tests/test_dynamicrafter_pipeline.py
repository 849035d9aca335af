"""End to end with tiny random checkpoints of every variant: animate, interpolate, regional
animation, temporal windows, precisions, and input errors."""
import pytest
import torch

import tiny_dynamicrafter
from kinema.pipelines.dynamicrafter import convert
from kinema.pipelines.dynamicrafter import pipeline

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


_MODELS = {}


def tiny(variant):
    if variant not in _MODELS:
        _MODELS[variant] = convert.convert(tiny_dynamicrafter.checkpoint(variant), f"tiny_{variant}")
    return _MODELS[variant]


def _image(seed=0, h=64, w=80):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, h, w, 3, generator=g)


def _opts(**kw):
    base = dict(prompt="a cat walking", frames=4, steps=3, cfg=7.5, eta=1.0, seed=1, height=64, width=64)
    base.update(kw)
    return pipeline.AnimateOptions(**base)


@pytest.mark.parametrize("variant", ["256", "512", "1024"])
def test_animate_every_variant(variant):
    model = tiny(variant)
    out = pipeline.animate(model, _image(), _opts())
    assert out.shape == (4, 64, 64, 3) and torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    again = pipeline.animate(model, _image(), _opts())
    torch.testing.assert_close(out, again, atol=0, rtol=0)
    other = pipeline.animate(model, _image(), _opts(seed=2))
    assert (other - out).abs().max() > 1e-4


def _record_unet(model):
    calls = []
    orig = model.unet.forward

    def spy(x, t, ctx, fs=None, debug=None):
        calls.append({"x": x.detach().clone(), "t": t.clone(), "ctx": ctx.detach().clone(), "fs": fs.clone()})
        return orig(x, t, ctx, fs, debug)

    model.unet.forward = spy
    return calls, lambda: setattr(model.unet, "forward", orig)


def test_conditioning_layout_and_fs_default():
    model = tiny("512")
    calls, undo = _record_unet(model)
    try:
        pipeline.animate(model, _image(), _opts(steps=2, fs=0))
    finally:
        undo()
    c = calls[0]
    assert c["x"].shape == (2, 8, 4, 8, 8)            # cond + uncond, [z_t, image latent]
    concat = c["x"][:, 4:]
    torch.testing.assert_close(concat[:, :, 0], concat[:, :, 3])   # latent repeated over frames
    assert c["ctx"].shape == (2, 77 + 64, 32)         # text + 16 tokens per frame x 4 frames
    assert c["fs"].tolist() == [24, 24]               # 512 default fs
    assert [int(x["t"][0]) for x in calls] == [999, 499]   # trailing spacing, 2 steps


def test_interpolation_keyframes_at_ends():
    model = tiny("512")
    calls, undo = _record_unet(model)
    try:
        out = pipeline.interpolate(model, _image(0), _image(1), _opts(frames=4, steps=2, fs=5))
    finally:
        undo()
    assert out.shape == (4, 64, 64, 3)
    concat = calls[0]["x"][:, 4:]
    assert concat[:, :, 0].abs().max() > 0 and concat[:, :, 3].abs().max() > 0
    assert concat[:, :, 1:3].abs().max() == 0
    assert (concat[:, :, 0] - concat[:, :, 3]).abs().max() > 1e-3
    assert calls[0]["fs"].tolist() == [5, 5]


def _disc_mask(h, w, cx, cy, r):
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return (((xs - cx) ** 2 + (ys - cy) ** 2) <= r * r).float()[None]


def test_regional_animation_keeps_outside_fixed(monkeypatch):
    """Regional animation in two parts, each checked on its own.

    The sampler: after every step the latent cells entirely outside the mask are the image
    latent noised to the current level - a variance-preserving mix ``a * z + b * n`` of the image
    latent and fresh standard noise (``a^2 + b^2 = 1``, ``a`` growing as the noise falls) - and
    exactly the image latent after the last step; cells inside move. Decoding those latents does
    not give the input back (the VAE's reconstruction error). The paste: the frames are composited
    over the input with an alpha that is 0 outside the mask (there the output is the input) and 1
    deep inside (there it is the decoded frame)."""
    from kinema.kernels.regional import default_feather, paste_alpha
    from kinema.pipelines.dynamicrafter import sampler
    model = tiny("512")
    mask = _disc_mask(64, 64, 20.0, 26.0, 15.0)           # a round region, not aligned to latent cells
    img = _image(3, 64, 64)
    encoded, seen, draws = [], {}, []
    vae_encode, randn = model.vae_encode, sampler._randn
    monkeypatch.setattr(model, "vae_encode", lambda *a, **k: encoded.append(vae_encode(*a, **k)) or encoded[-1])
    monkeypatch.setattr(sampler, "_randn", lambda *a, **k: draws.append(randn(*a, **k)) or draws[-1])
    decoded = []
    vae_decode = model.vae_decode
    monkeypatch.setattr(model, "vae_decode", lambda *a, **k: decoded.append(vae_decode(*a, **k)) or decoded[-1])
    out = pipeline.generate(model, [img], _opts(steps=3), mask=mask,
                            callback=lambda i, info: seen.__setitem__(i, info["x"].clone()))
    outside = mask[0] == 0

    # the sampler's own latents, before any paste
    z_img = encoded[0][0].double()                                    # (4, 8, 8)
    free_cells = torch.nn.functional.avg_pool2d(mask[None], 8)[0, 0] == 0
    z = z_img[:, None, free_cells].expand(-1, 4, -1).reshape(-1)      # every frame, every free cell
    levels = []
    for i in (2, 1):
        x = seen[i][0][:, :, free_cells].double().reshape(-1)
        # which noise was mixed in is not known to the test: fit a * z + b * n for every draw
        fits = []
        for n in draws:
            n = n[0][:, :, free_cells].double().reshape(-1)
            coef = torch.linalg.lstsq(torch.stack([z, n], 1), x[:, None]).solution[:, 0]
            fits.append((float((torch.stack([z, n], 1) @ coef - x).abs().max()), coef))
        residual, (a, b) = min(fits, key=lambda f: f[0])
        assert residual < 1e-4, (i, residual)                         # exactly such a mix
        assert abs(float(a * a + b * b) - 1.0) < 1e-4, (i, float(a), float(b))
        assert 0 < float(a) < 1 and float(b) > 0
        levels.append(float(a))
    assert levels[0] < levels[1]                                      # less noise at the later step
    final = seen[0][0]                                                # (4, T, 8, 8)
    assert torch.equal(final[:, :, free_cells], encoded[0][0][:, None, free_cells].expand(-1, 4, -1))
    assert (final[:, 1:, ~free_cells] - final[:, :1, ~free_cells]).abs().max() > 1e-4

    # the decoded frames before the paste: not the input outside the mask, and moving inside
    frames = ((decoded[0].float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    assert (frames - img[0])[:, outside].abs().max() > 4 / 255
    assert (frames[1:] - frames[:1])[:, ~outside].abs().max() > 1e-3

    # the paste: the input where the alpha is 0, the decoded frame where it is ~1, between the two
    # everywhere else
    alpha = paste_alpha(mask[None], default_feather(64, 64))
    core = alpha > 0.999
    assert torch.equal(alpha == 0, outside) and int(core.sum()) > 100
    assert (out - img[0])[:, outside].abs().max() <= 1 / 255
    assert (out - frames)[:, core].abs().max() <= 1e-3
    lo, hi = torch.minimum(frames, img[0]), torch.maximum(frames, img[0])
    assert bool(((out >= lo - 1 / 255) & (out <= hi + 1 / 255)).all())
    free = pipeline.generate(model, [img], _opts(steps=3))
    assert (free - out).abs().max() > 1e-4


def test_temporal_windows_more_frames_than_native():
    model = tiny("1024")
    assert model.temporal_length == 4
    calls, undo = _record_unet(model)
    try:
        out = pipeline.animate(model, _image(), _opts(frames=6, steps=1, window_overlap=2))
    finally:
        undo()
    assert out.shape == (6, 64, 64, 3)
    assert [c["x"].shape[2] for c in calls] == [4, 4]          # two windows of 4 frames
    assert pipeline._window_starts(6, 4, 2) == [0, 2] and pipeline._window_starts(16, 16, 4) == [0]
    assert pipeline._window_starts(10, 4, 1) == [0, 3, 6]
    w = pipeline._window_weight(4, 2, 6, 2, CPU)
    assert w.tolist() == pytest.approx([1 / 3, 2 / 3, 1, 1])


def test_bf16_and_no_guidance():
    model = convert.convert(tiny_dynamicrafter.checkpoint("512"), "tiny", dtype=torch.bfloat16)
    assert model.unet.dtype == torch.bfloat16
    out = pipeline.animate(model, _image(), _opts(steps=2, cfg=1.0))
    assert out.shape == (4, 64, 64, 3) and torch.isfinite(out).all()


def test_fp16_keeps_vae_in_fp32():
    model = convert.convert(tiny_dynamicrafter.checkpoint("256"), "tiny", dtype=torch.float16)
    assert model.unet.dtype == torch.float16 and model.vae.dtype == torch.float32


def test_bad_inputs():
    model = tiny("512")
    with pytest.raises(ValueError, match="image"):
        pipeline.animate(model, torch.rand(64, 64), _opts())
    with pytest.raises(ValueError, match="mask: the mask is empty"):
        pipeline.animate(model, _image(), _opts(), mask=torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match="width/height"):
        pipeline.animate(model, _image(), _opts(width=72))
    with pytest.raises(ValueError, match="cfg"):
        pipeline.animate(model, _image(), _opts(cfg=0.5))
    with pytest.raises(ValueError, match="frames"):
        pipeline.interpolate(model, _image(), _image(1), _opts(frames=2))
    with pytest.raises(ValueError, match="eta"):
        pipeline.animate(model, _image(), _opts(eta=3.0))


def test_interp_variant_defaults_and_forced_variant():
    model = convert.convert(tiny_dynamicrafter.checkpoint("512"), "tiny_interp", variant="512_interp")
    assert model.variant == "512_interp" and model.settings()["defaults"]["fs"] == 5
    calls, undo = _record_unet(model)
    try:
        pipeline.animate(model, _image(), _opts(steps=1))
    finally:
        undo()
    assert calls[0]["fs"].tolist() == [5, 5]


def test_interrupt_and_progress(monkeypatch):
    from kinema.pipelines.dynamicrafter import sampler
    from kinema.runtime import Interrupted
    model = tiny("512")
    updates = []

    class Bar:
        def __init__(self, total, desc=""):
            updates.append(("total", total))

        def update(self, n=1):
            updates.append(("step", n))

    monkeypatch.setattr(sampler, "ProgressBar", Bar)
    pipeline.animate(model, _image(), _opts(steps=3))
    assert updates == [("total", 3)] + [("step", 1)] * 3
    count = {"n": 0}

    def stop():
        count["n"] += 1
        if count["n"] == 2:
            raise Interrupted("stop")

    monkeypatch.setattr(sampler, "check_interrupt", stop)
    with pytest.raises(Interrupted):
        pipeline.animate(model, _image(), _opts(steps=5))
    assert count["n"] == 2
