"""Puppet-Master: part-level drags on Stable Video Diffusion.

The UNet is diffusers' ``UNetSpatioTemporalConditionModel`` with the Puppet-Master additions,
key-compatible with the released ``model.safetensors`` (flat diffusers keys):

- ``down_blocks.0-2`` and ``up_blocks.1-3`` get, for every resnet/attention pair j, a drag
  embedder ``flow_convs.j`` (drag image -> per-pixel scale/shift applied after the resnet) and a
  ``drag_token_mlps.j`` making one cross-attention token per drag, appended to the CLIP image
  token;
- every spatial self-attention (``transformer_blocks.*.attn1`` of all spatial transformers)
  is all-to-first: queries of every frame, keys/values of the video's first frame;
- there is no ``add_embedding`` (fps / motion bucket / noise augmentation are unused).

The VAE and the CLIP image encoder are ComfyUI's own (from its loaders, e.g. Image Only
Checkpoint Loader on an SVD img2vid file), used through :class:`ComfyCodec`. Sampling follows the official demo: EDM Euler with Karras sigmas and v-prediction, per-frame
guidance ``linspace(1, cfg, F)``, and an unconditional branch with zero image latent, zero image
embedding and zero drags.

Where this differs from the official code (which the fixtures and tests document):

- drag presence can be given explicitly (``drag_valid``): the official encoding treats a drag whose
  four numbers are all zero as absent, so a drag starting at the (0, 0) corner vanishes on frame 0;
- all-to-first works for any frame count (the official processor assumes 14 when it picks frame 0);
- the sin-cos tables follow each call's device and dtype (the official blocks move them once);
- the starting noise comes from the node's seeded generator, not the global RNG.
Matched on purpose: the drag up blocks normalise with GroupNorm eps 1e-5 (stock SVD: 1e-6), drags
absent on only some frames still get tokens (computed at (0, 0)), unscaled VAE-mean image latents.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_3d_blocks import (
    CrossAttnDownBlockSpatioTemporal,
    CrossAttnUpBlockSpatioTemporal,
)

from ..kernels.attention import all_to_first_attention
from ..kernels.drag import (
    DragEmbedding, DragModulation, drag_context, drag_token_mlp, drag_tokens, drag_validity,
    encode_drags, sincos_pos_embed_2d, track_length,
)
from ..kernels.motion import resample_track
from .. import runtime
from ..runtime import KinemaError, ProgressBar, check_interrupt
from .checkpoint import check_keys, read_header, read_state_dict

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
NUM_FRAMES = 14
MAX_DRAGS = 5
CROP_SIZE = 256
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_json(relpath: str) -> dict:
    path = CONFIG_DIR / relpath
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# ============================================================================ drag conditioning
@dataclass
class DragCondition:
    """Drags of a batch of videos, ready for the drag layers.

    drags: (B, F, N, 4) in [0, 1]; valid: (B, F, N) bool (present at that frame). Drag images
    (BF, 6N, r, r) and pos-emb tables are built once per resolution and reused by all layers.
    Build one per video batch and pass it to every denoising step: each drag layer's modulation
    (its drag embedder's output) is then computed at the first step and reused
    (:meth:`modulation`), for the device and dtype the layer runs in at that step. A drag-free
    video (the unconditional half) is embedded from one frame. The cache goes with the object.
    """
    drags: torch.Tensor
    valid: torch.Tensor
    pos_embed_dim: int = 64
    _images: dict = field(default_factory=dict, repr=False)
    _pos: dict = field(default_factory=dict, repr=False)
    _modulations: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, drags: torch.Tensor, valid: torch.Tensor | None = None, pos_embed_dim: int = 64):
        if valid is None:
            valid = drag_validity(drags)
        return cls(drags, valid.to(torch.bool), pos_embed_dim)

    @property
    def flat(self) -> torch.Tensor:
        """(BF, N, 4)."""
        return self.drags.flatten(0, 1)

    @property
    def used(self) -> torch.Tensor:
        """(B, N): present on at least one frame (otherwise the drag's tokens are zero)."""
        return self.valid.any(dim=1)

    def image(self, r: int, dtype) -> torch.Tensor:
        if r not in self._images:
            self._images[r] = encode_drags(self.drags, r, self.valid).flatten(0, 1)
        return self._images[r].to(dtype)

    def pos(self, r: int) -> torch.Tensor:
        if r not in self._pos:
            self._pos[r] = sincos_pos_embed_2d(self.pos_embed_dim, r, device=self.drags.device)
        return self._pos[r]

    def modulation(self, embedder: nn.Module, r: int, dtype, device) -> DragModulation:
        """The drag layer ``embedder``'s modulation at resolution r, computed on first use for
        this device and dtype (a partly loaded model may change them between runs, not steps)."""
        key = (id(embedder), r, dtype, torch.device(device))
        found = self._modulations.get(key)
        if found is None or found[0] is not embedder:
            image = self.image(r, dtype).to(device)
            found = (embedder, DragModulation(embedder, image, self.used.any(dim=1)))
            self._modulations[key] = found
        return found[1]


class _DragLayers:
    """Shared drag step of the down and up blocks."""

    def _inject(self, j, hidden, encoder_hidden_states, drag: DragCondition | None):
        if drag is None:
            return hidden, encoder_hidden_states
        r = hidden.shape[-1]
        if hidden.shape[-2] != r:
            raise ValueError(f"latents: drags need square latents, got {tuple(hidden.shape[-2:])}")
        hidden = drag.modulation(self.flow_convs[j], r, hidden.dtype, hidden.device)(hidden)
        tokens = drag_tokens(self.drag_token_mlps[j], hidden, drag.flat.to(hidden.dtype), drag.pos(r), drag.used)
        return hidden, drag_context(encoder_hidden_states, tokens)


def _drag_modules(n_layers, out_channels, flow_channels, embedder_channels, pos_embed_dim, context_dim):
    convs = nn.ModuleList([DragEmbedding(flow_channels, 2 * out_channels, embedder_channels) for _ in range(n_layers)])
    mlps = nn.ModuleList([drag_token_mlp(out_channels, pos_embed_dim, context_dim) for _ in range(n_layers)])
    return convs, mlps


class DragDownBlock(nn.Module, _DragLayers):
    """A stock ``CrossAttnDownBlockSpatioTemporal`` plus drag embedders and drag-token MLPs.

    Adopts the stock block's modules; registration order (attentions, resnets, flow_convs,
    drag_token_mlps, downsamplers) gives the released state-dict order.
    """

    def __init__(self, stock: CrossAttnDownBlockSpatioTemporal, out_channels: int, flow_channels: int,
                 embedder_channels, pos_embed_dim: int, context_dim: int):
        super().__init__()
        self.has_cross_attention = True
        self.attentions = stock.attentions
        self.resnets = stock.resnets
        self.flow_convs, self.drag_token_mlps = _drag_modules(
            len(stock.resnets), out_channels, flow_channels, embedder_channels, pos_embed_dim, context_dim)
        self.downsamplers = stock.downsamplers

    def forward(self, hidden_states, temb=None, encoder_hidden_states=None, image_only_indicator=None,
                drag: DragCondition | None = None):
        """hidden_states (BF, C, r, r) -> (hidden (BF, C', r', r'), tuple of skip states)."""
        output_states = ()
        for j, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):
            hidden_states = resnet(hidden_states, temb, image_only_indicator=image_only_indicator)
            hidden_states, context = self._inject(j, hidden_states, encoder_hidden_states, drag)
            hidden_states = attn(hidden_states, encoder_hidden_states=context,
                                 image_only_indicator=image_only_indicator, return_dict=False)[0]
            output_states += (hidden_states,)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                hidden_states = down(hidden_states)
            output_states += (hidden_states,)
        return hidden_states, output_states


class DragUpBlock(nn.Module, _DragLayers):
    """A stock ``CrossAttnUpBlockSpatioTemporal`` plus drag embedders and drag-token MLPs.

    Unlike the stock SVD up blocks (GroupNorm eps 1e-6), the released model's drag up blocks
    normalise their resnets with eps ``resnet_eps`` = 1e-5.
    """

    def __init__(self, stock: CrossAttnUpBlockSpatioTemporal, out_channels: int, flow_channels: int,
                 embedder_channels, pos_embed_dim: int, context_dim: int, resnet_eps: float = 1e-5):
        super().__init__()
        self.has_cross_attention = True
        self.attentions = stock.attentions
        self.resnets = stock.resnets
        for module in self.resnets.modules():
            if isinstance(module, nn.GroupNorm):
                module.eps = resnet_eps
        self.flow_convs, self.drag_token_mlps = _drag_modules(
            len(stock.resnets), out_channels, flow_channels, embedder_channels, pos_embed_dim, context_dim)
        self.upsamplers = stock.upsamplers
        self.resolution_idx = getattr(stock, "resolution_idx", None)

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, encoder_hidden_states=None,
                image_only_indicator=None, drag: DragCondition | None = None):
        for j, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):
            skip = res_hidden_states_tuple[-1]
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            hidden_states = torch.cat([hidden_states, skip], dim=1)
            hidden_states = resnet(hidden_states, temb, image_only_indicator=image_only_indicator)
            hidden_states, context = self._inject(j, hidden_states, encoder_hidden_states, drag)
            hidden_states = attn(hidden_states, encoder_hidden_states=context,
                                 image_only_indicator=image_only_indicator, return_dict=False)[0]
        if self.upsamplers is not None:
            for up in self.upsamplers:
                hidden_states = up(hidden_states)
        return hidden_states


