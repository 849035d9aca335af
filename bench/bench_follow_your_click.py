"""Benchmark: Follow-Your-Click on the CPU (random weights).

1. one sampling step of the real-size UNet (SD1.5 + AnimateDiff v1 motion modules, 1.28 B
   parameters) with classifier-free guidance (batch 2) on a latent video, per precision: wall
   time, peak resident memory;
2. one training step (forward + backward + AdamW) of a small model at the given size, the
   trainer's per-step cost without data loading.

    python bench/bench_follow_your_click.py                        # bf16, 4 frames at 256x256
    python bench/bench_follow_your_click.py --dtype fp32 --frames 16 --size 512
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from _pack import load_pack, peak_rss_mib, random_weights


def real_unet(dtype: torch.dtype):
    from kinema.pipelines.follow_your_click.convert import build_unet
    from kinema.pipelines.follow_your_click.unet import load_config
    from kinema.kernels.motion_attention import sinusoidal_position_encoding
    unet = random_weights(build_unet(load_config("unet")).to_empty(device="cpu"))
    with torch.no_grad():
        for m in unet.modules():           # the position tables are buffers: rebuild them
            if hasattr(m, "pe"):
                m.pe.copy_(sinusoidal_position_encoding(m.pe.shape[1], m.pe.shape[2]))
    return unet.to(dtype).eval()


def sampling_step(dtype_name: str, frames: int, size: int) -> dict:
    from kinema.pipelines.follow_your_click.unet import conditioning_input
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    t0 = time.perf_counter()
    unet = real_unet(dtype)
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, frames, size // 8, size // 8, generator=g)
    x = conditioning_input(z, torch.randn(1, 4, size // 8, size // 8, generator=g))
    ctx = torch.randn(2, 77, 768, generator=g).to(dtype)
    with torch.no_grad():
        t0 = time.perf_counter()
        y = unet(torch.cat([x, x]).to(dtype), 501, ctx, 2, 4)
        step_s = time.perf_counter() - t0
    assert torch.isfinite(y.float()).all()
    return {"what": "sampling step (CFG batch 2)", "dtype": dtype_name, "frames": frames, "size": size,
            "params_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1), "build_s": round(build_s, 1),
            "step_s": round(step_s, 2), "peak_rss_GiB": round(peak_rss_mib() / 1024, 2),
            "threads": torch.get_num_threads()}


def training_step(frames: int, size: int) -> dict:
    from kinema.pipelines.follow_your_click.pipeline import scheduler
    from kinema.pipelines.follow_your_click.unet import FYCUNet, conditioning_input, load_config
    cfg = dict(load_config("unet"), block_out_channels=[64, 128, 128], layers_per_block=1, cross_attention_dim=768,
               down_block_types=["CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"],
               up_block_types=["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
               motion_module_resolutions=[1, 2, 4])
    torch.manual_seed(0)
    unet = FYCUNet(cfg).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    sched = scheduler()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 4, frames, size // 8, size // 8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([500])
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        x_t = sched.add_noise(x0, noise, t)
        pred = unet(conditioning_input(x_t, x0[:, :, 0]), t, torch.randn(1, 77, 768, generator=g), 2, 4)
        loss = torch.nn.functional.mse_loss(pred, sched.get_velocity(x0, noise, t))
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"what": "training step (small UNet, fp32)", "frames": frames, "size": size,
            "params_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
            "step_s": round(min(times), 2), "peak_rss_GiB": round(peak_rss_mib() / 1024, 2),
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=["bf16", "fp32"], action="append")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--size", type=int, default=256, help="square frame size in pixels (a multiple of 64)")
    p.add_argument("--skip-sampling", action="store_true")
    args = p.parse_args(argv)
    load_pack()
    rows = []
    if not args.skip_sampling:
        for name in args.dtype or ["bf16"]:
            rows.append(sampling_step(name, args.frames, args.size))
            print(json.dumps(rows[-1]), flush=True)
    rows.append(training_step(args.frames, args.size))
    print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
