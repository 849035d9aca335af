"""Motion-I2V networks: an AnimateDiff-style 3D UNet on diffusers building blocks.

The blocks are shared with Follow-Your-Click (``pipelines/follow_your_click``), whose AnimateDiff-v1
layout differs in two settings read from the config: no mid-block motion module, and ResNet /
output group norms taken over all frames of a clip (``"joint_frame_norm": true``; AnimateDiff v1
applies ``nn.GroupNorm`` to the 5-D video, v2 normalises each frame).

Both stages share one module tree whose ``state_dict`` keys and shapes are those of the
released files (see ``configs/motion_i2v`` and the key manifests):

- stage 1 (flow predictor): 8-channel input ``[z_img, z_flow_t]``, a per-frame embedding
  ``TimeEmb(t) + StrideEmb(stride_f)``, stock AnimateDiff motion modules, and a ControlNet
  (``controlnet.*``) fed with the 5-channel sparse-flow condition;
- stage 2 (renderer): SD1.5 UNet + AnimateDiff-v2 motion modules whose temporal attention is
  motion-augmented (frame 0 forward-splatted by the flow, see
  ``kernels.motion_attention``); frame 0 is embedded at timestep 1 (it is the clean image).

Spatial layers run per frame on (B*F, C, H, W); motion modules regroup to (B, F).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from ...kernels.motion_attention import (MAX_FRAMES, FlowSplats, motion_augmented_attention,
                                         sinusoidal_position_encoding, temporal_self_attention)

TEMPORAL = "temporal"              # stock AnimateDiff temporal attention
MOTION_AUGMENTED = "motion_augmented"


# ------------------------------------------------------------------ motion modules

class PositionEncoding(nn.Module):
    """Holds the sinusoidal table as the persistent buffer ``pe`` (1, max_len, C)."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        self.register_buffer("pe", sinusoidal_position_encoding(max_len, dim), persistent=True)


class TemporalAttention(nn.Module):
    """Temporal self-attention over frames with AnimateDiff's parameter layout.

    ``processor`` selects the computation: ``"temporal"`` (stock) or ``"motion_augmented"``
    (needs ``flow``). Neither adds parameters.
    """

    def __init__(self, dim: int, heads: int, pe_len: int, processor: str = TEMPORAL):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.pos_encoder = PositionEncoding(dim, pe_len)
        self.processor = processor
        self.official_batch_tiling = False

    def _out(self, x):
        return self.to_out[1](self.to_out[0](x))

    def forward(self, x: torch.Tensor, frames: int, hw: tuple[int, int], flow: torch.Tensor | None = None,
                splats: FlowSplats | None = None):
        """x (B*F, h*w, C) -> (B*F, h*w, C); flow (B or 1, F, H0, W0, 2) pixels; splats: the run's
        cache of the flow's splat per grid (see ``kernels.motion_attention.FlowSplats``)."""
        if self.processor == MOTION_AUGMENTED:
            if flow is None:
                raise ValueError("motion-augmented attention needs a motion field (flow) for every step")
            return motion_augmented_attention(x, flow, hw, frames, self.to_q, self.to_k, self.to_v, self._out,
                                              self.heads, self.pos_encoder.pe,
                                              official_batch_tiling=self.official_batch_tiling, splats=splats)
        return temporal_self_attention(x, frames, self.to_q, self.to_k, self.to_v, self._out, self.heads,
                                       self.pos_encoder.pe)


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, pe_len: int, n_attention: int = 2, processor: str = TEMPORAL):
        super().__init__()
        self.attention_blocks = nn.ModuleList([TemporalAttention(dim, heads, pe_len, processor)
                                               for _ in range(n_attention)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(n_attention)])
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x, frames, hw, flow=None, splats=None):
        for attn, norm in zip(self.attention_blocks, self.norms):
            x = attn(norm(x), frames, hw, flow, splats) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, pe_len: int, n_blocks: int = 1, processor: str = TEMPORAL):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([TemporalTransformerBlock(channels, heads, pe_len, 2, processor)
                                                 for _ in range(n_blocks)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x, frames, flow=None, splats=None):
        """x (B*F, C, H, W) -> same."""
        bf, c, h, w = x.shape
        res = x
        t = self.norm(x).permute(0, 2, 3, 1).reshape(bf, h * w, c)
        t = self.proj_in(t)
        if flow is not None and splats is None:
            splats = FlowSplats()  # shared by this module's attention blocks
        for blk in self.transformer_blocks:
            t = blk(t, frames, (h, w), flow, splats)
        t = self.proj_out(t)
        return t.reshape(bf, h, w, c).permute(0, 3, 1, 2) + res


class MotionModule(nn.Module):
    """AnimateDiff v2 ``VanillaTemporalModule`` layout (``temporal_transformer.*``)."""

    def __init__(self, channels: int, heads: int = 8, pe_len: int = 32, n_blocks: int = 1,
                 processor: str = TEMPORAL):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels, heads, pe_len, n_blocks, processor)

    def forward(self, x, frames, flow=None, splats=None):
        """x (B*F, C, H, W); flow (B or 1, F, H0, W0, 2) pixels; splats: a :class:`FlowSplats` kept
        for the whole run (one sampling), so the flow's splat at each grid is built once."""
        return self.temporal_transformer(x, frames, flow, splats)


