"""Puppet-Master sampling: EDM Euler parity, crops and drags, end to end with a tiny SVD-shaped model."""
import logging

import pytest
import torch

from kinema.pipelines.puppet_master import (
    EDMEuler, denoise, guidance_weights, load_json, paste_back, subject_crop, tracks_to_drags,
)
import tiny_puppet_master


# ---------------------------------------------------------------- sampler
def test_edm_euler_matches_diffusers_euler_scheduler():
    from diffusers import EulerDiscreteScheduler
    cfg = load_json("svd/scheduler.json")
    ref = EulerDiscreteScheduler.from_config({k: v for k, v in cfg.items() if k != "rho"})
    ref.set_timesteps(50)
    ours = EDMEuler.from_config(cfg)
    sig = ours.sigmas(50)
    assert torch.allclose(sig.float(), ref.sigmas.float(), rtol=1e-5, atol=1e-7)
    assert torch.allclose(torch.tensor([ours.timestep(s) for s in sig[:-1].tolist()]), ref.timesteps.float(), atol=1e-5)
    assert ours.init_noise_sigma() == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 4, 4, 4, generator=g) * ours.init_noise_sigma()
    for i in (0, 1, 25, 49):
        s, s_next = sig[i].item(), sig[i + 1].item()
        t = ref.timesteps[i]
        ref._step_index = i
        assert torch.allclose(ours.model_input(x, s), ref.scale_model_input(x, t), rtol=1e-5)
        v = torch.randn(x.shape, generator=g)
        ref._step_index = i
        got, want = ours.step(x, v, s, s_next), ref.step(v, t, x).prev_sample
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(x.abs().max())), i
        x = want


def test_guidance_weights_per_frame():
    w = guidance_weights(5.0, 14)
    assert w[0] == 1.0 and w[-1] == 5.0 and torch.allclose(w[1:] - w[:-1], torch.full((13,), 4 / 13))


# ---------------------------------------------------------------- crops and drags
def test_subject_crop_with_mask_is_square_on_white():
    img = torch.zeros(60, 100, 3)
    mask = torch.zeros(60, 100)
    mask[20:40, 30:50] = 1  # 20x20 box centred at (40, 30)
    crop_img, crop = subject_crop(img, mask, size=64, margin=0.0)
    assert crop.side == 20 and (crop.x0, crop.y0) == (30, 20)
    assert crop_img.shape == (64, 64, 3)
    assert crop_img[32, 32].tolist() == [0.0, 0.0, 0.0]  # the (black) subject
    crop_img, crop = subject_crop(img, mask, size=64, margin=1.0)
    assert crop_img[2, 2].tolist() == [1.0, 1.0, 1.0]  # background became white
    with pytest.raises(ValueError, match="mask: it is empty"):
        subject_crop(img, torch.zeros(60, 100))
    with pytest.raises(ValueError, match="mask"):
        subject_crop(img, torch.zeros(10, 10))


def test_subject_crop_without_mask_pads_with_white():
    img = torch.full((50, 100, 3), 0.25)
    crop_img, crop = subject_crop(img, None, size=100)
    assert crop.side == 100 and crop.y0 == -25
    assert crop_img[10, 50].tolist() == [1.0, 1.0, 1.0] and crop_img[50, 50].tolist() == pytest.approx([0.25] * 3)


def test_tracks_to_drags_two_point_and_polyline():
    _, crop = subject_crop(torch.zeros(64, 64, 3), None, size=64)
    tracks = [torch.tensor([[15.5, 31.5], [47.5, 31.5]]),
              torch.tensor([[31.5, 7.5], [31.5, 23.5], [47.5, 23.5]])]
    drags, valid = tracks_to_drags(tracks, crop)
    assert drags.shape == (1, 14, 5, 4) and valid[0, :, :2].all() and not valid[0, :, 2:].any()
    assert torch.allclose(drags[0, :, 0, :2], torch.tensor([0.25, 0.5]).expand(14, 2))
    assert torch.allclose(drags[0, 0, 0, 2:], torch.tensor([0.25, 0.5]))
    assert torch.allclose(drags[0, 13, 0, 2:], torch.tensor([0.75, 0.5]))
    assert torch.allclose(drags[0, 13, 1, 2:], torch.tensor([0.75, 0.375]))
    # the polyline reaches its corner halfway
    assert torch.allclose(drags[0, 6, 1, 2:], torch.tensor([0.5, 0.125 + 0.25 * 12 / 13]), atol=1e-6)
    assert (drags[0, :, 2:] == 0).all()


