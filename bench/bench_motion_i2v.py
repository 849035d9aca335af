"""Motion-I2V stage-2 cost of the motion-augmented temporal attention (real sizes, random weights).

``--part modules`` (the default): the 21 motion modules of the SD1.5 + AnimateDiff-v2 network
at their real widths and token grids (512x320, 16 frames, the [cond, uncond] batch), Motion-I2V's
module against the stock AnimateDiff temporal transformer of diffusers
(``AnimateDiffTransformer3D``: same width, 8 heads, two temporal self-attentions, GEGLU
feed-forward, sinusoidal positions). Both run interleaved in one process, 1 torch thread, and are
timed in CPU seconds of this thread. The figure is one sampling of ``--steps`` steps: every
module call, plus building the flow's splat once per token grid (what a run does: the splats are
kept for the whole run). The motion field is smooth, like a drag's (a moving region, a slow zoom).

``--part step``: one whole UNet step with the motion-augmented vs the stock processor, and the
time spent in the temporal attention and in the splat (wall clock, best of ``--repeats``).

    python bench/bench_motion_i2v.py [--part modules|step|both] [--dtypes fp32 bf16] [--steps 25]
                                     [--batch 2] [--frames 16] [--width 512] [--height 320]
                                     [--repeats 3] [--device cpu] [--threads N]

Timings depend on the machine and on other load; the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from _pack import load_average, load_pack as _load_pack, random_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def smooth_flow(frames: int, height: int, width: int, device) -> torch.Tensor:
    """(1, F, H, W, 2) pixels: the middle third moves 3 px a frame to the right and 1 px down,
    the whole picture zooms by 0.5 % a frame; zero at frame 0."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    region = ((xs > width / 3) & (xs < 2 * width / 3) & (ys > height / 3) & (ys < 2 * height / 3)).float()
    out = torch.zeros(1, frames, height, width, 2)
    for k in range(frames):
        out[0, k, ..., 0] = 3.0 * k * region + 0.005 * k * (xs - width / 2)
        out[0, k, ..., 1] = 1.0 * k * region + 0.005 * k * (ys - height / 2)
    return out.to(device)