# ============================================================================ attention
class AllToFirstAttnProcessor:
    """diffusers attention processor: every frame attends to its video's first frame.

    ``num_frames`` is set by the UNet before each forward (rows are batch-major b*F + f).
    """

    def __init__(self, num_frames: int = NUM_FRAMES):
        self.num_frames = num_frames

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("all-to-first attention is self-attention: no context or mask expected")
        residual = hidden_states
        f = self.num_frames
        first = hidden_states[::f]
        out = all_to_first_attention(attn.to_q(hidden_states), attn.to_k(first), attn.to_v(first),
                                     num_frames=f, heads=attn.heads, scale=attn.scale)
        out = attn.to_out[1](attn.to_out[0](out.to(hidden_states.dtype)))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# ============================================================================ UNet
class PuppetMasterUNet(UNetSpatioTemporalConditionModel):
    """SVD UNet with drag conditioning and all-to-first spatial attention.

    forward(sample (B, F, 4, h, w), timestep, image_latents (B, 4, h, w),
            encoder_hidden_states (B, 1, D), drags (B, F, N, 4) | DragCondition | None, drag_valid (B, F, N) | None)
    -> (B, F, 4, h, w). ``added_time_ids`` is accepted and ignored; ``drags=None`` means no drags
    (every slot unused, the unconditional input). ``drag_valid`` marks drags present per frame
    when a drag's four numbers may legitimately all be zero. A sampler passes one
    :meth:`drag_condition` to all its steps, so the drag embeddings are computed once.
    """

    @register_to_config
    def __init__(self, sample_size=None, in_channels=8, out_channels=4,
                 down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
                 up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3,
                 block_out_channels=(320, 640, 1280, 1280), addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=768, layers_per_block=2, cross_attention_dim=1024,
                 transformer_layers_per_block=1, num_attention_heads=(5, 10, 20, 20), num_frames=NUM_FRAMES,
                 num_drags=MAX_DRAGS, pos_embed_dim=64, drag_embedder_out_channels=(256, 320, 320),
                 attention="all_to_first"):
        UNetSpatioTemporalConditionModel.__init__.__wrapped__(
            self, sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
            down_block_types=tuple(down_block_types), up_block_types=tuple(up_block_types),
            block_out_channels=tuple(block_out_channels), addition_time_embed_dim=addition_time_embed_dim,
            projection_class_embeddings_input_dim=projection_class_embeddings_input_dim,
            layers_per_block=layers_per_block, cross_attention_dim=cross_attention_dim,
            transformer_layers_per_block=transformer_layers_per_block, num_attention_heads=num_attention_heads,
            num_frames=num_frames)
        # no added-time conditioning in Puppet-Master
        del self.add_embedding
        del self.add_time_proj
        ctx = cross_attention_dim if isinstance(cross_attention_dim, int) else None
        flow_channels = 6 * num_drags
        emb_ch = tuple(drag_embedder_out_channels)
        for i, block in enumerate(self.down_blocks):
            if isinstance(block, CrossAttnDownBlockSpatioTemporal):
                self.down_blocks[i] = DragDownBlock(block, block_out_channels[i], flow_channels, emb_ch,
                                                    pos_embed_dim, ctx or cross_attention_dim[i])
        rev = list(reversed(block_out_channels))
        rev_ctx = None if ctx else list(reversed(cross_attention_dim))
        for i, block in enumerate(self.up_blocks):
            if isinstance(block, CrossAttnUpBlockSpatioTemporal):
                self.up_blocks[i] = DragUpBlock(block, rev[i], flow_channels, emb_ch, pos_embed_dim,
                                                ctx or rev_ctx[i])
        self._a2f = []
        self.set_spatial_attention(attention)

    def set_spatial_attention(self, kind: str) -> None:
        """``"all_to_first"`` (the released model) or ``"stock"`` (plain spatial self-attention)."""
        from diffusers.models.attention_processor import AttnProcessor2_0
        if kind not in ("all_to_first", "stock"):
            raise ValueError(f"attention: '{kind}' is not 'all_to_first' or 'stock'")
        self._a2f = []
        for name, module in self.named_modules():
            if name.endswith(".attn1") and ".transformer_blocks." in name and "temporal_transformer_blocks" not in name:
                if kind == "all_to_first":
                    proc = AllToFirstAttnProcessor(self.config.num_frames)
                    self._a2f.append(proc)
                else:
                    proc = AttnProcessor2_0()
                module.set_processor(proc)

    def drag_condition(self, drags, drag_valid=None, batch: int | None = None, frames: int | None = None,
                       device=None) -> DragCondition:
        """The :class:`DragCondition` of (B, F, N, 4) drags (None: no drags, all slots unused, as in
        the unconditional branch; then ``batch`` and ``frames`` give its size). Pass it as
        ``drags`` to every step of one sampling so the drag embeddings are computed once."""
        if drags is None:
            drags = torch.zeros(batch, frames, self.config.num_drags, 4, device=device)
        if drags.ndim != 4 or drags.shape[-1] != 4 or (batch is not None and drags.shape[:2] != (batch, frames)):
            raise ValueError(f"drags: expected ({batch or 'B'}, {frames or 'F'}, N, 4), got {tuple(drags.shape)}")
        device = drags.device if device is None else device
        if drag_valid is not None:
            drag_valid = drag_valid.to(device)
        return DragCondition.build(drags.to(device, torch.float32), drag_valid, self.config.pos_embed_dim)

    def forward(self, sample, timestep, image_latents, encoder_hidden_states, drags=None, drag_valid=None,
                added_time_ids=None, return_dict=False):
        b, f = sample.shape[:2]
        sample = torch.cat([sample, image_latents[:, None].expand(-1, f, -1, -1, -1).to(sample.dtype)], dim=2)
        t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], dtype=torch.float32)
        t = t.to(sample.device).reshape(-1).expand(b) if t.numel() == 1 else t.to(sample.device)
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        emb = emb.repeat_interleave(f, dim=0)
        ehs = encoder_hidden_states.to(sample.dtype).repeat_interleave(f, dim=0)
        if isinstance(drags, DragCondition):  # built once per video batch: layers reuse their drag embeddings
            drag = drags
            if drag.drags.shape[:2] != (b, f):
                raise ValueError(f"drags: expected ({b}, {f}, N, 4), got {tuple(drag.drags.shape)}")
        else:
            drag = self.drag_condition(drags, drag_valid, b, f, sample.device)
        for proc in self._a2f:
            proc.num_frames = f
        indicator = torch.zeros(b, f, dtype=sample.dtype, device=sample.device)

        h = self.conv_in(sample.flatten(0, 1))
        skips = (h,)
        for block in self.down_blocks:
            if isinstance(block, DragDownBlock):
                h, res = block(h, emb, ehs, indicator, drag)
            else:
                h, res = block(hidden_states=h, temb=emb, image_only_indicator=indicator)
            skips += res
        h = self.mid_block(hidden_states=h, temb=emb, encoder_hidden_states=ehs, image_only_indicator=indicator)
        for block in self.up_blocks:
            res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
            if isinstance(block, DragUpBlock):
                h = block(h, res, emb, ehs, indicator, drag)
            else:
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, image_only_indicator=indicator)
        h = self.conv_out(self.conv_act(self.conv_norm_out(h)))
        return h.reshape(b, f, *h.shape[1:])


