"""LVDM video UNet of DynamiCrafter, key-compatible with ``model.diffusion_model.*``.

Layout (per level): ResBlocks with a temporal convolution block, then at attention levels a
spatial transformer (self-attention, dual text/image cross-attention, GEGLU) followed by a
temporal transformer (self-attention over frames). An extra temporal transformer
(``init_attn``) follows the input convolution. The timestep and the frame-rate / frame-stride
condition (``fs``) are both sinusoid-embedded and summed.

Frames are flattened into the batch as ``b * T + t`` everywhere except inside the temporal
layers, which see (B, C, T, H, W).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...kernels.attention import multihead_attention
from ...kernels.dual_attention import dual_cross_attention, image_scale, per_frame_context


@dataclass
class UNetConfig:
    in_channels: int = 8
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: list = field(default_factory=lambda: [4, 2, 1])
    num_res_blocks: int = 2
    channel_mult: list = field(default_factory=lambda: [1, 2, 4, 4])
    num_head_channels: int = 64
    num_heads: int = -1              # used when num_head_channels is -1
    transformer_depth: int = 1
    context_dim: int = 1024
    use_linear: bool = True
    temporal_conv: bool = True
    temporal_attention: bool = True
    temporal_selfatt_only: bool = True
    temporal_length: int = 16
    addition_attention: bool = True
    image_cross_attention: bool = True
    image_cross_attention_scale_learnable: bool = False
    fs_condition: bool = True
    default_fs: int = 24
    text_context_len: int = 77
    image_tokens_per_frame: int = 16
    init_attn_heads: int = 8

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        names = {f.name for f in fields(cls)}
        unsupported = {"use_relative_position": False, "use_causal_attention": False, "use_checkpoint": None,
                       "dropout": None, "use_fp16": None, "conv_resample": True, "dims": 2,
                       "tempspatial_aware": False, "temporal_selfatt_only": True}
        for k, ok in unsupported.items():
            if k in d and ok is not None and bool(d[k]) != ok:
                raise ValueError(f"unet config: {k}={d[k]} is not supported (the released models use {ok})")
        return cls(**{k: v for k, v in d.items() if k in names})


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) -> (N, dim): ``cat[cos(t f), sin(t f)]``, ``f_k = exp(-ln(max_period) k / (dim/2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype."""

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float() if self.weight is not None else None,
                            self.bias.float() if self.bias is not None else None, self.eps).to(x.dtype)


def _norm(ch: int) -> nn.GroupNorm:
    return GroupNorm32(32, ch, eps=1e-5)


class TemporalConvBlock(nn.Module):
    """Four GN -> SiLU -> Conv3d((3,1,1)) stages on (B, C, T, H, W), added to the input."""

    def __init__(self, ch: int):
        super().__init__()
        k, p = (3, 1, 1), (1, 0, 0)
        self.conv1 = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv3d(ch, ch, k, padding=p))
        self.conv2 = nn.Sequential(_norm(ch), nn.SiLU(), nn.Dropout(0.0), nn.Conv3d(ch, ch, k, padding=p))
        self.conv3 = nn.Sequential(_norm(ch), nn.SiLU(), nn.Dropout(0.0), nn.Conv3d(ch, ch, k, padding=p))
        self.conv4 = nn.Sequential(_norm(ch), nn.SiLU(), nn.Dropout(0.0), nn.Conv3d(ch, ch, k, padding=p))

    def forward(self, x):
        return x + self.conv4(self.conv3(self.conv2(self.conv1(x))))


