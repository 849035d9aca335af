import math
from pathlib import Path

import cv2
import pytest
import torch

from kinema.kernels.flow import (compose_flow, flow_magnitude_stats,
                                 flow_to_color, motion_strength, pair_motion, path_length, sample_field,
                                 strength_bucket)
from kinema.kernels.motion import dense_motion
from kinema.pipelines.optical_flow import flow_from_first, pair_flows, track_point, track_points

ASSETS = Path(__file__).resolve().parent.parent / "assets"


# ---------------------------------------------------------------- colour wheel


def test_zero_flow_is_white():
    assert torch.equal(flow_to_color(torch.zeros(4, 5, 2)), torch.ones(4, 5, 3))
    mixed = torch.zeros(3, 3, 2)
    mixed[1, 1] = torch.tensor([2.0, 0.0])
    col = flow_to_color(mixed)
    assert torch.equal(col[0, 0], torch.ones(3))


def test_direction_sets_hue():
    dirs = {"right": (1.0, 0.0), "down": (0.0, 1.0), "left": (-1.0, 0.0), "up": (0.0, -1.0)}
    flow = torch.tensor([list(v) for v in dirs.values()]).reshape(1, 4, 2)
    col = flow_to_color(flow)[0]
    right, down, left, up = col
    assert right[0] == 1.0 and right[1] == 0.0 and right[2] < 0.2            # red
    assert down[0] == 1.0 and down[1] > 0.8 and down[2] == 0.0              # orange-yellow
    assert left[0] == 0.0 and left[1] > 0.7 and left[2] == 1.0              # cyan-blue
    assert up[2] == 1.0 and up[1] == 0.0 and 0.2 < up[0] < 0.5             # blue-violet
    # hue does not depend on the length, only saturation does
    half = flow_to_color(torch.tensor([[[1.0, 0.0], [0.5, 0.0]]]))[0]
    assert torch.allclose(half[1], 1.0 - 0.5 * (1.0 - half[0]), atol=1 / 255)


def test_wheel_colours_and_layout():
    # the Middlebury wheel's primaries sit at fixed directions: red at 0 degrees (+x), yellow at
    # 15 / 54 of the turn, green at 21 / 54, cyan at 25 / 54, blue at 36 / 54, magenta at 49 / 54,
    # counted from +x towards +y (down) in image coordinates
    def at(steps):
        ang = steps / 54 * 2 * math.pi
        return torch.tensor([[[math.cos(ang), math.sin(ang)]]])
    expected = {0: (1, 0, 0), 15: (1, 1, 0), 21: (0, 1, 0), 25: (0, 1, 1), 36: (0, 0, 1), 49: (1, 0, 1)}
    for steps, rgb in expected.items():
        assert torch.allclose(flow_to_color(at(steps))[0, 0], torch.tensor(rgb, dtype=torch.float32),
                              atol=1.5 / 255), steps
    batch = flow_to_color(torch.randn(2, 3, 6, 7, 2))
    assert batch.shape == (2, 3, 6, 7, 3) and float(batch.min()) >= 0 and float(batch.max()) <= 1
    with pytest.raises(ValueError, match="NaN"):
        flow_to_color(torch.full((2, 2, 2), float("nan")))


def test_wheel_matches_torchvision_flow_to_image():
    # torchvision's flow_to_image draws the same Middlebury wheel: an independent implementation
    from torchvision.utils import flow_to_image
    g = torch.Generator().manual_seed(0)
    ang = torch.linspace(-math.pi, math.pi, 2001)
    cases = [torch.randn(3, 40, 50, 2, generator=g) * 5, torch.randn(1, 16, 16, 2, generator=g) * 1e-3,
             torch.stack([torch.cos(ang), torch.sin(ang)], -1).view(1, 1, -1, 2) * torch.rand(2001, 1, generator=g)]
    for flow in cases:
        want = flow_to_image(flow.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).to(torch.float32) / 255
        assert torch.equal(flow_to_color(flow), want)