def build_unet(config: dict, device="cpu", dtype=torch.float32) -> PuppetMasterUNet:
    """Random-initialised UNet from a config dict (``device="meta"`` for shapes only)."""
    with torch.device(device):
        unet = PuppetMasterUNet(**config)
    if device != "meta" and dtype != torch.float32:
        unet = unet.to(dtype)
    return unet


# ============================================================================ checkpoint loading
def _describe(keys, n=4) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def unet_config(shapes: dict, name: str = "checkpoint") -> dict:
    """The UNet config a Puppet-Master checkpoint's tensor shapes describe: the released config
    with every size the tensors show (levels and channels, blocks per level, cross-attention
    width, drag embedder and token sizes). Heads are SVD's 64 channels each (shapes do not tell)."""
    cfg = dict(load_json("puppet_master/unet.json"))
    key = "down_blocks.{}.resnets.0.spatial_res_block.conv1.weight"
    levels = []
    while key.format(len(levels)) in shapes:
        levels.append(len(levels))
    if not levels or "conv_in.weight" not in shapes:
        raise KinemaError(f"{name}: not a Puppet-Master UNet checkpoint: no 'conv_in.weight' and "
                          f"'{key.format(0)}' (found e.g. {_describe(list(shapes)[:4])})")
    ch = [int(shapes[key.format(i)][0]) for i in levels]
    n = len(ch)
    has = lambda prefix: any(k.startswith(prefix) for k in shapes)  # noqa: E731
    cross = [has(f"down_blocks.{i}.attentions.") for i in levels]
    cfg.update(block_out_channels=ch,
               layers_per_block=sum(1 for j in range(8) if f"down_blocks.0.resnets.{j}.spatial_res_block.conv1.weight"
                                    in shapes),
               down_block_types=["CrossAttnDownBlockSpatioTemporal" if c else "DownBlockSpatioTemporal" for c in cross],
               up_block_types=["CrossAttnUpBlockSpatioTemporal" if has(f"up_blocks.{i}.attentions.")
                               else "UpBlockSpatioTemporal" for i in range(n)],
               num_attention_heads=[max(1, c // 64) for c in ch],
               in_channels=int(shapes["conv_in.weight"][1]))
    if "conv_out.weight" in shapes:
        cfg["out_channels"] = int(shapes["conv_out.weight"][0])
    first = next((i for i, c in enumerate(cross) if c), None)
    if first is not None:
        to_k = shapes.get(f"down_blocks.{first}.attentions.0.transformer_blocks.0.attn2.to_k.weight")
        if to_k is not None:
            cfg["cross_attention_dim"] = int(to_k[1])
        emb = f"down_blocks.{first}.flow_convs.0."
        if emb + "conv_in.weight" in shapes:
            cfg["num_drags"] = int(shapes[emb + "conv_in.weight"][1]) // 6
            cfg["drag_embedder_out_channels"] = [int(shapes[emb + "conv_in.weight"][0]),
                                                 int(shapes[emb + "blocks.1.weight"][0]),
                                                 int(shapes[emb + "blocks.3.weight"][0])]
        mlp = shapes.get(f"down_blocks.{first}.drag_token_mlps.0.0.weight")
        if mlp is not None:
            cfg["pos_embed_dim"] = (int(mlp[1]) - 2 * ch[first]) // 2
    return cfg


EXPECTED = "the Puppet-Master UNet (ckpts/model.safetensors of the release)"


def _shapes(path) -> dict:
    """Tensor name -> shape of a checkpoint: from a safetensors header without reading the
    tensors, else from the loaded state dict."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        return read_header(path, EXPECTED)[1]
    return {k: tuple(v.shape) for k, v in read_state_dict(path, expected=EXPECTED).items()}


def _check_unet(name: str, expected: dict, found: dict) -> None:
    """The strict key check, saying when the file is a stock SVD UNet (no drag layers)."""
    advice = "Use the Puppet-Master UNet (ckpts/model.safetensors of the release)"
    if any(".flow_convs." in k for k in expected) and not any(".flow_convs." in k for k in found):
        advice = "This looks like a stock SVD UNet, not the Puppet-Master UNet. " + advice
    check_keys(expected, found, f"{name} (Puppet-Master UNet)", advice=advice)


def load_unet(path, dtype=torch.float32, device="cpu", config: dict | None = None) -> PuppetMasterUNet:
    """The Puppet-Master UNet from its released flat-key checkpoint, sized by the file (or by
    ``config``); strict key and shape check (from the safetensors header before reading
    gigabytes)."""
    name = Path(path).name
    shapes = _shapes(path)
    cfg = config or unet_config(shapes, name)
    unet = build_unet(cfg, device="meta")
    expected = unet.state_dict()
    _check_unet(name, expected, shapes)
    sd = read_state_dict(path, expected=EXPECTED)
    _check_unet(name, expected, sd)
    unet.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    return unet.eval()


# ============================================================================ sampler
def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """(steps + 1,) float64 descending Karras sigmas ending with 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    s = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([s, s.new_zeros(1)])


@dataclass
class EDMEuler:
    """Euler sampler on EDM sigmas for a v-prediction model (SVD's EulerDiscreteScheduler setup).

    Model input ``x / sqrt(s^2 + 1)`` at time ``0.25 ln s``; denoised
    ``x / (s^2 + 1) - v * s / sqrt(s^2 + 1)``; Euler step to the next sigma.
    """
    sigma_min: float = 0.002
    sigma_max: float = 700.0
    rho: float = 7.0

    @classmethod
    def from_config(cls, cfg: dict) -> "EDMEuler":
        return cls(float(cfg["sigma_min"]), float(cfg["sigma_max"]), float(cfg.get("rho", 7.0)))

    def sigmas(self, steps: int) -> torch.Tensor:
        return karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho)

    def init_noise_sigma(self) -> float:
        return math.sqrt(self.sigma_max ** 2 + 1)

    @staticmethod
    def model_input(x, sigma):
        return x / math.sqrt(sigma ** 2 + 1)

    @staticmethod
    def timestep(sigma) -> float:
        return 0.25 * math.log(sigma)

    @staticmethod
    def step(x, v, sigma, sigma_next):
        denoised = x / (sigma ** 2 + 1) - v * (sigma / math.sqrt(sigma ** 2 + 1))
        return x + (x - denoised) / sigma * (sigma_next - sigma)


def guidance_weights(cfg: float, frames: int) -> torch.Tensor:
    """(frames,) per-frame guidance, linear from 1 at frame 0 to ``cfg`` at the last frame."""
    return torch.linspace(1.0, float(cfg), frames)


@torch.no_grad()
def denoise(unet: PuppetMasterUNet, image_latent, image_embed, drags, steps: int, cfg: float,
            generator: torch.Generator, sampler: EDMEuler, drag_valid=None, progress: bool = True, device=None):
    """Sample (1, F, 4, h, w) latents (scaled by the VAE factor) conditioned on one image.

    image_latent: (1, 4, h, w) VAE mean (unscaled); image_embed: (1, 1, D); drags: (1, F, N, 4).
    device: where the UNet runs (default: where its weights are).
    """
    p = next(unet.parameters())
    dev, dtype = (torch.device(device) if device is not None else p.device), p.dtype
    f = drags.shape[1]
    h, w = image_latent.shape[-2:]
    x = torch.randn((1, f, 4, h, w), generator=generator, dtype=torch.float32).to(dev) * sampler.init_noise_sigma()
    sig = sampler.sigmas(steps).tolist()
    wts = guidance_weights(cfg, f).to(dev)[None, :, None, None, None]
    lat = torch.cat([image_latent, torch.zeros_like(image_latent)]).to(dev, dtype)
    emb = torch.cat([image_embed, torch.zeros_like(image_embed)]).to(dev, dtype)
    valid = None
    if drag_valid is not None:
        valid = torch.cat([drag_valid, torch.zeros_like(drag_valid)])
    # built once: every step reuses its drag embeddings (the unconditional half's from one frame)
    drag = unet.drag_condition(torch.cat([drags, torch.zeros_like(drags)]), valid, 2, f, dev)
    bar = ProgressBar(steps, "Puppet-Master") if progress else None
    for i in range(steps):
        check_interrupt()
        s, s_next = sig[i], sig[i + 1]
        inp = sampler.model_input(x, s).to(dtype).expand(2, -1, -1, -1, -1)
        t = torch.tensor([sampler.timestep(s)], dtype=torch.float32, device=dev)
        v = unet(inp, t, lat, emb, drag).float()
        cond, uncond = v[:1], v[1:]
        v = uncond + wts * (cond - uncond)
        x = sampler.step(x, v, s, s_next)
        if bar is not None:
            bar.update()
    return x


# ============================================================================ image and drags
@dataclass
class Crop:
    """Square crop of the full image: top-left (x0, y0) and side in pixels (may pass the border)."""
    x0: float
    y0: float
    side: float

    def to_unit(self, pts: torch.Tensor) -> torch.Tensor:
        """(..., 2) full-image pixels -> crop coordinates in [0, 1] (pixel centres)."""
        return (pts + 0.5 - torch.tensor([self.x0, self.y0])) / self.side


def subject_crop(image: torch.Tensor, mask: torch.Tensor | None, size: int = CROP_SIZE, margin: float = 0.1):
    """The square subject crop on white that Puppet-Master expects.

    image: (H, W, 3) in [0, 1]; mask: (H, W) in [0, 1] or None. With a mask, the square around
    its bounding box (plus ``margin`` of its side) with the background replaced by white; without
    one, the whole image centred on a white square. Returns ((size, size, 3), Crop).
    """
    hgt, wid = image.shape[:2]
    if mask is not None:
        if tuple(mask.shape) != (hgt, wid):
            raise ValueError(f"mask: {tuple(mask.shape)} does not match the {wid}x{hgt} image")
        m = mask.float().clamp(0, 1)
        ys, xs = torch.nonzero(m > 0.5, as_tuple=True)
        if ys.numel() == 0:
            raise ValueError("mask: it is empty; click the object (or draw a mask) so there is a subject to crop")
        x_lo, x_hi, y_lo, y_hi = xs.min().item(), xs.max().item() + 1, ys.min().item(), ys.max().item() + 1
        side = max(x_hi - x_lo, y_hi - y_lo) * (1 + margin)
        cx, cy = (x_lo + x_hi) / 2, (y_lo + y_hi) / 2
        comp = image * m[..., None] + (1 - m[..., None])
    else:
        side = float(max(hgt, wid))
        cx, cy = wid / 2, hgt / 2
        comp = image
    side = max(side, 8.0)
    crop = Crop(cx - side / 2, cy - side / 2, side)
    # sample the square with bilinear interpolation, white outside the image
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size * side
    gx = (crop.x0 + lin) / wid * 2 - 1
    gy = (crop.y0 + lin) / hgt * 2 - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]
    src = comp.permute(2, 0, 1)[None].float()
    if side > size:  # shrink first (antialiased); normalised coordinates do not depend on resolution
        scale = size / side
        src = F.interpolate(src, size=(max(1, round(hgt * scale)), max(1, round(wid * scale))),
                            mode="bilinear", align_corners=False, antialias=True)
    out = F.grid_sample(src - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1
    return out[0].permute(1, 2, 0).clamp(0, 1), crop


def tracks_to_drags(tracks, crop: Crop, frames: int = NUM_FRAMES, max_drags: int = MAX_DRAGS, anchors=None):
    """Pixel tracks of the full image -> (1, frames, max_drags, 4) drags in crop coordinates, and
    (1, frames, max_drags) validity.

    A 2-point track is (start, end) with the end moving linearly from the start (frame 0) to the
    end (last frame); a longer track is resampled over the frames along its points (point i at
    time i/(M-1)). More than ``max_drags`` tracks: the longest ``max_drags`` are kept (warning).
    Starts must lie in the crop; ends are clamped to it. ``anchors`` (M, 2) pixel points that
    must stay still become zero-length drags in the slots the tracks leave free.
    """
    tr = [torch.as_tensor(t, dtype=torch.float32).reshape(-1, 2) for t in tracks]
    if len(tr) > max_drags:
        order = sorted(range(len(tr)), key=lambda i: -track_length(tr[i]))[:max_drags]
        log.warning("Puppet-Master takes at most %d drags; using the %d longest of %d (tracks %s)",
                    max_drags, max_drags, len(tr), sorted(order))
        tr = [tr[i] for i in sorted(order)]
    if anchors is not None and len(anchors):
        free = max_drags - len(tr)
        if len(anchors) > free:
            log.warning("Puppet-Master: %d anchor(s) ignored, the %d drag slots are taken", len(anchors) - free,
                        max_drags)
        tr += [torch.as_tensor(a, dtype=torch.float32).reshape(1, 2).repeat(2, 1) for a in list(anchors)[:free]]
    drags = torch.zeros(1, frames, max_drags, 4)
    valid = torch.zeros(1, frames, max_drags, dtype=torch.bool)
    for n, t in enumerate(tr):
        if t.shape[0] < 2:
            raise ValueError(f"tracks: track {n} has {t.shape[0]} point; a drag needs a start and an end")
        u = crop.to_unit(t)
        s = u[0]
        if not bool(((s >= 0) & (s <= 1)).all()):
            raise ValueError(f"tracks: drag {n} starts at ({t[0, 0]:g}, {t[0, 1]:g}), outside the subject crop; "
                             f"start drags on the object")
        u = u.clamp(0, 1)
        drags[0, :, n] = torch.cat([u[0].expand(frames, 2), resample_track(u, frames)], dim=-1)
        valid[0, :, n] = True
    return drags, valid


def paste_back(frames: torch.Tensor, image: torch.Tensor, crop: Crop, mask: torch.Tensor | None):
    """Put animated crops (F, s, s, 3) back into the full image (H, W, 3) -> (F, H, W, 3).

    The crop's white background is keyed out (alpha from distance to white), and inside the
    subject mask the animated crop replaces the image.
    """
    hgt, wid = image.shape[:2]
    f = frames.shape[0]
    ys = (torch.arange(hgt, dtype=torch.float32) + 0.5 - crop.y0) / crop.side * 2 - 1
    xs = (torch.arange(wid, dtype=torch.float32) + 0.5 - crop.x0) / crop.side * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)[None].expand(f, -1, -1, -1)
    up = F.grid_sample(frames.permute(0, 3, 1, 2).float(), grid, mode="bilinear", padding_mode="border",
                       align_corners=False).permute(0, 2, 3, 1)
    inside = ((grid.abs() <= 1).all(-1)).float()[..., None]
    if mask is None:
        alpha = inside
    else:
        key = ((1 - up.min(dim=-1, keepdim=True).values) / 0.12).clamp(0, 1)
        alpha = torch.maximum(key, mask.float()[None, ..., None]) * inside
    return (image[None] * (1 - alpha) + up * alpha).clamp(0, 1)