class ResBlock(nn.Module):
    """(B*T, C, H, W) + emb (B*T, E) -> (B*T, C_out, H, W); keys as released (``temopral_conv``)."""

    def __init__(self, ch: int, emb_ch: int, out_ch: int, temporal_conv: bool):
        super().__init__()
        self.in_layers = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch))
        self.out_layers = nn.Sequential(_norm(out_ch), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)
        if temporal_conv:
            self.temopral_conv = TemporalConvBlock(out_ch)
        else:
            self.temopral_conv = None

    def forward(self, x, emb, frames: int):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[..., None, None]
        h = self.skip_connection(x) + self.out_layers(h)
        if self.temopral_conv is not None:
            bt, c, hh, ww = h.shape
            v = h.view(bt // frames, frames, c, hh, ww).transpose(1, 2)
            v = self.temopral_conv(v)
            h = v.transpose(1, 2).reshape(bt, c, hh, ww)
        return h


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class CrossAttention(nn.Module):
    """Multi-head attention with bias-free q/k/v; optional image stream (``to_k_ip``, ``to_v_ip``).

    With the image stream the context is ``[text (text_len), image tokens]`` and the result is
    ``to_out(Attn(q, text) + s * Attn(q, image))``; ``s`` is fixed or ``tanh(alpha) + 1``.
    """

    def __init__(self, dim: int, context_dim: int | None, heads: int, dim_head: int,
                 image_cross_attention: bool = False, learnable_scale: bool = False, text_len: int = 77):
        super().__init__()
        inner = heads * dim_head
        cdim = context_dim if context_dim is not None else dim
        self.heads = heads
        self.text_len = text_len
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(cdim, inner, bias=False)
        self.to_v = nn.Linear(cdim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))
        self.image_cross_attention = image_cross_attention
        self.image_scale = 1.0
        if image_cross_attention:
            self.to_k_ip = nn.Linear(cdim, inner, bias=False)
            self.to_v_ip = nn.Linear(cdim, inner, bias=False)
            if learnable_scale:
                self.alpha = nn.Parameter(torch.tensor(0.0))
            else:
                self.alpha = None

    def forward(self, x, context=None):
        q = self.to_q(x)
        if context is None:
            return self.to_out(multihead_attention(q, self.to_k(x), self.to_v(x), self.heads))
        if not self.image_cross_attention:
            return self.to_out(multihead_attention(q, self.to_k(context), self.to_v(context), self.heads))
        text, img = context[:, :self.text_len], context[:, self.text_len:]
        scale = image_scale(self.image_scale, self.alpha)
        if torch.is_tensor(scale):
            scale = scale.to(q.dtype)
        out = dual_cross_attention(q, self.to_k(text), self.to_v(text), self.to_k_ip(img), self.to_v_ip(img),
                                   self.heads, scale)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.proj = nn.Linear(dim, out * 2)

    def forward(self, x):
        a, g = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(g)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """x += attn1(LN x); x += attn2(LN x, context); x += FF(LN x). attn2 self-attends when the
    block has no context (temporal transformers)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None,
                 image_cross_attention: bool = False, learnable_scale: bool = False, text_len: int = 77):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, image_cross_attention, learnable_scale, text_len)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context=None):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Per-frame transformer on (B*T, C, H, W) with context (B*T, L, context_dim)."""

    def __init__(self, ch: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool,
                 image_cross_attention: bool, learnable_scale: bool, text_len: int):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, inner) if use_linear else nn.Conv2d(ch, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, image_cross_attention, learnable_scale, text_len)
            for _ in range(depth))
        self.proj_out = nn.Linear(inner, ch) if use_linear else nn.Conv2d(inner, ch, 1)

    def forward(self, x, context):
        n, c, h, w = x.shape
        y = self.norm(x)
        if not self.use_linear:
            y = self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)
        if self.use_linear:
            y = self.proj_in(y)
        for blk in self.transformer_blocks:
            y = blk(y, context)
        if self.use_linear:
            y = self.proj_out(y)
        y = y.transpose(1, 2).reshape(n, -1, h, w)
        if not self.use_linear:
            y = self.proj_out(y)
        return y + x


class TemporalTransformer(nn.Module):
    """Self-attention over frames on (B, C, T, H, W); GN statistics span all frames."""

    def __init__(self, ch: int, heads: int, dim_head: int, depth: int, use_linear: bool):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, inner) if use_linear else nn.Conv1d(ch, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, None) for _ in range(depth))
        self.proj_out = nn.Linear(inner, ch) if use_linear else nn.Conv1d(inner, ch, 1)

    def forward(self, x):
        b, c, t, h, w = x.shape
        y = self.norm(x)
        y = y.permute(0, 3, 4, 1, 2).reshape(b * h * w, c, t)
        if not self.use_linear:
            y = self.proj_in(y)
        y = y.transpose(1, 2)
        if self.use_linear:
            y = self.proj_in(y)
        for blk in self.transformer_blocks:
            y = blk(y)
        if self.use_linear:
            y = self.proj_out(y)
        y = y.transpose(1, 2)
        if not self.use_linear:
            y = self.proj_out(y)
        y = y.reshape(b, h, w, c, t).permute(0, 3, 4, 1, 2)
        return y + x


