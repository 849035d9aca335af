"""Timings of the motion kernels at the demo size (512x512, 16 frames).

    python bench/bench_motion.py [--repeats 3] [--threads N]

Prints one table row per case: the median and best wall time of ``repeats`` runs.
"""
from __future__ import annotations

import argparse
import statistics
import time

import cv2
import numpy as np
import torch
from _pack import ROOT, load_pack as _load_pack



def _time(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def _drags(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """n drags of 3 points starting near the middle of the image, up to 85 px long."""
    out = []
    for _ in range(n):
        start = torch.rand(2, generator=gen) * 120 + 196
        step = (torch.rand(2, generator=gen) - 0.5) * 60
        out.append(torch.stack([start, start + step, start + 2 * step]))
    return out


def _video(frames: int, size: int) -> torch.Tensor:
    """The astronaut photo drifting by (2, 1) px a frame plus a slow zoom."""
    img = cv2.cvtColor(cv2.imread(str(ROOT / "assets" / "astronaut.jpg")), cv2.COLOR_BGR2RGB)
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    out = []
    for k in range(frames):
        m = cv2.getRotationMatrix2D((size / 2, size / 2), 0.0, 1.0 + 0.004 * k)
        m[:, 2] += (2.0 * k, 1.0 * k)
        out.append(cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))
    return torch.from_numpy(np.stack(out)).float() / 255.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--frames", type=int, default=16)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    _load_pack()
    from kinema.kernels.flow import flow_to_color
    from kinema.kernels.motion import dense_motion
    from kinema.pipelines.optical_flow import flow_from_first, track_point

    s, f = args.size, args.frames
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    region = (((xx - s / 2) / (0.3 * s)) ** 2 + ((yy - s / 2) / (0.22 * s)) ** 2 < 1).float()  # object-like
    anchors = torch.tensor([[0.15 * s, 0.15 * s], [0.85 * s, 0.8 * s]])

    rows = []
    for n in (1, 3, 8):
        drags = _drags(n, gen)
        for interp in ("shepard", "rbf"):
            for use_region in (False, True):
                def run(drags=drags, interp=interp, use_region=use_region):
                    return dense_motion(drags, (s, s), f, anchors=anchors,
                                        region=region if use_region else None, interpolation=interp)
                med, best = _time(run, args.repeats)
                rows.append((f"dense_motion {n} drag{'s' if n > 1 else ''} + 2 anchors, {interp}, "
                             f"{'region' if use_region else 'no region'}", med, best))
    field = dense_motion(_drags(3, gen), (s, s), f, anchors=anchors)
    rows.append(("flow_to_color, all frames", *_time(lambda: flow_to_color(field), args.repeats)))
    video = _video(f, s)
    for preset in ("medium", "fine"):
        rows.append((f"DIS flow_from_first {preset}, chain ({f - 1} pairs)",
                     *_time(lambda p=preset: flow_from_first(video, preset=p), 1)))
    rows.append((f"DIS flow_from_first medium, direct ({f - 1} pairs)",
                 *_time(lambda: flow_from_first(video, method="direct"), 1)))
    rows.append((f"track_point medium ({f - 1} pairs)", *_time(lambda: track_point(video, (s / 2, s / 2)), 1)))

    print(f"# {s}x{s}, {f} frames; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OpenCV {cv2.__version__} ({cv2.getNumThreads()} threads)")
    width = max(len(r[0]) for r in rows)
    print(f"{'case':<{width}}  {'median s':>9}  {'best s':>8}")
    for name, med, best in rows:
        print(f"{name:<{width}}  {med:>9.3f}  {best:>8.3f}")


if __name__ == "__main__":
    main()
