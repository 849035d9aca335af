import pytest
import torch

from kinema.kernels.warp import backward_warp, soft_splat, splat_operator


def _img(b=2, c=3, h=9, w=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g)


def test_identity_flow_is_identity():
    src = _img()
    zero = torch.zeros(2, 9, 11, 2)
    assert torch.allclose(backward_warp(src, zero), src, atol=1e-6)
    for mode in ("avg", "sum"):
        assert torch.allclose(soft_splat(src, zero, mode=mode), src, atol=1e-6)


def test_integer_shift_exact_and_holes_zero():
    src = _img(1, 2, 5, 6)
    flow = torch.zeros(1, 5, 6, 2)
    flow[..., 0] = 2.0  # move right by 2
    out = soft_splat(src, flow, mode="avg")
    assert torch.allclose(out[..., 2:], src[..., :4], atol=1e-6)
    assert torch.equal(out[..., :2], torch.zeros_like(out[..., :2]))


def test_sum_splat_conserves_mass_inside():
    src = _img(1, 1, 16, 16)
    flow = torch.full((1, 16, 16, 2), 0.0)
    flow[:, 4:12, 4:12] = torch.tensor([0.3, -0.7])  # fractional, stays inside
    out = soft_splat(src, flow, mode="sum")
    assert torch.allclose(out.sum(), src.sum(), rtol=1e-5)


def test_softmax_front_wins():
    src = torch.zeros(1, 1, 1, 4)
    src[0, 0, 0, 0] = 1.0  # foreground value
    src[0, 0, 0, 2] = 5.0  # background value already at the target
    flow = torch.zeros(1, 1, 4, 2)
    flow[0, 0, 0, 0] = 2.0  # foreground moves onto pixel 2
    metric = torch.zeros(1, 1, 1, 4)
    metric[0, 0, 0, 0] = 30.0
    out = soft_splat(src, flow, metric=metric, mode="softmax")
    assert out[0, 0, 0, 2].item() == pytest.approx(1.0, abs=1e-6)
    avg = soft_splat(src, flow, mode="avg")
    assert avg[0, 0, 0, 2].item() == pytest.approx(3.0, abs=1e-6)


def test_backward_forward_roundtrip_for_translation():
    src = _img(1, 3, 12, 12)
    flow = torch.zeros(1, 12, 12, 2)
    flow[..., 1] = 1.0
    fwd = soft_splat(src, flow)  # moves down by 1
    back = backward_warp(fwd, flow)  # reads from one row below
    assert torch.allclose(back[..., :-1, :], src[..., :-1, :], atol=1e-6)


def test_bad_shapes_and_mode():
    src = _img()
    with pytest.raises(ValueError, match="flow must be"):
        soft_splat(src, torch.zeros(2, 9, 10, 2))
    with pytest.raises(ValueError, match="mode"):
        soft_splat(src, torch.zeros(2, 9, 11, 2), mode="max")
    with pytest.raises(ValueError, match="metric"):
        soft_splat(src, torch.zeros(2, 9, 11, 2), mode="softmax")


def test_nonfinite_flow_sources_are_dropped():
    src = _img(1, 1, 4, 4)
    flow = torch.zeros(1, 4, 4, 2)
    flow[0, 0, 0, 0] = float("nan")
    out, wgt = soft_splat(src, flow, return_weight=True)
    assert torch.isfinite(out).all()
    assert wgt[0, 0, 0, 0] == 0


def test_softmax_keeps_low_metric_pixels_far_from_a_high_metric():
    # a background pixel that nothing lands on keeps its value even when another pixel's metric
    # is large (the overflow shift must not let eps swamp the background weights)
    src = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    flow = torch.zeros(1, 6, 6, 2)
    flow[0, 0, 0] = torch.tensor([1.0, 0.0])
    metric = torch.zeros(1, 1, 6, 6)
    metric[0, 0, 0, 0] = 40.0
    out = soft_splat(src, flow, metric=metric, mode="softmax")
    assert torch.allclose(out[..., 3:, 3:], src[..., 3:, 3:], atol=1e-6)
    assert torch.allclose(out[..., 0, 1], src[..., 0, 0], atol=1e-6)


def test_splat_points_matches_soft_splat_and_accumulates():
    from kinema.kernels.warp import base_grid, splat_points
    src = _img(2, 3, 7, 8)
    g = torch.Generator().manual_seed(3)
    flow = (torch.rand(2, 7, 8, 2, generator=g) - 0.5) * 4
    ref = soft_splat(src, flow, mode="sum")
    pos = (base_grid(7, 8) + flow).reshape(2, -1, 2)
    out = splat_points(src.reshape(2, 3, -1), pos, (8, 7))
    assert torch.allclose(out, ref, atol=1e-6)
    # two disjoint halves splatted one after the other into one accumulator give the whole
    acc = torch.zeros(2, 3, 7, 8)
    vals = src.reshape(2, 3, -1)
    first, second = torch.arange(0, 30), torch.arange(30, 56)
    splat_points(vals[..., first], pos[:, first], (8, 7), acc=acc)
    assert not torch.allclose(acc, ref, atol=1e-3)
    splat_points(vals[..., second], pos[:, second], (8, 7), acc=acc)
    assert torch.allclose(acc, ref, atol=1e-6)
    with pytest.raises(ValueError, match="values must be"):
        splat_points(src.reshape(2, 3, -1), pos[:, :5], (8, 7))



def test_splat_operator_is_the_avg_splat_as_a_matrix():
    """Built once from the flow, the sparse map applied to any source equals soft_splat "avg":
    sub-pixel, out-of-image and non-finite sources, pixels nothing lands on, two batch items."""
    g = torch.Generator().manual_seed(5)
    flow = (torch.rand(2, 7, 8, 2, generator=g) - 0.5) * 6
    flow[0, 0, 0] = torch.tensor([float("inf"), 0.0])
    flow[1, 3, 3] = torch.tensor([20.0, 0.0])  # leaves the image
    op = splat_operator(flow)
    assert op.shape == (112, 112) and op.is_coalesced()
    rows = op.indices()[0]
    assert ((rows // 56) == (op.indices()[1] // 56)).all()  # no mixing of batch items
    for seed in (0, 1):
        src = _img(2, 3, 7, 8, seed=seed)
        tokens = src.permute(0, 2, 3, 1).reshape(112, 3)
        got = (op @ tokens).reshape(2, 7, 8, 3).permute(0, 3, 1, 2)
        assert torch.allclose(got, soft_splat(src, flow, mode="avg"), atol=1e-6)
    # a pixel hit by exactly one integer-shifted source copies it; its row sums to 1 / (1 + eps)
    shift = torch.zeros(1, 3, 3, 2)
    shift[..., 0] = 1.0
    one = splat_operator(shift).to_dense()
    assert one[1, 0] == pytest.approx(1 / (1 + 1e-7)) and one[0].sum() == 0  # column 0 is a hole
    with pytest.raises(ValueError, match="flow must be"):
        splat_operator(torch.zeros(7, 8, 2))