class Block(nn.ModuleList):
    """A sequence of layers, each fed what it needs (emb, context, frames)."""

    def forward(self, h, emb, context, frames: int):
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb, frames)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            elif isinstance(layer, TemporalTransformer):
                bt, c, hh, ww = h.shape
                v = h.view(bt // frames, frames, c, hh, ww).transpose(1, 2)
                h = layer(v).transpose(1, 2).reshape(bt, c, hh, ww)
            else:
                h = layer(h)
        return h


class DynamiCrafterUNet(nn.Module):
    """x (B, in_ch, T, H, W), timesteps (B,), context (B, L, ctx), fs (B,) -> (B, out_ch, T, H, W).

    ``context`` may also be given per frame, (B, T, L', ctx): frame t of sample b then sees
    ``context[b, t]`` (e.g. a different image context for every frame of a transition)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        emb_ch = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if cfg.fs_condition:
            self.fps_embedding = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        def split_heads(ch):
            if cfg.num_head_channels > 0:
                return ch // cfg.num_head_channels, cfg.num_head_channels
            return cfg.num_heads, ch // cfg.num_heads

        def attn_layers(ch):
            heads, dim_head = split_heads(ch)
            layers = [SpatialTransformer(ch, heads, dim_head, cfg.transformer_depth, cfg.context_dim,
                                         cfg.use_linear, cfg.image_cross_attention,
                                         cfg.image_cross_attention_scale_learnable, cfg.text_context_len)]
            if cfg.temporal_attention:
                layers.append(TemporalTransformer(ch, heads, dim_head, cfg.transformer_depth, cfg.use_linear))
            return layers

        self.input_blocks = nn.ModuleList([Block([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        if cfg.addition_attention:
            self.init_attn = Block([TemporalTransformer(mc, cfg.init_attn_heads, split_heads(mc)[1],
                                                        cfg.transformer_depth, use_linear=False)])
        chans = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_ch, mult * mc, cfg.temporal_conv)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers += attn_layers(ch)
                self.input_blocks.append(Block(layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Block([Downsample(ch)]))
                chans.append(ch)
                ds *= 2
        self.middle_block = Block([ResBlock(ch, emb_ch, ch, cfg.temporal_conv), *attn_layers(ch),
                                   ResBlock(ch, emb_ch, ch, cfg.temporal_conv)])
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                skip = chans.pop()
                layers = [ResBlock(ch + skip, emb_ch, mc * mult, cfg.temporal_conv)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers += attn_layers(ch)
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Block(layers))
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def embed(self, timesteps: torch.Tensor, fs: torch.Tensor | None, frames: int) -> torch.Tensor:
        """Time + fs embedding, (B,) -> (B*T, 4*model_channels)."""
        mc = self.cfg.model_channels
        emb = self.time_embed(timestep_embedding(timesteps, mc).to(self.dtype))
        if self.cfg.fs_condition:
            if fs is None:
                fs = torch.full_like(timesteps, int(self.cfg.default_fs))
            emb = emb + self.fps_embedding(timestep_embedding(fs.to(timesteps.device), mc).to(self.dtype))
        return emb.repeat_interleave(frames, dim=0)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                fs: torch.Tensor | None = None, debug: dict | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if c != self.cfg.in_channels:
            raise ValueError(f"x: expected {self.cfg.in_channels} channels, got {c}")
        timesteps = timesteps.reshape(-1).expand(b) if timesteps.numel() == 1 else timesteps
        if fs is not None:
            fs = fs.reshape(-1).expand(b) if fs.numel() == 1 else fs
        emb = self.embed(timesteps, fs, t)
        if context.dim() == 4:  # already per frame: (B, T, L', C), frame t of sample b gets context[b, t]
            if tuple(context.shape[:2]) != (b, t):
                raise ValueError(f"context: per-frame context {tuple(context.shape)} does not match {b} x {t} frames")
            ctx = context.to(self.dtype).reshape(b * t, context.shape[2], context.shape[3])
        else:
            ctx = per_frame_context(context.to(self.dtype), t, self.cfg.text_context_len,
                                    self.cfg.image_tokens_per_frame)
        hcur = x.to(self.dtype).transpose(1, 2).reshape(b * t, c, h, w)
        if debug is not None:
            debug["emb"], debug["context_frames"] = emb, ctx
        skips = []
        for idx, blk in enumerate(self.input_blocks):
            hcur = blk(hcur, emb, ctx, t)
            if idx == 0 and self.cfg.addition_attention:
                hcur = self.init_attn(hcur, emb, ctx, t)
                if debug is not None:
                    debug["h_after_init_attn"] = hcur
            skips.append(hcur)
        hcur = self.middle_block(hcur, emb, ctx, t)
        if debug is not None:
            debug["h_after_middle_block"] = hcur
        for blk in self.output_blocks:
            hcur = blk(torch.cat([hcur, skips.pop()], dim=1), emb, ctx, t)
        y = self.out(hcur)
        return y.reshape(b, t, -1, h, w).transpose(1, 2).to(x.dtype)
