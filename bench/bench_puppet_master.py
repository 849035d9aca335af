"""Puppet-Master UNet at real size on the CPU (random weights): one sampling step with all-to-first
vs stock spatial self-attention, and the share of the step spent in the drag modules.

    python bench/bench_puppet_master.py [--batch 2] [--repeats 2] [--warmup 1] [--threads N]

A step is one UNet call of the sampler: the [cond, uncond] batch (2 videos x 14 frames) at
32x32 latents (256x256 images). Timings are wall-clock seconds (median over ``--repeats``).
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from _pack import load_pack as _pack



def random_unet(pm):
    """Real-size UNet with random weights, allocated without the slow default initialisation."""
    unet = pm.build_unet(pm.model_configs("released")["unet"], device="meta")
    unet = unet.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias") or name.endswith("mix_factor"):
                p.zero_()
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.normal_(0.0, fan_in ** -0.5, generator=g)
    return unet.eval()


class Timers:
    """Wall-clock time spent inside chosen modules / callables during one forward."""

    def __init__(self):
        self.t = defaultdict(float)
        self._start = {}

    def hook(self, module, key):
        def pre(m, *a, **k):
            self._start[id(m)] = time.perf_counter()

        def post(m, *a, **k):
            self.t[key] += time.perf_counter() - self._start.pop(id(m))
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def wrap(self, obj, attr, key):
        fn = getattr(obj, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            self.t[key] += time.perf_counter() - t0
            return out
        setattr(obj, attr, timed)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2, help="videos per call (2 = the CFG batch)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    _pack()
    from kinema.pipelines import puppet_master as pm
    from kinema.pipelines.puppet_master import DragDownBlock, DragUpBlock

    t0 = time.perf_counter()
    unet = random_unet(pm)
    n_params = sum(p.numel() for p in unet.parameters())
    build_s = time.perf_counter() - t0

    timers = Timers()
    for name, m in unet.named_modules():
        if name.endswith(".attn1") and ".transformer_blocks." in name and "temporal" not in name:
            timers.hook(m, "spatial self-attention")
    for block in list(unet.down_blocks) + list(unet.up_blocks):
        if isinstance(block, (DragDownBlock, DragUpBlock)):
            for conv in block.flow_convs:
                timers.hook(conv, "drag embedders (convs)")
            for mlp in block.drag_token_mlps:
                timers.hook(mlp, "drag-token MLPs")
            timers.wrap(block, "_inject", "drag layers (all)")

    g = torch.Generator().manual_seed(1)
    b, f = args.batch, 14
    sample = torch.randn(b, f, 4, 32, 32, generator=g)
    lat = torch.randn(b, 4, 32, 32, generator=g)
    emb = torch.randn(b, 1, 1024, generator=g)
    drags = torch.zeros(b, f, 5, 4)
    start = torch.tensor([[0.3, 0.4], [0.6, 0.5], [0.5, 0.7]])
    end = torch.tensor([[0.4, 0.3], [0.7, 0.6], [0.5, 0.9]])
    drags[0, :, :3] = pm.interpolate_drag_frames(start, end, f)
    t = torch.tensor([0.25 * torch.log(torch.tensor(10.0)).item()])

    def call():
        timers.t.clear()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = unet(sample, t, lat, emb, drags)
        assert torch.isfinite(out).all()
        return time.perf_counter() - t0, dict(timers.t)

    for _ in range(args.warmup):  # first calls pay for allocations and kernel set-up
        call()
    kinds = ("all_to_first", "stock")
    step, parts = {k: [] for k in kinds}, {k: defaultdict(list) for k in kinds}
    for _ in range(args.repeats):  # interleaved, so a change in machine load hits both
        for kind in kinds:
            unet.set_spatial_attention(kind)
            s, p = call()
            step[kind].append(s)
            for key, v in p.items():
                parts[kind][key].append(v)
    rows = [(k, statistics.median(step[k]), {key: statistics.median(v) for key, v in parts[k].items()})
            for k in kinds]

    print(f"Puppet-Master UNet, {n_params / 1e9:.3f} B parameters (random), built in {build_s:.1f} s; "
          f"CPU, {torch.get_num_threads()} threads, batch {b} x {f} frames at 32x32 latents, "
          f"median of {args.repeats} interleaved runs after {args.warmup} warm-up")
    print(f"{'spatial attention':<18} {'step s':>8} {'attn1 s':>8} {'drag layers s':>14} {'share':>7} "
          f"{'embedders s':>12} {'token MLPs s':>13}")
    for kind, s, p in rows:
        drag = p.get("drag layers (all)", 0.0)
        print(f"{kind:<18} {s:>8.2f} {p.get('spatial self-attention', 0.0):>8.2f} {drag:>14.2f} "
              f"{100 * drag / s:>6.1f}% {p.get('drag embedders (convs)', 0.0):>12.2f} "
              f"{p.get('drag-token MLPs', 0.0):>13.2f}")
    a2f, stock = rows[0][1], rows[1][1]
    print(f"all-to-first / stock step time: {a2f / stock:.3f}")


if __name__ == "__main__":
    main()
