"""End to end with tiny random checkpoints of every variant: animate, interpolate, regional
animation, temporal windows, precisions, and input errors."""
import pytest
import torch

import tiny_dynamicrafter
from kinema.pipelines.dynamicrafter import convert as C
from kinema.pipelines.dynamicrafter import pipeline as P

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


_MODELS = {}


def tiny(variant):
    if variant not in _MODELS:
        _MODELS[variant] = C.convert(tiny_dynamicrafter.checkpoint(variant), f"tiny_{variant}")
    return _MODELS[variant]


def _image(seed=0, h=64, w=80):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, h, w, 3, generator=g)


def _opts(**kw):
    base = dict(prompt="a cat walking", frames=4, steps=3, cfg=7.5, eta=1.0, seed=1, height=64, width=64)
    base.update(kw)
    return P.AnimateOptions(**base)


@pytest.mark.parametrize("variant", ["256", "512", "1024"])
def test_animate_every_variant(variant):
    model = tiny(variant)
    out = P.animate(model, _image(), _opts())
    assert out.shape == (4, 64, 64, 3) and torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    again = P.animate(model, _image(), _opts())
    torch.testing.assert_close(out, again, atol=0, rtol=0)
    other = P.animate(model, _image(), _opts(seed=2))
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
        P.animate(model, _image(), _opts(steps=2, fs=0))
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
        out = P.interpolate(model, _image(0), _image(1), _opts(frames=4, steps=2, fs=5))
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
    """Outside the mask every frame is the input (<= 1/255). The latent blending alone keeps the
    latents of cells outside the mask equal to the image latent, but decoding them does not give
    the input back (the VAE's reconstruction error): the final paste is what makes the pixels exact."""
    model = tiny("512")
    mask = _disc_mask(64, 64, 20.0, 26.0, 15.0)           # a round region, not aligned to latent cells
    img = _image(3, 64, 64)
    encoded, seen = [], {}
    vae_encode = model.vae_encode
    monkeypatch.setattr(model, "vae_encode", lambda *a, **k: encoded.append(vae_encode(*a, **k)) or encoded[-1])
    out = P.generate(model, [img], _opts(steps=3), mask=mask,
                     callback=lambda i, info: seen.__setitem__(i, info["x"].clone()))
    outside = mask[0] == 0

    # latent blending: after the last step the cells entirely outside the mask hold the image latent
    z_img = encoded[0][0]                                             # (4, 8, 8)
    free_cells = torch.nn.functional.avg_pool2d(mask[None], 8)[0, 0] == 0
    final = seen[0][0]                                                # (4, T, 8, 8)
    assert torch.equal(final[:, :, free_cells], z_img[:, None, free_cells].expand(-1, 4, -1))
    # ... and before it they hold it noised (not yet equal), while cells inside move
    assert (seen[2][0][:, :, free_cells] - z_img[:, None, free_cells]).abs().max() > 1e-2
    assert (final[:, 1:, ~free_cells] - final[:, :1, ~free_cells]).abs().max() > 1e-4

    # decoding the blended latents alone does not give the input back outside the mask
    decoded = ((model.vae_decode(final.transpose(0, 1)) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    assert (decoded - img[0])[:, outside].abs().max() > 4 / 255

    # with the paste it does, and the inside still animates
    assert (out - img[0])[:, outside].abs().max() <= 1 / 255
    assert (out[1:] - out[:1])[:, ~outside].abs().max() > 1e-3
    free = P.generate(model, [img], _opts(steps=3))
    assert (free - out).abs().max() > 1e-4


def test_temporal_windows_more_frames_than_native():
    model = tiny("1024")
    assert model.temporal_length == 4
    calls, undo = _record_unet(model)
    try:
        out = P.animate(model, _image(), _opts(frames=6, steps=1, window_overlap=2))
    finally:
        undo()
    assert out.shape == (6, 64, 64, 3)
    assert [c["x"].shape[2] for c in calls] == [4, 4]          # two windows of 4 frames
    assert P._window_starts(6, 4, 2) == [0, 2] and P._window_starts(16, 16, 4) == [0]
    assert P._window_starts(10, 4, 1) == [0, 3, 6]
    w = P._window_weight(4, 2, 6, 2, CPU)
    assert w.tolist() == pytest.approx([1 / 3, 2 / 3, 1, 1])


def test_bf16_and_no_guidance():
    model = C.convert(tiny_dynamicrafter.checkpoint("512"), "tiny", dtype=torch.bfloat16)
    assert model.unet.dtype == torch.bfloat16
    out = P.animate(model, _image(), _opts(steps=2, cfg=1.0))
    assert out.shape == (4, 64, 64, 3) and torch.isfinite(out).all()


def test_fp16_keeps_vae_in_fp32():
    model = C.convert(tiny_dynamicrafter.checkpoint("256"), "tiny", dtype=torch.float16)
    assert model.unet.dtype == torch.float16 and model.vae.dtype == torch.float32


def test_bad_inputs():
    model = tiny("512")
    with pytest.raises(ValueError, match="image"):
        P.animate(model, torch.rand(64, 64), _opts())
    with pytest.raises(ValueError, match="mask: the mask is empty"):
        P.animate(model, _image(), _opts(), mask=torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match="width/height"):
        P.animate(model, _image(), _opts(width=72))
    with pytest.raises(ValueError, match="cfg"):
        P.animate(model, _image(), _opts(cfg=0.5))
    with pytest.raises(ValueError, match="frames"):
        P.interpolate(model, _image(), _image(1), _opts(frames=2))
    with pytest.raises(ValueError, match="eta"):
        P.animate(model, _image(), _opts(eta=3.0))


def test_interp_variant_defaults_and_forced_variant():
    model = C.convert(tiny_dynamicrafter.checkpoint("512"), "tiny_interp", variant="512_interp")
    assert model.variant == "512_interp" and model.settings()["defaults"]["fs"] == 5
    calls, undo = _record_unet(model)
    try:
        P.animate(model, _image(), _opts(steps=1))
    finally:
        undo()
    assert calls[0]["fs"].tolist() == [5, 5]


def test_interrupt_and_progress(monkeypatch):
    from kinema.pipelines.dynamicrafter import sampler as S
    from kinema.runtime import Interrupted
    model = tiny("512")
    updates = []

    class Bar:
        def __init__(self, total, desc=""):
            updates.append(("total", total))

        def update(self, n=1):
            updates.append(("step", n))

    monkeypatch.setattr(S, "ProgressBar", Bar)
    P.animate(model, _image(), _opts(steps=3))
    assert updates == [("total", 3)] + [("step", 1)] * 3
    count = {"n": 0}

    def stop():
        count["n"] += 1
        if count["n"] == 2:
            raise Interrupted("stop")

    monkeypatch.setattr(S, "check_interrupt", stop)
    with pytest.raises(Interrupted):
        P.animate(model, _image(), _opts(steps=5))
    assert count["n"] == 2
