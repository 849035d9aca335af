"""Timings of click -> mask.

    python bench/bench_segment.py [--sam tiny|vit_b|vit_l|vit_h] [--device cpu|cuda] [--repeat N]

Rows: the classical backend (superpixel hierarchies + objectness) on the 512x512 astronaut photo and on a
1024x1024 upscale of it (worked at 512), and SAM predictions with random weights of the chosen
architecture: a first click on a new picture (image encoder + decoder) and further clicks on the
same picture (embedding from the cache, decoder only). Prints median and best of ``--repeat`` runs.
"""
from __future__ import annotations

import argparse
import statistics
import time
from _pack import ROOT, load_pack as _load_pack



def _time(fn, repeat: int, sync=lambda: None) -> list[float]:
    out = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sam", default="tiny", choices=["tiny", "vit_b", "vit_l", "vit_h"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    _load_pack()
    import cv2
    import torch

    from kinema.formats import parse_points
    from kinema.pipelines import segment as seg

    torch.manual_seed(0)
    bgr = cv2.imread(str(ROOT / "assets" / "astronaut.jpg"))
    img512 = torch.from_numpy(bgr[..., ::-1].copy()).float() / 255
    img1024 = torch.from_numpy(cv2.resize(bgr, (1024, 1024), interpolation=cv2.INTER_CUBIC)[..., ::-1].copy()).float() / 255
    face512 = parse_points({"positive": [[225, 120]]}, (512, 512))
    face1024 = parse_points({"positive": [[450, 240]]}, (1024, 1024))
    rows = []
    rows.append(("classical, 512x512, 1 click", _time(lambda: seg.segment(img512, face512), args.repeat)))
    rows.append(("classical, 1024x1024 (worked at 512), 1 click",
                 _time(lambda: seg.segment(img1024, face1024), args.repeat)))

    if args.sam == "tiny":
        cfg = seg.SamConfig(img_size=256, embed_dim=64, depth=2, num_heads=2, window_size=4,
                            global_attn_indexes=(1,), prompt_dim=64, mask_in_chans=8, decoder_depth=2,
                            decoder_mlp_dim=128, iou_head_hidden_dim=64)
    else:
        dim, depth, heads, glob = seg.SAM_VARIANTS[args.sam]
        cfg = seg.SamConfig(embed_dim=dim, depth=depth, num_heads=heads, global_attn_indexes=glob)
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    model = seg.build_sam(cfg, device="cpu").eval().to(dev)
    label = f"SAM {cfg.variant if args.sam != 'tiny' else 'tiny'} (encoder {cfg.img_size}px, random weights, {dev})"
    segmenter = seg.SamSegmenter(model, name=args.sam, variant=cfg.variant, cache_size=4)
    clicks = [parse_points({"positive": [[225, 120]]}, (512, 512)),
              parse_points({"positive": [[100, 350]], "negative": [[225, 120]]}, (512, 512))]

    def uncached():
        segmenter.embeddings.clear()
        segmenter.predict(img512, clicks[0])

    rows.append((f"{label}: first click on a picture", _time(uncached, args.repeat, sync)))
    state = {"i": 0}

    def cached():
        state["i"] += 1
        segmenter.predict(img512, clicks[state["i"] % 2])

    rows.append((f"{label}: next click, cached embedding", _time(cached, max(args.repeat, 5), sync)))

    width = max(len(r[0]) for r in rows)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, opencv {cv2.__version__}")
    print(f"{'case'.ljust(width)}  median s   best s")
    for name, ts in rows:
        print(f"{name.ljust(width)}  {statistics.median(ts):8.3f}  {min(ts):7.3f}")


if __name__ == "__main__":
    main()
