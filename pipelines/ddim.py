"""DDIM schedules of the official pipelines, as noise levels for ComfyUI's samplers.

Euler on a model's own sigma table at the timesteps diffusers' ``DDIMScheduler`` picks is
DDIM with eta 0: in ComfyUI's variables (x / sqrt(alpha_bar)) one DDIM step is
``x + (sigma_next - sigma) * eps``, which is exactly an Euler step. So the pack's models,
sampled by ComfyUI's ``euler`` on :func:`ddim_sigmas`, follow the official DDIM schedules.
"""
from __future__ import annotations

import torch


def ddim_timesteps(steps: int, scheduler_config: dict) -> torch.Tensor:
    """The timesteps (descending, int64) diffusers' DDIMScheduler runs for ``scheduler_config``."""
    from diffusers import DDIMScheduler
    if int(steps) < 1:
        raise ValueError(f"steps: {steps} must be at least 1")
    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(int(steps))
    return sched.timesteps.long()


def ddim_sigmas(sigma_table: torch.Tensor, steps: int, scheduler_config: dict) -> torch.Tensor:
    """(steps + 1,) noise levels of that DDIM run on ``sigma_table`` (a model's per-timestep
    sigmas, ComfyUI's ``model_sampling.sigmas``). The last level is where DDIM's last step
    lands: 0 with ``set_alpha_to_one``, else ``alphas_cumprod[0]``, i.e. the table's first
    sigma."""
    table = sigma_table.float().cpu()
    ts = ddim_timesteps(steps, scheduler_config)
    if int(ts.max()) >= table.shape[0]:
        raise ValueError(f"steps: {steps} steps reach timestep {int(ts.max())}, beyond the model's "
                         f"{table.shape[0]} noise levels")
    last = torch.zeros(1) if scheduler_config.get("set_alpha_to_one", True) else table[:1]
    return torch.cat([table[ts], last])