def test_more_than_five_drags_keeps_longest(caplog):
    _, crop = subject_crop(torch.zeros(64, 64, 3), None, size=64)
    tracks = [torch.tensor([[10.0, 10.0], [10.0 + n, 10.0]]) for n in range(1, 8)]
    with caplog.at_level(logging.WARNING):
        drags, valid = tracks_to_drags(tracks, crop)
    assert "at most 5 drags" in caplog.text
    ends = sorted(round(float(x) * 64 - 0.5) for x in drags[0, -1, :, 2])
    assert ends == [13, 14, 15, 16, 17]  # lengths 3..7 kept, 1 and 2 dropped


def test_drag_starting_off_the_subject_is_an_error():
    img = torch.zeros(64, 64, 3)
    mask = torch.zeros(64, 64)
    mask[10:20, 10:20] = 1
    _, crop = subject_crop(img, mask, size=64)
    with pytest.raises(ValueError, match="drag 0 starts at \\(50, 50\\)"):
        tracks_to_drags([torch.tensor([[50.0, 50.0], [55.0, 55.0]])], crop)


def test_paste_back_keeps_outside_and_keys_white():
    img = torch.full((40, 60, 3), 0.3)
    mask = torch.zeros(40, 60)
    mask[10:30, 20:40] = 1
    frames = torch.ones(2, 32, 32, 3)
    frames[:, 12:20, 12:20] = 0.0  # a dark object in the middle of a white crop
    _, crop = subject_crop(img, mask, size=32, margin=0.0)
    out = paste_back(frames, img, crop, mask)
    assert out.shape == (2, 40, 60, 3)
    assert torch.allclose(out[:, 0, 0], torch.tensor(0.3))  # outside the crop: untouched
    assert torch.allclose(out[:, 20, 30], torch.tensor(0.0))  # the object
    assert torch.allclose(out[:, 11, 21], torch.tensor(1.0))  # inside the mask: the animated crop


# ---------------------------------------------------------------- end to end (tiny SVD-shaped model)
@pytest.fixture(scope="module")
def tiny():
    return tiny_puppet_master.puppet_master(0)


@pytest.fixture(scope="module")
def codec():
    return tiny_puppet_master.codec(0)


def _inputs():
    img = torch.linspace(0, 1, 48 * 64 * 3).reshape(48, 64, 3)
    mask = torch.zeros(48, 64)
    mask[8:40, 12:44] = 1
    tracks = [torch.tensor([[20.0, 20.0], [30.0, 25.0]]), torch.tensor([[30.0, 30.0], [28.0, 36.0], [24.0, 38.0]])]
    return img, mask, tracks


def test_animate_end_to_end(tiny, codec):
    img, mask, tracks = _inputs()
    size = 8 * tiny.unet.config.sample_size
    a = tiny.animate(img, tracks, codec, mask, steps=1, cfg=3.0, seed=7, paste=True, progress=False)
    assert a.shape == (14, 48, 64, 3) and torch.isfinite(a).all()
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a[:, 0, 0], img[0, 0].expand(14, 3))  # outside the subject crop: the image
    crop = tiny.animate(img, tracks, codec, mask, steps=1, cfg=3.0, seed=7, progress=False)
    assert crop.shape == (14, size, size, 3)


def _cond(seed):
    g = torch.Generator().manual_seed(seed)
    s = 8  # the tiny config's latent size
    return torch.randn(1, 4, s, s, generator=g), torch.randn(1, 1, 32, generator=g)


def test_denoise_determinism_and_seed(tiny):
    lat, emb = _cond(1)
    drags = torch.zeros(1, 14, 5, 4)
    drags[0, :, 0] = torch.tensor([0.3, 0.3, 0.6, 0.4])
    run = lambda seed: denoise(tiny.unet, lat, emb, drags, 1, 3.0, torch.Generator().manual_seed(seed),
                               tiny.sampler, progress=False)
    x1, x2, x3 = run(5), run(5), run(6)
    assert x1.shape == (1, 14, 4, 8, 8)
    assert torch.equal(x1, x2) and not torch.allclose(x1, x3)


