"""The layered renderer for masked objects (pipelines/warp_animator.py) through the nodes and
the pipeline: sharp sub-pixel motion, a still background, one fill revealed progressively, the
drag's landing, and what is refused before memory runs out."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kinema import runtime
from kinema.kernels.field import MotionField
from kinema.kernels.motion import dense_motion
from kinema.nodes.motion import KinemaAnimateWarp, KinemaMotionBrush, KinemaMotionFromDrags
from kinema.pipelines import warp_animator
from kinema.pipelines.warp_animator import animate

ROOT = Path(__file__).resolve().parent.parent


def _photo(name):
    return torch.from_numpy(np.asarray(Image.open(ROOT / "assets" / name).convert("RGB")).copy()).float() / 255


@pytest.fixture(scope="module")
def astronaut():
    return _photo("astronaut.jpg")


def _disc(h, w, cx, cy, r):
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    return (((xs - cx) ** 2 + (ys - cy) ** 2) <= r * r).float()


def _energy(x):
    """Sum of squared forward differences of (H, W, 3)."""
    return float(((x[:, 1:] - x[:, :-1]) ** 2).sum() + ((x[1:] - x[:-1]) ** 2).sum())


def test_sub_pixel_motion_stays_as_sharp_as_frame0(astronaut):
    # the face moves 0.37 px right and 0.29 px down per frame: every frame lands between pixels.
    # Inside the object, compared where the object is (its interior moved along), the gradient
    # energy stays at least 0.9 of frame 0's in every frame (forward splatting gave 0.19-0.8)
    h, w = astronaut.shape[:2]
    disc = _disc(h, w, 225, 120, 60)
    n = 9
    step = torch.tensor([0.37, 0.29])
    flow = (torch.arange(n).float().view(n, 1, 1, 1) * step) * disc[None, ..., None]
    frames = animate(astronaut, MotionField(flow, disc), progress=False)
    y0, x0, side = 80, 185, 80  # a square well inside the face
    ref = _energy(astronaut[y0:y0 + side, x0:x0 + side])
    for k in range(1, n):
        dx, dy = (step * k).round().long().tolist()  # compare the same content, moved along
        ratio = _energy(frames[k, y0 + dy:y0 + dy + side, x0 + dx:x0 + dx + side]) / ref
        assert ratio >= 0.9, (k, ratio)
    # and the content is where it should be: an exact whole-pixel move at frame k with k * step whole
    whole = animate(astronaut, MotionField(torch.arange(3).float().view(3, 1, 1, 1) * torch.tensor([2.0, -1.0])
                                           * disc[None, ..., None], disc), progress=False)
    inner = _disc(h, w, 229, 118, 50) > 0
    assert torch.equal(whole[-1][inner], torch.roll(astronaut, (-2, 4), dims=(0, 1))[inner])


def test_background_stays_put_with_a_mask(astronaut):
    # a drag on a masked object: no band of background is warped; everything outside where the
    # object was and where it goes (with its soft edge) is bitwise the input in every frame
    h, w = astronaut.shape[:2]
    disc = _disc(h, w, 300, 300, 40)
    flow = dense_motion([torch.tensor([[300.0, 300.0], [340.0, 280.0]])], (w, h), 8, region=disc, falloff=0)
    assert torch.equal(flow[:, disc == 0], torch.zeros_like(flow[:, disc == 0]))  # nothing outside moves
    frames = animate(astronaut, MotionField(flow, disc), progress=False)
    r = warp_animator.matte_radius(h, w)
    reach = torch.zeros(h, w, dtype=torch.bool)
    for k in range(8):
        sx, sy = flow[k, 300, 300].tolist()
        reach |= _disc(h, w, 300 + sx, 300 + sy, 40 + r + 1) > 0
    assert torch.equal(frames[:, ~reach], astronaut[~reach].expand(8, -1, -1))
    # the object covers what is behind it where it lands (in front), with its own colours
    landed = _disc(h, w, 340, 280, 30) > 0
    assert torch.allclose(frames[-1][landed], torch.roll(astronaut, (-20, 40), dims=(0, 1))[landed], atol=1e-4)


def test_fill_is_made_once_and_revealed_without_flicker(astronaut):
    h, w = astronaut.shape[:2]
    disc = _disc(h, w, 400, 150, 30)
    n = 6
    flow = (torch.arange(n).float().view(n, 1, 1, 1) / (n - 1) * torch.tensor([0.0, 70.0])) * disc[None, ..., None]
    frames, holes = animate(astronaut, MotionField(flow, disc), progress=False, return_holes=True)
    # a pixel revealed in two frames shows the same fill in both
    for k in range(1, n - 1):
        both = (holes[k] > 0.999) & (holes[k + 1] > 0.999)
        assert both.sum() > 50 * k
        assert torch.equal(frames[k][both], frames[k + 1][both])
    # the place revealed grows frame by frame
    shown = [(holes[k] > 0.999).sum().item() for k in range(n)]
    assert shown == sorted(shown) and shown[0] == 0


def test_drag_on_a_masked_object_lands_within_2px(astronaut):
    # a green disc painted on the photo, its mask dragged: its centre lands on the drag's end
    h, w = astronaut.shape[:2]
    img = astronaut.clone()
    disc = _disc(h, w, 150, 380, 22)
    img[disc > 0] = torch.tensor([0.0, 1.0, 0.0])
    start, end = (150, 380), (190.6, 357.3)
    field = KinemaMotionFromDrags().build(img[None], json.dumps({"tracks": [[list(start), list(end)]]}), 12, 1.0,
                                          "ease_in_out", 0, mask=disc[None])["result"][0]
    frames = KinemaAnimateWarp().render(img[None], field, "inpaint", False)["result"][0]
    near = (1 - (frames[-1] - torch.tensor([0.0, 1.0, 0.0])).norm(dim=-1) / 0.6).clamp(min=0)
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    cx, cy = float((near * xs).sum() / near.sum()), float((near * ys).sum() / near.sum())
    assert ((cx - end[0]) ** 2 + (cy - end[1]) ** 2) ** 0.5 <= 2.0
    assert torch.equal(frames[0], img)


def test_empty_mask_into_animate_is_refused(astronaut):
    h, w = astronaut.shape[:2]
    disc = _disc(h, w, 150, 380, 22)
    field = MotionField(torch.ones(4, h, w, 2) * disc[None, ..., None], disc)
    with pytest.raises(ValueError, match="mask: the mask is empty"):
        KinemaAnimateWarp().render(astronaut[None], field, "inpaint", False, mask=torch.zeros(1, h, w))
    with pytest.raises(ValueError, match="mask: the mask is empty"):
        KinemaMotionFromDrags().build(astronaut[None], "[[[150, 380], [160, 380]]]", 4, 1.0, "linear", 0,
                                      mask=torch.zeros(1, h, w))


def test_motion_from_drags_checks_interrupt(astronaut, monkeypatch):
    calls = []

    def stop():
        calls.append(1)
        raise runtime.Interrupted()

    monkeypatch.setattr(runtime, "check_interrupt", stop)
    with pytest.raises(runtime.Interrupted):
        KinemaMotionFromDrags().build(astronaut[None], "[[[150, 380], [160, 380]]]", 16, 1.0, "linear", 0)
    assert calls


def test_strokes_parse_error_shows_a_strokes_example(astronaut):
    with pytest.raises(ValueError, match=r'strokes: not valid JSON.*"mode": "paint", "radius"'):
        KinemaMotionBrush().paint(astronaut[None], '{"strokes": [{"mode": "paint"')


MEMORY = """
import resource, sys, json, torch
sys.path.insert(0, {tests!r})
import conftest  # loads the pack as ``kinema``
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from kinema.kernels.field import MotionField
from kinema.nodes.motion import KinemaAnimateWarp, KinemaMotionFromDrags
img = torch.zeros(1, 6000, 6000, 3)
img[0, 2000:4000, 2000:4000] = 0.5
out = {{}}
try:
    KinemaMotionFromDrags().build(img, "[[[3000, 3000], [3200, 3000]]]", 16, 1.0, "linear", 0)
    out["drags"] = "completed"
