"""Command line: ``python follow_your_click.py build ...`` and ``python follow_your_click.py train ...``
(see docs/follow_your_click.md)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from ...runtime import KinemaError


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parser() -> argparse.ArgumentParser:
    from .train import PRECISIONS, TRAINABLE, TrainConfig
    defaults = {f.name: (f.default_factory() if callable(f.default_factory) else f.default) for f in fields(TrainConfig)}
    p = argparse.ArgumentParser(prog="follow_your_click.py", description="Make and train Follow-Your-Click models.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="initialise a Follow-Your-Click UNet from SD1.5 + an AnimateDiff motion module")
    b.add_argument("--sd15", required=True, help="SD1.5 single-file checkpoint (e.g. v1-5-pruned-emaonly.safetensors)")
    b.add_argument("--motion-module", required=True, help="AnimateDiff motion module (mm_sd_v15.ckpt or mm_sd_v15_v2.ckpt)")
    b.add_argument("--out", required=True, help="output FYC checkpoint (.safetensors or .ckpt)")
    b.add_argument("--seed", type=int, default=0, help="seed of the new embedding layers' init")

    t = sub.add_parser("train", help="fine-tune a Follow-Your-Click UNet on a folder of clips")
    t.add_argument("--model", required=True, help="FYC checkpoint to start from (from 'build', or a trained one)")
    t.add_argument("--sd15", required=True, help="the SD1.5 checkpoint it was built from (VAE and text encoder)")
    t.add_argument("--clips", required=True, help="folder of video files / frame folders (+ <clip>.txt captions)")
    t.add_argument("--out", required=True, help="output folder (loss.csv, checkpoints/, final.safetensors)")
    for name in ("steps", "batch_size", "frames", "width", "height", "save_every", "seed"):
        t.add_argument(f"--{name.replace('_', '-')}", type=int, default=defaults[name])
    for name in ("lr", "caption_dropout", "weight_decay", "max_grad_norm"):
        t.add_argument(f"--{name.replace('_', '-')}", type=float, default=defaults[name])
    t.add_argument("--strides", type=_ints, default=defaults["strides"], help="frame strides to draw (the fps condition), e.g. 1,2,3,4")
    t.add_argument("--first-frame-mask-rates", type=_floats, default=defaults["first_frame_mask_rates"],
                   help="shares of the frame-0 latent to drop, drawn per sample, e.g. 0,0.3,0.5,0.7")
    t.add_argument("--train", choices=list(TRAINABLE), default=defaults["train"],
                   help="motion: motion modules, conv_in, fps/motion embeddings (the official set); all: everything")
    t.add_argument("--precision", choices=list(PRECISIONS), default=defaults["precision"],
                   help="bf16 / fp16 autocast on CUDA; fp32 anywhere")
    t.add_argument("--device", default="", help="cuda, cpu, mps (default: the best available)")
    t.add_argument("--sam", default="", help="optional segment-anything checkpoint for the object masks")
    t.add_argument("--resume", default=None, help="a checkpoints/step_* folder, or 'latest'")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "build":
            from .convert import build_from_sd15, save_unet
            model = build_from_sd15(args.sd15, args.motion_module, seed=args.seed)
            out = save_unet(model, args.out, {"built_from": f"{args.sd15} + {args.motion_module}"})
            print(out)
            return 0
        from .train import TrainConfig, Trainer
        names = {f.name for f in fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
        print(Trainer(cfg, resume=args.resume).run())
        return 0
    except (ValueError, KinemaError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
