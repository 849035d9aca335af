"""Video clips for the trainers: finding them, reading their frames, writing them, and a practice
set made by the weights-free warp animator.

A clip is a video file (read with PyAV: ``VIDEO_EXTENSIONS``) or a folder of frames (image files
directly in it, in name order).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..runtime import KinemaError

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def find_clips(paths) -> list[Path]:
    """Video files and frame folders (a folder with image files directly in it) under ``paths``."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            if p.suffix.lower() not in VIDEO_EXTENSIONS:
                raise ValueError(f"data: {p} is not a video file ({', '.join(VIDEO_EXTENSIONS)})")
            out.append(p)
        elif p.is_dir():
            entries = sorted(p.iterdir())
            if any(e.is_file() and e.suffix.lower() in IMAGE_EXTENSIONS for e in entries):
                out.append(p)
            else:
                out.extend(find_clips([e for e in entries if e.is_dir() or e.suffix.lower() in VIDEO_EXTENSIONS]))
        else:
            raise ValueError(f"data: {p} does not exist")
    return out


def frame_files(folder: Path) -> list[Path]:
    """The image files of a frame folder, in name order."""
    return sorted(e for e in Path(folder).iterdir() if e.is_file() and e.suffix.lower() in IMAGE_EXTENSIONS)


def read_frames(clip: Path, step: int = 1, limit: int = 0):
    """Frames of a clip, every ``step``-th, as (H, W, 3) float tensors in [0, 1] (a generator)."""
    n = 0
    clip = Path(clip)
    if clip.is_dir():
        from PIL import Image
        import numpy as np
        for i, f in enumerate(frame_files(clip)):
            if i % step:
                continue
            with Image.open(f) as im:
                yield torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
            n += 1
            if limit and n >= limit:
                return
        return
    try:
        import av
    except ImportError:
        raise KinemaError("reading video files needs PyAV (pip install av; ComfyUI installs it); "
                          "frame folders work without it") from None
    try:
        with av.open(str(clip)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i % step:
                    continue
                yield torch.from_numpy(frame.to_ndarray(format="rgb24")).float() / 255.0
                n += 1
                if limit and n >= limit:
                    return
    except av.FFmpegError as e:
        raise KinemaError(f"data: {clip} could not be read as a video ({e})") from None


def count_frames(clip: Path) -> int:
    """Frames in a clip (the container's count when it has one, else by decoding)."""
    clip = Path(clip)
    if clip.is_dir():
        return len(frame_files(clip))
    import av
    try:
        with av.open(str(clip)) as container:
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
    except (IndexError, av.FFmpegError) as e:
        raise KinemaError(f"data: {clip} could not be read as a video ({e})") from None
    return sum(1 for _ in read_frames(clip))


def write_video(frames: torch.Tensor, path, fps: float = 8.0, crf: int = 8) -> Path:
    """Frames (F, H, W, 3) in [0, 1] -> an H.264 .mp4 (PyAV; even sizes; ``crf`` 0 = lossless)."""
    import av
    import numpy as np
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    u8 = (frames.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    h, w = u8.shape[1:3]
    if h % 2 or w % 2:
        raise ValueError(f"frames: {w}x{h}; H.264 needs even sizes")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=int(round(fps)))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(int(crf))}
        for f in u8:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path



def make_warp_clips(folder, count: int = 8, size: int = 64, frames: int = 12, seed: int = 0,
                    video: bool = False) -> list[Path]:
    """Write ``count`` small clips made by the weights-free warp animator (no model, no download):
    a textured background with a disc that a drag moves across it with ease-in-out timing (so
    its path in embedding space is not linear in time). Each clip is a frame folder
    (``clip_XX/0000.png ...``), or with ``video`` an .mp4 (PyAV) - a set to check a training setup
    on before a real one."""
    import numpy as np
    from PIL import Image

    from ..kernels.field import MotionField
    from ..kernels.motion import dense_motion
    from .warp_animator import animate

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    out = []
    for c in range(count):
        rnd = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
        a, b = rnd(3), rnd(3)
        img = a.view(1, 1, 3) * (xs / size)[..., None] + b.view(1, 1, 3) * (ys / size)[..., None]
        for _ in range(4):                                       # static blocks to move over
            x0, y0 = (rnd(2) * size * 0.8).long().tolist()
            img[y0:y0 + size // 6, x0:x0 + size // 6] = rnd(3)
        cx, cy = (size * (0.25 + 0.5 * rnd(2))).tolist()
        r = size * (0.12 + 0.06 * float(rnd(1)))
        disc = ((xs - cx) ** 2 + (ys - cy) ** 2 <= r * r).float()
        stripe = (((xs - cx) // max(2, int(r / 3))) % 2 == 0).float() * disc
        colour = rnd(3)
        img = img * (1 - disc[..., None]) + disc[..., None] * (colour * (0.6 + 0.4 * stripe[..., None]))
        angle = float(rnd(1)) * 2 * torch.pi
        reach = size * 0.35
        ex = min(max(cx + reach * float(torch.cos(torch.tensor(angle))), r), size - 1 - r)
        ey = min(max(cy + reach * float(torch.sin(torch.tensor(angle))), r), size - 1 - r)
        flow = dense_motion([torch.tensor([[cx, cy], [ex, ey]])], (size, size), frames, region=disc,
                            easing="ease_in_out")
        clip = animate(img.clamp(0, 1), MotionField(flow, disc), progress=False)
        arr = (clip.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        if video:
            path = write_video(clip, folder / f"clip_{c:02d}.mp4", crf=12)
        else:
            path = folder / f"clip_{c:02d}"
            path.mkdir(exist_ok=True)
            for i, f in enumerate(arr):
                Image.fromarray(f).save(path / f"{i:04d}.png")
        out.append(path)
    return out