def bench_modules(args, device) -> None:
    """Motion-I2V's motion module vs diffusers' stock AnimateDiff motion module, per precision."""
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
    from kinema.kernels import motion_attention as kma
    from kinema.pipelines.motion_i2v.modules import MOTION_AUGMENTED, MotionModule

    g = torch.Generator().manual_seed(0)
    h, w, f, b = args.height // 8, args.width // 8, args.frames, args.batch
    levels = [(320, h, w, 5), (640, h // 2, w // 2, 5), (1280, h // 4, w // 4, 5), (1280, h // 8, w // 8, 6)]
    flow = smooth_flow(f, args.height, args.width, device)
    print(f"Motion-I2V motion modules vs diffusers' AnimateDiff motion modules: 21 modules at real widths and grids, "
          f"{b} clips x {f} frames at {args.width}x{args.height}, {args.steps}-step sampling, "
          f"{torch.get_num_threads()} thread(s), CPU time, median of {args.repeats}")
    print(f"load average before: {load_average()}")
    print(f"{'dtype':<6} {'grid':>7} {'ch':>5} {'stock s':>9} {'motion s':>9} {'ratio':>7} {'splat build s':>14}")
    for name in args.dtypes:
        dt = DTYPES[name]
        total_stock = total_ours = 0.0
        for ch, hh, ww, count in levels:
            ours = MotionModule(ch, 8, 32, processor=MOTION_AUGMENTED)
            stock = AnimateDiffTransformer3D(num_attention_heads=8, attention_head_dim=ch // 8, in_channels=ch,
                                             norm_num_groups=32, activation_fn="geglu",
                                             positional_embeddings="sinusoidal", num_positional_embeddings=32)
            random_weights(ours, 2 * ch)
            random_weights(stock, 2 * ch + 1)
            ours, stock = ours.to(device, dt).eval(), stock.to(device, dt).eval()
            x = torch.randn(b * f, ch, hh, ww, generator=g).to(device, dt)
            with torch.no_grad():
                splats = kma.FlowSplats()
                t0 = time.thread_time()
                splats.get(flow, (hh, ww), b, x.device)  # what the first module at this grid builds
                build = time.thread_time() - t0
                stock(x, num_frames=f)  # warm-up
                ours(x, f, flow, splats)
                t_stock, t_ours = [], []
                for _ in range(args.repeats):  # interleaved, so a change in load hits both
                    t0 = time.thread_time()
                    stock(x, num_frames=f)
                    t1 = time.thread_time()
                    ours(x, f, flow, splats)
                    t2 = time.thread_time()
                    t_stock.append(t1 - t0)
                    t_ours.append(t2 - t1)
            s, o = statistics.median(t_stock), statistics.median(t_ours)
            total_stock += args.steps * count * s
            total_ours += args.steps * count * o + build
            print(f"{name:<6} {f'{ww}x{hh}':>7} {ch:>5} {s:>9.3f} {o:>9.3f} {o / s:>7.3f} {build:>14.3f}")
        print(f"{name:<6} {'all':>7} {'':>5} {total_stock:>9.1f} {total_ours:>9.1f} {total_ours / total_stock:>7.3f}"
              f"   (one {args.steps}-step sampling, 21 modules, splats built once)")
    print(f"load average after:  {load_average()}")


def bench_step(args, device) -> None:
    """One whole UNet step, motion-augmented vs stock temporal attention."""
    from kinema.kernels import motion_attention as kma
    from kinema.pipelines.motion_i2v import loading
    from kinema.pipelines.motion_i2v.modules import MOTION_AUGMENTED, TEMPORAL, TemporalAttention

    dtype = DTYPES[args.dtypes[0]]
    if args.arch == "sd15":
        cfg = loading.load_config("stage2_unet")
    else:  # the tests' small network of the same structure
        import json
        from pathlib import Path
        tiny = Path(__file__).resolve().parents[1] / "tests" / "configs" / "motion_i2v" / "tiny_stage2_unet.json"
        cfg = json.loads(tiny.read_text())
    unet = loading.build_render_unet(cfg).to_empty(device=device)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for name, t in list(unet.named_parameters()) + list(unet.named_buffers()):
            if name.endswith("pos_encoder.pe"):
                t.copy_(kma.sinusoidal_position_encoding(t.shape[1], t.shape[2]))
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (0.02 if t.ndim >= 2 else 0.1))
    unet = unet.to(dtype).eval().requires_grad_(False)

    b, f, h, w = args.batch, args.frames, args.height // 8, args.width // 8
    x = torch.randn(b, 4, f, h, w, generator=g).to(device, dtype)
    ctx = torch.randn(b, 77, cfg["cross_attention_dim"], generator=g).to(device, dtype)
    flow = smooth_flow(f, args.height, args.width, device)
    t = torch.tensor(500, device=device)
    timers: dict = defaultdict(float)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    real_splat = kma.FirstFrameSplat.__call__

    def timed_splat(self, *a, **k):
        sync()
        t0 = time.perf_counter()
        out = real_splat(self, *a, **k)
        sync()
        timers["splat"] += time.perf_counter() - t0
        return out

    def attn_pre(mod, inp):
        sync()
        mod._t0 = time.perf_counter()

    def attn_post(mod, inp, out):
        sync()
        timers["temporal attention"] += time.perf_counter() - mod._t0

    hooks = []
    for m in unet.modules():
        if isinstance(m, TemporalAttention):
            hooks += [m.register_forward_pre_hook(attn_pre), m.register_forward_hook(attn_post)]
    kma.FirstFrameSplat.__call__ = timed_splat
    rows = []
    try:
        with torch.no_grad():
            splats = kma.FlowSplats()  # one per run, as the sampler keeps it
            for mode in (TEMPORAL, MOTION_AUGMENTED):
                unet.set_temporal_processor(mode)
                for _ in range(args.warmup):
                    unet(x, t, ctx, flow=flow, splats=splats)
                best = None
                for _ in range(args.repeats):
                    timers.clear()
                    sync()
                    t0 = time.perf_counter()
                    unet(x, t, ctx, flow=flow, splats=splats)
                    sync()
                    total = time.perf_counter() - t0
                    if best is None or total < best[0]:
                        best = (total, dict(timers))
                rows.append((mode, best[0], best[1].get("temporal attention", 0.0), best[1].get("splat", 0.0)))
    finally:
        kma.FirstFrameSplat.__call__ = real_splat
        for hk in hooks:
            hk.remove()

    print(f"Motion-I2V stage-2 UNet step: {args.arch}, batch {b}, {f} frames, {args.width}x{args.height} "
          f"(latent {w}x{h}), {str(dtype).replace('torch.', '')} on {device}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats} after {args.warmup} warm-up")
    print(f"{'temporal attention':<20}{'step s':>10}{'attention s':>14}{'splat s':>10}{'splat % step':>14}")
    for mode, total, att, spl in rows:
        print(f"{mode:<20}{total:>10.2f}{att:>14.2f}{spl:>10.2f}{100 * spl / total:>13.1f}%")
    (m0, t0_, a0, _), (m1, t1, a1, s1) = rows
    print(f"ratio step (motion-augmented / stock): {t1 / t0_:.3f}")
    print(f"ratio temporal attention only:          {a1 / max(a0, 1e-9):.3f}")
    print(f"splat share of the motion-augmented attention: {100 * s1 / max(a1, 1e-9):.1f}%")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default="modules", choices=("modules", "step", "both"),
                   help="the motion modules against diffusers' stock ones, a whole UNet step, or both")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES),
                   help="precisions (the step uses the first)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps the modules' figure is for")
    p.add_argument("--batch", type=int, default=2, help="clips per call (2 = with classifier-free guidance)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed UNet steps per mode before timing")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: 1 for the modules, torch's default "
                                                          "for the step)")
    p.add_argument("--arch", default="sd15", help="the step's network: sd15 (real size) or tiny (smoke run)")
    args = p.parse_args(argv)

    _load_pack()
    device = torch.device(args.device)
    if args.part in ("modules", "both"):
        torch.set_num_threads(args.threads or 1)
        bench_modules(args, device)
    if args.part in ("step", "both"):
        if args.threads:
            torch.set_num_threads(args.threads)
        bench_step(args, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