# ============================================================================ the model bundle
class ComfyCodec:
    """The image side of Puppet-Master on ComfyUI's objects: the SVD VAE (``VAE``) and the CLIP
    ViT-H image encoder (``CLIP_VISION``) from its loaders (e.g. Image Only Checkpoint Loader
    on an SVD img2vid file).

    encode: the crop (s, s, 3) in [0, 1] -> (VAE mean latent (1, 4, s/8, s/8), unscaled; CLIP
    image embedding (1, 1, D)); decode: sampled latents (1, F, 4, h, w) -> frames (F, 8h, 8w, 3).
    ComfyUI's CLIP preprocessing resizes bicubic with antialiasing, as the released code does,
    and rounds to 8-bit levels first (the released code does not: a difference of about 1/255).
    """

    scaling_factor = 0.18215  # SVD's VAE

    def __init__(self, vae, clip_vision):
        if vae is None or not hasattr(vae, "encode"):
            raise ValueError("vae: connect the SVD checkpoint's VAE (e.g. from Image Only Checkpoint Loader)")
        if clip_vision is None or not hasattr(clip_vision, "encode_image"):
            raise ValueError("clip_vision: connect the SVD checkpoint's CLIP_VISION (e.g. from Image Only "
                             "Checkpoint Loader, or Load CLIP Vision with CLIP-ViT-H-14)")
        self.vae, self.clip_vision = vae, clip_vision

    @torch.no_grad()
    def encode(self, crop: torch.Tensor):
        x = crop[None].float()
        latent = self.vae.encode(x).float()
        embed = self.clip_vision.encode_image(x, crop=True)["image_embeds"].float()
        return latent, embed[:, None]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        frames = self.vae.decode(latents[0].float() / self.scaling_factor)
        return frames.reshape(-1, *frames.shape[-3:]).float().cpu().clamp(0, 1)


