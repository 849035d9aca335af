"""Diffusion schedules and the DDIM sampler of DynamiCrafter.

The 512/1024 models are v-prediction with zero-terminal-SNR betas, trailing timestep spacing,
guidance rescale and a dynamic rescale of the predicted x0; the 256 model is eps-prediction with
plain linear betas and uniform spacing. Every array is built in the precision the released
sampler uses (float64 schedule cast to float32 buffers, float32 per-step coefficients), so a
float32 run reproduces the official trajectory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ...runtime import ProgressBar, check_interrupt


@dataclass(frozen=True)
class ScheduleConfig:
    """Training-noise schedule and sampler settings of one model variant."""

    parameterization: str = "v"          # "v" or "eps"
    zero_snr: bool = True                # rescale betas to zero terminal SNR
    spacing: str = "uniform_trailing"    # "uniform_trailing" | "uniform" | "quad"
    base_scale: float | None = 0.7       # dynamic rescale of x0 (None: off)
    guidance_rescale: float = 0.7
    linear_start: float = 0.00085
    linear_end: float = 0.012
    num_timesteps: int = 1000
    scale_start_steps: int = 400         # length of the linspace(1, base_scale) ramp

    @classmethod
    def from_dict(cls, d: dict) -> "ScheduleConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class DiffusionSchedule:
    """The model's schedule buffers (float32, as stored in the checkpoints) and float64 sources.

    Attributes (all (num_timesteps,) float32 unless noted): ``betas``, ``alphas_cumprod``,
    ``alphas_cumprod_prev``, ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``,
    ``betas64``/``alphas_cumprod64`` (float64), ``scale_arr`` ((num_timesteps + ramp,) or None).
    """

    def __init__(self, cfg: ScheduleConfig):
        if cfg.parameterization not in ("v", "eps"):
            raise ValueError(f"parameterization: '{cfg.parameterization}' is not 'v' or 'eps'")
        self.cfg = cfg
        n = cfg.num_timesteps
        betas = torch.linspace(cfg.linear_start ** 0.5, cfg.linear_end ** 0.5, n, dtype=torch.float64).numpy() ** 2
        if cfg.zero_snr:
            betas = _zero_terminal_snr(betas)
        alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
        prev = np.append(1.0, alphas_cumprod[:-1])
        f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        self.betas64 = torch.from_numpy(betas)
        self.alphas_cumprod64 = torch.from_numpy(alphas_cumprod)
        self.betas = f32(betas)
        self.alphas_cumprod = f32(alphas_cumprod)
        self.alphas_cumprod_prev = f32(prev)
        self.sqrt_alphas_cumprod = f32(np.sqrt(alphas_cumprod))
        self.sqrt_one_minus_alphas_cumprod = f32(np.sqrt(1.0 - alphas_cumprod))
        self.scale_arr = None
        if cfg.base_scale is not None:
            ramp = np.linspace(1.0, cfg.base_scale, cfg.scale_start_steps)
            self.scale_arr = f32(np.concatenate([ramp, np.full(n, cfg.base_scale)]))


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alphas_cumprod) so the last step has zero SNR (float64)."""
    s = np.sqrt(np.cumprod(1.0 - betas, axis=0))
    s0, s_last = s[0].copy(), s[-1].copy()
    s = (s - s_last) * s0 / (s0 - s_last)
    ab = s ** 2
    alphas = np.concatenate([ab[0:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def ddim_timesteps(steps: int, spacing: str, num_timesteps: int = 1000, exact_count: bool = True) -> np.ndarray:
    """Ascending DDIM timesteps (int64) for ``steps`` sampling steps.

    ``uniform_trailing``: ``flip(round(arange(N, 0, -N/S))) - 1`` (= [19, 39, ..., 999] for S=50).
    ``uniform``: stride ``N // S`` starting at 1 (= [1, 21, ..., 981] for S=50). The released
    sampler builds it as ``arange(0, N, N // S) + 1``, which gives more than S steps when S does
    not divide N (31 for S=30); ``exact_count=True`` keeps the first S of them so the step
    count is always the one asked for, ``False`` reproduces the released count.
    ``quad``: quadratic spacing up to 0.8 N.
    """
    if not isinstance(steps, (int, np.integer)) or steps < 1 or steps > num_timesteps:
        raise ValueError(f"steps: {steps} must be an integer between 1 and {num_timesteps}")
    if spacing == "uniform_trailing":
        c = num_timesteps / steps
        ts = np.flip(np.round(np.arange(num_timesteps, 0, -c))).astype(np.int64) - 1
    elif spacing == "uniform":
        c = num_timesteps // steps
        ts = np.asarray(list(range(0, num_timesteps, c)), dtype=np.int64) + 1
        if exact_count:
            ts = ts[:steps]
    elif spacing == "quad":
        ts = ((np.linspace(0, np.sqrt(num_timesteps * 0.8), steps)) ** 2).astype(np.int64) + 1
    else:
        raise ValueError(f"spacing: '{spacing}' is not one of uniform_trailing, uniform, quad")
    return ts


class DDIMSampler:
    """DDIM over a :class:`DiffusionSchedule`.

    Per-step arrays (index i ascending with the timestep, visited from S-1 down to 0):
    ``timesteps`` (int64), ``alphas`` (f32), ``alphas_prev`` (f64 of f32 values, with
    ``alphas_prev[0] = alphas_cumprod[0]``), ``sigmas`` (f64), ``sqrt_one_minus_alphas`` (f32),
    ``scale_arr``/``scale_arr_prev`` (f32, dynamic rescale only).
    """

    def __init__(self, schedule: DiffusionSchedule, steps: int = 50, eta: float = 1.0,
                 exact_count: bool = True):
        if not (0.0 <= float(eta) <= 1.0):
            raise ValueError(f"eta: {eta} must be between 0 and 1")
        self.schedule = schedule
        self.eta = float(eta)
        cfg = schedule.cfg
        ts = ddim_timesteps(steps, cfg.spacing, cfg.num_timesteps, exact_count=exact_count)
        ac = schedule.alphas_cumprod
        self.timesteps = torch.from_numpy(ts)
        self.alphas = ac[ts]
        self.alphas_prev = torch.tensor([ac[0].item()] + ac[ts[:-1]].tolist(), dtype=torch.float64)
        # sigma = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)) in float64, with the
        # division by the float32 (1 - a) taken as a float32 reciprocal, as the released
        # sampler evaluates it (matters at the 1e-8 level).
        inv_one_minus_a = (1.0 - self.alphas).reciprocal().double()
        a64 = self.alphas.double()
        self.sigmas = self.eta * torch.sqrt(inv_one_minus_a * (1.0 - self.alphas_prev) * (1.0 - a64 / self.alphas_prev))
        self.sqrt_one_minus_alphas = torch.sqrt((1.0 - self.alphas).double()).float()  # correctly rounded
        self.scale_arr = self.scale_arr_prev = None
        if schedule.scale_arr is not None:
            self.scale_arr = schedule.scale_arr[ts]
            self.scale_arr_prev = torch.cat([schedule.scale_arr[ts[0]:ts[0] + 1], schedule.scale_arr[ts[:-1]]])

    def __len__(self) -> int:
        return len(self.timesteps)

    @staticmethod
    def guide(out_cond: torch.Tensor, out_uncond: torch.Tensor | None, cfg: float,
              guidance_rescale: float = 0.0) -> torch.Tensor:
        """Classifier-free guidance with optional rescale toward the conditional output's std.

        Outputs are (B, ...); std is unbiased over all non-batch dims, per sample.
        """
        if out_uncond is None:
            return out_cond
        o = out_uncond + cfg * (out_cond - out_uncond)
        if guidance_rescale > 0:
            dims = list(range(1, o.dim()))
            factor = out_cond.std(dim=dims, keepdim=True) / o.std(dim=dims, keepdim=True)
            o = guidance_rescale * (o * factor) + (1.0 - guidance_rescale) * o
        return o

    def step(self, x: torch.Tensor, i: int, model_out: torch.Tensor,
             noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM update at index ``i`` from the (guided) model output.

        x, model_out, noise: (B, C, T, h, w). Returns (x_prev, pred_x0), pred_x0 after the
        dynamic rescale.
        """
        sch = self.schedule
        t = int(self.timesteps[i])
        dev, dt = x.device, x.dtype
        full = lambda v: torch.tensor(float(v), dtype=torch.float32, device=dev)  # noqa: E731
        a_t = full(self.alphas[i])
        a_prev = full(self.alphas_prev[i])
        sigma = full(self.sigmas[i])
        xf, of = x.float(), model_out.float()
        if sch.cfg.parameterization == "v":
            sa = full(sch.sqrt_alphas_cumprod[t])
            s1a = full(sch.sqrt_one_minus_alphas_cumprod[t])
            e = sa * of + s1a * xf
            x0 = sa * xf - s1a * of
        else:
            e = of
            x0 = (xf - full(self.sqrt_one_minus_alphas[i]) * e) / a_t.sqrt()
        if self.scale_arr is not None:
            x0 = x0 * (full(self.scale_arr_prev[i]) / full(self.scale_arr[i]))
        dir_xt = (1.0 - a_prev - sigma ** 2).sqrt() * e
        x_prev = a_prev.sqrt() * x0 + dir_xt
        if noise is not None and self.sigmas[i] > 0:
            x_prev = x_prev + sigma * noise.float()
        return x_prev.to(dt), x0.to(dt)

    def q_sample(self, x0: torch.Tensor, i: int, noise: torch.Tensor) -> torch.Tensor:
        """``x0`` noised to the level the sampler holds after step ``i`` (``alphas_prev[i]``)."""
        a = float(self.alphas_prev[i])
        return (a ** 0.5) * x0 + ((1.0 - a) ** 0.5) * noise

    def sample(self, model_fn: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor | None]],
               x_T: torch.Tensor, cfg: float = 7.5, guidance_rescale: float = 0.0,
               generator: torch.Generator | None = None,
               noise_fn: Callable[[int], torch.Tensor] | None = None,
               keep_mask: torch.Tensor | None = None, keep_latent: torch.Tensor | None = None,
               callback: Callable[[int, dict], None] | None = None, desc: str = "DynamiCrafter") -> torch.Tensor:
        """Run the full loop from ``x_T`` (B, C, T, h, w).

        ``model_fn(x, t) -> (out_cond, out_uncond or None)``. Per-step noise comes from
        ``noise_fn(i)`` if given, else from ``generator``. ``keep_mask`` (B or 1, 1, T or 1, h, w),
        1 where the content is kept: there the latent is replaced after every step by
        ``keep_latent`` noised to the current level (exactly ``keep_latent`` after the last step).
        ``callback(i, info)`` sees ``x``, ``pred_x0``, ``out_cond``, ``out_uncond`` per step.
        """
        x = x_T
        bar = ProgressBar(len(self), desc)
        for i in reversed(range(len(self))):
            check_interrupt()
            t = int(self.timesteps[i])
            out_c, out_u = model_fn(x, t)
            o = self.guide(out_c, out_u, cfg, guidance_rescale)
            noise = noise_fn(i) if noise_fn is not None else _randn(x.shape, generator, x.device)
            x, x0 = self.step(x, i, o, noise if self.eta > 0 else None)
            if keep_mask is not None:
                if i == 0:
                    target = keep_latent
                else:
                    kn = _randn(x.shape, generator, x.device)
                    target = self.q_sample(keep_latent.float(), i, kn)
                x = (keep_mask * target + (1 - keep_mask) * x.float()).to(x.dtype)
            if callback is not None:
                callback(i, {"x": x, "pred_x0": x0, "out_cond": out_c, "out_uncond": out_u})
            bar.update()
        return x


def _randn(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, moved to ``device`` (float32)."""
    gdev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gdev, dtype=torch.float32).to(device)