def test_importing_the_pack_does_not_import_torchvision_or_kornia():
    # torchvision's package import pulls in torch._dynamo (about 1.5 s of every start), kornia's
    # all of kornia (a few tenths of a second); the weights-free demo needs neither
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from run_workflow import load_pack; load_pack(); "
            "import kinema.nodes, kinema.runner; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torchvision', 'kornia')))")
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", \
        "the pack imports torchvision or kornia at start-up; import it inside the function that needs it"


# ---------------------------------------------------------------- statistics


def test_magnitude_stats_inside_mask():
    flow = torch.zeros(2, 4, 4, 2)
    flow[1, 0, 0] = torch.tensor([3.0, 4.0])   # 5
    flow[1, 0, 1] = torch.tensor([0.0, 1.0])   # 1
    flow[1, 3, 3] = torch.tensor([30.0, 40.0])  # 50, outside the mask
    mask = torch.zeros(4, 4)
    mask[0, :2] = 1
    s = flow_magnitude_stats(flow, mask, percentile=50)
    assert s["max"] == 5.0
    assert s["mean"] == pytest.approx(1.5)       # (0 + 0 + 5 + 1) / 4
    assert s["percentile"] == pytest.approx(0.5)  # median of [0, 0, 1, 5]
    s90 = flow_magnitude_stats(flow[1:], mask, percentile=90)
    assert s90["percentile"] == pytest.approx(float(torch.quantile(torch.tensor([5.0, 1.0]), 0.9)))
    whole = flow_magnitude_stats(flow)
    assert whole["max"] == 50.0
    with pytest.raises(ValueError, match="mask: the mask is empty"):
        flow_magnitude_stats(flow, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="mask: the mask is 4x3 but the flow is 4x4"):
        flow_magnitude_stats(flow, torch.ones(3, 4))
    with pytest.raises(ValueError, match="percentile: 120"):
        flow_magnitude_stats(flow, None, percentile=120)
    with pytest.raises(ValueError, match="flow: expected"):
        flow_magnitude_stats(torch.zeros(4, 4, 2))


def test_pair_motion_and_path_length():
    k = torch.arange(5, dtype=torch.float32)
    flow = torch.zeros(5, 3, 3, 2)
    flow[..., 0] = k[:, None, None] * 2.0
    flow[2:, ..., 1] = 3.0  # a jump between frames 1 and 2
    pm = pair_motion(flow)
    assert pm.shape == (4, 3, 3, 2)
    assert torch.allclose(path_length(flow), torch.full((3, 3), 2.0 * 3 + math.hypot(2, 3)))
    # loop: the path length counts the way back, the end displacement would not
    loop = torch.zeros(3, 2, 2, 2)
    loop[1, ..., 0] = 5.0
    assert torch.allclose(path_length(loop), torch.full((2, 2), 10.0))


# ---------------------------------------------------------------- strength bucket


def test_strength_bucket_is_monotone_spans_every_bucket_and_normalises_speed():
    size, frames = (512, 512), 16
    sweep = [strength_bucket(0.05 * k, size, frames) for k in range(4001)]  # 0 .. 200 px over the clip
    assert sweep[0] == 0 and sweep[-1] == 10
    assert all(a <= b for a, b in zip(sweep, sweep[1:]))
    assert set(sweep) == set(range(11))
    # the same speed per frame pair gets the same bucket whatever the clip length
    for path in (3.0, 20.0, 40.0, 100.0):
        assert strength_bucket(path, size, 16) == strength_bucket(2 * path, size, 31), path
        # resolution: the same motion relative to the frame (half the pixels at half the size)
        assert strength_bucket(path, size, 16) == strength_bucket(path / 2, (256, 256), 16), path
        assert strength_bucket(path, size, 16) == strength_bucket(path, (768, 512), 16), path
        assert strength_bucket(path, size, 16) >= strength_bucket(path, (1024, 1024), 16), path


