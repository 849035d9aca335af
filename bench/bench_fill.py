"""Exemplar-based fill against push-pull on the place an object leaves.

    python bench/bench_fill.py [--out DIR]

For every hand-traced object of ``bench/data/mask_ground_truth.json`` the hole is the object
grown by 3 px; both fills run on the photo. Texture statistic: the mean squared gradient inside
the hole divided by the same in a 12 px ring around it (1 = as much fine structure as the
surroundings, 0 = flat). Colour statistic: the distance between the mean colours of the fill
and of the ring. ``--out`` writes side-by-side PNGs (photo, exemplar fill, push-pull fill)
cropped around the hole.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
from _pack import load_pack
from bench_masks import ground_truth


def grad_energy(img: np.ndarray, region: np.ndarray) -> float:
    gx = np.zeros_like(img)
    gy = np.zeros_like(img)
    gx[:, :-1] = img[:, 1:] - img[:, :-1]
    gy[:-1] = img[1:] - img[:-1]
    e = (gx ** 2 + gy ** 2).sum(-1)
    inner = region.copy()  # differences that straddle the region's edge do not count
    inner[:, :-1] &= region[:, 1:]
    inner[:-1] &= region[1:]
    return float(e[inner].mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    load_pack()
    import torch
    from kinema.kernels.inpaint import exemplar_fill, push_pull

    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    print(f"torch threads {torch.get_num_threads()}")
    print(f"{'object':10s} {'hole px':>8s}  {'texture exemplar':>16s} {'push-pull':>10s}  "
          f"{'colour exemplar':>15s} {'push-pull':>10s}  {'s exemplar':>10s} {'s push-pull':>11s}")
    rows = []
    for name, rgb, gt in ground_truth():
        hole = cv2.dilate(gt.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))) > 0
        ring = (cv2.dilate(hole.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (25, 25))) > 0) & ~hole
        img = torch.from_numpy(rgb).float().permute(2, 0, 1) / 255
        h = torch.from_numpy(hole)
        t = time.perf_counter()
        ex = exemplar_fill(img, h)
        t_ex = time.perf_counter() - t
        t = time.perf_counter()
        pp = push_pull(img[None], (~h).float()[None, None])[0]
        t_pp = time.perf_counter() - t
        ex_np = ex.permute(1, 2, 0).numpy()
        pp_np = torch.where(h[None], pp, img).permute(1, 2, 0).numpy()
        src = rgb.astype(np.float32) / 255
        ring_e = grad_energy(src, ring)
        tex = (grad_energy(ex_np, hole) / ring_e, grad_energy(pp_np, hole) / ring_e)
        ring_mean = src[ring].mean(0)
        col = (float(np.abs(ex_np[hole].mean(0) - ring_mean).max()), float(np.abs(pp_np[hole].mean(0) - ring_mean).max()))
        rows.append((tex, col))
        print(f"{name:10s} {int(hole.sum()):8d}  {tex[0]:16.3f} {tex[1]:10.3f}  {col[0]:15.3f} {col[1]:10.3f}  "
              f"{t_ex:10.2f} {t_pp:11.2f}")
        if out:
            ys, xs = np.nonzero(hole)
            pad = 24
            y0, y1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, hole.shape[0])
            x0, x1 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, hole.shape[1])
            tiles = [(a[y0:y1, x0:x1] * 255).round().astype(np.uint8)[..., ::-1] for a in (src, ex_np, pp_np)]
            cv2.imwrite(str(out / f"fill_{name}.png"), np.hstack(tiles))
    tex = np.array([r[0] for r in rows])
    col = np.array([r[1] for r in rows])
    print(f"{'mean':10s} {'':8s}  {tex[:, 0].mean():16.3f} {tex[:, 1].mean():10.3f}  "
          f"{col[:, 0].mean():15.3f} {col[:, 1].mean():10.3f}")


if __name__ == "__main__":
    main()
