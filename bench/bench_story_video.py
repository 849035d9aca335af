"""Benchmark and measurements for story-to-video (semantic motion predictor + transitions).

1. Per-frame image-context continuity of a transition between the two bundled photos, on the
   tiny random-weight DynamiCrafter (configs/dynamicrafter/tiny.json): for each frame t the
   resampler's whole output C_t for that frame's tokens; steps |C_{t+1} - C_t| relative to
   |C_end - C_start|, and how far the last frame's context is from the end keyframe's. Modes:
   ``single``  every frame the first keyframe's context (plain DynamiCrafter interpolation),
   ``cut``     the first keyframe's for the first half, the last keyframe's after,
   ``interp``  the training-free semantic motion (tokens interpolated, then resampled).
2. The ViT-H-size predictor (configs/story_diffusion/semantic_motion_predictor.json): parameters,
   one forward pass for a 16-frame transition on the CPU (random weights), peak memory.
3. Trainer throughput on the tiny set (warp-animator clips, tiny encoder and predictor).

    python bench/bench_story_video.py [--frames 16] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _pack import ROOT, load_pack, peak_rss_mib


def _tiny():
    """The tests' tiny DynamiCrafter factory (tests/tiny_dynamicrafter.py)."""
    import sys
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    import tiny_dynamicrafter
    return tiny_dynamicrafter


def _photo(name: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image
    return torch.from_numpy(np.asarray(Image.open(ROOT / "assets" / name).convert("RGB"), dtype=np.float32) / 255)[None]


def continuity(frames: int) -> dict:
    from kinema.pipelines.dynamicrafter import convert as C
    from kinema.pipelines.dynamicrafter.pipeline import prepare_image
    from kinema.pipelines.story_video import transitions as T
    model = C.convert(_tiny().checkpoint("512"), "tiny", variant="512_interp")
    keys = torch.cat([prepare_image(_photo(n), 64, 64).permute(0, 2, 3, 1) * 0.5 + 0.5
                      for n in ("astronaut.jpg", "chelsea.jpg")])
    motion = T.predict_motion(model, keys, frames, height=64, width=64)
    tok = motion.tokens[0]
    with torch.no_grad():
        full = torch.cat([model.resample_image_tokens(tok[t:t + 1]) for t in range(frames)])
    start, end = full[0], full[-1]
    span = float((end - start).norm())
    modes = {"single": start.expand(frames, -1, -1),
             "cut": torch.stack([start if t < frames // 2 else end for t in range(frames)]),
             "interp": full}
    out = {}
    for name, ctx in modes.items():
        steps = [(ctx[t + 1] - ctx[t]).norm().item() / span for t in range(frames - 1)]
        cos_end = [torch.nn.functional.cosine_similarity(ctx[t].flatten(), end.flatten(), dim=0).item()
                   for t in range(frames)]
        out[name] = {"max_step": max(steps), "mean_step": sum(steps) / len(steps),
                     "path_length": sum(steps), "last_to_end": (ctx[-1] - end).norm().item() / span,
                     "cos_to_end_monotone": all(b >= a - 1e-6 for a, b in zip(cos_end, cos_end[1:]))}
    # token-space steps of the interpolation are uniform by construction; the resampler bends them
    tsteps = [(tok[t + 1] - tok[t]).norm().item() for t in range(frames - 1)]
    out["interp"]["token_step_ratio_max_min"] = max(tsteps) / min(tsteps)
    steps = [(full[t + 1] - full[t]).norm().item() for t in range(frames - 1)]
    out["interp"]["context_step_ratio_max_min"] = max(steps) / min(steps)
    return out


def predictor_speed(frames: int) -> dict:
    from kinema.pipelines.story_video import predictor as SP
    cfg = SP.default_config()
    torch.manual_seed(0)
    m = SP.SemanticMotionPredictor(cfg).eval()
    torch.nn.init.normal_(m.proj_out.weight, std=0.01)
    s, e = torch.randn(1, cfg.tokens, cfg.token_width), torch.randn(1, cfg.tokens, cfg.token_width)
    with torch.no_grad():
        m(s, e, frames)
        t0 = time.perf_counter()
        m(s, e, frames)
        dt = time.perf_counter() - t0
    return {"parameters_M": sum(p.numel() for p in m.parameters()) / 1e6, "forward_s": dt,
            "frames": frames, "peak_rss_MiB": peak_rss_mib()}


def trainer_speed() -> dict:
    from safetensors.torch import save_file
    from kinema.pipelines.story_video import train as TR
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        TR.make_warp_clips(d / "clips", count=8, size=64, frames=12)
        save_file(_tiny().checkpoint("512"), str(d / "dc.safetensors"))
        opts = TR.TrainOptions(data=[str(d / "clips")], encoder=str(d / "dc.safetensors"), out=str(d / "p.safetensors"),
                               work_dir=str(d / "run"), config=json.loads((ROOT / "tests" / "configs" / "story_diffusion" / "tiny.json").read_text()), frames=6,
                               height=64, width=64, steps=1500, batch=8, lr=3e-3, warmup=10, log_every=100,
                               save_every=10000, device="cpu")
        t0 = time.perf_counter()
        res = TR.train(opts, log=lambda m: None)
        dt = time.perf_counter() - t0
    log = res["log_lines"]
    return {"steps": 1500, "seconds": dt, "loss_by_step": {r["step"]: [round(r["loss"], 5), round(r["interpolation_loss"], 5)]
                                                            for r in log if r["step"] in (100, 400, 800, 1500)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (tiny models are fastest on one; more threads on a busy machine can be far slower)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    load_pack()
    print(json.dumps({"continuity_tiny": continuity(a.frames), "predictor_vit_h": predictor_speed(a.frames),
                      "trainer_tiny": trainer_speed()}, indent=1))


if __name__ == "__main__":
    main()
