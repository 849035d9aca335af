import json
import math

import numpy as np
import pytest
import torch

from kinema.kernels.motion import (EASINGS, MAX_FRAMES, dense_motion, distance_to_region, ease,
                                   resample_track, sample_track)

W, H = 64, 48


def _dist_to(points, size=(W, H)):
    """(H, W) brute-force Euclidean distance of every pixel to the nearest of (P, 2) points."""
    w, h = size
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    pix = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)
    return torch.cdist(pix, points.to(torch.float64)).min(1).values.reshape(h, w)


def _rect(x0, y0, x1, y1, size=(W, H)):
    w, h = size
    m = torch.zeros(h, w)
    m[y0:y1 + 1, x0:x1 + 1] = 1
    return m


# ---------------------------------------------------------------- easing


def test_easing_endpoints_and_values():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    for kind in EASINGS:
        e = ease(t, kind)
        assert e[0] == 0.0, kind
        assert e[3] == (0.0 if kind == "loop" else 1.0), kind
    assert torch.allclose(ease(t, "linear"), t)
    assert torch.allclose(ease(t, "ease_in"), t * t)
    assert torch.allclose(ease(t, "ease_out"), 1 - (1 - t) ** 2)
    assert torch.allclose(ease(t, "ease_in_out"), torch.tensor([0.0, 0.15625, 0.5, 1.0]))
    assert torch.allclose(ease(t, "loop"), torch.tensor([0.0, 0.5, 1.0, 0.0]), atol=1e-7)
    dense = torch.linspace(0, 1, 2001, dtype=torch.float64)
    back = ease(dense, "ease_out_back")
    assert 1.09 < float(back.max()) < 1.11  # overshoots by ~10 % and comes back
    for kind in ("linear", "ease_in", "ease_out", "ease_in_out"):
        assert bool((ease(dense, kind).diff() >= 0).all()), kind
    # loop rises to 1 at t = 0.5, symmetric, smooth (zero speed at the ends)
    loop = ease(dense, "loop")
    assert torch.allclose(loop, loop.flip(0), atol=1e-12)
    assert float(loop[1]) < 1e-5


def test_easing_bad_inputs():
    with pytest.raises(ValueError, match="easing: 'bounce'"):
        ease(torch.tensor([0.5]), "bounce")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ease(torch.tensor([1.5]), "linear")
    with pytest.raises(ValueError, match="NaN"):
        ease(torch.tensor([float("nan")]), "linear")


# ---------------------------------------------------------------- tracks


def test_resample_track_linear_in_time():
    track = torch.tensor([[0.0, 0.0], [10.0, 0.0], [10.0, 20.0]])  # points at t = 0, 0.5, 1
    out = resample_track(track, 5)
    expect = torch.tensor([[0.0, 0.0], [5.0, 0.0], [10.0, 0.0], [10.0, 10.0], [10.0, 20.0]])
    assert torch.equal(out, expect)
    # tracks of different lengths all give `frames` points, ends exact
    for n in (2, 3, 7, 40):
        tr = torch.stack([torch.linspace(3, 50, n), torch.linspace(7, -4, n) ** 2], -1)
        r = resample_track(tr, 16)
        assert r.shape == (16, 2)
        assert torch.equal(r[0], tr[0]) and torch.equal(r[-1], tr[-1])
    # same path sampled with more points: same positions on a straight line
    a = resample_track(torch.tensor([[0.0, 0.0], [30.0, 15.0]]), 7)
    b = resample_track(torch.tensor([[0.0, 0.0], [10.0, 5.0], [20.0, 10.0], [30.0, 15.0]]), 7)
    assert torch.allclose(a, b, atol=1e-5)
    assert resample_track(track, 1).shape == (1, 2)


def test_resample_track_easing_applies_to_time():
    track = torch.tensor([[0.0, 0.0], [100.0, 0.0]])
    out = resample_track(track, 5, easing="ease_in")
    assert torch.allclose(out[:, 0], 100 * torch.tensor([0.0, 0.0625, 0.25, 0.5625, 1.0]))
    back = resample_track(track, 33, easing="ease_out_back")
    assert float(back[:, 0].max()) > 105  # overshoot extrapolates along the last direction
    assert torch.allclose(back[:, 1], torch.zeros(33))
    # loop: frame k at time k / frames, so the frame after the last one would be frame 0 again
    loop = resample_track(track, 4, easing="loop")
    assert torch.allclose(loop[:, 0], torch.tensor([0.0, 50.0, 100.0, 50.0]), atol=1e-4)


