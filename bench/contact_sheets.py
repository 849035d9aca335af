"""Contact sheets of the weights-free path on photos, the way a user drives it: one click on the
object, one drag, the nodes Click to Mask -> Motion from drags (with the mask) -> Animate by
warping, 16 frames. Each sheet shows the input with the click and the drag and the mask (top),
and frames 0, 5, 10 and 15 cropped around the object and where it goes (bottom).

    python bench/contact_sheets.py --out DIR [--fill inpaint|stretch]

Photos: the bundled ones in assets/ and scikit-image's bundled samples.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
from _pack import load_pack
from bench_masks import load_photo

# name, photo, click (x, y), drag end (x, y); optionally the clicks as the Click to Mask node takes
# them, and Motion from drags' falloff (px; 0: only the masked object moves)
DEMO = {"positive": [[405, 40], [400, 150], [440, 120], [436, 60]], "negative": [[330, 100], [405, 262]],
        "box": [350, 0, 470, 285]}
# the cat's head, as the Follow-Your-Click, DynamiCrafter-region and Puppet-Master workflows click it
CAT_HEAD = {"positive": [[200, 150], [310, 110], [150, 240], [262, 240], [200, 50], [80, 150]],
            "negative": [[435, 150], [430, 250]], "box": [0, 0, 410, 299]}
CASES = [
    ("shuttle_demo_clicks", "assets:astronaut.jpg", (405, 150), (405, 70), DEMO),
    ("shuttle", "assets:astronaut.jpg", (405, 150), (405, 70)),
    ("helmet", "assets:astronaut.jpg", (400, 430), (370, 400)),
    ("head", "assets:astronaut.jpg", (229, 78), (250, 70)),
    ("cat_nose", "assets:chelsea.jpg", (263, 242), (263, 262)),
    ("cup", "skimage:coffee", (290, 150), (250, 120)),
    ("spoon", "skimage:coffee", (367, 286), (400, 300)),
    ("rocket", "skimage:rocket", (322, 250), (322, 190)),
    ("motorcycle_tank", "skimage:stereo_motorcycle", (450, 205), (450, 175)),
    ("cat_head_workflow_clicks", "assets:chelsea.jpg", (230, 140), (243, 133), CAT_HEAD),
    # ... and as the two-backends workflow animates it without a model: the fur around the head
    # bends with it
    ("cat_head_workflow_falloff", "assets:chelsea.jpg", (230, 140), (243, 133), CAT_HEAD, 40),
    # what a user does next where one click misses parts: a box around the object, more clicks
    ("helmet_box", "assets:astronaut.jpg", (400, 430), (370, 400),
     {"positive": [[400, 430]], "box": [265, 331, 511, 511]}),
    ("cup_box_3_clicks", "skimage:coffee", (290, 150), (250, 120),
     {"positive": [[290, 150], [247, 242], [290, 244]], "box": [160, 4, 422, 320]}),
]


def sheet(rows: list[np.ndarray], labels: list[str], h: int = 256) -> np.ndarray:
    tiles = []
    for img, label in zip(rows, labels):
        s = h / img.shape[0]
        t = cv2.resize(img, (int(round(img.shape[1] * s)), h), interpolation=cv2.INTER_AREA)
        cv2.putText(t, label, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(t, label, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(t)
    return np.hstack(tiles)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--fill", default="inpaint")
    args = ap.parse_args()
    load_pack()
    import torch
    from kinema.nodes.motion import KinemaAnimateWarp, KinemaMotionFromDrags
    from kinema.nodes.segment import KinemaClickToMask

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, photo, click, end, *extra in CASES:
        rgb = load_photo(photo)
        img = torch.from_numpy(rgb).float()[None] / 255
        t0 = time.perf_counter()
        clicks = extra[0] if extra else {"positive": [list(click)]}
        falloff = extra[1] if len(extra) > 1 else 0
        mask = KinemaClickToMask().run(img, json.dumps(clicks))["result"][0]
        t1 = time.perf_counter()
        field = KinemaMotionFromDrags().build(img, json.dumps({"tracks": [[list(click), list(end)]]}), 16, 1.0,
                                              "ease_in_out", falloff, mask=mask)["result"][0]
        frames = KinemaAnimateWarp().render(img, field, args.fill, False)["result"][0]
        t2 = time.perf_counter()
        bgr = [np.ascontiguousarray((f.numpy() * 255).round().astype(np.uint8)[..., ::-1]) for f in frames]
        first = bgr[0].copy()
        cv2.arrowedLine(first, click, end, (0, 255, 255), 2, cv2.LINE_AA, tipLength=0.25)
        for kind, colour in (("positive", (0, 200, 0)), ("negative", (0, 0, 230))):
            for x, y in clicks.get(kind, []):
                cv2.circle(first, (int(x), int(y)), 6, (255, 255, 255), -1)
                cv2.circle(first, (int(x), int(y)), 5, colour, -1)
        if clicks.get("box"):
            x0b, y0b, x1b, y1b = (int(v) for v in clicks["box"])
            cv2.rectangle(first, (x0b, y0b), (x1b, y1b), (0, 220, 255), 1)
        m = mask[0].numpy() > 0.5
        tint = first.astype(np.float32)
        tint[m] = 0.45 * tint[m] + 0.55 * np.array([255, 120, 30])
        tint = tint.astype(np.uint8)
        cs, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(tint, cs, -1, (255, 200, 0), 1, cv2.LINE_AA)
        # second row: frames 0, 5, 10, 15 cropped around the object and where it goes, larger
        ys, xs = np.nonzero(m)
        dx, dy = end[0] - click[0], end[1] - click[1]
        x0, x1 = min(xs.min(), xs.min() + dx), max(xs.max(), xs.max() + dx)
        y0, y1 = min(ys.min(), ys.min() + dy), max(ys.max(), ys.max() + dy)
        pad = int(0.25 * max(x1 - x0, y1 - y0)) + 12
        hh, ww = m.shape
        x0, x1 = max(int(x0) - pad, 0), min(int(x1) + pad, ww)
        y0, y1 = max(int(y0) - pad, 0), min(int(y1) + pad, hh)
        top = sheet([first, tint], ["input, click, drag", "mask"], 320)
        crops = [b[y0:y1, x0:x1] for b in (bgr[0], bgr[5], bgr[10], bgr[15])]
        bottom = sheet(crops, ["frame 0", "frame 5", "frame 10", "frame 15"], 320)
        width = max(top.shape[1], bottom.shape[1])
        top = np.pad(top, ((0, 0), (0, width - top.shape[1]), (0, 0)))
        bottom = np.pad(bottom, ((0, 0), (0, width - bottom.shape[1]), (0, 0)))
        cv2.imwrite(str(out / f"{name}.png"), np.vstack([top, bottom]))
        print(f"{name:16s} mask {t1 - t0:.2f}s  motion+animate {t2 - t1:.2f}s  mask area {m.mean():.3f}")


if __name__ == "__main__":
    main()
