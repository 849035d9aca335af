"""StoryDiffusion's semantic motion predictor: per-frame image embeddings between two keyframes.

StoryDiffusion encodes the start and end frames into CLIP image space, linearly interpolates the
two embeddings to L frames, refines the sequence with a transformer in that space, and hands
the result to a video diffusion model as per-frame cross-attention conditions. Here the video
model is DynamiCrafter (512-interp), so the space is the one DynamiCrafter's image stream reads:

**The space.** DynamiCrafter's resampler (query transformer) reads the OpenCLIP ViT-H/14 vision
*tokens* - class token + 16x16 patch tokens, (257, 1280) per frame, of the whole frame resized
to 224, taken after the last residual block and **before** ``ln_post`` and the projection
(``pipelines/dynamicrafter/encoders.py``) - and turns them into 16 context tokens per frame. The
pooled, projected CLIP image embedding (1024) cannot be turned back into those tokens, and the
resampler's output is tied to a frame slot (its learned queries differ per frame), so neither is
a per-frame embedding DynamiCrafter can be conditioned on. The predictor therefore works on the
per-frame token sets: frame t's embedding is a (257, 1280) token set, and its image context is
the resampler's output for it (see ``transitions`` and DynamiCrafter's ``FrameContext``). The
encoder is frozen and the same in every DynamiCrafter release, so a predictor fits all of them.

**Training-free mode** (no weights): ``K_t = lerp(K_start, K_end, t / (L - 1))`` for every token;
exact keyframe tokens at both ends, and exactly the keyframe's tokens everywhere when the two
keyframes are the same picture.

**Learned mode**: ``P_t = K_t + m_t * D(K)_t``, ``m_t`` = 0 at the two keyframes and 1 between
(the keyframes are given, only the frames between are predicted). ``D`` is a transformer over
the (L x 257) tokens of the interpolated sequence with divided space-time attention: each block
is temporal self-attention (a token position across the L frames), spatial self-attention (the
257 tokens of one frame: motion needs spatial context, which attention along time alone lacks)
and an MLP, all pre-LayerNorm and residual. Input: ``LayerNorm(K) -> Linear(token_width, width)``
plus a learned token-position table and an MLP of the sinusoidal embedding of ``t / (L - 1)``
(so any L works). Output: ``LayerNorm -> Linear(width, token_width)``, zero-initialised, so an
untrained predictor is exactly the training-free mode and training starts from it.

**File format** (one ``.safetensors`` file in ``models/kinema/story_diffusion/``): the tensors are
the module's state dict (names as :class:`SemanticMotionPredictor` defines them); the header's
metadata holds ``format`` = ``kinema.semantic_motion_predictor``, ``format_version`` = ``1``,
``config`` = the JSON of :class:`PredictorConfig` (documented in
``configs/story_diffusion/semantic_motion_predictor.json``) and optionally ``training`` (JSON:
what the trainer did). ``train_motion_predictor.py`` writes it; :func:`load_predictor` reads it
and says what is wrong with any other file.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn

from ... import runtime
from ...kernels.attention import multihead_attention
from ...runtime import KinemaError
from ..checkpoint import load_strict, read_header, read_state_dict
from ..dynamicrafter.unet import timestep_embedding

FORMAT = "kinema.semantic_motion_predictor"
FORMAT_VERSION = "1"
SPACE = "openclip_vit_tokens_before_ln_post"
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "story_diffusion"


@dataclass(frozen=True)
class PredictorConfig:
    """The predictor's architecture (see ``configs/story_diffusion/semantic_motion_predictor.json``)."""
    space: str = SPACE          # the embedding space (only this one so far)
    token_width: int = 1280     # width of a CLIP vision token (ViT-H/14: 1280)
    tokens: int = 257           # tokens per frame (ViT-H/14 at 224: 1 class + 16x16 patches)
    width: int = 1024           # transformer width
    depth: int = 4              # blocks (temporal attention + spatial attention + MLP each)
    heads: int = 16
    mlp_ratio: float = 4.0

    @classmethod
    def from_dict(cls, d, where: str = "config") -> "PredictorConfig":
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if k not in names and not k.startswith("_"))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
        kw = {k: v for k, v in d.items() if k in names}
        cfg = cls(**kw)
        if cfg.space != SPACE:
            raise ValueError(f"{where}: space {cfg.space!r} is not supported (this version reads {SPACE!r})")
        for name in ("token_width", "tokens", "width", "depth", "heads"):
            v = getattr(cfg, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{where}: {name} must be a positive whole number, got {v!r}")
        if not isinstance(cfg.mlp_ratio, (int, float)) or cfg.mlp_ratio <= 0:
            raise ValueError(f"{where}: mlp_ratio must be a positive number, got {cfg.mlp_ratio!r}")
        if cfg.width % cfg.heads:
            raise ValueError(f"{where}: width {cfg.width} is not divisible by heads {cfg.heads}")
        return cfg

    @classmethod
    def from_file(cls, path) -> "PredictorConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"config: {path} could not be read as JSON ({e})") from None
        return cls.from_dict(d, where=f"config {path.name}")

    def to_dict(self) -> dict:
        return asdict(self)


def default_config(name: str = "semantic_motion_predictor") -> PredictorConfig:
    """A config shipped in ``configs/story_diffusion`` (``semantic_motion_predictor``: the ViT-H predictor)."""
    return PredictorConfig.from_file(CONFIG_DIR / f"{name}.json")


# ------------------------------------------------------------------------------ training-free

def frame_times(frames: int, device=None) -> torch.Tensor:
    """(frames,) positions in [0, 1]: exactly 0 at the first frame and 1 at the last."""
    if frames < 2:
        raise ValueError(f"frames: {frames} is too few (a transition has at least the two keyframes)")
    return torch.linspace(0.0, 1.0, frames, device=device)


def interpolate_tokens(start: torch.Tensor, end: torch.Tensor, frames: int) -> torch.Tensor:
    """Linear interpolation of two keyframes' tokens: (..., N, W) x 2 -> (..., frames, N, W).

    ``torch.lerp`` is exact at both ends and returns ``start`` itself when ``end == start``."""
    if start.shape != end.shape:
        raise ValueError(f"keyframes: start tokens {tuple(start.shape)} and end tokens {tuple(end.shape)} differ")
    t = frame_times(frames, start.device).to(start.dtype)
    w = t.view(*([1] * (start.dim() - 2)), frames, 1, 1)
    return torch.lerp(start.unsqueeze(-3), end.unsqueeze(-3), w)


# ------------------------------------------------------------------------------ learned

class _SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(multihead_attention(q.contiguous(), k.contiguous(), v.contiguous(), self.heads))


class _Block(nn.Module):
    """Temporal attention, spatial attention, MLP; (B, L, N, width) -> same."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm_time = nn.LayerNorm(width)
        self.attn_time = _SelfAttention(width, heads)
        self.norm_space = nn.LayerNorm(width)
        self.attn_space = _SelfAttention(width, heads)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, length, n, d = h.shape
        x = h.transpose(1, 2).reshape(b * n, length, d)
        x = x + self.attn_time(self.norm_time(x))
        x = x.reshape(b, n, length, d).transpose(1, 2).reshape(b * length, n, d)
        x = x + self.attn_space(self.norm_space(x))
        x = x + self.mlp(self.norm_mlp(x))
        return x.reshape(b, length, n, d)


class SemanticMotionPredictor(nn.Module):
    """(B, N, W) start and end tokens, L -> (B, L, N, W) per-frame tokens (module doc)."""

    def __init__(self, config: PredictorConfig | None = None):
        super().__init__()
        cfg = config or PredictorConfig()
        self.config = cfg
        w = cfg.width
        self.norm_in = nn.LayerNorm(cfg.token_width)
        self.proj_in = nn.Linear(cfg.token_width, w)
        self.token_pos = nn.Parameter(torch.randn(cfg.tokens, w) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.blocks = nn.ModuleList(_Block(w, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(w)
        self.proj_out = nn.Linear(w, cfg.token_width)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def check_tokens(self, tokens: torch.Tensor, name: str = "tokens") -> None:
        want = (self.config.tokens, self.config.token_width)
        if tokens.dim() < 2 or tuple(tokens.shape[-2:]) != want:
            raise ValueError(f"{name}: {tuple(tokens.shape)} are not tokens of this predictor's space "
                             f"(..., {want[0]}, {want[1]}): it was made for another image encoder")

    def forward(self, start: torch.Tensor, end: torch.Tensor, frames: int) -> torch.Tensor:
        self.check_tokens(start, "start tokens")
        base = interpolate_tokens(start, end, frames)                       # (B, L, N, W)
        t = frame_times(frames, start.device)
        dt = self.proj_in.weight.dtype
        h = self.proj_in(self.norm_in(base.to(dt)))
        time = self.time_mlp(timestep_embedding(t * 1000.0, self.config.width).to(dt))
        h = h + self.token_pos.to(dt) + time[:, None, :]
        for blk in self.blocks:
            h = blk(h)
        delta = self.proj_out(self.norm_out(h))
        inner = ((t > 0) & (t < 1)).to(delta.dtype).view(frames, 1, 1)
        return base + (delta * inner).to(base.dtype)


@torch.no_grad()
def new_predictor(config: PredictorConfig, seed: int = 0) -> SemanticMotionPredictor:
    """An untrained predictor whose weights are drawn from ``seed`` by a local generator (the
    host's global RNG is neither read nor seeded): PyTorch's default initialisation of its layers,
    position table N(0, 0.02), zero output layer."""
    from ..weights_init import default_init
    with torch.device("meta"):
        model = SemanticMotionPredictor(config)
    generator = torch.Generator().manual_seed(int(seed))
    default_init(model, generator, leave=("token_pos",))
    with torch.no_grad():
        model.token_pos.normal_(0.0, 0.02, generator=generator)
        nn.init.zeros_(model.proj_out.weight)
        nn.init.zeros_(model.proj_out.bias)
    return model


def predict(start: torch.Tensor, end: torch.Tensor, frames: int,
            predictor: "runtime.ManagedModel | None" = None) -> torch.Tensor:
    """Per-frame tokens (frames, N, W) float32 on the CPU between keyframe tokens (N, W).

    ``predictor``: a loaded predictor (learned mode) or None (training-free interpolation)."""
    if predictor is None:
        return interpolate_tokens(start.float().cpu(), end.float().cpu(), frames)
    module: SemanticMotionPredictor = predictor.module
    module.check_tokens(start, "keyframe tokens")
    runtime.load_models(predictor)
    dev = predictor.device
    out = module(start[None].to(dev, torch.float32), end[None].to(dev, torch.float32), frames)
    return out[0].float().cpu()


# ------------------------------------------------------------------------------ files

def save_predictor(model: SemanticMotionPredictor, path, training: dict | None = None,
                   dtype: torch.dtype | None = None) -> Path:
    """Write the predictor file (module doc); written to a temporary name, then renamed."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
          for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(model.config.to_dict())}
    if training:
        meta["training"] = json.dumps(training)
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_metadata(path) -> tuple[dict, list[str]]:
    """(header metadata, tensor names) of a safetensors file; KinemaError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise KinemaError(f"semantic motion predictor '{path}' does not exist")
    if path.suffix.lower() != ".safetensors":
        raise KinemaError(f"'{path.name}' is not a semantic motion predictor: predictors are .safetensors files "
                          "written by train_motion_predictor.py (pickled checkpoints are not read)")
    meta, shapes = read_header(path, "a semantic motion predictor (.safetensors written by "
                                     "train_motion_predictor.py)")
    return meta, list(shapes)


def _looks_like(keys: list[str]) -> str:
    from ..dynamicrafter.convert import identify
    what = identify(keys)
    return "a DynamiCrafter checkpoint" if what is None else what


def load_predictor(path, dtype: torch.dtype = torch.float32) -> SemanticMotionPredictor:
    """Read a predictor file (module doc). Wrong files give a KinemaError naming the file."""
    path = Path(path)
    meta, keys = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise KinemaError(f"'{path.name}' is not a semantic motion predictor: its header has no "
                          f"format '{FORMAT}' (it looks like {_looks_like(keys)}). Train one with "
                          "train_motion_predictor.py, or leave the predictor unconnected for the "
                          "training-free interpolation")
    if meta.get("format_version") != FORMAT_VERSION:
        raise KinemaError(f"'{path.name}': predictor format version {meta.get('format_version')!r} is not "
                          f"supported (this version reads {FORMAT_VERSION})")
    try:
        cfg = PredictorConfig.from_dict(json.loads(meta.get("config", "")), where=f"'{path.name}' config")
    except json.JSONDecodeError as e:
        raise KinemaError(f"'{path.name}': the config in its header is not JSON ({e})") from None
    except ValueError as e:
        raise KinemaError(str(e)) from None
    with torch.device("meta"):
        model = SemanticMotionPredictor(cfg)
    sd = read_state_dict(path, expected="a semantic motion predictor")
    load_strict(model, {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()},
                f"'{path.name}' (weights against the config in its header)",
                advice="The file is damaged or was edited; train it again with train_motion_predictor.py")
    return model.eval()


def training_info(path) -> dict:
    """The ``training`` record of a predictor file ({} if none)."""
    meta, _ = read_metadata(path)
    try:
        return json.loads(meta.get("training") or "{}")
    except json.JSONDecodeError:
        return {}


def parameter_count(config: PredictorConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in SemanticMotionPredictor(config).parameters())