def test_pchip_matches_motion_i2v_trajectory_interpolation(fixtures_dir):
    """Motion-I2V's demo resamples each drawn trajectory with PCHIP to 16 points."""
    data = json.loads((fixtures_dir / "motion_i2v" / "flow_normalisation.json").read_text())
    n_checked = 0
    for case in data["cases"].values():
        if "tracks_grid_int" not in case:
            continue
        for grid, ref in zip(case["tracks_grid_int"], case["tracks_interpolated_16"]):
            tr = torch.tensor(grid, dtype=torch.float64)
            if tr.shape[0] < 2:
                continue
            out = resample_track(tr, 16, method="pchip")
            diff = (out - torch.tensor(ref, dtype=torch.float64)).abs().max()
            assert float(diff) < 1e-9, float(diff)
            n_checked += 1
    assert n_checked >= 2


def test_pchip_equals_scipys_pchip_interpolator():
    from scipy.interpolate import PchipInterpolator
    g = torch.Generator().manual_seed(3)
    for n in (2, 3, 4, 9):
        tr = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 100).round()
        tr[n // 2] = tr[n // 2 - 1]  # a repeated point: flat piece, zero slopes
        knots = np.linspace(0.0, 1.0, n)
        t = np.linspace(0.0, 1.0, 97)
        ours = sample_track(tr, torch.from_numpy(t), method="pchip").numpy()
        ref = np.stack([PchipInterpolator(knots, tr[:, i].numpy())(t) for i in range(2)], 1)
        assert np.allclose(ours, ref, atol=1e-9), n
        # outside [0, 1] the track goes on straight with the end slopes
        slope = np.stack([PchipInterpolator(knots, tr[:, i].numpy()).derivative()([0.0, 1.0]) for i in range(2)], 1)
        out = sample_track(tr, torch.tensor([-0.25, 1.5], dtype=torch.float64), method="pchip").numpy()
        assert np.allclose(out, [tr[0].numpy() - 0.25 * slope[0], tr[-1].numpy() + 0.5 * slope[1]], atol=1e-9), n


def test_pchip_against_scipy_on_a_wiggly_track():
    """Sign changes, a repeated point and a steep last piece: the end-slope limiter and the flat
    pieces, resampled to Motion-I2V's 16 points."""
    from scipy.interpolate import PchipInterpolator
    pts = np.array([[0, 0], [5, 9], [7, 2], [7, 2], [20, -4], [21, 30]], dtype=np.float64)
    t = np.linspace(0, 1, len(pts))
    ref = np.stack([PchipInterpolator(t, pts[:, i])(np.linspace(0, 1, 16)) for i in range(2)], 1)
    out = resample_track(torch.from_numpy(pts), 16, method="pchip").numpy()
    assert np.abs(out - ref).max() < 1e-9


def test_pchip_shape_preserving():
    tr = torch.tensor([[0.0, 0.0], [1.0, 5.0], [2.0, 5.0], [3.0, 9.0]], dtype=torch.float64)
    t = torch.linspace(0, 1, 301, dtype=torch.float64)
    y = sample_track(tr, t, method="pchip")[:, 1]
    assert bool((y.diff() >= -1e-12).all())  # monotone data -> monotone curve
    mid = y[(t > 1 / 3) & (t < 2 / 3)]
    assert torch.allclose(mid, torch.full_like(mid, 5.0))  # flat where the data is flat


# ---------------------------------------------------------------- dense motion: exact cases


def test_one_drag_start_follows_exactly_flow0_zero():
    drag = torch.tensor([[20.0, 30.0], [30.0, 36.0]])
    flow = dense_motion([drag], (W, H), 6, easing="linear")
    assert flow.shape == (6, H, W, 2) and flow.dtype == torch.float32
    assert torch.equal(flow[0], torch.zeros(H, W, 2))
    k = torch.arange(6, dtype=torch.float32)[:, None] / 5
    assert torch.allclose(flow[:, 30, 20], k * torch.tensor([10.0, 6.0]), atol=1e-5)
    # neighbours move less, in the same direction, and nothing moves farther than the drag
    assert 0 < float(flow[-1, 30, 28, 0]) < 10
    assert float(flow.norm(dim=-1).max()) <= math.hypot(10, 6) + 1e-4


def test_core_around_a_lone_drag_moves_rigidly():
    drag = torch.tensor([[32.0, 24.0], [40.0, 20.0]])
    flow = dense_motion([drag], (W, H), 4, falloff=20.0, easing="linear")  # core radius 5
    near = _dist_to(drag[:1]) <= 5.0
    assert torch.allclose(flow[-1][near], torch.tensor([8.0, -4.0]).expand(int(near.sum()), 2), atol=1e-5)
    ring = (_dist_to(drag[:1]) > 6.0) & (_dist_to(drag[:1]) < 20.0)
    assert bool((flow[-1][ring].norm(dim=-1) < math.hypot(8, 4) - 1e-3).all())


def test_far_pixels_exactly_zero_without_region():
    drags = [torch.tensor([[15.0, 20.0], [25.0, 20.0]]), torch.tensor([[40.0, 30.0], [40.0, 25.0], [44.0, 22.0]])]
    falloff = 6.0
    flow = dense_motion(drags, (W, H), 5, falloff=falloff)
    reach = [10.0, float(math.hypot(4, 8))]
    d0 = _dist_to(drags[0][:1])
    d1 = _dist_to(drags[1][:1])
    outside = (d0 >= reach[0] + falloff) & (d1 >= reach[1] + falloff)
    moving = flow.abs().amax(dim=(0, 3)) > 0
    assert bool(outside.any()) and not bool((moving & outside).any())
    assert bool(moving[~outside].float().mean() > 0.9)
    # the general statement: farther than the longest reach + falloff -> exactly zero
    far = torch.minimum(d0, d1) > max(reach) + falloff
    assert bool((flow[:, far] == 0).all())


def test_anchors_exactly_still():
    drag = torch.tensor([[20.0, 24.0], [36.0, 24.0]])
    anchors = torch.tensor([[26.0, 24.0], [20.0, 34.0], [26.4, 23.6]])  # the last rounds onto the first
    for method in ("shepard", "rbf"):
        flow = dense_motion([drag], (W, H), 6, anchors=anchors, easing="linear", interpolation=method)
        assert torch.equal(flow[:, 24, 26], torch.zeros(6, 2)), method
        assert torch.equal(flow[:, 34, 20], torch.zeros(6, 2)), method
        k = torch.arange(6, dtype=torch.float32) / 5
        assert torch.allclose(flow[:, 24, 20, 0], 16 * k, atol=1e-4), method
        assert torch.allclose(flow[:, 24, 20, 1], torch.zeros(6), atol=1e-4), method


def test_shepard_never_moves_against_the_drag():
    """Behind an anchor the default interpolation keeps moving (a little) with the drag."""
    drag = torch.tensor([[30.0, 24.0], [40.0, 24.0]])
    flow = dense_motion([drag], (W, H), 4, anchors=torch.tensor([[25.0, 24.0]]))
    assert float(flow[..., 0].min()) >= 0.0
    assert float(flow.norm(dim=-1).max()) <= 10 + 1e-4


def test_strength_scales_linearly():
    drags = [torch.tensor([[20.0, 20.0], [28.0, 14.0], [35.0, 20.0]]), torch.tensor([[44.0, 30.0], [40.0, 40.0]])]
    anchors = torch.tensor([[32.0, 30.0]])
    base = dense_motion(drags, (W, H), 7, anchors=anchors)
    for s in (2.5, -1.0, 0.3):
        scaled = dense_motion(drags, (W, H), 7, anchors=anchors, strength=s)
        assert torch.allclose(scaled, s * base, atol=1e-4, rtol=1e-5), s
    assert torch.equal(dense_motion(drags, (W, H), 7, strength=0.0), torch.zeros(7, H, W, 2))


def test_easing_shapes_the_timing():
    drag = torch.tensor([[20.0, 20.0], [40.0, 20.0]])
    f = dense_motion([drag], (W, H), 5, easing="ease_in_out")
    s = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    assert torch.allclose(f[:, 20, 20, 0], 20 * (3 * s ** 2 - 2 * s ** 3), atol=1e-5)
    loop = dense_motion([drag], (W, H), 4, easing="loop")
    assert torch.equal(loop[0], torch.zeros(H, W, 2))
    # out and back: the last frame is one step before the start, not a repeat of it
    assert torch.allclose(loop[:, 20, 20, 0], torch.tensor([0.0, 10.0, 20.0, 10.0]), atol=1e-4)


def test_accepts_parsed_tracks():
    from kinema.formats import parse_tracks
    parsed = parse_tracks('{"tracks": [[[20, 24], [36, 24]]], "anchors": [[26, 24]]}', (W, H))
    a = dense_motion(parsed, (W, H), 4)
    b = dense_motion([torch.tensor([[20.0, 24.0], [36.0, 24.0]])], (W, H), 4, anchors=torch.tensor([[26.0, 24.0]]))
    assert torch.equal(a, b) and torch.equal(a[:, 24, 26], torch.zeros(4, 2))


def test_tracks_of_different_lengths():
    a = torch.tensor([[10.0, 10.0], [20.0, 10.0]])
    b = torch.tensor([[50.0, 30.0], [50.0, 32.0], [50.0, 34.0], [52.0, 36.0], [54.0, 38.0], [56.0, 40.0]])
    flow = dense_motion([a, b], (W, H), 11, easing="linear")
    assert torch.allclose(flow[:, 10, 10], resample_track(a, 11) - a[0], atol=1e-5)
    assert torch.allclose(flow[:, 30, 50], resample_track(b, 11) - b[0], atol=1e-5)


# ---------------------------------------------------------------- region


def test_region_translates_rigidly_and_is_zero_beyond_falloff():
    region = _rect(20, 15, 40, 30)
    drag = torch.tensor([[25.0, 20.0], [33.0, 26.0]])
    falloff = 5.0
    # an anchor far outside the region plays no part
    flow = dense_motion([drag], (W, H), 5, region=region, falloff=falloff, easing="linear",
                        anchors=torch.tensor([[60.0, 5.0]]))
    k = torch.arange(5, dtype=torch.float32)[:, None] / 4
    inside = region > 0.5
    expect = (k * torch.tensor([8.0, 6.0]))[:, None, :].expand(5, int(inside.sum()), 2)
    assert torch.allclose(flow[:, inside], expect, atol=1e-5)
    dist = _dist_to(torch.nonzero(inside).flip(-1).to(torch.float64))
    beyond = dist >= falloff
    assert bool((flow[:, beyond] == 0).all())
    band = (dist > 0) & (dist < falloff)
    mags = flow[-1].norm(dim=-1)
    assert bool((mags[band] > 0).all()) and bool((mags[band] < 10).all())
    # the soft edge decreases with distance
    row = flow[-1, 22, 41:46, 0]
    assert bool((row.diff() < 0).all())


def test_region_several_drags_interpolate_and_anchors_pin():
    region = _rect(8, 8, 56, 40)
    drags = [torch.tensor([[12.0, 24.0], [12.0, 16.0]]), torch.tensor([[52.0, 24.0], [52.0, 32.0]])]
    for method in ("shepard", "rbf"):
        flow = dense_motion(drags, (W, H), 3, region=region, anchors=torch.tensor([[32.0, 12.0]]),
                            easing="linear", interpolation=method)
        assert torch.allclose(flow[-1, 24, 12], torch.tensor([0.0, -8.0]), atol=1e-4)
        assert torch.allclose(flow[-1, 24, 52], torch.tensor([0.0, 8.0]), atol=1e-4)
        assert torch.equal(flow[:, 12, 32], torch.zeros(3, 2))
        mid = flow[-1, 24, 13:52, 1]
        assert bool((mid.diff() >= -1e-4).all()), method  # blends from one drag to the other
    assert float(flow.abs().max()) < 20


def test_all_ones_region_moves_whole_image():
    drag = torch.tensor([[5.0, 5.0], [9.0, 8.0]])
    flow = dense_motion([drag], (W, H), 3, region=torch.ones(H, W), easing="linear")
    assert torch.allclose(flow[-1], torch.tensor([4.0, 3.0]).expand(H, W, 2), atol=1e-5)
    assert torch.allclose(flow[1], torch.tensor([2.0, 1.5]).expand(H, W, 2), atol=1e-5)


def test_region_ignores_drags_far_from_it():
    region = _rect(5, 5, 20, 20)
    near = torch.tensor([[10.0, 10.0], [14.0, 10.0]])
    far = torch.tensor([[55.0, 40.0], [50.0, 40.0]])
    a = dense_motion([near, far], (W, H), 3, region=region, falloff=4)
    b = dense_motion([near], (W, H), 3, region=region, falloff=4)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="no drag starts on or within 4 px of the region"):
        dense_motion([far], (W, H), 3, region=region, falloff=4)