def test_zero_conditioning_equals_unconditional_branch(tiny):
    """With zero latent, zero embedding and zero drags the conditional branch is the unconditional
    one, so the guidance scale has no effect; the batched [cond, uncond] forward gives each row what
    it gives alone (all-to-first stays inside each video); and drags do change the prediction."""
    lat0, emb0, drags0 = torch.zeros(1, 4, 8, 8), torch.zeros(1, 1, 32), torch.zeros(1, 14, 5, 4)
    run = lambda cfg: denoise(tiny.unet, lat0, emb0, drags0, 1, cfg, torch.Generator().manual_seed(3),
                              tiny.sampler, progress=False)
    assert torch.allclose(run(1.0), run(6.0), atol=1e-5)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 14, 4, 8, 8, generator=g).expand(3, -1, -1, -1, -1)
    lat, emb = _cond(5)
    lat = torch.cat([lat, lat, torch.zeros_like(lat)])
    emb = torch.cat([emb, emb, torch.zeros_like(emb)])
    drags = torch.zeros(3, 14, 5, 4)
    drags[0, :, 0] = torch.tensor([0.2, 0.7, 0.5, 0.5])
    t = torch.tensor([0.5])
    with torch.no_grad():
        both = tiny.unet(x, t, lat, emb, drags)
        alone = tiny.unet(x[2:], t, lat[2:], emb[2:], drags[2:])
    assert torch.allclose(both[2:], alone, atol=1e-4)
    assert not torch.allclose(both[0], both[1], atol=1e-4)  # same inputs but the drag


def test_drag_embeddings_are_computed_once_per_sampling(tiny):
    """Three steps of the sampler run each drag embedder once (the [cond, uncond] batch: 14
    frames plus one frame of the drag-free half), with the same result as building the drag
    condition afresh at every step."""
    lat, emb = _cond(2)
    drags = torch.zeros(1, 14, 5, 4)
    drags[0, :, 0] = torch.tensor([0.3, 0.3, 0.6, 0.4])
    rows = []
    convs = [c for b in list(tiny.unet.down_blocks) + list(tiny.unet.up_blocks) for c in getattr(b, "flow_convs", [])]
    hooks = [c.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0])) for c in convs]
    try:
        cached = denoise(tiny.unet, lat, emb, drags, 3, 3.0, torch.Generator().manual_seed(9), tiny.sampler,
                         progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert len(convs) > 0 and rows == [15] * len(convs)

    class Fresh(torch.nn.Module):  # the UNet given raw drags: a new drag condition at every call
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def drag_condition(self, *args):
            return self.unet.drag_condition(*args)

        def forward(self, x, t, lat, emb, drag):
            return self.unet(x, t, lat, emb, drag.drags, drag_valid=drag.valid)

    fresh = denoise(Fresh(tiny.unet), lat, emb, drags, 3, 3.0, torch.Generator().manual_seed(9), tiny.sampler,
                    progress=False)
    assert torch.allclose(cached, fresh, atol=1e-4 * float(fresh.abs().max()))


def test_drag_condition_follows_dtype(tiny):
    """One drag condition used in float32 and then in float64 keeps an embedding per dtype."""
    unet = tiny_puppet_master.unet(0)
    g = torch.Generator().manual_seed(6)
    x, (lat, emb) = torch.randn(1, 14, 4, 8, 8, generator=g), _cond(3)
    drags = torch.zeros(1, 14, 5, 4)
    drags[0, :, 1] = torch.tensor([0.6, 0.2, 0.4, 0.5])
    t = torch.tensor([0.5])
    drag = unet.drag_condition(drags)
    with torch.no_grad():
        a = unet(x, t, lat, emb, drag)
        unet.double()
        b = unet(x.double(), t, lat.double(), emb.double(), drag)
    assert b.dtype == torch.float64
    assert torch.allclose(a.double(), b, atol=1e-4)
    assert {k[2] for k in drag._modulations} == {torch.float32, torch.float64}


def test_bad_steps_is_a_clear_error(tiny, codec):
    img, mask, tracks = _inputs()
    with pytest.raises(ValueError, match="steps"):
        tiny.animate(img, tracks, codec, mask, steps=0)


def test_anchors_become_still_drags_in_free_slots(caplog):
    _, crop = subject_crop(torch.zeros(64, 64, 3), None, size=64)
    tracks = [torch.tensor([[15.5, 31.5], [47.5, 31.5]])]
    anchors = torch.tensor([[31.5, 15.5], [7.5, 7.5]])
    drags, valid = tracks_to_drags(tracks, crop, anchors=anchors)
    assert valid[0, :, :3].all() and not valid[0, :, 3:].any()
    assert torch.allclose(drags[0, :, 1], torch.tensor([0.5, 0.25, 0.5, 0.25]).expand(14, 4))
    assert torch.allclose(drags[0, :, 2], torch.tensor([0.125] * 4).expand(14, 4))
    many = [torch.tensor([[10.0, 10.0], [12.0 + n, 10.0]]) for n in range(5)]
    with caplog.at_level(logging.WARNING):
        _, valid = tracks_to_drags(many, crop, anchors=anchors)
    assert "2 anchor(s) ignored" in caplog.text and valid[0, 0].all()
