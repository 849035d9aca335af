"""The weights-free motion nodes end to end on a real photo, and their errors."""
import json

import pytest
import torch

from kinema.kernels.field import MotionField
from kinema.nodes.core_io import LoadImage
from kinema.nodes.motion import (KinemaAnimateWarp, KinemaMotionBrush, KinemaMotionFromDrags,
                                 KinemaMotionStrength)
from kinema.pipelines.optical_flow import track_point


@pytest.fixture(autouse=True)
def _temp(tmp_path, monkeypatch):
    monkeypatch.setenv("KINEMA_TEMP_DIR", str(tmp_path / "temp"))


@pytest.fixture(scope="module")
def cat():
    img, _ = LoadImage().load_image("chelsea.jpg")
    return img  # (1, 300, 451, 3)


def _result(out):
    return out["result"] if isinstance(out, dict) else out


def _drag(cat, tracks, **kw):
    args = dict(frames=12, strength=1.0, easing="linear", falloff=0)
    args.update(kw)
    return _result(KinemaMotionFromDrags().build(cat, json.dumps(tracks), **args))[:2]


def test_drag_moves_the_point_and_leaves_far_pixels(cat):
    start, end = (170, 110), (200, 125)  # the cat's left eye, dragged right and down
    field, preview = _drag(cat, {"tracks": [[list(start), list(end)]], "anchors": []})
    assert isinstance(field, MotionField) and field.flow.shape == (12, 300, 451, 2)
    assert preview.shape == (1, 300, 451, 3)
    frames = _result(KinemaAnimateWarp().render(cat, field, "inpaint", False))[0]
    assert frames.shape == (12, 300, 451, 3)
    assert torch.equal(frames[0], cat[0])  # frame 0 is the input, bitwise
    # pixels farther from the drag than its length (plus the falloff) are unchanged
    length = ((end[0] - start[0]) ** 2 + (end[1] - start[1]) ** 2) ** 0.5
    ys, xs = torch.meshgrid(torch.arange(300.0), torch.arange(451.0), indexing="ij")
    dist = ((xs - start[0]) ** 2 + (ys - start[1]) ** 2).sqrt()
    far = dist > 2 * length + 451 / 8 + 2  # longest drag reach + default falloff (64 px at 512) margin
    assert (frames[:, far] - cat[0][far]).abs().max() <= 1 / 255
    # tracked with optical flow, the dragged point lands within 2 px of the drag's end
    path = track_point(frames, start)
    assert float((path[-1] - torch.tensor(end, dtype=path.dtype)).norm()) < 2.0


def test_brush_limits_motion_to_the_painted_region(cat):
    strokes = {"strokes": [{"mode": "paint", "radius": 30, "points": [[300, 60], [340, 80]]},
                           {"mode": "erase", "radius": 8, "points": [[300, 60]]}]}
    mask, preview = _result(KinemaMotionBrush().paint(cat, json.dumps(strokes)))
    assert mask.shape == (1, 300, 451) and preview.shape == (1, 300, 451, 3)
    assert mask[0, 80, 340] == 1 and mask[0, 60, 300] == 0 and mask[0, 250, 50] == 0
    field, _ = _drag(cat, {"tracks": [[[330, 75], [345, 70]]], "anchors": []}, falloff=4)
    frames = _result(KinemaAnimateWarp().render(cat, field, "inpaint", False, mask=mask))[0]
    outside = mask[0] == 0
    assert torch.equal(frames[:, outside], cat[0][outside].expand(12, -1, -1))
    assert (frames[-1] - cat[0]).abs().amax() > 0.1  # something inside moved


def test_strength_of_field_and_of_video_agree(cat):
    field, _ = _drag(cat, {"tracks": [[[200, 150], [260, 150]]], "anchors": []}, frames=16)
    mask = torch.zeros(1, 300, 451)
    mask[0, 140:161, 190:211] = 1
    strength = KinemaMotionStrength()
    f_out = strength.measure(90.0, mask=mask, motion=field)
    mean, p90, bucket = f_out["result"]
    assert mean == pytest.approx(60 / 15, rel=0.05)  # linear easing: 4 px per frame pair
    assert "bucket" in f_out["ui"]["text"][0]
    frames = _result(KinemaAnimateWarp().render(cat, field, "inpaint", False))[0]
    v_mean, _, v_bucket = strength.measure(90.0, mask=mask, video=frames)["result"]
    assert v_mean == pytest.approx(mean, rel=0.25)
    assert abs(v_bucket - bucket) <= 1


