"""Sharpness of a moving object, frame by frame: the gradient-energy ratio to frame 0.

    python bench/bench_sharpness.py

A disc on the astronaut's face (radius 60 px) moves 0.37 px right and 0.29 px down per frame
for 16 frames, so every frame lands between pixels. In each frame the sum of squared forward
differences over an 80 px square inside the object (followed along with the motion, rounded to
whole pixels) is divided by frame 0's. Rows: the layered renderer with the object mask
(translation: separable Lanczos-6), the same motion with a slight stretch (two drags: the
general path, 2-D Lanczos-3 on the inverted field), and the forward splatting renderer the pack
used before for the same motion (the field without a mask). 1.0 = as sharp as frame 0.
"""
from __future__ import annotations

import numpy as np
import torch
from _pack import ROOT, load_pack
from PIL import Image


def energy(x: torch.Tensor) -> float:
    return float(((x[:, 1:] - x[:, :-1]) ** 2).sum() + ((x[1:] - x[:-1]) ** 2).sum())


def main():
    load_pack()
    from kinema.kernels.field import MotionField
    from kinema.pipelines.warp_animator import animate

    img = torch.from_numpy(np.asarray(Image.open(ROOT / "assets" / "astronaut.jpg").convert("RGB")).copy()).float() / 255
    h, w = img.shape[:2]
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    disc = (((xs - 225) ** 2 + (ys - 120) ** 2) <= 60 ** 2).float()
    n = 16
    step = torch.tensor([0.37, 0.29])
    k = torch.arange(n).float().view(n, 1, 1, 1)
    shift = k * step * disc[None, ..., None]
    stretch = shift.clone()
    stretch[..., 0] += (k[..., 0] * 0.01 * (xs - 225) * disc)[..., None][..., 0]  # 1 % wider per frame
    y0, x0, side = 80, 185, 80
    ref = energy(img[y0:y0 + side, x0:x0 + side])
    cases = [("layered, translation", MotionField(shift, disc)),
             ("layered, translation + stretch", MotionField(stretch, disc)),
             ("forward splat (no mask)", MotionField(shift))]
    print(f"gradient-energy ratio to frame 0 inside the object, frames 1..{n - 1}")
    print(f"{'renderer':32s} {'min':>6s} {'mean':>6s}  per frame")
    for name, field in cases:
        frames = animate(img, field, progress=False)
        ratios = []
        for j in range(1, n):
            dx, dy = (step * j).round().long().tolist()
            ratios.append(energy(frames[j, y0 + dy:y0 + dy + side, x0 + dx:x0 + dx + side]) / ref)
        r = np.array(ratios)
        print(f"{name:32s} {r.min():6.3f} {r.mean():6.3f}  " + " ".join(f"{v:.2f}" for v in r))


if __name__ == "__main__":
    main()
