"""Timings of click -> mask.

    python bench/bench_segment.py [--sam tiny|vit_b|vit_l|vit_h] [--device cpu|cuda] [--repeat N] [--threads N]

Rows: the classical backend (superpixel hierarchies + objectness) on the 512x512 astronaut photo and on a
1024x1024 upscale of it (worked at 512), and SAM predictions with random weights of the chosen
architecture: a first click on a new picture (image encoder + decoder) and further clicks on the
same picture (embedding from the cache, decoder only), with the mask decoder in fp32 (what
segment_anything's predictor runs) and in the default precision (bf16 on a CPU with native
bf16), interleaved click by click; their CPU time (all threads) and how far the masks agree.
Prints median and best of ``--repeat`` runs and the load average.
"""
from __future__ import annotations

import argparse
import statistics
import time
from _pack import ROOT, load_average, load_pack as _load_pack



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
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    _load_pack()
    import cv2
    import torch

    from kinema.formats import parse_points
    from kinema.pipelines import segment as seg

    if args.threads:
        torch.set_num_threads(args.threads)
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
    if args.sam != "tiny":  # random weights of a trained scale, so masks are not all one value
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim > 1:
                    p.copy_(torch.randn(p.shape, generator=g).to(dev) * p[0].numel() ** -0.5)
    label = f"SAM {cfg.variant if args.sam != 'tiny' else 'tiny'} (encoder {cfg.img_size}px, random weights, {dev})"
    import copy
    segmenter = seg.SamSegmenter(model, name=args.sam, variant=cfg.variant, cache_size=4, device=dev)
    reference = seg.SamSegmenter(copy.deepcopy(model), name=args.sam, variant=cfg.variant, cache_size=4, device=dev,
                                 decoder_dtype=torch.float32)
    clicks = [parse_points({"positive": [[225, 120]]}, (512, 512)),
              parse_points({"positive": [[100, 350]], "negative": [[225, 120]]}, (512, 512))]

    def uncached():
        segmenter.embeddings.clear()
        segmenter.predict(img512, clicks[0])

    rows.append((f"{label}: first click on a picture", _time(uncached, args.repeat, sync)))
    reference.embeddings.put(seg.image_key(seg.to_uint8(img512)), segmenter.embed(img512))
    # further clicks on the same picture, the two decoders interleaved: wall and CPU time (all threads)
    walls = {"ref": [], "new": []}
    cpus = {"ref": [], "new": []}
    agree = []
    for i in range(max(args.repeat, 5) + 1):
        for key, which in (("ref", reference), ("new", segmenter)):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            pred = which.predict(img512, clicks[i % 2])
            mask = pred.mask
            sync()
            if i:  # the first round warms up
                walls[key].append(time.perf_counter() - t0)
                cpus[key].append(time.process_time() - c0)
            if key == "ref":
                ref_mask = mask
            else:
                union = float(((mask > 0) | (ref_mask > 0)).sum())
                agree.append(float(((mask > 0) & (ref_mask > 0)).sum()) / max(union, 1.0))
    rows.append((f"{label}: next click, cached embedding, fp32 decoder", walls["ref"]))
    rows.append((f"{label}: next click, cached embedding, {str(segmenter.decoder_dtype)[6:]} decoder (default)",
                 walls["new"]))

    width = max(len(r[0]) for r in rows)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, opencv {cv2.__version__}, "
          f"load average {load_average()}")
    print(f"{'case'.ljust(width)}  median s   best s")
    for name, ts in rows:
        print(f"{name.ljust(width)}  {statistics.median(ts):8.3f}  {min(ts):7.3f}")
    print(f"next click, CPU seconds (all threads, median): fp32 decoder {statistics.median(cpus['ref']):.3f}, "
          f"default decoder {statistics.median(cpus['new']):.3f}; mask agreement (IoU) with fp32: "
          f"min {min(agree):.4f}")


if __name__ == "__main__":
    main()
