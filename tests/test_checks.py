"""The shared argument checks (their messages through the kernels are in test_motion_kernels,
test_flow, test_masks and test_warp_animator)."""
import pytest
import torch

from kinema.kernels.checks import finite_number, mask_plane, region_mask


def test_finite_number():
    assert finite_number("2.5", "falloff", "pixels", minimum=0) == 2.5
    assert finite_number(-3, "strength") == -3.0
    with pytest.raises(ValueError, match=r"falloff: expected a number of pixels, got 'wide'"):
        finite_number("wide", "falloff", "pixels")
    with pytest.raises(ValueError, match=r"falloff: -1 must be a finite number of pixels >= 0"):
        finite_number(-1, "falloff", "pixels", minimum=0)
    with pytest.raises(ValueError, match=r"strength: inf must be a finite number$"):
        finite_number(float("inf"), "strength")


def test_mask_plane_and_region():
    m = torch.zeros(1, 3, 4, dtype=torch.bool)
    m[0, 1, 2] = True
    plane = mask_plane(m, (4, 3))
    assert plane.shape == (3, 4) and plane.dtype == torch.bool
    assert torch.equal(region_mask(m.float() * 0.6, (4, 3), "region", "draw one"), m[0])
    assert torch.equal(mask_plane([[0.0, 1.0]], (2, 1)), torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"region: the mask is 4x3 but the flow is 3x4 \(width x height\)"):
        mask_plane(m, (3, 4), "region", against="flow")
    with pytest.raises(ValueError, match=r"mask: expected an \(H, W\) mask, got shape \(2, 3, 4\)"):
        mask_plane(torch.zeros(2, 3, 4), (4, 3))
    with pytest.raises(ValueError, match="mask: expected an \\(H, W\\) mask, got object"):
        mask_plane(object(), (4, 3))
    with pytest.raises(ValueError, match="mask: the mask has NaN"):
        mask_plane(torch.full((3, 4), float("nan")), (4, 3))
    with pytest.raises(ValueError, match="region: the mask is empty .*; draw one"):
        region_mask(torch.full((3, 4), 0.5), (4, 3), "region", "draw one")
