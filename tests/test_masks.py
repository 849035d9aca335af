import math
import time

import pytest
import torch

from kinema.kernels.masks import (bounding_box, connected_component, dilate, erode, feather,
                                  rasterize_strokes, resize, strokes_from_json)


def _disc(h, w, cx, cy, r):
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    return (((xs - cx) ** 2 + (ys - cy) ** 2) <= r * r).float()


def test_resize_modes_keep_range_and_layout():
    m = _disc(20, 30, 10, 10, 6)
    for mode in ("nearest", "bilinear", "area"):
        out = resize(m, (15, 10), mode)
        assert out.shape == (10, 15)
        assert out.min() >= 0 and out.max() <= 1
    up = resize(m, (60, 40), "nearest")
    assert set(up.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(up[::2, ::2], m)
    b = resize(torch.stack([m, 1 - m]), (15, 10), "area")
    assert b.shape == (2, 10, 15)
    # area of a 2x box average on an exactly divisible size
    assert torch.allclose(resize(m, (15, 10), "area"), torch.nn.functional.avg_pool2d(m[None, None], 2)[0, 0])
    with pytest.raises(ValueError, match="mode"):
        resize(m, (4, 4), "cubic")
    with pytest.raises(ValueError, match=r"\(H, W\) or \(B, H, W\)"):
        resize(m[None, None], (4, 4))


def test_feather_softens_edge_only():
    m = _disc(64, 64, 32, 32, 16)
    f = feather(m, 4)
    assert f.shape == m.shape and f.min() >= 0 and f.max() <= 1
    assert f[32, 32] == pytest.approx(1.0, abs=1e-4)  # deep inside
    assert f[0, 0] == pytest.approx(0.0, abs=1e-6)  # far outside
    assert 0.3 < f[32, 48].item() < 0.7  # on the edge
    assert torch.equal(feather(m, 0), m)
    with pytest.raises(ValueError, match="radius"):
        feather(m, -1)


def test_dilate_erode_by_disc_exact():
    m = torch.zeros(21, 21)
    m[10, 10] = 1
    d = dilate(m, 5)
    assert torch.equal(d, _disc(21, 21, 10, 10, 5))
    # erosion of a big disc by r gives the disc of radius R - r (digital discs agree away from ties)
    big = _disc(61, 61, 30, 30, 20)
    e = erode(big, 5)
    ref = _disc(61, 61, 30, 30, 15)
    assert (e != ref).float().sum() <= 8
    assert torch.equal(erode(torch.ones(5, 7), 2), torch.ones(5, 7))  # borders count as inside
    assert torch.equal(dilate(erode(m, 0), 0), m)
    batch = dilate(torch.stack([m, m]), 3)
    assert batch.shape == (2, 21, 21) and torch.equal(batch[0], batch[1])


def test_bounding_box_padding_clamp_empty():
    m = torch.zeros(10, 12)
    m[2:5, 3:7] = 1
    assert bounding_box(m) == (3, 2, 7, 5)
    assert bounding_box(m, padding=2) == (1, 0, 9, 7)
    assert bounding_box(m, padding=100) == (0, 0, 12, 10)
    assert bounding_box(torch.zeros(4, 4)) is None
    with pytest.raises(ValueError, match="padding"):
        bounding_box(m, padding=-1)


def test_connected_component_picks_the_clicked_blob():
    m = torch.zeros(40, 40)
    m[2:10, 2:10] = 1
    m[20:30, 5:35] = 1
    m[20:38, 30:35] = 1  # L shape joined to the bar
    m[11, 11] = 1  # only diagonally touching the first square: separate under 4-connectivity
    cc = connected_component(m, (6, 25))
    assert cc[25, 6] == 1 and cc[35, 32] == 1 and cc[5, 5] == 0 and cc[11, 11] == 0
    assert cc.sum() == 10 * 30 + 8 * 5
    assert connected_component(m, (0, 0)).sum() == 0
    with pytest.raises(ValueError, match="outside"):
        connected_component(m, (40, 3))


def test_connected_component_spiral_and_speed_1024():
    # a serpentine: many turns, every pass still fills whole runs
    m = torch.zeros(1024, 1024)
    for k in range(0, 1024, 64):
        m[k:k + 32, :] = 1
        col = slice(0, 32) if (k // 64) % 2 else slice(992, 1024)
        m[k + 32:k + 64, col] = 1
    t = time.perf_counter()
    cc = connected_component(m, (5, 5))
    dt = time.perf_counter() - t
    assert torch.equal(cc, m)  # everything is one snake
    assert dt < 30  # generous bound only to catch an exponential blow-up


def test_rasterize_strokes_paint_erase_order():
    strokes = [{"mode": "paint", "radius": 5, "points": [[10, 10], [40, 10]]},
               {"mode": "erase", "radius": 3, "points": [[25, 10]]}]
    m = rasterize_strokes(strokes, (50, 20))
    assert m.shape == (20, 50)
    assert m[10, 12] == 1 and m[10, 38] == 1 and m[14, 20] == 1  # capsule body
    assert m[10, 25] == 0  # erased
    assert m[10, 2] == 0 and m[18, 20] == 0  # outside radius
    # anti-aliased edge at distance r from the segment
    assert 0 < m[15, 20].item() < 1
    hard = rasterize_strokes(strokes, (50, 20), antialias=False)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    # area of a single disc is about pi r^2
    disc = rasterize_strokes([{"mode": "paint", "radius": 8, "points": [[32, 32]]}], (64, 64))
    assert disc.sum().item() == pytest.approx(math.pi * 64, rel=0.03)
    # strokes outside the image are ignored, not an error
    assert rasterize_strokes([{"radius": 3, "points": [[-50, -50]]}], (10, 10)).sum() == 0


def test_rasterize_strokes_validation_names_the_stroke():
    good = {"mode": "paint", "radius": 3, "points": [[1, 1]]}
    with pytest.raises(ValueError, match="brush: stroke 2 has radius -1"):
        rasterize_strokes([good, good, {"mode": "paint", "radius": -1, "points": [[1, 1]]}], (8, 8))
    with pytest.raises(ValueError, match="stroke 0 has mode 'blur'"):
        rasterize_strokes([{"mode": "blur", "radius": 1, "points": [[1, 1]]}], (8, 8))
    with pytest.raises(ValueError, match="stroke 0 point 1"):
        rasterize_strokes([{"radius": 1, "points": [[1, 1], [2, "a"]]}], (8, 8))
    with pytest.raises(ValueError, match="stroke 0 needs"):
        rasterize_strokes([{"radius": 1, "points": []}], (8, 8))
    with pytest.raises(ValueError, match="not valid JSON"):
        strokes_from_json("[{")
    assert strokes_from_json('[{"mode": "erase", "radius": 2, "points": [[3, 4]]}]')[0]["mode"] == "erase"


def test_sliding_and_box_max_match_pooling():
    from kinema.kernels.masks import box_max, box_min, sliding_max
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 13, 17, generator=g)
    for half in (1, 2, 3, 5, 9):
        ref = torch.nn.functional.max_pool2d(x, (1, 2 * half + 1), stride=1, padding=(0, half))
        assert torch.equal(sliding_max(x, half, -1), ref)
    ref = torch.nn.functional.max_pool2d(x, 3, stride=1, padding=1)
    assert torch.equal(box_max(x, 1), ref)
    assert torch.equal(box_min(x, 1), -torch.nn.functional.max_pool2d(-x, 3, stride=1, padding=1))


def _bfs(inside, x, y):
    h, w = inside.shape
    out = torch.zeros(h, w, dtype=torch.bool)
    if not inside[y, x]:
        return out
    stack = [(y, x)]
    out[y, x] = True
    while stack:
        cy, cx = stack.pop()
        for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
            if 0 <= ny < h and 0 <= nx < w and inside[ny, nx] and not out[ny, nx]:
                out[ny, nx] = True
                stack.append((ny, nx))
    return out


def test_connected_component_matches_flood_fill_on_random_masks():
    g = torch.Generator().manual_seed(5)
    for trial in range(6):
        m = (torch.rand(37, 53, generator=g) < 0.58).float()
        ys, xs = torch.nonzero(m > 0, as_tuple=True)
        k = int(torch.randint(0, ys.numel(), (1,), generator=g))
        x, y = int(xs[k]), int(ys[k])
        assert torch.equal(connected_component(m, (x, y)) > 0, _bfs(m > 0, x, y)), trial


def test_guided_filter_follows_the_guide_edges():
    from kinema.kernels.masks import guided_filter
    # a step edge in the guide at x = 20; a blurry source edge around x = 23 snaps towards x = 20
    guide = torch.zeros(16, 40, 3)
    guide[:, 20:] = 1.0
    src = ((torch.arange(40.0) - 18) / 10).clamp(0, 1)[None].expand(16, 40).contiguous()
    out = guided_filter(guide, src, 4, 1e-4)
    assert out[8, 17] < 0.15 and out[8, 22] > 0.45 and abs(float(out[8, 35]) - 1) < 0.05
    # a flat guide carries no edge: the filter is then the mean of window means (a box blur twice)
    flat = guided_filter(torch.full((16, 40, 3), 0.5), src, 4, 1e-4)
    box = torch.nn.functional.avg_pool2d
    twice = box(box(src[None, None], 9, 1, 4, count_include_pad=False), 9, 1, 4, count_include_pad=False)[0, 0]
    assert torch.allclose(flat, twice, atol=1e-4)


def test_matte_is_soft_only_in_a_band_and_follows_the_picture():
    from kinema.kernels.masks import matte
    # the picture's edge is at x = 30 with a 4 px ramp; the mask's edge is 2 px off at x = 32
    ramp = ((torch.arange(64.0) - 28) / 4).clamp(0, 1)
    image = (1 - ramp)[None, :, None].expand(32, 64, 3).contiguous()  # object bright on the left
    mask = torch.zeros(32, 64)
    mask[:, :32] = 1
    a = matte(image, mask, 3)
    assert torch.equal(a[:, :28], torch.ones(32, 28)) and torch.equal(a[:, 36:], torch.zeros(32, 28))
    row = a[16]
    assert row[29] > 0.5 > row[33] and 0.05 < row[31] < 0.95  # the soft edge sits on the picture's edge
    assert float(a.min()) >= 0 and float(a.max()) <= 1