@pytest.mark.parametrize("tracks,kw,match", [
    ('{"tracks": [], "anchors": []}', {}, "tracks: no drags given"),
    ("[[[10, 10]]]", {}, "track 0 has 1 point"),
    ("[[[10, NaN], [20, 20]]]", {}, "NaN or infinite"),
    ("[[[900, 10], [20, 20]]]", {}, r"outside the 451x300 image"),
    ("{oops", {}, "tracks: not valid JSON"),
    ("[[[10, 10], [20, 20]]]", {"frames": 1}, "frames"),
    ("[[[10, 10], [20, 20]]]", {"frames": 100000}, "frames"),
])
def test_drag_errors_name_the_input(cat, tracks, kw, match):
    args = dict(frames=8, strength=1.0, easing="linear", falloff=0)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        KinemaMotionFromDrags().build(cat, tracks, **args)


def test_mask_and_size_mismatches_are_clear(cat):
    with pytest.raises(ValueError, match="mask: the mask is 10x10 but the image is 451x300"):
        KinemaMotionFromDrags().build(cat, "[[[10, 10], [20, 20]]]", 8, 1.0, "linear", 0, mask=torch.ones(1, 10, 10))
    with pytest.raises(ValueError, match="empty"):
        KinemaMotionFromDrags().build(cat, "[[[10, 10], [20, 20]]]", 8, 1.0, "linear", 0, mask=torch.zeros(1, 300, 451))
    field, _ = _drag(cat, [[[10, 10], [20, 20]]])
    with pytest.raises(ValueError, match="motion field is 451x300 but the image is 64x64"):
        KinemaAnimateWarp().render(torch.zeros(1, 64, 64, 3), field, "inpaint", False)
    with pytest.raises(ValueError, match="nothing is painted"):
        KinemaMotionBrush().paint(cat, '{"strokes": []}')
    with pytest.raises(ValueError, match="connect exactly one"):
        KinemaMotionStrength().measure(90.0)
    with pytest.raises(ValueError, match="2 or more frames"):
        KinemaMotionStrength().measure(90.0, video=cat)
    with pytest.raises(ValueError, match="mask: the mask is empty"):
        KinemaMotionStrength().measure(90.0, mask=torch.zeros(1, 300, 451), motion=field)


def test_wan_tracks_output(cat):
    """The drags as core WanTrackToVideo tracks: 121 samples each, the node's timing and
    strength, anchors still, mapped as WanTrackToVideo fits the 451x300 photo into 832x480:
    centre crop to 451x260 (20 rows off the top and bottom), then x 832/451, y 480/260."""
    tracks = {"tracks": [[[100, 150], [200, 150]]], "anchors": [[400, 40]]}
    out = KinemaMotionFromDrags().build(cat, json.dumps(tracks), 8, 0.5, "linear", 0)["result"][2]
    wan = json.loads(out)
    assert len(wan) == 2 and [len(t) for t in wan] == [121, 121]
    fx = lambda x: (x + 0.5) * 832 / 451 - 0.5
    fy = lambda y: (y - 20 + 0.5) * 480 / 260 - 0.5
    for k in (0, 30, 60, 120):   # linear timing, half strength: 100 -> 150 px
        assert wan[0][k]["x"] == pytest.approx(fx(100 + 50 * k / 120), abs=0.01)
        assert wan[0][k]["y"] == pytest.approx(fy(150), abs=0.01)
    assert all(p == {"x": pytest.approx(fx(400), abs=0.01), "y": pytest.approx(fy(40), abs=0.01)} for p in wan[1])
    # the default timing (ease_in_out) is slow at the start: a quarter in, less than a quarter moved
    eased = json.loads(KinemaMotionFromDrags().build(cat, json.dumps(tracks), 8, 1.0, "ease_in_out", 0,
                                                     wan_width=451 * 2 // 16 * 16, wan_height=304)["result"][2])
    x0, x30, x120 = (eased[0][k]["x"] for k in (0, 30, 120))
    assert 0 < x30 - x0 < 0.25 * (x120 - x0)
