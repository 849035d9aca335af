"""Train the semantic motion predictor on video clips.

Data: clips are video files (read with PyAV) or folders of frames (image files, in name order).
Every clip is embedded once with the frozen CLIP image encoder - each frame scaled and
centre-cropped to the transition size, then encoded exactly as DynamiCrafter encodes a keyframe
- and the tokens are cached (``<work_dir>/embeddings``, one safetensors file per clip, reused
while the clip file, the encoder and the size are unchanged).

A training sample is a window of ``frames`` frames, ``frame_step`` apart, at a random place in a
random clip (clips weighted by their number of windows): its first and last frames are the
keyframes, the frames between are the targets.

Loss. StoryDiffusion names the target (the intermediate frames' image embeddings) but its
reading notes do not give the loss, so we chose: the mean squared error between predicted and
true tokens of the frames between the keyframes, each token standardised first (LayerNorm
without scale and shift, i.e. zero mean and unit variance over its channels). Why: the
resampler reads tokens only through ``LayerNorm(proj_in(x))``, so a token's direction matters and
its overall scale hardly does; and the ViT-H tokens have a few channels of very large magnitude
that a plain MSE would spend itself on. The same loss of the training-free interpolation on the
same batch is logged beside it (``interpolation_loss``): the learned mode is worth using once its
loss is clearly below that.

Optimiser: AdamW (betas 0.9 / 0.999, weight decay 0.01), linear warm-up then constant learning
rate, gradients clipped to norm 1. The predictor starts as the interpolation (zero output layer).

Resume: ``<work_dir>/trainer_state.pt`` holds the weights, the optimiser state, the step, the
sampler's random state and the settings; it is written every ``save_every`` steps, at the end
and on Ctrl+C. Resuming continues bit for bit as if never stopped (on the CPU; CUDA kernels may
be non-deterministic). ``<work_dir>/loss_log.jsonl`` has one line per ``log_every`` steps; the
predictor file (``out``) is written with the state.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ...runtime import KinemaError, ProgressBar
from ..clips import find_clips, make_warp_clips, read_frames  # noqa: F401  (make_warp_clips: the practice set)
from ..dynamicrafter.encoders import VisionEncoder
from ..dynamicrafter.pipeline import prepare_image
from .predictor import PredictorConfig, interpolate_tokens, new_predictor, save_predictor

STATE = "trainer_state.pt"
LOG = "loss_log.jsonl"


@dataclass
class TrainOptions:
    data: list                      # video files, frame folders, or folders holding them
    encoder: str                    # DynamiCrafter checkpoint or OpenCLIP ViT-H file (its image encoder)
    out: str                        # the predictor file to write (.safetensors)
    work_dir: str                   # trainer state, loss log, embedding cache
    config: dict = field(default_factory=dict)   # PredictorConfig fields; {} = the shipped ViT-H config
    frames: int = 16                # frames per window (keyframes included), as the transitions use
    frame_step: int = 1             # source frames between window frames
    height: int = 320               # keyframe size the transitions use (512-interp: 320 x 512)
    width: int = 512
    steps: int = 10000
    batch: int = 8
    lr: float = 1e-4
    warmup: int = 200
    weight_decay: float = 0.01
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda | cuda:N | mps
    precision: str = "fp32"         # fp32 | bf16 (autocast for the predictor; CUDA)
    save_every: int = 500
    log_every: int = 10
    resume: bool = False
    max_clip_frames: int = 0        # 0: every frame of a clip; else the first N (after frame sampling)


def _check(opts: TrainOptions) -> None:
    for name in ("frames", "frame_step", "height", "width", "steps", "batch", "save_every", "log_every"):
        v = getattr(opts, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: {v!r} must be a positive whole number")
    if opts.frames < 3:
        raise ValueError(f"frames: {opts.frames} is too few (the keyframes and at least one frame between)")
    if not opts.lr > 0:
        raise ValueError(f"lr: {opts.lr} must be positive")
    if opts.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision: {opts.precision!r} is not fp32 or bf16")
    if not str(opts.out).endswith(".safetensors"):
        raise ValueError(f"out: {opts.out} must be a .safetensors file")
    if not opts.data:
        raise ValueError("data: give at least one video file or frame folder")


# ------------------------------------------------------------------------------ encoder

def load_image_encoder(path, dtype: torch.dtype = torch.float32) -> VisionEncoder:
    """The frozen CLIP image encoder from a DynamiCrafter checkpoint (``embedder.model.visual.*``)
    or an OpenCLIP ViT-H file (``visual.*``); only those tensors are read."""
    from ..checkpoint import load_strict, read_state_dict
    from ..dynamicrafter import convert as dc
    path = Path(path)
    prefixes = (dc.VISION + "visual.", "visual.")
    sd = read_state_dict(path, prefixes=prefixes, expected=f"{dc.EXPECTED}, or an OpenCLIP ViT-H file", mmap=True)
    for prefix in prefixes:
        vis = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if "conv1.weight" in vis:
            break
    else:
        raise KinemaError(f"'{path.name}' holds no OpenCLIP image encoder (expected embedder.model.visual.* of a "
                          "DynamiCrafter checkpoint, or visual.* of an OpenCLIP ViT-H file)")
    vis = {k: v for k, v in vis.items() if k not in ("ln_post.weight", "ln_post.bias", "proj")}
    cfg = dc.vision_config({"visual." + k: v for k, v in vis.items()})
    with torch.device("meta"):
        enc = VisionEncoder(**cfg)
    load_strict(enc, vis, f"'{path.name}' (image encoder)",
                advice="Use a DynamiCrafter checkpoint or an OpenCLIP ViT-H/14 file")
    return enc.to(dtype).eval().requires_grad_(False)


def encoder_signature(enc: VisionEncoder) -> str:
    """A short fingerprint of the encoder's weights (cache key)."""
    h = hashlib.sha1()
    for name in ("conv1.weight", "positional_embedding", "ln_pre.weight"):
        t = dict(enc.named_parameters())[name].detach().float().cpu().contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def embed_clip(enc: VisionEncoder, clip: Path, height: int, width: int, device, dtype, step: int = 1,
               limit: int = 0, chunk: int = 16) -> torch.Tensor:
    """(T, N, W) float16 CPU tokens of a clip's frames (each cropped to height x width first)."""
    out, buf = [], []

    def flush():
        x = torch.cat([prepare_image(f[None], height, width, name=f"frame of {clip.name}") for f in buf])
        out.append(enc(x.to(device, dtype)).to(torch.float16).cpu())
        buf.clear()

    for frame in read_frames(clip, step, limit):
        buf.append(frame)
        if len(buf) == chunk:
            flush()
    if buf:
        flush()
    if not out:
        raise KinemaError(f"data: {clip} has no frames")
    return torch.cat(out)