def test_strength_of_measured_motion_is_the_bucket_of_the_applied_speed():
    """Crops of a photo moved at known speeds (px per frame), flow measured by DIS: the mean path
    length inside the region is the distance we applied, so motion_strength gives its bucket."""
    region = torch.zeros(146, 146)
    region[24:-24, 24:-24] = 1
    for dx, dy in ((0, 0), (1, 0), (2, 1), (3, 0)):
        frames = _photo_shifts([(k * dx, k * dy) for k in range(6)], box=(150, 50, 296, 196))
        flow = flow_from_first(frames)
        applied = 5 * math.hypot(dx, dy)
        assert float(path_length(flow)[region > 0].mean()) == pytest.approx(applied, rel=0.02, abs=0.05)
        assert motion_strength(flow, region) == strength_bucket(applied, (146, 146), 6), (dx, dy)


def test_strength_bucket_bad_inputs():
    with pytest.raises(ValueError, match="mean_magnitude"):
        strength_bucket(float("nan"), (512, 512), 16)
    with pytest.raises(ValueError, match="mean_magnitude"):
        strength_bucket(-1.0, (512, 512), 16)
    with pytest.raises(ValueError, match="frames"):
        strength_bucket(3.0, (512, 512), 1)
    with pytest.raises(ValueError, match="size"):
        strength_bucket(3.0, (512,), 16)


def test_motion_strength_of_a_drag():
    """A 25 px drag of a masked object over 16 frames at 512 px is the demo's default bucket 4."""
    region = torch.zeros(512, 512)
    region[200:300, 200:300] = 1
    flow = dense_motion([torch.tensor([[250.0, 250.0], [275.0, 250.0]])], (512, 512), 16,
                        region=region, easing="linear")
    assert motion_strength(flow, region) == 4
    assert motion_strength(flow * 0, region) == 0
    assert motion_strength(flow * 8, region) == 10


# ---------------------------------------------------------------- composition


def test_compose_flow():
    a = torch.zeros(6, 7, 2)
    a[..., 0] = 1.0
    b = torch.zeros(6, 7, 2)
    b[..., 1] = torch.arange(7, dtype=torch.float32)  # depends on x
    c = compose_flow(a, b)
    assert torch.allclose(c[..., 0], torch.ones(6, 7))
    expect = torch.clamp(torch.arange(7, dtype=torch.float32) + 1, max=6.0)  # edge value beyond x = 6
    assert torch.allclose(c[..., 1], expect.expand(6, 7))
    assert torch.allclose(compose_flow(torch.zeros(2, 6, 7, 2), b.expand(2, 6, 7, 2)), b.expand(2, 6, 7, 2),
                          atol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        compose_flow(a, torch.zeros(5, 7, 2))


def test_sample_field_bilinear():
    field = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4, 1)  # value = 4y + x
    pts = torch.tensor([[[1.5, 0.5], [3.0, 2.0], [0.25, 1.0]]])
    out = sample_field(field, pts)[0, :, 0]
    assert torch.allclose(out, torch.tensor([3.5, 11.0, 4.25]))


# ---------------------------------------------------------------- DIS optical flow on a real photo


def _photo_shifts(shifts, box=(140, 40, 300, 200)):
    """Crops of the astronaut photo whose content moves by each (dx, dy) relative to crop 0."""
    img = cv2.cvtColor(cv2.imread(str(ASSETS / "astronaut.jpg")), cv2.COLOR_BGR2RGB)
    x0, y0, x1, y1 = box
    frames = [img[y0 - dy:y1 - dy, x0 - dx:x1 - dx] for dx, dy in shifts]
    return torch.from_numpy(__import__("numpy").stack(frames)).float() / 255.0


def test_dis_flow_recovers_a_shift():
    frames = _photo_shifts([(0, 0), (3, 2)])
    pair = pair_flows(frames)
    assert pair.shape == (1, 160, 160, 2)
    inner = pair[0, 16:-16, 16:-16].reshape(-1, 2)
    med = inner.median(dim=0).values
    assert torch.allclose(med, torch.tensor([3.0, 2.0]), atol=0.1)
    assert float((inner - torch.tensor([3.0, 2.0])).norm(dim=-1).mean()) < 0.3
    fine = flow_from_first(frames, preset="fine")
    assert torch.equal(fine[0], torch.zeros(160, 160, 2))
    assert torch.allclose(fine[1, 16:-16, 16:-16].reshape(-1, 2).median(0).values,
                          torch.tensor([3.0, 2.0]), atol=0.1)


