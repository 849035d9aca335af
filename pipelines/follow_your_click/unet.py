"""The Follow-Your-Click UNet and its conditioning.

An SD1.5 UNet inflated with AnimateDiff-v1 motion modules (position encoding 24, none in the mid
block, ResNet group norms over all frames of a clip), built from the blocks of
``pipelines/motion_i2v/modules.py``, with three additions of Follow-Your-Click:

- a 9-channel input ``[z_t (4), M (1), C (4)]`` (:func:`conditioning_input`): ``M`` is the
  region mask at latent size on every frame (without a mask: 1 on frame 0, 0 elsewhere), ``C``
  the image latent on frame 0 and zeros on the other frames;
- two more additive terms of the time embedding: ``FpsEmb(sinusoid(fps))`` and
  ``MotionEmb(sinusoid(motion strength))`` (:meth:`FYCUNet.embedding`), both always applied;
- v-prediction under a zero-terminal-SNR schedule (``sampler.py``).

State-dict keys and shapes are those of FYC-format checkpoints (the official
``UNet3DConditionModel``; see ``../shared/fixtures/follow_your_click/key_manifest.json``).
Where the official code differs from what its weights mean, this module does what they mean:
``in_channels`` is the 9 of ``conv_in`` (the official config says 4; the latent has
:attr:`FYCUNet.latent_channels` = 4), and the motion-strength term does not silently disappear
when no fps is given (both are required).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding

from ...runtime import KinemaError
from ..motion_i2v.modules import MotionUNet3D, _flat, _repeat_ctx, _unflat

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "follow_your_click"
LATENT_SCALE = 0.18215          # SD1.5 VAE latent scaling
SD_HEADS = 8                    # attention heads of every SD1.5 / AnimateDiff block (not visible in shapes)


def load_config(name: str = "unet") -> dict:
    """A JSON file of ``configs/follow_your_click`` (``name`` without ``.json``)."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise KinemaError(f"config '{path}' is missing from the pack; reinstall it")
    return json.loads(path.read_text())


class FYCUNet(MotionUNet3D):
    """Follow-Your-Click 3D UNet; ``cfg`` like ``configs/follow_your_click/unet.json``."""

    def __init__(self, cfg: dict):
        cfg = dict(cfg, temporal_attention="temporal", stride_embedding=False, first_frame_clean=False,
                   controlnet=False)
        if cfg.get("motion_module_mid_block"):
            raise ValueError("Follow-Your-Click has no mid-block motion module (AnimateDiff v1 layout)")
        super().__init__(cfg)
        ch0 = cfg["block_out_channels"][0]
        self.fps_embedding = TimestepEmbedding(ch0, ch0 * 4)
        self.motion_embedding = TimestepEmbedding(ch0, ch0 * 4)
        for emb in (self.fps_embedding, self.motion_embedding):   # zero-initialised output, as trained
            nn.init.zeros_(emb.linear_2.weight)
            nn.init.zeros_(emb.linear_2.bias)

    @property
    def in_channels(self) -> int:
        """Channels of the UNet input (9), those of ``conv_in``."""
        return int(self.conv_in.weight.shape[1])

    @property
    def latent_channels(self) -> int:
        """Channels of the latent that is denoised (4)."""
        return int(self.config["out_channels"])

    @property
    def max_frames(self) -> int:
        return int(self.config["motion_pe_len"])

    def embedding(self, timestep, fps, strength, batch: int) -> torch.Tensor:
        """(B, 4 C0) = TimeEmb(p(t)) + FpsEmb(p(fps)) + MotionEmb(p(strength)), added in that
        order; ``p`` is the flip-sin-to-cos sinusoid of width C0. Each argument is a number or a
        (B,) tensor."""
        if fps is None or strength is None:
            raise ValueError("fps and motion strength: Follow-Your-Click needs both conditions at every step "
                             "(the official scripts silently drop both when --use_fps_condition is not given)")
        dev, dtype = self.conv_in.weight.device, self.dtype

        def proj(v, name):
            v = torch.as_tensor(v, device=dev)
            if v.ndim == 0:
                v = v[None]
            if v.ndim != 1 or v.shape[0] not in (1, batch):
                raise ValueError(f"{name}: expected a number or {batch} values, got shape {tuple(v.shape)}")
            return self.time_proj(v.expand(batch)).to(dtype)

        emb = self.time_embedding(proj(timestep, "timestep"))
        emb = emb + self.fps_embedding(proj(fps, "fps"))
        return emb + self.motion_embedding(proj(strength, "motion strength"))

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, fps, strength
                ) -> torch.Tensor:
        """sample (B, 9, F, h, w) from :func:`conditioning_input`; encoder_hidden_states (B, L, D);
        fps, strength: numbers or (B,) -> v prediction (B, 4, F, h, w)."""
        if sample.ndim != 5 or sample.shape[1] != self.in_channels:
            raise ValueError(f"sample: expected (B, {self.in_channels}, F, h, w), got {tuple(sample.shape)}")
        b, _, f, h, w = sample.shape
        if f > self.max_frames:
            raise ValueError(f"frames: {f}; Follow-Your-Click renders at most {self.max_frames} "
                             f"(the motion modules' position encoding)")
        dtype = self.dtype
        temb = self.embedding(timestep, fps, strength, b).repeat_interleave(f, dim=0)   # (B*F, E)
        ctx = _repeat_ctx(encoder_hidden_states, f, dtype)
        x = self.conv_in(_flat(sample).to(dtype))
        return _unflat(self.body(x, temb, ctx, f), b)


