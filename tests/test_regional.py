"""Regional-animation kernels: the latent keep weight, the feathered paste alpha, the paste."""
import pytest
import torch

from kinema.kernels import regional as R


def _square(h=48, w=56, y0=8, y1=40, x0=8, x1=48):
    m = torch.zeros(1, 1, h, w)
    m[..., y0:y1, x0:x1] = 1.0
    return m


def test_latent_keep_counts_the_covered_share_of_each_cell():
    m = torch.zeros(1, 1, 16, 16)
    m[..., :8, :8] = 1.0           # cell (0, 0) fully inside
    m[..., 8:10, 8:16] = 1.0       # cell (1, 1): 16 of its 64 pixels inside
    keep = R.latent_keep(m, (2, 2))
    assert keep.shape == (1, 1, 1, 2, 2)
    assert keep[0, 0, 0].tolist() == [[0.0, 1.0], [1.0, 0.75]]


def test_blend_is_the_target_where_keep_is_one():
    x = torch.randn(1, 4, 3, 2, 2)
    target = torch.randn(1, 4, 3, 2, 2)
    keep = torch.tensor([[1.0, 0.0], [0.5, 1.0]]).view(1, 1, 1, 2, 2)
    out = R.blend(x, target, keep)
    assert torch.equal(out[..., 0, 0], target[..., 0, 0]) and torch.equal(out[..., 1, 1], target[..., 1, 1])
    assert torch.equal(out[..., 0, 1], x[..., 0, 1])
    torch.testing.assert_close(out[..., 1, 0], (x[..., 1, 0] + target[..., 1, 0]) / 2)


def test_paste_alpha_is_zero_outside_and_ramps_inside():
    m = _square()
    a = R.paste_alpha(m, 3)
    assert a.shape == (48, 56)
    assert torch.equal(a[m[0, 0] == 0], torch.zeros_like(a[m[0, 0] == 0]))   # exactly 0 outside
    assert a[24, 28] == 1.0                                                 # deep inside: 1
    row = a[24, 8:21]                                                       # from the edge inwards
    assert row[0] < 0.2 and bool((row[1:] >= row[:-1] - 1e-6).all())       # rises monotonically
    assert torch.equal(R.paste_alpha(m, 0), m[0, 0])                        # no feather: the mask
    with pytest.raises(ValueError, match="feather"):
        R.paste_alpha(m, -1)


def test_paste_keeps_the_source_bit_for_bit_where_alpha_is_zero():
    torch.manual_seed(0)
    frames = torch.rand(5, 48, 56, 3)
    src = torch.rand(48, 56, 3)
    alpha = R.paste_alpha(_square(), 3)
    out = R.paste(frames, src, alpha)
    outside = alpha == 0
    assert torch.equal(out[:, outside], src[outside].expand(5, -1, -1))
    inside = alpha == 1
    assert bool(inside.any()) and torch.equal(out[:, inside], frames[:, inside])
    mid = (alpha > 0.2) & (alpha < 0.8)
    assert bool(mid.any())
    torch.testing.assert_close(out[:, mid], alpha[mid][None, :, None] * frames[:, mid]
                               + (1 - alpha[mid][None, :, None]) * src[mid])


def test_fit_mask_crops_like_the_picture_and_rejects_bad_masks():
    m = torch.zeros(1, 20, 40)
    m[:, :, 25:] = 1.0                              # columns 25-39
    out = R.fit_mask(m, 20, 20)                     # cover 20x20 keeps columns 10-29: 25-29 are in
    assert out.shape == (1, 1, 20, 20) and float(out[..., 15:].sum()) == 20 * 5 and float(out[..., :10].sum()) == 0
    with pytest.raises(ValueError, match="mask: the mask is empty"):
        R.fit_mask(torch.zeros(1, 8, 8), 8, 8)
    with pytest.raises(ValueError, match=r"mask: expected a MASK"):
        R.fit_mask(torch.zeros(8), 8, 8)
    assert R.default_feather(512, 768) == 8 and R.default_feather(16, 16) == 1