def test_flow_from_first_chain_and_direct_and_tracking():
    shifts = [(3 * k, 2 * k) for k in range(5)]
    frames = _photo_shifts(shifts, box=(150, 50, 290, 190))
    for method in ("chain", "direct"):
        flow = flow_from_first(frames, method=method)
        assert flow.shape == (5, 140, 140, 2)
        for k, (dx, dy) in enumerate(shifts):
            med = flow[k, 24:-24, 24:-24].reshape(-1, 2).median(0).values
            assert torch.allclose(med, torch.tensor([float(dx), float(dy)]), atol=0.25), (method, k)
    pts = torch.tensor([[70.0, 70.0], [50.0, 80.0]])
    tracks = track_points(frames, pts)
    assert tracks.shape == (5, 2, 2) and torch.equal(tracks[0], pts)
    assert float((tracks[-1] - (pts + torch.tensor([12.0, 8.0]))).norm(dim=-1).max()) < 1.0
    one = track_point(frames, (70.0, 70.0))
    assert one.shape == (5, 2) and torch.allclose(one, tracks[:, 0])


def test_optical_flow_bad_inputs():
    frames = torch.rand(2, 32, 32, 3)
    with pytest.raises(ValueError, match="preset: 'ultra'"):
        flow_from_first(frames, preset="ultra")
    with pytest.raises(ValueError, match="method: 'both'"):
        flow_from_first(frames, method="both")
    with pytest.raises(ValueError, match="frames: expected an IMAGE batch"):
        flow_from_first(torch.rand(32, 32))
    with pytest.raises(ValueError, match="too small"):
        flow_from_first(torch.rand(2, 8, 8, 3))
    with pytest.raises(ValueError, match="NaN"):
        flow_from_first(torch.full((2, 32, 32, 3), float("nan")))
    with pytest.raises(ValueError, match="at least 2 frames"):
        pair_flows(torch.rand(1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"points: \(40, 3\) is outside the 32x32 frames"):
        track_point(frames, (40.0, 3.0))
    assert torch.equal(flow_from_first(torch.rand(1, 32, 32, 3)), torch.zeros(1, 32, 32, 2))


def _render(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Frames of ``image`` (H, W, 3) moved by a forward field (F, H, W, 2): each output pixel y
    looks up the source x with x + flow(x) = y (fixed-point iteration; fine for fold-free fields)."""
    f, h, w, _ = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    target = torch.stack([xs, ys], -1).expand(f, h, w, 2)
    src = target.clone()
    for _ in range(20):
        src = target - sample_field(flow, src)
    return sample_field(image[None].expand(f, h, w, 3).contiguous(), src)


@pytest.mark.parametrize("use_region", [True, False])
def test_dragged_point_lands_on_target_when_tracked(use_region):
    """Drag -> dense field -> frames -> DIS tracking: the dragged point ends within 2 px of the
    drag's end (the quality criterion; measured here: 0.13 px with a region, 0.50 px without)."""
    photo = _photo_shifts([(0, 0)], box=(140, 40, 300, 200))[0]  # 160x160
    start, end = torch.tensor([80.0, 70.0]), torch.tensor([92.0, 63.0])
    region = torch.zeros(160, 160)
    region[40:120, 45:125] = 1
    flow = dense_motion([torch.stack([start, end])], (160, 160), 8, region=region if use_region else None,
                        falloff=12 if use_region else 60)
    frames = _render(photo, flow)
    track = track_point(frames, start)
    assert float((track[-1] - end).norm()) < 1.0
    assert float((track - (start + flow[:, 70, 80])).norm(dim=-1).max()) < 1.0