@dataclass
class PuppetMaster:
    """Loaded Puppet-Master: the UNet (under model management) and the sampler setup. The VAE
    and image encoder come with each call (a codec, e.g. :class:`ComfyCodec`)."""
    unet: PuppetMasterUNet
    sampler: EDMEuler
    dtype: torch.dtype = torch.float32
    _managed: object = field(default=None, repr=False)
    _comfy: object = field(default=None, repr=False)

    def managed(self):
        """The UNet under model management: inside ComfyUI the patcher of its ComfyUI MODEL (one
        per loaded model, whichever route samples it), outside a ManagedModel. Returns
        (what :func:`runtime.load_models` takes, the device inputs go to)."""
        if runtime.in_comfyui():
            patcher = comfy_model(self)
            return patcher, patcher.load_device
        if self._managed is None:
            self._managed = runtime.ManagedModel(self.unet, "Puppet-Master UNet")
        return self._managed, self._managed.device

    def animate(self, image: torch.Tensor, tracks, codec, mask: torch.Tensor | None = None, steps: int = 50,
                cfg: float = 5.0, seed: int = 0, paste: bool = False, size: int | None = None,
                frames: int = NUM_FRAMES, progress: bool = True, anchors=None) -> torch.Tensor:
        """image (H, W, 3) in [0, 1], tracks: list of (M_i, 2) pixel tracks -> (F, ., ., 3) frames.

        The frames are the subject crop (``size`` defaults to 8 x the UNet's ``sample_size``:
        256 for the released model), or the full image with the crop pasted back.
        """
        if steps < 1:
            raise ValueError(f"steps: {steps} must be at least 1")
        if size is None:
            size = 8 * int(self.unet.config.sample_size or CROP_SIZE // 8)
        crop_img, crop = subject_crop(image, mask, size)
        drags, valid = tracks_to_drags(tracks, crop, frames, anchors=anchors)
        latent, embed = codec.encode(crop_img)
        part, device = self.managed()
        h, w = latent.shape[-2:]
        runtime.load_models(part, memory_required=runtime.inference_memory((2 * frames, 4, h, w), self.dtype, 2.0))
        gen = torch.Generator().manual_seed(int(seed))
        lat = denoise(self.unet, latent, embed, drags, steps, cfg, gen, self.sampler, valid, progress,
                      device=device)
        out = codec.decode(lat)
        if paste:
            out = paste_back(out, image.float().cpu(), crop, None if mask is None else mask.cpu())
        return out


def load_puppet_master(unet_path, dtype=torch.float32) -> PuppetMaster:
    """The Puppet-Master UNet from its file (sized by it) and the sampler setup."""
    unet = load_unet(unet_path, dtype)
    return PuppetMaster(unet, EDMEuler.from_config(load_json("svd/scheduler.json")), dtype)


# ============================================================================ as a ComfyUI MODEL
class ComfyUNet(nn.Module):
    """The Puppet-Master UNet called as ComfyUI calls its UNets.

    ComfyUI's video latents are a batch of frame latents: rows come in groups of ``frames`` (one
    video per CFG half). Per row the conditions carry the image latent (``pm_latent``), the drags
    of that frame (``pm_drags`` / ``pm_valid``) and, as context, the CLIP image embedding; the
    first row of each video holds what the video shares.
    """

    def __init__(self, unet: PuppetMasterUNet):
        super().__init__()
        self.unet = unet

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype

    def forward(self, x, t, context=None, control=None, transformer_options=None, pm_latent=None, pm_drags=None,
                pm_valid=None, pm_frames=None, **kwargs):
        if pm_latent is None or pm_drags is None or pm_frames is None:
            raise ValueError("Puppet-Master: the conditioning carries no drags or image; make it with "
                             "'Puppet-Master conditioning'")
        f = int(pm_frames)
        rows = x.shape[0]
        if rows % f:
            raise ValueError(f"latent batch: {rows} frames is not a whole number of {f}-frame videos; use the "
                             f"latent of 'Puppet-Master conditioning'")
        b = rows // f
        sample = x.reshape(b, f, *x.shape[1:])
        firsts = torch.arange(0, rows, f, device=x.device)
        out = self.unet(sample, t.reshape(b, f)[:, 0], pm_latent[firsts], context[firsts, :1],
                        pm_drags.float().reshape(b, f, *pm_drags.shape[1:]),
                        None if pm_valid is None else pm_valid.reshape(b, f, *pm_valid.shape[1:]).bool())
        return out.reshape(rows, *out.shape[2:])


def _pm_conds(kwargs, c):
    out = {}
    for key in ("pm_latent", "pm_drags", "pm_valid"):
        if kwargs.get(key) is not None:
            out[key] = c.regular(kwargs[key])
    if kwargs.get("pm_frames") is not None:
        out["pm_frames"] = c.constant(int(kwargs["pm_frames"]))
    return out


def comfy_model(pm: "PuppetMaster"):
    """Puppet-Master as a ComfyUI MODEL (made once per loaded model): SVD's continuous EDM
    v-prediction schedule, so KSampler's euler with the karras scheduler is the released
    sampler; the per-frame guidance ramp is core VideoLinearCFGGuidance (min_cfg 1)."""
    if pm._comfy is None:
        s = pm.sampler
        pm._comfy = runtime.comfy_model(ComfyUNet(pm.unet), "Puppet-Master UNet",
                                        runtime.continuous_edm_sampling("v", s.sigma_min, s.sigma_max),
                                        conds=_pm_conds, latent_format="SD15")
    return pm._comfy


@torch.no_grad()
def comfy_conditioning(pm: "PuppetMaster", image: torch.Tensor, tracks, codec, mask: torch.Tensor | None = None,
                       size: int | None = None, frames: int = NUM_FRAMES, anchors=None):
    """(positive, negative, latent, crop image (s, s, 3)) for sampling :func:`comfy_model` with
    ComfyUI: the subject crop's VAE latent and CLIP embedding with the drags as the positive
    conditioning, all zero as the negative (the released unconditional branch), and an empty
    latent of ``frames`` frames."""
    if size is None:
        size = 8 * int(pm.unet.config.sample_size or CROP_SIZE // 8)
    crop_img, crop = subject_crop(image, mask, size)
    drags, valid = tracks_to_drags(tracks, crop, frames, anchors=anchors)
    latent, embed = codec.encode(crop_img)
    per_frame = latent.expand(frames, -1, -1, -1).contiguous()
    common = {"pm_frames": frames}
    positive = [[embed.float(), dict(common, pm_latent=per_frame, pm_drags=drags[0].float(),
                                     pm_valid=valid[0].float())]]
    negative = [[torch.zeros_like(embed).float(), dict(common, pm_latent=torch.zeros_like(per_frame),
                                                       pm_drags=torch.zeros_like(drags[0]).float(),
                                                       pm_valid=torch.zeros_like(valid[0]).float())]]
    h, w = latent.shape[-2:]
    return positive, negative, {"samples": torch.zeros(frames, latent.shape[1], h, w)}, crop_img
