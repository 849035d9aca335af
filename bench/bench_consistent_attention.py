"""Benchmark: tiled consistent self-attention vs the untiled form of the same maths.

One layer call at real SDXL up-block token counts (64x64 level: 4096 tokens, 640 channels,
10 heads; 32x32 level: 1024 tokens, 1280 channels, 20 heads), one character with
``id_length`` reference panels, every other panel reading them, sampling rate 0.5, one CFG
group. Each case runs in a fresh subprocess; peak memory is the subprocess's peak resident
set size minus the same process's peak right before the attention call (inputs included
in the baseline; the (P, N, D) output, column "out MB", is part of both peaks). Untiled cases whose block mask and scores would exceed ``--max-gb`` are
skipped and reported with the estimate.

    python bench/bench_consistent_attention.py [--panels 4 8 16] [--heads-frac 1.0] [--window 2]

``--heads-frac`` < 1 keeps the token counts and head size (64) but fewer heads, to fit a
busy CPU; time and memory of both forms scale about linearly with the number of heads.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

LEVELS = {"64x64": (4096, 640, 10), "32x32": (1024, 1280, 20)}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _case(args) -> dict:
    import importlib.util
    import torch

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("kinema_ca", root / "kernels" / "consistent_attention.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kinema_ca"] = mod
    spec.loader.exec_module(mod)
    torch.set_num_threads(args.threads)
    n, ch, heads = LEVELS[args.level]
    heads = max(1, round(heads * args.heads_frac))
    d = heads * 64
    p = args.n_panels
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(p, n, d, generator=gen) for _ in range(3))
    refs = list(range(args.id_length))
    sources = [[r for r in refs if r != i] if i in refs else list(refs) for i in range(p)]
    masks = torch.rand(p, n, generator=gen) < 0.5
    base = _peak_mb()
    t0 = time.perf_counter()
    if args.impl == "tiled":
        mod.consistent_attention(q, k, v, heads, sources, masks, window=args.window)
    else:
        mod.consistent_attention_dense(q, k, v, heads, sources, masks)
    dt = time.perf_counter() - t0
    return {"time_s": dt, "peak_mb": _peak_mb() - base, "heads": heads, "out_mb": q.numel() * 4 / 2 ** 20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--panels", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--levels", nargs="+", default=list(LEVELS))
    ap.add_argument("--heads-frac", type=float, default=1.0)
    ap.add_argument("--window", type=int, default=2)
    ap.add_argument("--id-length", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-gb", type=float, default=12.0)
    ap.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="tiled", help=argparse.SUPPRESS)
    ap.add_argument("--level", default="64x64", help=argparse.SUPPRESS)
    ap.add_argument("--n-panels", type=int, default=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(_case(args)))
        return

    rows = []
    for level in args.levels:
        n, ch, heads = LEVELS[level]
        heads = max(1, round(heads * args.heads_frac))
        for p in args.panels:
            res = {}
            for impl in ("tiled", "untiled"):
                # untiled: the (P*N)^2 bool block mask, plus kernel workspace
                est_gb = 1.5 * (p * n) ** 2 / 1e9
                if impl == "untiled" and est_gb > args.max_gb:
                    res[impl] = None
                    res["est_gb"] = est_gb
                    continue
                cmd = [sys.executable, __file__, "--case", "--impl", impl, "--level", level,
                       "--n-panels", str(p), "--heads-frac", str(args.heads_frac), "--window",
                       str(args.window), "--id-length", str(args.id_length), "--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
                if out.returncode != 0:
                    res[impl] = None
                    res["error"] = out.stderr.strip().splitlines()[-1:] or ["failed"]
                    continue
                res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((level, heads, p, res))
            _print_row(level, heads, p, res)


def _print_row(level, heads, p, res):
    if not hasattr(_print_row, "header"):
        _print_row.header = True
        print(f"{'level':6} {'heads':>5} {'panels':>6} {'out MB':>6} | {'tiled s':>8} {'tiled MB':>9} | "
              f"{'untiled s':>9} {'untiled MB':>10} | {'time x':>7} {'mem x':>7}")
    t, u = res.get("tiled"), res.get("untiled")
    ts = f"{t['time_s']:8.2f} {t['peak_mb']:9.0f}" if t else f"{'-':>8} {'-':>9}"
    if u:
        us = f"{u['time_s']:9.2f} {u['peak_mb']:10.0f}"
        ratio = f"{u['time_s'] / t['time_s']:7.2f} {u['peak_mb'] / max(t['peak_mb'], 1):7.2f}" if t else ""
    else:
        note = f"skip ~{res['est_gb']:.0f} GB" if "est_gb" in res else "failed"
        us, ratio = f"{note:>20}", ""
    out_mb = (t or u or {}).get("out_mb", 0.0)
    print(f"{level:6} {heads:5d} {p:6d} {out_mb:6.0f} | {ts} | {us} | {ratio}", flush=True)


if __name__ == "__main__":
    main()