class TokenClips:
    """Cached per-clip tokens; :meth:`sample` draws training windows."""

    def __init__(self, files: list[Path], lengths: list[int], frames: int, span: int):
        self.files, self.lengths, self.frames, self.span = files, lengths, frames, span
        self.windows = torch.tensor([max(0, n - (frames - 1) * span) for n in lengths], dtype=torch.float64)
        if float(self.windows.sum()) == 0:
            longest = max(lengths) if lengths else 0
            raise ValueError(f"data: no clip is long enough for a window of {frames} frames {span} apart "
                             f"(needs {(frames - 1) * span + 1} frames, the longest has {longest}); use fewer "
                             "frames or a smaller frame step")

    def sample(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        """(batch, frames, N, W) float32 windows."""
        from safetensors import safe_open
        clips = torch.multinomial(self.windows, batch, replacement=True, generator=gen).tolist()
        out = []
        for c in clips:
            start = int(torch.randint(int(self.windows[c]), (1,), generator=gen))
            idx = list(range(start, start + (self.frames - 1) * self.span + 1, self.span))
            with safe_open(str(self.files[c]), framework="pt") as fh:
                out.append(fh.get_slice("tokens")[idx[0]:idx[-1] + 1][::self.span].float())
        return torch.stack(out)


def prepare_data(opts: TrainOptions, enc: VisionEncoder, device, log=print) -> tuple[TokenClips, dict]:
    """Embed every clip (cached) and return the window sampler and a description of the data."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    clips = find_clips(opts.data)
    if not clips:
        raise ValueError(f"data: no video files or frame folders found in {', '.join(map(str, opts.data))}")
    cache = Path(opts.work_dir) / "embeddings"
    cache.mkdir(parents=True, exist_ok=True)
    sig = encoder_signature(enc)
    enc_dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    enc.to(device, enc_dtype)
    files, lengths = [], []
    bar = ProgressBar(len(clips), "embed clips")
    for clip in clips:
        st = clip.stat()
        key = json.dumps([str(clip.resolve()), st.st_mtime_ns, st.st_size, sig, opts.height, opts.width,
                          opts.max_clip_frames])
        name = hashlib.sha1(key.encode()).hexdigest()[:20] + ".safetensors"
        path = cache / name
        if not path.is_file():
            tokens = embed_clip(enc, clip, opts.height, opts.width, device, enc_dtype, limit=opts.max_clip_frames)
            save_file({"tokens": tokens.contiguous()}, str(path), metadata={"clip": str(clip), "key": key})
        with safe_open(str(path), framework="pt") as fh:
            n = fh.get_slice("tokens").get_shape()[0]
        files.append(path)
        lengths.append(n)
        bar.update()
    data = TokenClips(files, lengths, opts.frames, opts.frame_step)
    usable = int((data.windows > 0).sum())
    info = {"clips": len(clips), "usable_clips": usable, "frames_embedded": sum(lengths),
            "windows": int(data.windows.sum()), "encoder_signature": sig}
    if usable < len(clips):
        log(f"note: {len(clips) - usable} clip(s) are shorter than a window and are left out")
    return data, info


# ------------------------------------------------------------------------------ loss

def token_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE of standardised tokens over the frames between the keyframes: (B, L, N, W) x 2 -> ()."""
    p = F.layer_norm(pred[:, 1:-1].float(), pred.shape[-1:])
    t = F.layer_norm(target[:, 1:-1].float(), target.shape[-1:])
    return F.mse_loss(p, t)


# ------------------------------------------------------------------------------ training

def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name} was asked for but CUDA is not available")
    return dev


