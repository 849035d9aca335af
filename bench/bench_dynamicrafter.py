"""Benchmark: one DynamiCrafter UNet step at real size on the CPU (random weights).

Runs the released 512 architecture (1.4 B parameters) on one latent video of 16 frames at
320x512 (latent 40x64) with the full 333-token context, once per precision, and prints a
table: wall time of the step, peak resident memory, and the share of the step spent in the
image stream of the dual cross-attention (to_k_ip / to_v_ip projections, image attention,
scaled add). A sampling step with guidance runs this twice (batched).

    python bench/bench_dynamicrafter.py                 # bf16 and fp32
    python bench/bench_dynamicrafter.py --dtype bf16 --frames 16 --height 320 --width 512
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch
from _pack import load_pack as _load_pack, random_weights



def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def build_unet(dtype: torch.dtype, variant: str = "512"):
    from kinema.pipelines.dynamicrafter.convert import variants
    from kinema.pipelines.dynamicrafter.unet import DynamiCrafterUNet, UNetConfig
    d = dict(variants()["common_unet"])
    d.update(variants()["variants"][variant]["unet"])
    with torch.device("meta"):
        unet = DynamiCrafterUNet(UNetConfig.from_dict(d))
    return random_weights(unet.to_empty(device="cpu").to(dtype))


class ImageStreamTimer:
    """Times the image stream inside every dual cross-attention (CPU work is synchronous)."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0

    def install(self):
        from kinema.kernels import dual_attention as K
        from kinema.kernels.attention import multihead_attention
        from kinema.pipelines.dynamicrafter import unet as U
        timer = self
        orig = U.CrossAttention.forward

        def forward(mod, x, context=None):
            if context is None or not mod.image_cross_attention:
                return orig(mod, x, context)
            q = mod.to_q(x)
            text, img = context[:, :mod.text_len], context[:, mod.text_len:]
            out = multihead_attention(q, mod.to_k(text), mod.to_v(text), mod.heads)
            t0 = time.perf_counter()
            scale = K.image_scale(mod.image_scale, mod.alpha)
            out = out + scale * multihead_attention(q, mod.to_k_ip(img), mod.to_v_ip(img), mod.heads)
            timer.seconds += time.perf_counter() - t0
            timer.calls += 1
            return mod.to_out(out)

        U.CrossAttention.forward = forward
        return lambda: setattr(U.CrossAttention, "forward", orig)


def run(dtype_name: str, frames: int, height: int, width: int) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    t0 = time.perf_counter()
    unet = build_unet(dtype)
    build_s = time.perf_counter() - t0
    rss_weights = _peak_rss_gib()
    g = torch.Generator().manual_seed(1)
    h, w = height // 8, width // 8
    x = torch.randn(1, 8, frames, h, w, generator=g).to(dtype)
    ctx = torch.randn(1, 77 + 16 * 16, 1024, generator=g).to(dtype)
    timer = ImageStreamTimer()
    undo = timer.install()
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            y = unet(x, torch.tensor([500]), ctx, torch.tensor([24]))
            step_s = time.perf_counter() - t0
    finally:
        undo()
    assert torch.isfinite(y.float()).all()
    params = sum(p.numel() for p in unet.parameters())
    return {"dtype": dtype_name, "frames": frames, "size": f"{width}x{height}", "params_M": round(params / 1e6, 1),
            "build_s": round(build_s, 1), "step_s": round(step_s, 2), "peak_rss_GiB": round(_peak_rss_gib(), 2),
            "rss_after_weights_GiB": round(rss_weights, 2), "image_xattn_s": round(timer.seconds, 2),
            "image_xattn_share": round(timer.seconds / step_s, 4), "image_xattn_calls": timer.calls,
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], action="append")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = p.parse_args(argv)
    _load_pack()
    rows = []
    for name in args.dtype or ["bf16", "fp32"]:
        rows.append(run(name, args.frames, args.height, args.width))
        print(json.dumps(rows[-1]) if args.json else "", end="\n" if args.json else "", flush=True)
    if not args.json:
        cols = ["dtype", "frames", "size", "params_M", "step_s", "peak_rss_GiB", "image_xattn_s", "image_xattn_share",
                "threads"]
        print(" | ".join(cols))
        for r in rows:
            print(" | ".join(str(r[c]) for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
