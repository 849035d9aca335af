"""Fine-tune a Follow-Your-Click UNet on a folder of clips (see docs/follow_your_click.md).

Per step, for each clip of the batch (all randomness from one seeded generator, saved with
every checkpoint, so a resumed run continues bit for bit):

1. a window of ``frames`` frames every ``stride`` frames, the stride drawn from ``strides``
   (the fps condition), at a random start;
2. its labels (``data.analyse``): the moving object's mask on frame 0 (SAM or the classical
   segmentation, seeded from the optical flow) and the motion-strength bucket of the flow in it;
3. the VAE latents of the frames (a posterior sample, times 0.18215); the image latent ``C`` is
   frame 0's, partly dropped with a rate drawn from ``first_frame_mask_rates`` (first-frame
   masking); the caption is dropped with ``caption_dropout`` (for classifier-free guidance);
4. the v-prediction loss under the zero-terminal-SNR schedule: ``t`` uniform, ``x_t`` the noised
   latents, the UNet's output on ``cat[x_t, M, C]`` with the fps and strength conditions against
   ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0``.

What trains: ``"motion"`` (the official ``trainable_modules``: motion modules, ``conv_in``, the
fps and motion embeddings) or ``"all"``. AdamW, gradients clipped to 1. On CUDA the forward
runs in bf16 or fp16 autocast (fp16 with a gradient scaler) over fp32 weights; on the CPU in
fp32 (tiny models).

Output folder: ``loss.csv`` (step, loss, strength, fps, t per step), ``checkpoints/step_NNNNNN/``
with ``unet.safetensors`` (an FYC-format checkpoint the loader node reads) and ``state.pt``
(optimizer, generator, step; read with ``torch.load(weights_only=True)``), and ``final.safetensors``.
"""
from __future__ import annotations

import csv
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ... import runtime
from ...runtime import KinemaError
from . import convert, sd15
from .data import ClipFolder, analyse
from .pipeline import scheduler
from .unet import LATENT_SCALE, FYCUNet, conditioning_input, mask_condition

TRAINABLE = {"motion": ("motion_modules.", "conv_in", "motion_embedding", "fps_embedding"), "all": ("",)}
PRECISIONS = tuple(runtime.DTYPES)  # fp32: no autocast; bf16 / fp16: autocast on CUDA


@dataclass
class TrainConfig:
    model: str                      # FYC checkpoint to start from ('python follow_your_click.py build' makes one)
    sd15: str                       # SD1.5 single-file checkpoint: its VAE and text encoder
    clips: str                      # folder of clips
    out: str                        # output folder
    steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-5
    frames: int = 16
    width: int = 512
    height: int = 512
    strides: list = field(default_factory=lambda: [1, 2, 3, 4])
    first_frame_mask_rates: list = field(default_factory=lambda: [0.0, 0.3, 0.5, 0.7])
    caption_dropout: float = 0.1
    train: str = "motion"
    precision: str = "fp32"
    device: str = ""                # "" = the best available
    save_every: int = 500
    seed: int = 0
    sam: str = ""                   # optional segment-anything checkpoint for the object masks
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0

    def check(self) -> None:
        if self.train not in TRAINABLE:
            raise ValueError(f"train: {self.train!r} is not one of {', '.join(TRAINABLE)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        for name in ("steps", "batch_size", "frames", "width", "height", "save_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} must be at least 1")
        if self.width % 8 or self.height % 8:
            raise ValueError(f"width/height: {self.width}x{self.height} must be multiples of 8")
        if not self.strides or any(int(s) < 1 for s in self.strides):
            raise ValueError(f"strides: {self.strides} must be whole numbers >= 1")
        if any(not 0 <= float(r) < 1 for r in self.first_frame_mask_rates) or not self.first_frame_mask_rates:
            raise ValueError(f"first_frame_mask_rates: {self.first_frame_mask_rates} must be in [0, 1)")


