"""Motion-I2V stage-2 cost of the motion-augmented temporal attention (real sizes, random weights).

One UNet step of the SD1.5 + AnimateDiff-v2 network at 512x320, 16 frames, with the
motion-augmented processor (frame 0 splatted by the flow, 2F-1 keys per query) against the
same network with the stock AnimateDiff temporal attention; plus the time spent in the
temporal attention itself and in the splat.

    python bench/bench_motion_i2v.py [--batch 1] [--frames 16] [--width 512] [--height 320]
                                     [--dtype auto|fp32|bf16|fp16] [--device cpu] [--repeats 1]

Prints a table. Timings depend on the machine and on other load; run it on an idle machine.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from _pack import load_pack as _load_pack



def _pick_dtype(name: str, device) -> torch.dtype:
    if name != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    a = torch.randn(1024, 1024, device=device)
    times = {}
    for dt in (torch.float32, torch.bfloat16):
        x = a.to(dt)
        x @ x
        t0 = time.perf_counter()
        for _ in range(5):
            x @ x
        times[dt] = time.perf_counter() - t0
    return min(times, key=times.get)


def bench_modules(args, dtype, device) -> None:
    """The 21 motion modules of the real network alone, at their real token grids and widths."""
    from kinema.kernels import motion_attention as kma
    from kinema.pipelines.motion_i2v.modules import MOTION_AUGMENTED, TEMPORAL, MotionModule

    g = torch.Generator().manual_seed(0)
    h, w, f, b = args.height // 8, args.width // 8, args.frames, args.batch
    levels = [(320, h, w, 5), (640, h // 2, w // 2, 5), (1280, h // 4, w // 4, 5), (1280, h // 8, w // 8, 6)]
    flow = (torch.randn(1, f, args.height, args.width, 2, generator=g) * 8).to(device)
    flow[:, 0] = 0
    real_splat = kma.splat_first_frame
    spent = {"splat": 0.0}

    def timed_splat(*a, **k):
        t0 = time.perf_counter()
        out = real_splat(*a, **k)
        spent["splat"] += time.perf_counter() - t0
        return out

    kma.splat_first_frame = timed_splat
    totals = {TEMPORAL: 0.0, MOTION_AUGMENTED: 0.0}
    splat = 0.0
    try:
        with torch.no_grad():
            for ch, hh, ww, count in levels:
                m = MotionModule(ch, 8, 32).to(device)
                for prm in m.parameters():
                    prm.copy_(torch.randn(prm.shape, generator=g) * 0.02)
                m = m.to(dtype)
                x = torch.randn(b * f, ch, hh, ww, generator=g).to(device, dtype)
                for mode in (TEMPORAL, MOTION_AUGMENTED):
                    for a in m.modules():
                        if hasattr(a, "processor"):
                            a.processor = mode
                    m(x, f, flow)  # warm-up
                    spent["splat"] = 0.0
                    t0 = time.perf_counter()
                    m(x, f, flow)
                    totals[mode] += count * (time.perf_counter() - t0)
                    if mode == MOTION_AUGMENTED:
                        splat += count * spent["splat"]
    finally:
        kma.splat_first_frame = real_splat
    print(f"motion modules only (21 at real widths/grids), batch {b}, {f} frames, {str(dtype).replace('torch.', '')}:")
    print(f"  stock {totals[TEMPORAL]:.2f} s, motion-augmented {totals[MOTION_AUGMENTED]:.2f} s, "
          f"ratio {totals[MOTION_AUGMENTED] / totals[TEMPORAL]:.3f}, splat {splat:.2f} s "
          f"({100 * splat / totals[MOTION_AUGMENTED]:.1f}% of the motion-augmented modules)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1, help="clips per step (2 = with classifier-free guidance)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode before timing")
    p.add_argument("--arch", default="sd15", help="sd15 (real size) or tiny (smoke run)")
    p.add_argument("--part", default="step", choices=("step", "modules", "both"),
                   help="a whole UNet step, the motion modules alone, or both")
    args = p.parse_args(argv)

    _load_pack()
    from kinema.kernels import motion_attention as kma
    from kinema.pipelines.motion_i2v import loading
    from kinema.pipelines.motion_i2v.modules import MOTION_AUGMENTED, TEMPORAL, TemporalAttention

    device = torch.device(args.device)
    dtype = _pick_dtype(args.dtype, device)
    if args.part in ("modules", "both"):
        bench_modules(args, dtype, device)
        if args.part == "modules":
            return 0
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
    flow = (torch.randn(1, f, args.height, args.width, 2, generator=g) * 8).to(device)
    flow[:, 0] = 0
    t = torch.tensor(500, device=device)

    timers: dict = defaultdict(float)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    real_splat = kma.splat_first_frame

    def timed_splat(*a, **k):
        sync()
        t0 = time.perf_counter()
        out = real_splat(*a, **k)
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
    kma.splat_first_frame = timed_splat

    rows = []
    try:
        with torch.no_grad():
            for mode in (TEMPORAL, MOTION_AUGMENTED):
                unet.set_temporal_processor(mode)
                for _ in range(args.warmup):
                    unet(x, t, ctx, flow=flow)
                best = None
                for _ in range(args.repeats):
                    timers.clear()
                    sync()
                    t0 = time.perf_counter()
                    unet(x, t, ctx, flow=flow)
                    sync()
                    total = time.perf_counter() - t0
                    if best is None or total < best[0]:
                        best = (total, dict(timers))
                rows.append((mode, best[0], best[1].get("temporal attention", 0.0), best[1].get("splat", 0.0)))
    finally:
        kma.splat_first_frame = real_splat
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