# ------------------------------------------------------------------------ conditioning

def mask_condition(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """The mask channel at latent size: MASK (H, W) or (B, H, W) in [0, 1] -> (B, 1, h, w) in {0, 1}.

    As the official code reads its mask files: nearest resize (latent cell (i, j) takes pixel
    (floor(i H / h), floor(j W / w))), then every pixel that is not black (8-bit value >= 1)
    counts as inside.
    """
    if not torch.is_tensor(mask) or mask.ndim not in (2, 3):
        raise ValueError(f"mask: expected a MASK (B, H, W), got "
                         f"{tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__}")
    m = (mask[None] if mask.ndim == 2 else mask)[:, None].float()
    m = F.interpolate(m, size=tuple(latent_hw), mode="nearest")
    return ((m * 255.0).round() >= 1.0).to(torch.float32)


def conditioning_input(z_t: torch.Tensor, image_latent: torch.Tensor, mask: torch.Tensor | None = None,
                       partial: torch.Tensor | None = None) -> torch.Tensor:
    """The 9-channel UNet input ``cat[z_t, M, C]``.

    z_t (B, 4, F, h, w) the noisy latent; image_latent (B or 1, 4, h, w) the scaled VAE latent of
    the picture; mask (B or 1, 1, h, w) from :func:`mask_condition`, or None (then M is 1 on
    frame 0 and 0 elsewhere); partial (B or 1, 1, h, w) an optional 0/1 map multiplying the
    image latent (first-frame masking). Returns (B, 9, F, h, w) in z_t's dtype.
    """
    if z_t.ndim != 5:
        raise ValueError(f"latent: expected (B, 4, F, h, w), got {tuple(z_t.shape)}")
    b, c, f, h, w = z_t.shape
    if image_latent.ndim != 4 or tuple(image_latent.shape[1:]) != (c, h, w):
        raise ValueError(f"image latent: expected (B, {c}, {h}, {w}), got {tuple(image_latent.shape)}")
    m = torch.zeros(b, 1, f, h, w, dtype=z_t.dtype, device=z_t.device)
    if mask is None:
        m[:, :, 0] = 1.0
    else:
        if tuple(mask.shape[-2:]) != (h, w):
            raise ValueError(f"mask: expected the latent size {w}x{h}, got {tuple(mask.shape)}")
        m[:] = mask.reshape(-1, 1, 1, h, w).to(z_t)
    cond = torch.zeros_like(z_t)
    first = image_latent.to(z_t)
    if partial is not None:
        first = first * partial.reshape(-1, 1, h, w).to(z_t)
    cond[:, :, 0] = first
    return torch.cat([z_t, m, cond], dim=1)