class Trainer:
    """Holds the models, the data and the state of a run; :meth:`run` trains to ``cfg.steps``."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None, log=None):
        cfg.check()
        self.cfg = cfg
        self.log = log or (lambda s: print(s, file=sys.stderr))
        self.out = Path(cfg.out)
        self.device = torch.device(cfg.device) if cfg.device else runtime.device()
        self.amp = None if cfg.precision == "fp32" else runtime.DTYPES[cfg.precision]
        if self.amp is not None and self.device.type != "cuda":
            raise ValueError(f"precision: {cfg.precision} mixed precision needs a CUDA device (got {self.device}); "
                             f"use fp32 on the CPU")
        self.data = ClipFolder(cfg.clips)
        self.unet: FYCUNet = convert.load_unet(cfg.model, torch.float32)
        if self.unet.max_frames < cfg.frames:
            raise ValueError(f"frames: {cfg.frames}; this model takes at most {self.unet.max_frames}")
        self.unet.to(self.device).train()
        # frozen, in fp32 whatever the file holds (SD files are often fp16)
        self.vae = sd15.DiffusersVAE(sd15.load_vae(cfg.sd15).float(), device=self.device)
        self.text = sd15.TextEncoder(sd15.load_text_encoder(cfg.sd15).float(), device=self.device)
        self.segmenter = None
        if cfg.sam:
            from ..segment import load_sam
            self.segmenter = load_sam(cfg.sam, device=self.device)
        self.params = [p for n, p in self.unet.named_parameters() if any(k in n for k in TRAINABLE[cfg.train])]
        for n, p in self.unet.named_parameters():
            p.requires_grad_(any(k in n for k in TRAINABLE[cfg.train]))
        self.optim = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.sched = scheduler()
        self.gen = torch.Generator().manual_seed(int(cfg.seed))
        self.step = 0
        self._labels: dict = {}
        if resume:
            self._resume(resume)

    # ------------------------------------------------------------------------ batches
    def _sample(self, gen: torch.Generator):
        cfg = self.cfg

        def randint(n: int) -> int:
            return int(torch.randint(n, (1,), generator=gen))

        for _ in range(100):
            index = randint(len(self.data))
            clip = self.data.clips[index]
            fits = [int(s) for s in cfg.strides if (cfg.frames - 1) * int(s) < clip.frames]
            if fits:
                break
        else:
            raise KinemaError(f"clips: no clip has {cfg.frames} frames at stride {min(cfg.strides)}; use fewer "
                              f"frames or longer clips")
        stride = fits[randint(len(fits))]
        start = randint(clip.frames - (cfg.frames - 1) * stride)
        frames = self.data.window(index, start, cfg.frames, stride, cfg.height, cfg.width)
        key = (index, start, stride)
        if key not in self._labels:
            if len(self._labels) > 4096:
                self._labels.clear()
            self._labels[key] = analyse(frames, self.segmenter)
        labels = self._labels[key]
        caption = clip.caption if float(torch.rand((), generator=gen)) >= cfg.caption_dropout else ""
        rate = float(cfg.first_frame_mask_rates[randint(len(cfg.first_frame_mask_rates))])
        return frames, labels, stride, caption, rate

    def batch(self, gen: torch.Generator | None = None) -> dict:
        """One batch drawn with ``gen`` (default: the run's generator): latents x0 (B, 4, F, h, w),
        the UNet input parts and the conditions."""
        gen = self.gen if gen is None else gen
        z, m, partial, fps, strength, captions = [], [], [], [], [], []
        for _ in range(self.cfg.batch_size):
            frames, labels, stride, caption, rate = self._sample(gen)
            lat = self.vae.encode(frames, generator=gen) * LATENT_SCALE             # (F, 4, h, w)
            h, w = lat.shape[-2:]
            z.append(lat.transpose(0, 1))
            m.append(mask_condition(labels.mask, (h, w))[0] if labels.mask is not None else None)
            partial.append((torch.rand((1, h, w), generator=gen) >= rate).float())
            fps.append(stride)
            strength.append(labels.strength)
            captions.append(caption)
        z = torch.stack(z)
        return {"x0": z, "masks": m, "partial": torch.stack(partial), "fps": torch.tensor(fps),
                "strength": torch.tensor(strength), "captions": captions}

    def loss(self, batch: dict, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The v-prediction loss of a batch at timesteps t (B,) with noise like its latents."""
        dev = self.device
        x0 = batch["x0"].to(dev)
        noise = noise.to(dev)
        x_t = self.sched.add_noise(x0, noise, t.to(dev))
        target = self.sched.get_velocity(x0, noise, t.to(dev))
        rows = []
        for i in range(x0.shape[0]):
            m = batch["masks"][i]
            rows.append(conditioning_input(x_t[i:i + 1], x0[i:i + 1, :, 0], None if m is None else m.to(dev),
                                           batch["partial"][i:i + 1].to(dev)))
        ctx = self.text(batch["captions"]).to(dev)
        with torch.autocast(dev.type, dtype=self.amp, enabled=self.amp is not None):
            pred = self.unet(torch.cat(rows), t.to(dev), ctx, batch["fps"].to(dev), batch["strength"].to(dev))
        return torch.nn.functional.mse_loss(pred.float(), target.float())

    def train_step(self) -> dict:
        batch = self.batch()
        b = batch["x0"].shape[0]
        t = torch.randint(0, self.sched.config.num_train_timesteps, (b,), generator=self.gen)
        noise = torch.randn(batch["x0"].shape, generator=self.gen)
        loss = self.loss(batch, t, noise)
        self.optim.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optim)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            self.scaler.step(self.optim)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            self.optim.step()
        self.step += 1
        return {"step": self.step, "loss": float(loss.detach()), "strength": batch["strength"].tolist(),
                "fps": batch["fps"].tolist(), "t": t.tolist()}

    # --------------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        d = self.out / "checkpoints" / f"step_{self.step:06d}"
        d.mkdir(parents=True, exist_ok=True)
        convert.save_unet(self.unet, d / "unet.safetensors", {"step": self.step})
        state = {"step": self.step, "optimizer": self.optim.state_dict(), "generator": self.gen.get_state(),
                 "config": json.dumps(asdict(self.cfg))}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        torch.save(state, d / "state.pt")
        return d

    def _resume(self, where: str) -> None:
        d = Path(where)
        if where == "latest":
            found = sorted((self.out / "checkpoints").glob("step_*"))
            if not found:
                raise KinemaError(f"resume: no checkpoints in {self.out / 'checkpoints'}")
            d = found[-1]
        if not (d / "state.pt").is_file() or not (d / "unet.safetensors").is_file():
            raise KinemaError(f"resume: {d} is not a checkpoint folder (needs unet.safetensors and state.pt)")
        try:
            state = torch.load(d / "state.pt", map_location="cpu", weights_only=True)
        except Exception as e:
            raise KinemaError(f"resume: {d / 'state.pt'} could not be read ({type(e).__name__}: {e})") from None
        saved = json.loads(state["config"])
        for key in ("train", "batch_size", "frames", "width", "height"):
            if saved.get(key) != getattr(self.cfg, key):
                raise ValueError(f"resume: the checkpoint was trained with {key}={saved.get(key)!r}, this run asks "
                                 f"for {getattr(self.cfg, key)!r}")
        weights = convert.load_unet(d / "unet.safetensors", torch.float32).state_dict()
        self.unet.load_state_dict(weights)
        self.optim.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self._trim_log()
        self.log(f"resumed from {d} at step {self.step}")

    def _trim_log(self) -> None:
        """Keep the loss log up to the resumed step (a run that went further was thrown away)."""
        path = self.out / "loss.csv"
        if path.is_file():
            rows = list(csv.reader(path.open()))
            keep = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= self.step]
            with path.open("w", newline="") as f:
                csv.writer(f).writerows(keep)

    # ---------------------------------------------------------------------------- loop
    def run(self, progress: bool | None = None) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(asdict(self.cfg), indent=1))
        log_path = self.out / "loss.csv"
        new_log = not log_path.is_file()
        from tqdm import tqdm
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="Follow-Your-Click training", unit="step",
                   disable=not (sys.stderr.isatty() if progress is None else progress))
        try:
            with log_path.open("a", newline="") as f:
                writer = csv.writer(f)
                if new_log:
                    writer.writerow(["step", "loss", "strength", "fps", "t"])
                while self.step < self.cfg.steps:
                    rec = self.train_step()
                    writer.writerow([rec["step"], f"{rec['loss']:.6f}", " ".join(map(str, rec["strength"])),
                                     " ".join(map(str, rec["fps"])), " ".join(map(str, rec["t"]))])
                    f.flush()
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
                    if self.step % self.cfg.save_every == 0:
                        self.save()
        except KeyboardInterrupt:
            d = self.save()
            self.log(f"interrupted: saved {d}; continue with --resume {d}")
            raise
        finally:
            bar.close()
        if self.step % self.cfg.save_every:
            self.save()
        final = convert.save_unet(self.unet, self.out / "final.safetensors", {"step": self.step})
        self.log(f"wrote {final}")
        return final