# ------------------------------------------------------------------------ UNet blocks

def joint_group_norm(norm: nn.Module, x: torch.Tensor, frames: int) -> torch.Tensor:
    """GroupNorm of (B*F, C, H, W) with statistics over all F frames of each clip (the norm
    applied to the (B, C, F, H, W) video). ``frames == 1`` is the per-frame norm."""
    if frames == 1:
        return norm(x)
    bf, c, h, w = x.shape
    video = x.reshape(bf // frames, frames, c, h, w).transpose(1, 2)
    return norm(video).transpose(1, 2).reshape(bf, c, h, w)


class ResnetBlock(ResnetBlock2D):
    """diffusers' ``ResnetBlock2D`` (same parameters) run per frame on (B*F, C, H, W).

    ``joint_frames``: its two group norms take their statistics over all frames of a clip
    (:func:`joint_group_norm`); otherwise each frame is normalised on its own (the 2-D block).
    """

    def __init__(self, *args, joint_frames: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.joint_frames = joint_frames

    def forward(self, x: torch.Tensor, temb: torch.Tensor, frames: int = 1) -> torch.Tensor:
        if not self.joint_frames or frames == 1:
            return super().forward(x, temb)
        h = self.conv1(self.nonlinearity(joint_group_norm(self.norm1, x, frames)))
        h = h + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(self.nonlinearity(joint_group_norm(self.norm2, h, frames))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


def _spatial(ch: int, cfg: dict, heads: int) -> Transformer2DModel:
    return Transformer2DModel(num_attention_heads=heads, attention_head_dim=ch // heads, in_channels=ch,
                              num_layers=1, cross_attention_dim=cfg["cross_attention_dim"],
                              norm_num_groups=cfg["norm_num_groups"], use_linear_projection=False)


def _resnet(cin: int, cout: int, cfg: dict, scale: float = 1.0) -> ResnetBlock:
    return ResnetBlock(in_channels=cin, out_channels=cout, temb_channels=cfg["block_out_channels"][0] * 4,
                       groups=cfg["norm_num_groups"], eps=cfg["norm_eps"], output_scale_factor=scale,
                       joint_frames=bool(cfg.get("joint_frame_norm", False)))


def _motion(ch: int, cfg: dict, processor: str) -> MotionModule:
    return MotionModule(ch, cfg["motion_heads"], cfg["motion_pe_len"], cfg.get("motion_blocks", 1), processor)


def _heads(cfg: dict) -> list[int]:
    h = cfg["attention_head_dim"]  # SD1.5 config name; it holds the number of heads
    return list(h) if isinstance(h, (list, tuple)) else [h] * len(cfg["block_out_channels"])


class DownBlock(nn.Module):
    def __init__(self, cin, cout, cfg, cross: bool, heads: int, motion: bool, downsample: bool, processor):
        super().__init__()
        n = cfg["layers_per_block"]
        self.resnets = nn.ModuleList([_resnet(cin if i == 0 else cout, cout, cfg) for i in range(n)])
        if cross:
            self.attentions = nn.ModuleList([_spatial(cout, cfg, heads) for _ in range(n)])
        if motion:
            self.motion_modules = nn.ModuleList([_motion(cout, cfg, processor) for _ in range(n)])
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(cout, use_conv=True, out_channels=cout, padding=1, name="op")])

    def forward(self, x, temb, ctx, frames, flow, splats=None):
        outs = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb, frames)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x, encoder_hidden_states=ctx, return_dict=False)[0]
            if hasattr(self, "motion_modules"):
                x = self.motion_modules[i](x, frames, flow, splats)
            outs.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            outs.append(x)
        return x, outs


