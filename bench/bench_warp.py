"""Timings of the warp renderer and its kernels on the CPU.

    python bench/bench_warp.py [--repeat 3] [--threads N]

Prints one table: per-kernel timings at 512x512 and ``animate`` at 512x512 and 1024x1024 with
16 frames (a dragged object: region mask + smooth falloff, and a hard-masked rigid object), with
the peak resident memory of each ``animate`` run (VmHWM, reset before each run where the kernel
allows it; else the process-wide peak from ``getrusage``; "over start" is the rise above the
RSS before the timed run, which already holds the allocator's memory from the warm-up run).
On a busy machine ``--threads 1`` is much faster than torch's default thread count: the work is
many small tensor operations, and waiting threads stall on cores that other processes hold.
Run from the repository root.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _pack import ROOT, load_pack as _load_pack, peak_rss_mib


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _time(fn, repeat):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _photo(size):
    from PIL import Image
    im = Image.open(ROOT / "assets" / "astronaut.jpg").convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im).copy()).float() / 255


def _drag_field(size, frames, rigid):
    """A disc region around the face dragged by size/8 px; with a falloff of size/16 px outside
    it unless ``rigid`` (hard mask, flow zero outside)."""
    from kinema.kernels.field import MotionField
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    cx, cy, r = 0.49 * size, 0.33 * size, size / 8
    region = (((xs - cx) ** 2 + (ys - cy) ** 2) <= r * r).float()
    s = torch.linspace(0, 1, frames).view(frames, 1, 1, 1)
    s = 3 * s ** 2 - 2 * s ** 3
    drag = torch.tensor([size / 8, size / 16])
    if rigid:
        env = region
    else:
        fall = size / 16
        d = ((xs - cx) ** 2 + (ys - cy) ** 2).sqrt() - r
        u = (d / fall).clamp(0, 1)
        env = 1 - (3 * u ** 2 - 2 * u ** 3)
        env = torch.where(d <= 0, torch.ones_like(env), env)
    return MotionField(s * drag * env[None, ..., None], region)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    _load_pack()
    from kinema.kernels import inpaint, masks
    from kinema.kernels.warp import backward_warp, soft_splat
    from kinema.pipelines.warp_animator import animate

    rows = []
    g = torch.Generator().manual_seed(0)
    n = 512
    img = _photo(n)
    src = img.permute(2, 0, 1)[None].contiguous()
    flow = (torch.rand(1, n, n, 2, generator=g) - 0.5) * 8
    metric = torch.rand(1, 1, n, n, generator=g)
    flow16 = flow.expand(16, -1, -1, -1).contiguous()
    src16 = src.expand(16, -1, -1, -1).contiguous()
    hole = masks.rasterize_strokes([{"mode": "paint", "radius": 40, "points": [[250, 170], [300, 200]]}], (n, n))
    disc = masks.dilate(torch.zeros(n, n).index_put_((torch.tensor([256]), torch.tensor([256])),
                                                     torch.tensor([1.0])), 100)
    strokes = [{"mode": "paint", "radius": 12, "points": [[float(x), 200.0 + 50 * np.sin(x / 40)] for x in range(40, 480, 8)]},
               {"mode": "erase", "radius": 6, "points": [[100.0, 100.0], [400.0, 300.0]]}]
    kernels = [
        ("soft_splat softmax 1x512^2", lambda: soft_splat(src, flow, metric, mode="softmax")),
        ("soft_splat softmax 16x512^2", lambda: soft_splat(src16, flow16, metric.expand(16, -1, -1, -1), mode="softmax")),
        ("backward_warp 16x512^2", lambda: backward_warp(src16, flow16)),
        ("inpaint fill_holes 512^2", lambda: inpaint.fill_holes(src, hole[None, None])),
        ("masks resize 512->1024 bilinear", lambda: masks.resize(hole, (1024, 1024))),
        ("masks feather r=8", lambda: masks.feather(hole, 8)),
        ("masks dilate r=8", lambda: masks.dilate(hole, 8)),
        ("masks erode r=8", lambda: masks.erode(hole, 8)),
        ("masks bounding_box", lambda: masks.bounding_box(hole, 4)),
        ("masks connected_component 512^2", lambda: masks.connected_component(disc, (256, 256))),
        ("masks rasterize_strokes 57 pts", lambda: masks.rasterize_strokes(strokes, (n, n))),
    ]
    for name, fn in kernels:
        rows.append((name, _time(fn, args.repeat) * 1000, None))

    for size in (512, 1024):
        im = _photo(size)
        for rigid in (False, True):
            field = _drag_field(size, 16, rigid)
            animate(im, field, progress=False)  # warm-up
            base = _rss_mib()
            exact = _reset_peak()
            t = time.perf_counter()
            animate(im, field, progress=False)
            dt = time.perf_counter() - t
            peak = peak_rss_mib()
            for _ in range(args.repeat - 1):
                t = time.perf_counter()
                animate(im, field, progress=False)
                dt = min(dt, time.perf_counter() - t)
            label = f"animate {size}^2 x16 {'rigid mask' if rigid else 'region+falloff'}"
            rows.append((label, dt * 1000, (peak, peak - base, exact)))
            del field

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, best of {args.repeat}; "
          f"peak RSS over the first timed animate run")
    print(f"{'what':44s} {'ms':>9s}  {'peak RSS MiB (over start)':>26s}")
    for name, ms, mem in rows:
        extra = "" if mem is None else f"{mem[0]:9.0f} ({mem[1]:+.0f}){'' if mem[2] else ' *'}"
        print(f"{name:44s} {ms:9.1f}  {extra:>26s}")
    if any(m is not None and not m[2] for _, _, m in rows):
        print("* peak could not be reset: process-wide peak")


if __name__ == "__main__":
    main()
