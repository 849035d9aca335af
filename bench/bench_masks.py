"""Mask quality of click -> mask on photos with hand-traced ground truth.

    python bench/bench_masks.py [--clicks 3] [--box [--box-scale F]] [--sam PATH] [--out DIR]

Ground truth: ``bench/data/mask_ground_truth.json`` (outlines traced by hand on scikit-image's
bundled sample photos and the photos in ``assets/``). Clicks follow the usual interactive
protocol: the first click is the object's innermost pixel (largest distance to its outline);
each further click goes to the innermost pixel of the largest error region of the current mask,
positive where the object was missed, negative where the mask spills over. ``--box`` adds a box
drawn around the object (its traced outline's bounding box grown by 5 % of its longer side) to
every prompt, and also measures the box alone; ``--box-scale F`` grows that box F times about its
centre (inside the picture), a box drawn loosely. Prints the IoU per object after 1, 2, ... clicks
and the mean. The classical backend always runs; SAM's predictor
runs only with ``--sam`` pointing at a checkpoint (none ships with the pack). ``--out`` writes
each result as a PNG (photo, clicks, mask outline in blue, ground truth in yellow).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
from _pack import ROOT, load_pack

GROUND_TRUTH = ROOT / "bench" / "data" / "mask_ground_truth.json"


def load_photo(ref: str) -> np.ndarray:
    """RGB uint8 of ``skimage:NAME`` (scikit-image's bundled sample) or ``assets:FILE``."""
    kind, name = ref.split(":", 1)
    if kind == "assets":
        bgr = cv2.imread(str(ROOT / "assets" / name))
        return np.ascontiguousarray(bgr[..., ::-1])
    import skimage.data
    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
        img = img[0]
    return np.ascontiguousarray(img[..., :3])


def ground_truth():
    """[(name, photo (H, W, 3) uint8, mask (H, W) bool)] from the JSON file."""
    data = json.loads(GROUND_TRUTH.read_text())
    photos, out = {}, []
    for obj in data["objects"]:
        if obj["photo"] not in photos:
            photos[obj["photo"]] = load_photo(obj["photo"])
        img = photos[obj["photo"]]
        m = np.zeros(img.shape[:2], np.uint8)
        for poly in obj["polygons"]:
            cv2.fillPoly(m, [np.round(np.asarray(poly, np.float64)).astype(np.int32)], 1)
        out.append((obj["name"], img, m.astype(bool)))
    return out


def innermost(region: np.ndarray) -> tuple[int, int]:
    """The pixel of ``region`` farthest from its outline, (x, y)."""
    d = cv2.distanceTransform(np.pad(region.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(d)), d.shape)
    return int(x), int(y)


def next_click(pred: np.ndarray, gt: np.ndarray):
    """(x, y, positive) at the centre of the largest error region."""
    best = None
    for err, positive in ((gt & ~pred, True), (pred & ~gt, False)):
        n, lab, stats, _ = cv2.connectedComponentsWithStats(err.astype(np.uint8), connectivity=4)
        if n > 1:
            k = int(np.argmax(stats[1:, cv2.CC_STAT_AREA])) + 1
            if best is None or stats[k, cv2.CC_STAT_AREA] > best[0]:
                best = (stats[k, cv2.CC_STAT_AREA], lab == k, positive)
    if best is None:
        return None
    x, y = innermost(best[1])
    return x, y, best[2]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def drawn_box(gt: np.ndarray, margin: float = 0.05, scale: float = 1.0) -> list[float]:
    """A box drawn around the object: the bounding box of ``gt`` grown by ``margin`` of its longer
    side, then ``scale`` times about its centre, inside the picture (x0, y0, x1, y1)."""
    ys, xs = np.nonzero(gt)
    pad = margin * max(int(xs.max() - xs.min()), int(ys.max() - ys.min()))
    x0, y0, x1, y1 = xs.min() - pad, ys.min() - pad, xs.max() + pad, ys.max() + pad
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2 * scale, (y1 - y0) / 2 * scale
    h, w = gt.shape
    return [max(cx - hw, 0.0), max(cy - hh, 0.0), min(cx + hw, w - 1.0), min(cy + hh, h - 1.0)]


def run_clicks(segment_fn, img, gt, clicks: int, box=None):
    """IoU after each of ``clicks`` clicks (with ``box`` in every prompt when given), the clicks
    and the last mask."""
    from kinema.formats import Points
    import torch
    pos, neg, ious = [innermost(gt)], [], []
    pred = None
    box_t = None if box is None else torch.tensor(box, dtype=torch.float32)
    for k in range(clicks):
        pts = Points(torch.tensor(pos, dtype=torch.float32).reshape(-1, 2),
                     torch.tensor(neg, dtype=torch.float32).reshape(-1, 2), box_t)
        pred = segment_fn(torch.from_numpy(img).float() / 255, pts).numpy() > 0.5
        ious.append(iou(pred, gt))
        if k + 1 < clicks:
            nxt = next_click(pred, gt)
            if nxt is None:
                ious.extend([ious[-1]] * (clicks - k - 1))
                break
            (pos if nxt[2] else neg).append(nxt[:2])
    return ious, pos, neg, pred


def picture(img, gt, pred, pos, neg) -> np.ndarray:
    out = np.ascontiguousarray(img[..., ::-1]).copy()
    tint = out.astype(np.float32)
    tint[pred] = 0.6 * tint[pred] + 0.4 * np.array([255, 110, 40])
    out = tint.astype(np.uint8)
    for m, colour in ((gt, (0, 220, 255)), (pred, (255, 80, 0))):
        cs, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, cs, -1, colour, 1, cv2.LINE_AA)
    for pts, colour in ((pos, (0, 255, 0)), (neg, (0, 0, 255))):
        for x, y in pts:
            cv2.circle(out, (int(x), int(y)), 5, (255, 255, 255), -1)
            cv2.circle(out, (int(x), int(y)), 4, colour, -1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clicks", type=int, default=3)
    ap.add_argument("--box", action="store_true", help="a box around the object in every prompt")
    ap.add_argument("--box-scale", type=float, default=1.0,
                    help="with --box: grow the box this many times about its centre (a loose box)")
    ap.add_argument("--sam", default="", help="a SAM checkpoint file to compare (optional)")
    ap.add_argument("--out", default="", help="folder for result pictures")
    args = ap.parse_args()
    load_pack()
    from kinema.pipelines import segment as seg

    backends = [("classical", lambda img, pts: seg.segment(img, pts)[0])]
    if args.sam:
        sam = seg.load_sam(args.sam)
        backends.append((f"SAM {sam.variant}", lambda img, pts: seg.segment(img, pts, sam)[0]))
    else:
        print("SAM: no checkpoint given (--sam); the pack ships none, so only the classical backend is measured")
    cases = ground_truth()
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    from kinema.formats import Points
    import torch
    for label, fn in backends:
        print(f"\n{label}: IoU after 1..{args.clicks} clicks" + (", a box around the object in every prompt" if args.box else "")
              + (f" (grown {args.box_scale:g}x)" if args.box and args.box_scale != 1.0 else ""))
        print(f"{'object':12s} " + " ".join(f"{k + 1:>6d}" for k in range(args.clicks)) + "   seconds/click"
              + ("   box alone" if args.box else ""))
        table = []
        for name, img, gt in cases:
            box = drawn_box(gt, scale=args.box_scale) if args.box else None
            t = time.perf_counter()
            ious, pos, neg, pred = run_clicks(fn, img, gt, args.clicks, box)
            dt = (time.perf_counter() - t) / args.clicks
            row = list(ious)
            tail = ""
            if box is not None:
                alone = fn(torch.from_numpy(img).float() / 255,
                           Points(torch.zeros(0, 2), torch.zeros(0, 2), torch.tensor(box, dtype=torch.float32)))
                row.append(iou(alone.numpy() > 0.5, gt))
                tail = f"   {row[-1]:9.3f}"
            table.append(row)
            print(f"{name:12s} " + " ".join(f"{v:6.3f}" for v in ious) + f"   {dt:13.2f}" + tail)
            if out:
                cv2.imwrite(str(out / f"{label.split()[0]}_{name}.png"), picture(img, gt, pred, pos, neg))
        mean = np.mean(np.asarray(table), axis=0)
        print(f"{'mean':12s} " + " ".join(f"{v:6.3f}" for v in mean[:args.clicks])
              + (f"   {'':13s}   {mean[-1]:9.3f}" if args.box else ""))


if __name__ == "__main__":
    main()