class MidBlock(nn.Module):
    def __init__(self, ch, cfg, heads: int, motion: bool, processor):
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(ch, ch, cfg, cfg.get("mid_block_scale_factor", 1.0)) for _ in range(2)])
        self.attentions = nn.ModuleList([_spatial(ch, cfg, heads)])
        if motion:
            self.motion_modules = nn.ModuleList([_motion(ch, cfg, processor)])

    def forward(self, x, temb, ctx, frames, flow, splats=None):
        x = self.resnets[0](x, temb, frames)
        x = self.attentions[0](x, encoder_hidden_states=ctx, return_dict=False)[0]
        if hasattr(self, "motion_modules"):
            x = self.motion_modules[0](x, frames, flow, splats)
        return self.resnets[1](x, temb, frames)


class UpBlock(nn.Module):
    def __init__(self, cin, cprev, cout, cfg, cross: bool, heads: int, motion: bool, upsample: bool, processor):
        super().__init__()
        n = cfg["layers_per_block"] + 1
        self.resnets = nn.ModuleList([
            _resnet((cprev if i == 0 else cout) + (cin if i == n - 1 else cout), cout, cfg) for i in range(n)])
        if cross:
            self.attentions = nn.ModuleList([_spatial(cout, cfg, heads) for _ in range(n)])
        if motion:
            self.motion_modules = nn.ModuleList([_motion(cout, cfg, processor) for _ in range(n)])
        if upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(cout, use_conv=True, out_channels=cout)])

    def forward(self, x, skips, temb, ctx, frames, flow, size=None, splats=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb, frames)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x, encoder_hidden_states=ctx, return_dict=False)[0]
            if hasattr(self, "motion_modules"):
                x = self.motion_modules[i](x, frames, flow, splats)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, output_size=size)
        return x


def _encoder(cfg: dict, processor: str):
    ch = cfg["block_out_channels"]
    heads = _heads(cfg)
    res_set = set(cfg["motion_module_resolutions"])
    down = nn.ModuleList()
    cout = ch[0]
    for i, kind in enumerate(cfg["down_block_types"]):
        cin, cout = cout, ch[i]
        down.append(DownBlock(cin, cout, cfg, kind.startswith("CrossAttn"), heads[i], (2 ** i) in res_set,
                              i < len(ch) - 1, processor))
    mid = MidBlock(ch[-1], cfg, heads[-1], cfg["motion_module_mid_block"], processor)
    return down, mid


def _decoder(cfg: dict, processor: str) -> nn.ModuleList:
    ch = cfg["block_out_channels"]
    heads = _heads(cfg)[::-1]
    rch = ch[::-1]
    res_set = set(cfg["motion_module_resolutions"])
    up = nn.ModuleList()
    cout = rch[0]
    n = len(ch)
    for i, kind in enumerate(cfg["up_block_types"]):
        cprev, cout = cout, rch[i]
        cin = rch[min(i + 1, n - 1)]
        up.append(UpBlock(cin, cprev, cout, cfg, kind.startswith("CrossAttn"), heads[i],
                          (2 ** (n - 1 - i)) in res_set, i < n - 1, processor))
    return up


# --------------------------------------------------------------------------- embeddings

