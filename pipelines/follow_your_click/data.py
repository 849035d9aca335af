"""Training data for Follow-Your-Click: clips from a folder, and the labels the model is
conditioned on, made the way the paper describes them.

A clip is a video file (read with PyAV) or a folder of frames (images sorted by name), see
``pipelines/clips.py``. Its caption is the text of ``<clip>.txt`` next to the video, or
``caption.txt`` inside the frame folder (empty without one).

For a window of ``F`` frames taken every ``stride`` frames (:meth:`ClipFolder.window`),
:func:`analyse` makes the labels:

- optical flow from frame 0 (``pipelines/optical_flow.py``, OpenCV DIS, chained);
- the moving region: pixels whose path over the window is at least half of the 95th percentile
  of all paths (and at least ``MIN_MOTION`` px per frame at 512 px), the largest connected piece;
- the object mask on frame 0: that region turned into a click (its fastest pixel) and a box (its
  bounding box) and segmented (``pipelines/segment.py``: SAM when one is given, otherwise the
  classical segmentation); if the segmentation gives nothing sensible the motion region itself;
- the motion-strength label: the strength bucket of the flow inside the mask
  (``kernels/flow.motion_strength``, the bucket the Motion strength node reports);
- the fps condition: the stride (the official default 2 is "every second frame").

A window without motion (a still clip) gets no mask (the model's no-mask conditioning) and
strength 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...formats import Points
from ...kernels.flow import motion_strength, path_length
from ...kernels.masks import bounding_box, connected_component
from ...kernels.regional import cover_crop
from ...runtime import KinemaError
from ..clips import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, count_frames, frame_files, read_frames
from ..optical_flow import flow_from_first
from ..segment import segment

MIN_MOTION = 0.25        # px per frame at 512 px below which a window counts as still (bucket 0's bound)
MIN_REGION = 0.002       # smallest share of the frame a moving region may cover
ANALYSIS_SIDE = 256      # short side at which windows are analysed


@dataclass
class Clip:
    path: Path
    frames: int
    caption: str


class ClipFolder:
    """The clips of a folder (not recursive beyond frame folders), sorted by name."""

    def __init__(self, root):
        self.root = Path(root)
        if not self.root.is_dir():
            raise KinemaError(f"clips: folder {self.root} not found")
        clips = []
        for p in sorted(self.root.iterdir()):
            if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS:
                cap = p.with_suffix(".txt")
                clips.append(Clip(p, count_frames(p), cap.read_text().strip() if cap.is_file() else ""))
            elif p.is_dir():
                n = len(frame_files(p))
                if n:
                    cap = p / "caption.txt"
                    clips.append(Clip(p, n, cap.read_text().strip() if cap.is_file() else ""))
        if not clips:
            raise KinemaError(f"clips: {self.root} holds no video files ({', '.join(VIDEO_EXTENSIONS)}) and no "
                              f"folders of frames ({', '.join(IMAGE_EXTENSIONS)})")
        self.clips = clips

    def __len__(self) -> int:
        return len(self.clips)

    def window(self, index: int, start: int, count: int, stride: int, height: int, width: int) -> torch.Tensor:
        """Frames ``start, start + stride, ...`` (``count`` of them) of clip ``index``, scaled to
        cover ``width`` x ``height`` and centre-cropped: (count, height, width, 3) in [0, 1]."""
        clip = self.clips[index]
        wanted = [start + i * stride for i in range(count)]
        if wanted[-1] >= clip.frames:
            raise ValueError(f"{clip.path.name}: frames {wanted[0]}..{wanted[-1]} are beyond its {clip.frames} frames")
        frames = list(read_frames(clip.path, limit=wanted[-1] + 1))
        if len(frames) <= wanted[-1]:
            raise KinemaError(f"{clip.path.name}: decoded {len(frames)} frames, fewer than the {clip.frames} its "
                              f"header says")
        picked = [frames[i] for i in wanted]
        shapes = {tuple(f.shape) for f in picked}
        if len(shapes) != 1:
            raise KinemaError(f"{clip.path.name}: frames of different sizes {sorted(shapes)}")
        x = torch.stack(picked).permute(0, 3, 1, 2)
        return cover_crop(x, height, width).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


@dataclass
class Labels:
    mask: torch.Tensor | None   # (H, W) float {0, 1} on frame 0, or None (a still window)
    strength: int               # motion-strength bucket 0..10
    moving: torch.Tensor        # (H, W) the flow-based moving region (for inspection)


def analyse(frames: torch.Tensor, segmenter=None) -> Labels:
    """Object mask and motion-strength label of a window (F, H, W, 3) in [0, 1] (see the module
    docstring). ``segmenter``: a loaded SAM (``pipelines.segment.SamSegmenter``) or None.

    The flow is OpenCV DIS's "fine" preset: on a disc moving a known 0.9 px per frame it measured
    98% of the motion where the default preset measured 78%. Windows larger than
    ``ANALYSIS_SIDE`` px on the short side are analysed at that size (the strength is measured at
    512 px anyway) and the mask is scaled back."""
    f, h, w, _ = frames.shape
    scale = ANALYSIS_SIDE / min(h, w)
    if scale < 1:
        small = cover_crop(frames.permute(0, 3, 1, 2), max(16, round(h * scale)), max(16, round(w * scale)))
        labels = analyse(small.clamp(0, 1).permute(0, 2, 3, 1).contiguous(), segmenter)
        back = lambda m: cover_crop(m[None, None], h, w, mode="nearest")[0, 0]  # noqa: E731
        return Labels(None if labels.mask is None else back(labels.mask), labels.strength, back(labels.moving))
    flow = flow_from_first(frames, preset="fine")
    length = path_length(flow)                                   # (H, W) px over the window
    per_frame = length / max(f - 1, 1) * 512.0 / min(h, w)       # px per frame at 512 px
    p95 = float(torch.quantile(per_frame.flatten(), 0.95))
    empty = torch.zeros(h, w)
    if p95 < MIN_MOTION:
        return Labels(None, 0, empty)
    moving = (per_frame >= max(MIN_MOTION, 0.5 * p95)).float()
    y, x = divmod(int(torch.argmax(per_frame * moving)), w)
    region = connected_component(moving, (x, y))
    if float(region.mean()) < MIN_REGION:
        return Labels(None, motion_strength(flow), moving)
    box = bounding_box(region, padding=max(2, round(0.02 * max(h, w))))
    pts = Points(torch.tensor([[float(x), float(y)]]), torch.zeros(0, 2), torch.tensor(box, dtype=torch.float32))
    try:
        mask, _ = segment(frames[0], pts, segmenter, multimask=True)
    except ValueError:
        mask = region
    overlap = float((mask * region).sum()) / max(float(region.sum()), 1.0)
    if float(mask.sum()) == 0 or overlap < 0.3:       # the segmentation missed what moves: trust the flow
        mask = region
    return Labels(mask.float(), motion_strength(flow, mask), moving)
