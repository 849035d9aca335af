"""Training data for Follow-Your-Click: clips from a folder, and the labels the model is
conditioned on, made the way the paper describes them.

A clip is a video file (read with PyAV: .mp4, .webm, .mov, .mkv, .avi, .gif) or a folder of
frames (images sorted by name). Its caption is the text of ``<clip>.txt`` next to the video, or
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

import numpy as np
import torch
from PIL import Image

from ...formats import Points
from ...kernels.flow import motion_strength, path_length
from ...kernels.masks import bounding_box, connected_component
from ...kernels.regional import cover_crop
from ...runtime import KinemaError
from ..optical_flow import flow_from_first
from ..segment import segment

VIDEO_EXTS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".m4v")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_MOTION = 0.25        # px per frame at 512 px below which a window counts as still (bucket 0's bound)
MIN_REGION = 0.002       # smallest share of the frame a moving region may cover


@dataclass
class Clip:
    path: Path
    frames: int
    caption: str


def _video_frames(path: Path, stop: int | None = None) -> list[np.ndarray]:
    try:
        import av
    except ImportError:  # pragma: no cover - av is a requirement
        raise KinemaError("reading video clips needs PyAV (pip install av)") from None
    out = []
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                out.append(frame.to_ndarray(format="rgb24"))
                if stop is not None and len(out) >= stop:
                    break
    except av.error.FFmpegError as e:
        raise KinemaError(f"{path.name}: could not be read as a video ({e})") from None
    return out


def _count_video(path: Path) -> int:
    try:
        import av
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            return sum(1 for _ in container.decode(video=0))
    except (ImportError, IndexError, av.error.FFmpegError) as e:
        raise KinemaError(f"{path.name}: could not be read as a video ({e})") from None


class ClipFolder:
    """The clips of a folder (not recursive beyond frame folders), sorted by name."""

    def __init__(self, root):
        self.root = Path(root)
        if not self.root.is_dir():
            raise KinemaError(f"clips: folder {self.root} not found")
        clips = []
        for p in sorted(self.root.iterdir()):
            if p.is_file() and p.suffix.lower() in VIDEO_EXTS:
                cap = p.with_suffix(".txt")
                clips.append(Clip(p, _count_video(p), cap.read_text().strip() if cap.is_file() else ""))
            elif p.is_dir():
                n = len(self._images(p))
                if n:
                    cap = p / "caption.txt"
                    clips.append(Clip(p, n, cap.read_text().strip() if cap.is_file() else ""))
        if not clips:
            raise KinemaError(f"clips: {self.root} holds no video files ({', '.join(VIDEO_EXTS)}) and no folders "
                              f"of frames")
        self.clips = clips

    def __len__(self) -> int:
        return len(self.clips)

    @staticmethod
    def _images(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)

    def window(self, index: int, start: int, count: int, stride: int, height: int, width: int) -> torch.Tensor:
        """Frames ``start, start + stride, ...`` (``count`` of them) of clip ``index``, scaled to
        cover ``width`` x ``height`` and centre-cropped: (count, height, width, 3) in [0, 1]."""
        clip = self.clips[index]
        wanted = [start + i * stride for i in range(count)]
        if wanted[-1] >= clip.frames:
            raise ValueError(f"{clip.path.name}: frames {wanted[0]}..{wanted[-1]} are beyond its {clip.frames} frames")
        if clip.path.is_dir():
            files = self._images(clip.path)
            arrays = [np.asarray(Image.open(files[i]).convert("RGB")) for i in wanted]
        else:
            frames = _video_frames(clip.path, stop=wanted[-1] + 1)
            if len(frames) <= wanted[-1]:
                raise KinemaError(f"{clip.path.name}: decoded {len(frames)} frames, fewer than the {clip.frames} "
                                  f"its header says")
            arrays = [frames[i] for i in wanted]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise KinemaError(f"{clip.path.name}: frames of different sizes {sorted(shapes)}")
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
        return cover_crop(x, height, width).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


@dataclass
class Labels:
    mask: torch.Tensor | None   # (H, W) float {0, 1} on frame 0, or None (a still window)
    strength: int               # motion-strength bucket 0..10
    moving: torch.Tensor        # (H, W) the flow-based moving region (for inspection)


def analyse(frames: torch.Tensor, segmenter=None) -> Labels:
    """Object mask and motion-strength label of a window (F, H, W, 3) in [0, 1] (see the module
    docstring). ``segmenter``: a loaded SAM (``pipelines.segment.SamSegmenter``) or None."""
    f, h, w, _ = frames.shape
    flow = flow_from_first(frames)
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


# ------------------------------------------------------------------ clips the pack makes itself

def write_video(frames: torch.Tensor, path, fps: float = 8.0) -> Path:
    """Frames (F, H, W, 3) in [0, 1] -> an H.264 .mp4 (near-lossless, even sizes) with PyAV."""
    import av
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    u8 = (frames.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    h, w = u8.shape[1:3]
    if h % 2 or w % 2:
        raise ValueError(f"frames: {w}x{h}; H.264 needs even sizes")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=int(round(fps)), options={"crf": "8", "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for img in u8:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def synthetic_clips(folder, count: int = 4, frames: int = 16, size: int = 128, seed: int = 0) -> list[Path]:
    """Training clips made with the weights-free warp animator: on a bundled photo, a round region
    moves along a random drag (random direction and length, so the strength labels vary) while
    the rest stays still. Writes ``clip_NN.mp4`` + ``clip_NN.txt`` and returns the video paths."""
    from ...kernels.field import MotionField
    from ...kernels.motion import dense_motion
    from ..warp_animator import animate

    assets = sorted((Path(__file__).resolve().parents[2] / "assets").glob("*.jpg"))
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for i in range(count):
        photo = np.array(Image.open(assets[i % len(assets)]).convert("RGB"))
        img = cover_crop(torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255.0, size, size)[0]
        img = img.permute(1, 2, 0).clamp(0, 1).contiguous()
        cx, cy = (0.3 + 0.4 * torch.rand(2, generator=g)).mul(size).tolist()
        r = size * float(0.12 + 0.08 * torch.rand((), generator=g))
        ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                                indexing="ij")
        region = (((xs - cx) ** 2 + (ys - cy) ** 2) <= r * r).float()
        angle = float(torch.rand((), generator=g)) * 2 * np.pi
        dist = size * float(0.05 + 0.3 * torch.rand((), generator=g))
        track = torch.tensor([[cx, cy], [cx + dist * np.cos(angle), cy + dist * np.sin(angle)]])
        flow = dense_motion([track], (size, size), frames, region=region, easing="linear")
        video = animate(img, MotionField(flow, region), progress=False)
        path = write_video(video, Path(folder) / f"clip_{i:02d}.mp4")
        path.with_suffix(".txt").write_text(f"the round patch slides {'left' if np.cos(angle) < 0 else 'right'}")
        out.append(path)
    return out