def _lr(opts: TrainOptions, step: int) -> float:
    return opts.lr * min(1.0, (step + 1) / max(1, opts.warmup))


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _settings(opts: TrainOptions, cfg: PredictorConfig) -> dict:
    """What must not change when resuming."""
    return {"config": cfg.to_dict(), "frames": opts.frames, "frame_step": opts.frame_step, "height": opts.height,
            "width": opts.width, "batch": opts.batch, "lr": opts.lr, "warmup": opts.warmup,
            "weight_decay": opts.weight_decay, "seed": opts.seed, "precision": opts.precision}


def train(opts: TrainOptions, log=print) -> dict:
    """Train (or resume) and write the predictor; returns a summary (steps, losses, paths)."""
    _check(opts)
    device = _device(opts.device)
    work = Path(opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = PredictorConfig.from_dict(opts.config) if opts.config else None
    enc = load_image_encoder(opts.encoder)
    if cfg is None:
        from .predictor import default_config
        cfg = default_config()
    want = (enc.positional_embedding.shape[0], enc.conv1.weight.shape[0])
    if (cfg.tokens, cfg.token_width) != want:
        raise ValueError(f"config: tokens {cfg.tokens} x {cfg.token_width} do not fit the encoder in "
                         f"{Path(opts.encoder).name} ({want[0]} x {want[1]})")
    data, data_info = prepare_data(opts, enc, device, log)
    enc.to("cpu")
    del enc

    model = new_predictor(cfg, opts.seed).to(device).train()
    optim = torch.optim.AdamW(model.parameters(), lr=opts.lr, betas=(0.9, 0.999), weight_decay=opts.weight_decay)
    gen = torch.Generator().manual_seed(opts.seed)
    step = 0
    acc = [0.0, 0.0, 0]   # sums of the loss, the interpolation loss and the steps since the last full log interval
    settings = _settings(opts, cfg)
    state_path, log_path = work / STATE, work / LOG
    if opts.resume:
        if not state_path.is_file():
            raise ValueError(f"resume: no {STATE} in {work} to resume from")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["settings"] != settings:
            diff = sorted(k for k in settings if state["settings"].get(k) != settings[k])
            raise ValueError(f"resume: these settings differ from the run in {work}: {diff}; use them as "
                             "before, or a new work folder")
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optimizer"])
        gen.set_state(state["rng"])
        step = int(state["step"])
        acc = [float(v) for v in state["pending_log"]]
        log(f"resumed at step {step} from {state_path}")
    elif state_path.exists():
        raise ValueError(f"work_dir: {work} already holds a run ({STATE}); pass resume to continue it, or use "
                         "a new folder")
    elif Path(opts.out).exists():
        raise ValueError(f"out: {opts.out} already exists; choose another name (or remove it) so no predictor "
                         "is overwritten")
    # the log keeps exactly the lines up to the resumed step
    lines = []
    if opts.resume and log_path.is_file():
        lines = [ln for ln in log_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    log_path.write_text("".join(ln + "\n" for ln in lines))

    def save():
        _atomic_save({"model": model.state_dict(), "optimizer": optim.state_dict(), "rng": gen.get_state(),
                      "step": step, "settings": settings, "pending_log": list(acc)}, state_path)
        training = {"steps": step, "frames": opts.frames, "frame_step": opts.frame_step,
                    "size": [opts.height, opts.width], "loss": "standardised-token MSE", "data": data_info,
                    "encoder": Path(opts.encoder).name, "last_log": json.loads(lines[-1]) if lines else None}
        save_predictor(model, opts.out, training=training)

    autocast = opts.precision == "bf16" and device.type == "cuda"
    bar = ProgressBar(opts.steps, "train predictor")
    bar.update(step)
    t0 = time.perf_counter()
    try:
        while step < opts.steps:
            batch = data.sample(opts.batch, gen).to(device)
            start, end = batch[:, 0], batch[:, -1]
            for g in optim.param_groups:
                g["lr"] = _lr(opts, step)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                pred = model(start, end, opts.frames)
            loss = token_loss(pred, batch)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            with torch.no_grad():
                base = token_loss(interpolate_tokens(start, end, opts.frames), batch)
            step += 1
            acc = [acc[0] + float(loss.detach()), acc[1] + float(base), acc[2] + 1]
            bar.update()
            if step % opts.log_every == 0 or step == opts.steps:
                # the mean over the log interval (a run that ends inside one logs it so far, and a
                # resumed run completes it: the continued log is the same as an uninterrupted one's)
                rec = {"step": step, "loss": acc[0] / acc[2], "interpolation_loss": acc[1] / acc[2],
                       "lr": _lr(opts, step - 1), "seconds": round(time.perf_counter() - t0, 3)}
                line = json.dumps(rec)
                lines.append(line)
                with open(log_path, "a") as fh:
                    fh.write(line + "\n")
                log(f"step {step}/{opts.steps}  loss {rec['loss']:.5f}  interpolation {rec['interpolation_loss']:.5f}"
                    f"  lr {rec['lr']:.2e}")
                if step % opts.log_every == 0:
                    acc = [0.0, 0.0, 0]
            if step % opts.save_every == 0 and step < opts.steps:
                save()
    except KeyboardInterrupt:
        save()
        log(f"stopped at step {step}; state saved to {state_path} (resume to continue)")
        raise
    save()
    return {"steps": step, "out": str(opts.out), "state": str(state_path), "log": str(log_path),
            "data": data_info, "log_lines": [json.loads(ln) for ln in lines]}


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(
        prog="train_motion_predictor.py",
        description="Train the StoryDiffusion semantic motion predictor (learned mode) for DynamiCrafter "
                    "transitions. See docs/story_video.md.")
    d = TrainOptions(data=[], encoder="", out="", work_dir="")
    ap.add_argument("--data", nargs="+", required=True, help="video files, frame folders, or folders holding them")
    ap.add_argument("--encoder", required=True,
                    help="a DynamiCrafter checkpoint (its image encoder is used) or an OpenCLIP ViT-H/14 file")
    ap.add_argument("--out", required=True, help="the predictor file to write, e.g. "
                    "ComfyUI/models/kinema/story_diffusion/my_predictor.safetensors")
    ap.add_argument("--work-dir", required=True, help="folder for the trainer state, loss log and embedding cache")
    ap.add_argument("--config", help="a predictor config JSON (default configs/story_diffusion/"
                    "semantic_motion_predictor.json)")
    helps = {"frames": "frames per window, keyframes included (as the transitions use; 16)",
             "frame_step": "source frames between two window frames (larger = faster motion)",
             "height": "frames are scaled and centre-cropped to this height before encoding (as the transitions)",
             "width": "... and this width", "steps": "optimiser steps in all", "batch": "windows per step",
             "warmup": "steps of linear learning-rate warm-up", "seed": "seeds the initial weights and the sampling",
             "save_every": "write the trainer state and the predictor every N steps",
             "log_every": "one log line per N steps", "max_clip_frames": "use at most the first N frames of a clip (0: all)"}
    for name, text in helps.items():
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name),
                        help=f"{text} (default {getattr(d, name)})")
    ap.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr})")
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay (default {d.weight_decay})")
    ap.add_argument("--device", default=d.device, help="auto (CUDA if present), cpu, cuda, cuda:N")
    ap.add_argument("--precision", default=d.precision, choices=("fp32", "bf16"),
                    help="bf16: autocast the predictor on CUDA (the encoder runs in fp16 on CUDA either way)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --work-dir")
    a = ap.parse_args(argv)
    config = {}
    if a.config:
        config = PredictorConfig.from_file(a.config).to_dict()
    opts = TrainOptions(data=a.data, encoder=a.encoder, out=a.out, work_dir=a.work_dir, config=config,
                        **{k: getattr(a, k) for k in asdict(d) if k not in ("data", "encoder", "out", "work_dir",
                                                                           "config")})
    try:
        summary = train(opts)
    except (ValueError, KinemaError) as e:
        print(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"wrote {summary['out']} after {summary['steps']} steps")
    return 0