def _embed_frames(model, timestep, b: int, frames: int, device, dtype, stride=None):
    """Per-frame embedding (B*F, 1280)."""
    t = torch.as_tensor(timestep, device=device)
    if t.ndim == 0:
        t = t[None]
    t = t.expand(b)
    emb = model.time_embedding(model.time_proj(t).to(dtype))                  # (B, E)
    if getattr(model, "stride_embedding", None) is not None:
        if stride is None:
            raise ValueError("stride: the flow UNet needs the per-frame stride condition (1 or B, F)")
        s = torch.as_tensor(stride, device=device)
        if s.ndim == 1:
            s = s[None]
        if s.shape[-1] != frames:
            raise ValueError(f"stride: {s.shape[-1]} values for {frames} frames")
        s = s.expand(b, frames).reshape(-1)
        se = model.stride_embedding(model.time_proj(s).to(dtype)).reshape(b, frames, -1)
        emb = emb[:, None] + se
    elif getattr(model, "first_frame_clean", False):
        one = model.time_embedding(model.time_proj(torch.ones(b, device=device)).to(dtype))
        emb = torch.cat([one[:, None], emb[:, None].expand(b, frames - 1, -1)], dim=1)
    else:
        emb = emb[:, None].expand(b, frames, -1)
    return emb.reshape(b * frames, -1)


def _flat(x: torch.Tensor) -> torch.Tensor:
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def _unflat(x: torch.Tensor, b: int) -> torch.Tensor:
    bf, c, h, w = x.shape
    return x.reshape(b, bf // b, c, h, w).permute(0, 2, 1, 3, 4)


class ControlNetConditioningEmbedding(nn.Module):
    """Conv3d(5 -> 512, (1, 3, 3)) -> SiLU -> zero Conv3d(512 -> C0)."""

    def __init__(self, cond_channels: int, hidden: int, out_channels: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv3d(cond_channels, hidden, kernel_size=(1, 3, 3), padding=(0, 1, 1)), nn.SiLU(),
            nn.Conv3d(hidden, out_channels, kernel_size=(1, 3, 3), padding=(0, 1, 1)))
        nn.init.zeros_(self.layers[2].weight)
        nn.init.zeros_(self.layers[2].bias)

    def forward(self, cond):
        return self.layers(cond)


class FlowControlNet(nn.Module):
    """Stage-1 trajectory / motion-brush ControlNet (copy of the UNet encoder + zero convs)."""

    def __init__(self, cfg: dict):
        super().__init__()
        ch = cfg["block_out_channels"]
        self.conv_in = nn.Conv2d(cfg["in_channels"], ch[0], 3, padding=1)
        self.time_proj = Timesteps(ch[0], True, 0)
        self.time_embedding = TimestepEmbedding(ch[0], ch[0] * 4)
        self.stride_embedding = TimestepEmbedding(ch[0], ch[0] * 4)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            cfg.get("control_channels", 5), cfg.get("control_hidden", 512), ch[0])
        self.down_blocks, self.mid_block = _encoder(cfg, TEMPORAL)
        outs = [ch[0]]
        for i, blk in enumerate(self.down_blocks):
            outs += [ch[i]] * len(blk.resnets) + ([ch[i]] if hasattr(blk, "downsamplers") else [])
        self.controlnet_down_blocks = nn.ModuleList([nn.Conv2d(c, c, 1) for c in outs])
        self.controlnet_mid_block = nn.Conv2d(ch[-1], ch[-1], 1)
        for m in list(self.controlnet_down_blocks) + [self.controlnet_mid_block]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, sample, timestep, stride, ctx, control, scale: float = 1.0):
        """sample (B, C_in, F, h, w), control (B, 5, F, h, w) -> (down residuals, mid residual)."""
        b, _, f, h, w = sample.shape
        dtype = self.conv_in.weight.dtype
        temb = _embed_frames(self, timestep, b, f, sample.device, dtype, stride)
        x = self.conv_in(_flat(sample).to(dtype)) + _flat(self.controlnet_cond_embedding(control.to(dtype)))
        res = [x]
        for blk in self.down_blocks:
            x, outs = blk(x, temb, ctx, f, None)
            res += outs
        x = self.mid_block(x, temb, ctx, f, None)
        down = [zc(r) * scale for zc, r in zip(self.controlnet_down_blocks, res)]
        return down, self.controlnet_mid_block(x) * scale


