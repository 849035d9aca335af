from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kinema.kernels.field import MotionField
from kinema.pipelines import warp_animator
from kinema.pipelines.warp_animator import animate, loop_flow
from kinema.runtime import Interrupted

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def _photo(name):
    return torch.from_numpy(np.asarray(Image.open(ASSETS / name).convert("RGB")).copy()).float() / 255


@pytest.fixture(scope="module")
def astronaut():
    return _photo("astronaut.jpg")


@pytest.fixture(scope="module")
def chelsea():
    return _photo("chelsea.jpg")


def _grid(h, w):
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    return xs, ys


def _disc(h, w, cx, cy, r):
    xs, ys = _grid(h, w)
    return (((xs - cx) ** 2 + (ys - cy) ** 2) <= r * r).float()


def _translate(region, d, frames):
    """Flow moving ``region`` (H, W) by d * t, t from 0 to 1 over the frames."""
    t = torch.linspace(0, 1, frames).view(frames, 1, 1, 1)
    return t * torch.tensor(d, dtype=torch.float32) * region[None, ..., None]


MARK = torch.tensor([0.0, 1.0, 0.0])  # pure green: absent from both photos


def _red_disc_image(img, cx, cy, r):
    """The photo with a pure green disc painted on it."""
    h, w = img.shape[:2]
    disc = _disc(h, w, cx, cy, r)
    out = img.clone()
    out[disc > 0] = MARK
    return out, disc


def _red_centroid(frame):
    """Centroid of the painted disc, weighted by how close each pixel is to its colour."""
    near = (1 - (frame - MARK).norm(dim=-1) / 0.6).clamp(min=0)
    assert near.sum() > 100
    xs, ys = _grid(*frame.shape[:2])
    return float((near * xs).sum() / near.sum()), float((near * ys).sum() / near.sum())


def test_frame0_and_far_pixels_are_bitwise_input(astronaut):
    h, w = astronaut.shape[:2]
    disc = _disc(h, w, 250, 170, 40)
    frames = animate(astronaut, MotionField(_translate(disc, (20, 10), 6), disc), progress=False)
    assert frames.shape == (6, h, w, 3) and frames.dtype == astronaut.dtype
    assert torch.equal(frames[0], astronaut)
    # everything farther from the region than the drag (plus the soft band the object's edge
    # gets) is exactly the input in every frame
    far = _disc(h, w, 250, 170, 40 + 23 + warp_animator.matte_radius(h, w)) == 0
    assert torch.equal(frames[:, far], astronaut[far].expand(6, -1, -1))
    assert not torch.equal(frames[-1], astronaut)


def test_smooth_field_beyond_its_reach_is_exact(chelsea):
    h, w = chelsea.shape[:2]
    xs, ys = _grid(h, w)
    d2 = (xs - 220) ** 2 + (ys - 150) ** 2
    fall = torch.exp(-d2 / (2 * 30.0 ** 2)) * (d2 <= 70 ** 2)  # exactly zero beyond 70 px
    flow = _translate(fall, (25.0, -12.0), 5)
    frames = animate(chelsea, MotionField(flow), progress=False)
    far = d2 > (70 + 28) ** 2
    assert torch.equal(frames[:, far], chelsea[far].expand(5, -1, -1))
    assert (frames[-1] - chelsea).abs().max() > 0.1


def test_translated_object_lands_where_expected(astronaut):
    img, disc = _red_disc_image(astronaut, 200, 300, 20)
    frames = animate(img, MotionField(_translate(disc, (20, 10), 5), disc), progress=False)
    for k in range(5):
        cx, cy = _red_centroid(frames[k])
        assert abs(cx - (200 + 20 * k / 4)) < 1.0 and abs(cy - (300 + 10 * k / 4)) < 1.0
    # integer displacement: the object's pixels arrive unchanged
    inner = _disc(512, 512, 220, 310, 18) > 0
    src = _disc(512, 512, 200, 300, 18) > 0
    assert torch.allclose(frames[-1][inner], img[src], atol=1e-5)


