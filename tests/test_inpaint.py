import numpy as np
import pytest
import torch
from PIL import Image
from pathlib import Path

from kinema.kernels.inpaint import fill_holes, push_pull

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def test_constant_and_linear_fill():
    img = torch.full((1, 3, 32, 32), 0.4)
    hole = torch.zeros(1, 1, 32, 32)
    hole[..., 8:24, 8:24] = 1
    out = fill_holes(img * (1 - hole), hole)
    assert torch.allclose(out, img, atol=1e-6)
    # a horizontal ramp: relaxation makes the fill close to the harmonic (linear) solution
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(1, 1, 32, 32).contiguous()
    out = fill_holes(ramp * (1 - hole), hole, relax_iters=30)
    assert (out - ramp).abs()[..., 8:24, 8:24].max() < 0.06


def test_known_pixels_untouched_and_fill_within_range():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 20, 27, generator=g)
    hole = (torch.rand(2, 1, 20, 27, generator=g) > 0.7).float()
    out = fill_holes(img, hole)
    assert torch.equal(out[hole.expand_as(img) == 0], img[hole.expand_as(img) == 0])
    known = img[hole.expand_as(img) == 0]
    assert out.min() >= known.min() - 1e-6 and out.max() <= known.max() + 1e-6


def test_no_known_pixel_gives_zeros_and_shapes_checked():
    out = push_pull(torch.rand(1, 3, 5, 5), torch.zeros(1, 1, 5, 5))
    assert torch.equal(out, torch.zeros(1, 3, 5, 5))
    with pytest.raises(ValueError, match="weight must be"):
        push_pull(torch.rand(1, 3, 5, 5), torch.zeros(1, 5, 5))


def test_photo_hole_is_filled_like_its_surroundings():
    im = torch.from_numpy(np.asarray(Image.open(ASSETS / "chelsea.jpg").convert("RGB")).copy()).float() / 255
    img = im.permute(2, 0, 1)[None]
    h, w = img.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    d2 = (xs - 300) ** 2 + (ys - 150) ** 2
    hole = (d2 <= 30 ** 2).float()[None, None]
    ring = ((d2 > 30 ** 2) & (d2 <= 40 ** 2))
    out = fill_holes(img * (1 - hole), hole)
    filled = out[0][:, hole[0, 0] > 0]
    ring_px = img[0][:, ring]
    # no hole pixel darker than the darkest ring pixel (per channel), mean colour close to the ring
    assert (filled.min(dim=1).values >= ring_px.min(dim=1).values - 1e-5).all()
    assert (filled.mean(dim=1) - ring_px.mean(dim=1)).abs().max() < 0.08
    # and much closer to the true hidden content than black is
    truth = img[0][:, hole[0, 0] > 0]
    assert (filled - truth).abs().mean() < 0.5 * truth.abs().mean()


def test_need_limits_relaxation_but_not_the_needed_pixels():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 40, 40, generator=g)
    known = torch.ones(1, 1, 40, 40)
    known[..., 5:35, 5:35] = 0
    need = torch.zeros(1, 1, 40, 40, dtype=torch.bool)
    need[..., 30:35, 5:35] = True  # only a strip of the hole is used
    full = push_pull(img, known, relax_iters=3)
    part = push_pull(img, known, relax_iters=3, need=need)
    # inside the needed strip (away from the relaxation box edge) the two agree closely
    assert (full - part)[..., 31:35, 6:34].abs().max() < 0.05
    assert torch.equal(part[known.expand_as(img) > 0], img[known.expand_as(img) > 0])