class MotionUNet3D(nn.Module):
    """The 3D UNet of both stages; ``cfg`` is one of the JSON configs in ``configs/motion_i2v``."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.config = dict(cfg)
        ch = cfg["block_out_channels"]
        processor = cfg.get("temporal_attention", TEMPORAL)
        self.conv_in = nn.Conv2d(cfg["in_channels"], ch[0], 3, padding=1)
        self.time_proj = Timesteps(ch[0], True, 0)
        self.time_embedding = TimestepEmbedding(ch[0], ch[0] * 4)
        self.stride_embedding = TimestepEmbedding(ch[0], ch[0] * 4) if cfg.get("stride_embedding") else None
        self.first_frame_clean = bool(cfg.get("first_frame_clean", False))
        self.down_blocks, self.mid_block = _encoder(cfg, processor)
        self.up_blocks = _decoder(cfg, processor)
        self.conv_norm_out = nn.GroupNorm(cfg["norm_num_groups"], ch[0], eps=cfg["norm_eps"])
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[0], cfg["out_channels"], 3, padding=1)
        self.controlnet = FlowControlNet(cfg) if cfg.get("controlnet") else None

    @property
    def dtype(self):
        return self.conv_in.weight.dtype

    def temporal_attentions(self):
        return [m for m in self.modules() if isinstance(m, TemporalAttention)]

    def set_temporal_processor(self, processor: str, official_batch_tiling: bool = False) -> None:
        if processor not in (TEMPORAL, MOTION_AUGMENTED):
            raise ValueError(f"temporal processor must be {TEMPORAL!r} or {MOTION_AUGMENTED!r}, got {processor!r}")
        for m in self.temporal_attentions():
            m.processor = processor
            m.official_batch_tiling = official_batch_tiling

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *,
                stride=None, control: torch.Tensor | None = None, control_scale: float = 1.0,
                flow: torch.Tensor | None = None, splats: FlowSplats | None = None) -> torch.Tensor:
        """sample (B, C_in, F, h, w); encoder_hidden_states (B, L, D); stride (1 or B, F);
        control (B, 5, F, h, w); flow (1 or B, F, H, W, 2) pixels at image size -> (B, C_out, F, h, w).
        splats: a :class:`FlowSplats` the sampler keeps for the run (default: one per call), so the
        flow's splat at each token grid is built once."""
        b, _, f, h, w = sample.shape
        if self.config.get("temporal_attention") == MOTION_AUGMENTED and f > MAX_FRAMES:
            raise ValueError(f"frames: {f} frames; Motion-I2V renders at most {MAX_FRAMES}")
        dtype = self.dtype
        ctx = _repeat_ctx(encoder_hidden_states, f, dtype)
        down_res = mid_res = None
        if control is not None and self.controlnet is not None:
            down_res, mid_res = self.controlnet(sample, timestep, stride, ctx, control, control_scale)
        temb = _embed_frames(self, timestep, b, f, sample.device, dtype, stride)
        x = self.conv_in(_flat(sample).to(dtype))
        return _unflat(self.body(x, temb, ctx, f, flow, down_res, mid_res, splats), b)

    def body(self, x: torch.Tensor, temb: torch.Tensor, ctx: torch.Tensor | None, frames: int,
             flow: torch.Tensor | None = None, down_res=None, mid_res=None,
             splats: FlowSplats | None = None) -> torch.Tensor:
        """Everything after ``conv_in``: x (B*F, C0, h, w) features, temb (B*F, E) per-frame
        embedding, ctx (B*F, L, D) -> (B*F, C_out, h, w) output. ``splats``: as in :meth:`forward`."""
        if flow is not None and splats is None:
            splats = FlowSplats()
        skips = [x]
        for blk in self.down_blocks:
            x, outs = blk(x, temb, ctx, frames, flow, splats)
            skips += outs
        if down_res is not None:
            skips = [s + r for s, r in zip(skips, down_res)]
        x = self.mid_block(x, temb, ctx, frames, flow, splats)
        if mid_res is not None:
            x = x + mid_res
        for blk in self.up_blocks:
            size = skips[-len(blk.resnets) - 1].shape[-2:] if hasattr(blk, "upsamplers") else None
            x = blk(x, skips, temb, ctx, frames, flow, size, splats)
        if self.config.get("joint_frame_norm"):
            x = joint_group_norm(self.conv_norm_out, x, frames)
        else:
            x = self.conv_norm_out(x)
        return self.conv_out(self.conv_act(x))


def _repeat_ctx(ctx: torch.Tensor | None, frames: int, dtype) -> torch.Tensor | None:
    if ctx is None:
        return None
    return ctx.to(dtype).repeat_interleave(frames, dim=0)