def test_distance_to_region_exact_up_to_limit():
    g = torch.Generator().manual_seed(3)
    reg = torch.rand(40, 50, generator=g) > 0.985
    reg[5, 5] = True
    d = distance_to_region(reg, 9.0)
    ref = _dist_to(torch.nonzero(reg).flip(-1).to(torch.float64), size=(50, 40)).float()
    close = ref <= 9.0
    assert torch.allclose(d[close], ref[close], atol=1e-4)
    assert bool((d[~close] > 9.0).all())


# ---------------------------------------------------------------- device


@pytest.mark.hardware
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    drags = [torch.tensor([[20.0, 20.0], [30.0, 25.0]]), torch.tensor([[40.0, 30.0], [35.0, 40.0]])]
    region = _rect(10, 10, 50, 40)
    for method in ("shepard", "rbf"):
        cpu = dense_motion(drags, (W, H), 6, region=region, anchors=torch.tensor([[30.0, 35.0]]),
                           interpolation=method)
        gpu = dense_motion([d.cuda() for d in drags], (W, H), 6, region=region.cuda(),
                           anchors=torch.tensor([[30.0, 35.0]]), interpolation=method)
        assert gpu.device.type == "cuda"
        assert torch.allclose(cpu, gpu.cpu(), atol=1e-4)


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_give_clear_errors():
    drag = torch.tensor([[10.0, 10.0], [20.0, 10.0]])
    with pytest.raises(ValueError, match="tracks: no drags given — draw at least one drag"):
        dense_motion([], (W, H), 4)
    with pytest.raises(ValueError, match=r"frames: 1 is out of range; use 2\.\.256"):
        dense_motion([drag], (W, H), 1)
    with pytest.raises(ValueError, match="frames: 257"):
        dense_motion([drag], (W, H), MAX_FRAMES + 1)
    with pytest.raises(ValueError, match=r"tracks\[1\]: has NaN"):
        dense_motion([drag, torch.tensor([[1.0, float("nan")], [2.0, 2.0]])], (W, H), 4)
    with pytest.raises(ValueError, match="anchors: has NaN"):
        dense_motion([drag], (W, H), 4, anchors=torch.tensor([[float("inf"), 1.0]]))
    with pytest.raises(ValueError, match=r"tracks\[0\]: has 1 point"):
        dense_motion([torch.tensor([[3.0, 3.0]])], (W, H), 4)
    with pytest.raises(ValueError, match=r"tracks\[0\] start: \(70, 10\) is outside the 64x48 image"):
        dense_motion([torch.tensor([[70.0, 10.0], [60.0, 10.0]])], (W, H), 4)
    with pytest.raises(ValueError, match="region: the mask is 32x32 but the image is 64x48"):
        dense_motion([drag], (W, H), 4, region=torch.ones(32, 32))
    with pytest.raises(ValueError, match="region: the mask is empty"):
        dense_motion([drag], (W, H), 4, region=torch.zeros(H, W))
    with pytest.raises(ValueError, match="region: the mask has NaN"):
        dense_motion([drag], (W, H), 4, region=torch.full((H, W), float("nan")))
    with pytest.raises(ValueError, match="size: expected"):
        dense_motion([drag], (W,), 4)
    with pytest.raises(ValueError, match="strength: nan"):
        dense_motion([drag], (W, H), 4, strength=float("nan"))
    with pytest.raises(ValueError, match="falloff: -1"):
        dense_motion([drag], (W, H), 4, falloff=-1)
    with pytest.raises(ValueError, match="easing: 'zigzag'"):
        dense_motion([drag], (W, H), 4, easing="zigzag")
    with pytest.raises(ValueError, match="anchors: an anchor sits on the start of drag 0"):
        dense_motion([drag], (W, H), 4, anchors=torch.tensor([[10.2, 9.9]]))
    with pytest.raises(ValueError, match="tracks: drags 0 and 1 both start at"):
        dense_motion([drag, torch.tensor([[10.0, 10.0], [10.0, 30.0]])], (W, H), 4)
    with pytest.raises(ValueError, match=r"tracks\[0\]: expected an \(N, 2\)"):
        dense_motion([torch.zeros(3, 3)], (W, H), 4)
