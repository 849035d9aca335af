"""Puppet-Master at real size on the CPU (random weights).

``--part block`` (the default): the drag down block against the stock SVD block it extends
(diffusers' ``CrossAttnDownBlockSpatioTemporal``, same weights, same spatial attention), over a
whole sampling of ``--steps`` steps as the sampler runs it: one drag condition for the video,
so the drag embeddings are computed at the first step and reused. The two blocks run
interleaved step by step in one process: the first step, then ``--repeats`` later steps; the
sampling's time is the first step plus ``steps - 1`` times the median later step (the stock
block: ``steps`` times its median). Times are CPU seconds of this thread (1 torch thread by
default), which a busy machine disturbs less than wall time. Prints the ratio per precision and
the load average before and after.

``--part step``: one whole UNet step with all-to-first vs stock spatial self-attention, and the
share of the step spent in the drag modules (wall-clock, median over ``--repeats``).

A step is one UNet call of the sampler: the [cond, uncond] batch (2 videos x 14 frames) at
32x32 latents (256x256 images).

    python bench/bench_puppet_master.py [--part block|step|both] [--steps 25] [--dtypes fp32 bf16]
                                        [--batch 2] [--repeats 2] [--warmup 1] [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import defaultdict

import torch
from _pack import load_average, load_pack as _pack, random_weights



def random_unet(pm):
    """Real-size UNet with random weights, allocated without the slow default initialisation."""
    unet = pm.build_unet(pm.load_json("puppet_master/unet.json"), device="meta")
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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bench_block(args) -> None:
    """Drag down block vs the stock SVD down block over one sampling (see the module docstring)."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.models.unets.unet_3d_blocks import CrossAttnDownBlockSpatioTemporal
    from kinema.pipelines import puppet_master as pm
    from kinema.kernels.drag import interpolate_drag_frames

    cfg = pm.load_json("puppet_master/unet.json")
    ch, heads, ctx_dim = cfg["block_out_channels"][0], cfg["num_attention_heads"][0], cfg["cross_attention_dim"]
    b, f, r = args.batch, 14, 32
    stock = CrossAttnDownBlockSpatioTemporal(ch, ch, 4 * ch, num_layers=cfg["layers_per_block"],
                                             transformer_layers_per_block=1, num_attention_heads=heads,
                                             cross_attention_dim=ctx_dim, add_downsample=True)
    random_weights(stock, 0)
    drag_block = pm.DragDownBlock(copy.deepcopy(stock), ch, 6 * cfg["num_drags"],
                                  tuple(cfg["drag_embedder_out_channels"]), cfg["pos_embed_dim"], ctx_dim)
    random_weights(drag_block, 1)  # the drag embedders' zero output convs too: the modulation is real
    for blk in (stock, drag_block):
        for m in blk.modules():
            if hasattr(m, "set_processor"):
                m.set_processor(AttnProcessor2_0())
    g = torch.Generator().manual_seed(1)
    drags = torch.zeros(b, f, cfg["num_drags"], 4)
    start = torch.tensor([[0.3, 0.4], [0.6, 0.5], [0.5, 0.7]])
    end = torch.tensor([[0.4, 0.3], [0.7, 0.6], [0.5, 0.9]])
    drags[0, :, :3] = interpolate_drag_frames(start, end, f)  # video 1 is the drag-free half
    h0 = torch.randn(b * f, ch, r, r, generator=g)
    temb0 = torch.randn(b * f, 4 * ch, generator=g)
    ehs0 = torch.randn(b * f, 1, ctx_dim, generator=g)
    print(f"Puppet-Master drag down block vs stock SVD down block: {ch} channels at {r}x{r}, "
          f"{b} videos x {f} frames, {torch.get_num_threads()} thread(s), CPU time; a {args.steps}-step "
          f"sampling = the first step + {args.steps - 1} x the median of {args.repeats} later steps")
    print(f"load average before: {load_average()}")
    print(f"{'dtype':<6} {'stock s':>9} {'drag s':>9} {'ratio':>7} {'first step':>11} {'later steps':>12}")
    for name in args.dtypes:
        dt = DTYPES[name]
        stock.to(dt)
        drag_block.to(dt)
        h, temb, ehs = h0.to(dt), temb0.to(dt), ehs0.to(dt)
        ind = torch.zeros(b, f, dtype=dt)
        with torch.no_grad():
            stock(h, temb, ehs, ind)  # warm-up: allocator and kernel set-up
            drag_block(h, temb, ehs, ind, pm.DragCondition.build(drags))
            drag = pm.DragCondition.build(drags)  # one per video, as the sampler builds it
            t_stock, t_drag = [], []
            for _ in range(1 + args.repeats):  # interleaved, so a change in load hits both
                t0 = time.thread_time()
                stock(h, temb, ehs, ind)
                t1 = time.thread_time()
                drag_block(h, temb, ehs, ind, drag)
                t2 = time.thread_time()
                t_stock.append(t1 - t0)
                t_drag.append(t2 - t1)
        # the first step embeds the drags; every later step reuses them
        stock_step, later = statistics.median(t_stock), statistics.median(t_drag[1:])
        ts = args.steps * stock_step
        td = t_drag[0] + (args.steps - 1) * later
        print(f"{name:<6} {ts:>9.2f} {td:>9.2f} {td / ts:>7.3f} {t_drag[0] / stock_step:>11.3f} "
              f"{later / stock_step:>12.3f}")
    print(f"load average after:  {load_average()}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="block", choices=("block", "step", "both"))
    ap.add_argument("--steps", type=int, default=25, help="sampling steps of the block comparison")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--batch", type=int, default=2, help="videos per call (2 = the CFG batch)")
    ap.add_argument("--repeats", type=int, default=3, help="later steps timed (block); step repeats (step)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: 1 for the block, torch's default "
                                                            "for the step)")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    _pack()
    if args.part in ("block", "both"):
        torch.set_num_threads(args.threads or 1)
        bench_block(args)
        if args.part == "block":
            return
    if args.threads:
        torch.set_num_threads(args.threads)
    from kinema.pipelines import puppet_master as pm
    from kinema.kernels.drag import interpolate_drag_frames
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
    drags[0, :, :3] = interpolate_drag_frames(start, end, f)
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