def test_moving_object_is_in_front(chelsea):
    h, w = chelsea.shape[:2]
    img, disc = _red_disc_image(chelsea, 150, 150, 25)
    # the background under the target also moves (slower, not in the mask): the object still wins
    other = _disc(h, w, 210, 150, 30) * (disc == 0)
    flow = _translate(disc, (60, 0), 4) + _translate(other, (5, 0), 4)
    frames = animate(img, MotionField(flow, disc), progress=False)
    landed = _disc(h, w, 210, 150, 22) > 0
    assert torch.allclose(frames[-1][landed], MARK, atol=1e-4)
    # without a mask the faster pixels are in front (metric from the motion magnitude)
    frames = animate(img, MotionField(flow), progress=False)
    assert torch.allclose(frames[-1][landed], MARK, atol=1e-3)
    # a plain average splat would mix the two: make sure that is not what happens
    mixed = 0.5 * (MARK + img[landed])
    assert (frames[-1][landed] - mixed).abs().mean() > 0.1


def _gradient_energy(x):
    """Mean squared forward differences of (..., H, W, 3)."""
    gx = x[..., :, 1:, :] - x[..., :, :-1, :]
    gy = x[..., 1:, :, :] - x[..., :-1, :, :]
    return float((gx ** 2).mean() + (gy ** 2).mean())


def test_holes_are_filled_with_texture_from_the_background(chelsea):
    # the cat's fur around a disc that moves away: the revealed place gets fur-like texture,
    # copied from around it (not a smooth blend), in colours of its surroundings
    h, w = chelsea.shape[:2]
    cx, cy, r = 300, 200, 30
    disc = _disc(h, w, cx, cy, r)
    frames, holes = animate(chelsea, MotionField(_translate(disc, (0, -90), 4), disc),
                            progress=False, return_holes=True)
    xs, ys = _grid(h, w)
    d2 = (xs - cx) ** 2 + (ys - cy) ** 2
    hole = d2 <= (r - 2) ** 2
    assert bool((holes[-1][hole] > 0.99).all())
    ring = (d2 > (r + 4) ** 2) & (d2 <= (r + 24) ** 2) & (ys > cy - r)
    filled = frames[-1][hole]
    assert (filled.mean(0) - chelsea[ring].mean(0)).abs().max() < 0.08  # the colours of around it
    # texture: the fill's gradient energy is close to its surroundings', a smooth fill's is not
    y0, x0 = cy - r // 2, cx - r // 2
    inner = frames[-1][y0:y0 + r, x0:x0 + r]
    around = chelsea[cy + r + 4:cy + 2 * r + 4, x0:x0 + r]
    smooth = animate(chelsea, MotionField(_translate(disc, (0, -90), 4), disc), fill="stretch",
                     progress=False)[-1][y0:y0 + r, x0:x0 + r]
    ratio, smooth_ratio = _gradient_energy(inner) / _gradient_energy(around), \
        _gradient_energy(smooth) / _gradient_energy(around)
    assert ratio > 0.5 and smooth_ratio < 0.2, (ratio, smooth_ratio)


def test_fill_modes(chelsea):
    h, w = chelsea.shape[:2]
    disc = _disc(h, w, 200, 150, 30)
    field = MotionField(_translate(disc, (40, 0), 3), disc)  # the object still touches its hole
    none, holes = animate(chelsea, field, fill="none", progress=False, return_holes=True)
    gap = holes[-1] > 0.99
    assert gap.sum() > 1000 and none[-1][gap].abs().max() == 0  # holes left black
    stretch = animate(chelsea, field, fill="stretch", progress=False)
    # filled from around (the object included): a convex mix of the frame's other pixels
    assert stretch[-1][gap].mean() > 0.2
    assert (stretch[-1][gap].min(dim=0).values >= stretch[-1][~gap].min(dim=0).values - 1e-6).all()
    inpaint = animate(chelsea, field, progress=False)
    assert (inpaint[-1][gap] - stretch[-1][gap]).abs().mean() > 0.01  # the two fills differ
    keep = ~gap & (holes[-1] == 0)
    assert torch.allclose(none[-1][keep], inpaint[-1][keep], atol=1e-6)