except ValueError as e:
    out["drags"] = str(e)
# a 16-frame field of this size as a view (no memory): the renderer must refuse before allocating
flow = torch.zeros(1, 1, 1, 2).expand(16, 6000, 6000, 2)
try:
    KinemaAnimateWarp().render(img, MotionField(flow), "inpaint", False)
    out["animate"] = "completed"
except ValueError as e:
    out["animate"] = str(e)
print(json.dumps(out))
"""


def test_6000px_16_frames_under_a_memory_limit_is_refused_clearly():
    # under a 6 GB address-space limit the process must stay alive: both nodes estimate what a
    # 6000x6000, 16-frame run needs and refuse it with the inputs, the figure and what to lower
    code = MEMORY.format(tests=str(ROOT / "tests"), limit=6 * 2 ** 30)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["drags"].startswith("Motion from drags: a 6000x6000 picture with 16 frames needs about ")
    assert out["animate"].startswith("Animate by warping: a 6000x6000 picture with 16 frames needs about ")
    for msg in out.values():
        assert "GB of memory" in msg and "lower" in msg


def test_memory_estimates_grow_with_size_and_frames():
    small = warp_animator.animate_bytes((512, 512), 16)
    assert warp_animator.animate_bytes((1024, 512), 16) > 1.9 * small - warp_animator.CHUNK_BYTES
    assert warp_animator.animate_bytes((512, 512), 32) > small
    # the output alone, 16 frames of 6000x6000 RGB float32, is 6.4 GiB
    assert warp_animator.animate_bytes((6000, 6000), 16) >= 16 * 6000 * 6000 * 3 * 4


def test_weights_free_nodes_run_on_one_thread_and_restore_the_count(astronaut, monkeypatch):
    seen = []
    real = warp_animator.animate

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    import kinema.nodes.motion as motion_nodes
    monkeypatch.setattr(motion_nodes, "animate", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        h, w = astronaut.shape[:2]
        disc = _disc(h, w, 150, 380, 22)
        field = MotionField(torch.ones(3, h, w, 2) * disc[None, ..., None], disc)
        KinemaAnimateWarp().render(astronaut[None], field, "stretch", False)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