def test_loop_returns_to_frame0(chelsea):
    h, w = chelsea.shape[:2]
    img, disc = _red_disc_image(chelsea, 150, 150, 20)
    n = 8
    frames = animate(img, MotionField(_translate(disc, (40, 0), n), disc), loop=True, progress=False)
    assert torch.equal(frames[0], img)
    # out and back: the far end at n/2, frame n-1 mirrors frame 1 (one step before frame 0)
    assert abs(_red_centroid(frames[n // 2])[0] - 190) < 1.0
    assert torch.allclose(frames[n - 1], frames[1], atol=1e-4)
    cx = [_red_centroid(f)[0] for f in frames] + [_red_centroid(frames[0])[0]]
    steps = np.abs(np.diff(cx))
    assert steps[-1] <= steps.max() and steps[-1] < 40 / 2


def test_loop_flow_timing():
    flow = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 2, 2, 2).contiguous()
    lf = loop_flow(flow)
    tau = lf[:, 0, 0, 0]
    expected = 4 * (1 - np.cos(2 * np.pi * np.arange(5) / 5)) / 2
    assert np.allclose(tau.numpy(), expected, atol=1e-5)
    assert tau[0] == 0


def test_mask_restricts_motion(astronaut):
    h, w = astronaut.shape[:2]
    xs, ys = _grid(h, w)
    flow = _translate(torch.ones(h, w), (6, 3), 4)  # the whole image moves
    mask = ((xs >= 100) & (xs < 300) & (ys >= 150) & (ys < 350)).float()
    frames = animate(astronaut, MotionField(flow), mask=mask, progress=False)
    out = mask == 0
    assert torch.equal(frames[:, out], astronaut[out].expand(4, -1, -1))
    inside = (xs >= 120) & (xs < 280) & (ys >= 170) & (ys < 330)
    assert torch.allclose(frames[-1][inside], astronaut[(ys >= 167) & (ys < 327) & (xs >= 114) & (xs < 274)],
                          atol=1e-5)


def test_batching_does_not_change_the_result(chelsea, monkeypatch):
    h, w = chelsea.shape[:2]
    disc = _disc(h, w, 200, 150, 30)
    field = MotionField(_translate(disc, (17.5, 6.25), 5))
    ref = animate(chelsea, field, progress=False)
    monkeypatch.setattr(warp_animator, "CHUNK_BYTES", 1)  # one frame per batch
    assert torch.allclose(animate(chelsea, field, progress=False), ref, atol=1e-6)


def test_progress_and_interrupt(chelsea, monkeypatch):
    h, w = chelsea.shape[:2]
    disc = _disc(h, w, 200, 150, 30)
    field = MotionField(_translate(disc, (10, 0), 4))
    seen = []

    class Bar:
        def __init__(self, total, desc=""):
            seen.append(("total", total))

        def update(self, n=1):
            seen.append(("update", n))

    monkeypatch.setattr(warp_animator, "ProgressBar", Bar)
    animate(chelsea, field)
    assert seen[0] == ("total", 4) and sum(n for k, n in seen[1:] if k == "update") == 4

    def stop():
        raise Interrupted()

    monkeypatch.setattr(warp_animator, "check_interrupt", stop)
    with pytest.raises(Interrupted):
        animate(chelsea, field)


def test_input_validation(chelsea):
    h, w = chelsea.shape[:2]
    flow = torch.zeros(4, h, w, 2)
    with pytest.raises(ValueError, match=r"field: the motion field is 450x300 but the image is 451x300"):
        animate(chelsea, MotionField(torch.zeros(4, h, w - 1, 2)), progress=False)
    with pytest.raises(ValueError, match=r"mask: the mask is 451x299 but the image is 451x300"):
        animate(chelsea, MotionField(flow), mask=torch.ones(h - 1, w), progress=False)
    with pytest.raises(ValueError, match="at least 2 frames"):
        animate(chelsea, MotionField(torch.zeros(1, h, w, 2)), progress=False)
    bad = flow.clone()
    bad[2, 5, 5, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN .*frame 2"):
        animate(chelsea, MotionField(bad), progress=False)
    for v in (float("inf"), -float("inf")):  # an infinity among finite values, whatever its sign
        bad = flow.clone()
        bad[3, h - 1, w - 1, 1] = v
        with pytest.raises(ValueError, match="infinite .*frame 3"):
            animate(chelsea, MotionField(bad), progress=False)
    with pytest.raises(ValueError, match="fill"):
        animate(chelsea, MotionField(flow), fill="blur", progress=False)
    with pytest.raises(ValueError, match="image: must be"):
        animate(chelsea[..., :2], MotionField(flow), progress=False)
    # a still field gives the input in every frame
    still = animate(chelsea, MotionField(flow), progress=False)
    assert torch.equal(still, chelsea.expand(4, -1, -1, -1))


def test_stretched_region_is_covered_without_holes(chelsea):
    # a zoom by 1.8x around the eye, fading out smoothly: the stretched interior must be the
    # magnified photo (no fill showing through the gaps between the splatted pixels)
    h, w = chelsea.shape[:2]
    xs, ys = _grid(h, w)
    cx, cy, k = 270.0, 120.0, 0.8
    d2 = (xs - cx) ** 2 + (ys - cy) ** 2
    env = torch.exp(-d2 / (2 * 40.0 ** 2)) * (d2 <= 90 ** 2)
    flow = torch.stack([(xs - cx) * k * env, (ys - cy) * k * env], dim=-1)
    flow = torch.stack([torch.zeros_like(flow), flow])
    frames, holes = animate(chelsea, MotionField(flow), progress=False, return_holes=True)
    centre = d2 <= 20 ** 2
    assert holes[-1][centre].max() < 0.02
    # reference: near the centre the map is q = c + 1.8 (p - c), so out(q) = photo(c + (q - c) / 1.8)
    src = torch.stack([cx + (xs - cx) / 1.8, cy + (ys - cy) / 1.8], dim=-1)
    grid = torch.stack([src[..., 0] / (w - 1) * 2 - 1, src[..., 1] / (h - 1) * 2 - 1], dim=-1)
    ref = torch.nn.functional.grid_sample(chelsea.permute(2, 0, 1)[None], grid[None], align_corners=True)
    ref = ref[0].permute(1, 2, 0)
    assert (frames[-1][centre] - ref[centre]).abs().mean() < 0.03


def test_soft_object_mask_is_the_layer_alpha(chelsea):
    # a feathered object mask is used as the object's alpha as given: the landed object is the
    # object's colour over the still background with that alpha, and its solid middle is exact
    from kinema.kernels.masks import feather
    h, w = chelsea.shape[:2]
    soft = feather(_disc(h, w, 200, 150, 30), 6)
    flow = _translate((soft > 0).float(), (8, 0), 3)
    frames = animate(chelsea, MotionField(flow, soft), progress=False)
    xs, ys = _grid(h, w)
    middle = ((xs - 208) ** 2 + (ys - 150) ** 2) <= 20 ** 2
    assert torch.allclose(frames[-1][middle], torch.roll(chelsea, 8, dims=1)[middle], atol=1e-4)
    far = ((xs - 200) ** 2 + (ys - 150) ** 2) > 60 ** 2
    assert torch.equal(frames[-1][far], chelsea[far])
