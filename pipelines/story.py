"""StoryDiffusion story batches: one panel per story line, characters kept consistent.

- :func:`parse_story` turns the text into panels (``[Name] description`` lines, several
  names per line, ``[NC]`` for no character, ``#caption``) and picks each character's
  reference panels (its first ``id_length`` panels in which it appears alone).
- :func:`load_checkpoint` builds SD1.5 / SDXL diffusers models from a single-file
  checkpoint (original LDM / SGM key layout) with the configs shipped in ``configs/`` and
  tokenizers from the ``open_clip`` vocabulary; nothing is fetched.
- :func:`generate_story` runs the memory-bounded story batch: each character's reference
  panels first (write phase; the sampled reference tokens are banked per step and layer),
  then the other panels in windows of ``batch_size`` (read phase).
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..kernels.consistent_attention import ConsistentSelfAttention, StoryLayout
from ..runtime import SEED_MAX, KinemaError, ProgressBar, check_interrupt
from .ddim import ddim_sigmas
from .text_encoding import clip_tokenizer
from .checkpoint import load_strict, read_state_dict

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
ARCHS = ("sd15", "sdxl")
NO_CHARACTER = "NC"
FREEU_DEFAULTS = dict(s1=0.6, s2=0.4, b1=1.1, b2=1.2)

# ----------------------------------------------------------------------------- story text

_NAME = re.compile(r"\[([^\[\]]+)\]")


@dataclass
class Panel:
    """One story panel. prompt: the text given to the model; caption: for the comic page."""
    text: str
    characters: tuple
    caption: str
    prompt: str = ""


@dataclass
class Story:
    panels: list
    references: dict  # character -> reference panel indices (ascending)
    characters: list  # character names in order of first appearance

    @property
    def layout(self) -> StoryLayout:
        return StoryLayout([p.characters for p in self.panels], self.references)


def parse_characters(text: str) -> dict:
    """``[Name] description`` lines -> {Name: description}. Empty text -> {}."""
    out = {}
    for i, raw in enumerate((text or "").splitlines()):
        line = raw.strip()
        if not line:
            continue
        m = re.match(r"^\[([^\[\]]+)\]\s*(.*)$", line)
        if not m or not m.group(1).strip():
            raise ValueError(f"characters: line {i + 1} '{line}' is not '[Name] description'")
        name = m.group(1).strip()
        if name == NO_CHARACTER:
            raise ValueError(f"characters: line {i + 1}: '[{NO_CHARACTER}]' means no character, pick another name")
        if name in out:
            raise ValueError(f"characters: '{name}' is described twice")
        out[name] = m.group(2).strip()
    return out


def parse_story(text: str, id_length: int = 2, characters: str = "", style: str = "{prompt}") -> Story:
    """Parse a story, one panel per non-empty line.

    Line syntax: ``[Name] text``, ``[Name] [Other] text`` (several characters), ``[NC] text``
    (no character), or plain text (no character); ``#`` starts the caption shown on the comic
    page (the text before it is the prompt; without ``#`` the caption is the text).
    characters: optional ``[Name] description`` lines; when given, every name used in the
    story must be described there, and the description is put into the prompt.
    style: a template with ``{prompt}`` (or text appended after a comma).
    """
    if not 1 <= int(id_length) <= 4:
        raise ValueError(f"id_length: {id_length} is outside 1-4")
    described = parse_characters(characters)
    panels: list[Panel] = []
    order: list[str] = []
    for raw in (text or "").splitlines():
        line = raw.strip()
        if not line:
            continue
        names = []
        rest = line
        while True:
            m = re.match(r"^\s*\[([^\[\]]*)\]", rest)
            if not m:
                break
            names.append(m.group(1).strip())
            rest = rest[m.end():]
        line_no = len(panels) + 1
        if any(not n for n in names):
            raise ValueError(f"story: panel {line_no} has an empty [] name; write [Name] or [{NO_CHARACTER}]")
        if NO_CHARACTER in names and len(names) > 1:
            raise ValueError(f"story: panel {line_no} mixes [{NO_CHARACTER}] with named characters")
        names = tuple(dict.fromkeys(n for n in names if n != NO_CHARACTER))
        prompt, _, caption = rest.partition("#")
        prompt = prompt.strip()
        caption = caption.strip() or prompt
        if described:
            for n in names:
                if n not in described:
                    raise ValueError(f"story: panel {line_no} names '[{n}]', which is not in characters "
                                     f"({', '.join(described)}); describe it or fix the name")
        for n in names:
            if n not in order:
                order.append(n)
        parts = [described[n] for n in names if described.get(n)] + ([prompt] if prompt else [])
        full = ", ".join(parts) or ", ".join(names)
        styled = style.replace("{prompt}", full) if "{prompt}" in (style or "") else \
            ", ".join(x for x in (full, (style or "").strip()) if x)
        panels.append(Panel(text=prompt, characters=names, caption=caption, prompt=styled))
    if not panels:
        raise ValueError("story: it is empty; write one panel per line, e.g. '[Lily] reading in the garden'")
    n_chars = len(described) or len(order)
    if n_chars * id_length > len(panels):
        raise ValueError(f"story: {n_chars} character(s) need {id_length} reference panel(s) each "
                         f"({n_chars * id_length} in all) but the story has {len(panels)} panels; "
                         f"add panels or lower id_length")
    references = {}
    for name in order:
        alone = [i for i, p in enumerate(panels) if p.characters == (name,)]
        if not alone:
            raise ValueError(f"story: '[{name}]' never appears alone in a panel, so it has no reference "
                             f"images; add a panel with only [{name}] before panel "
                             f"{next(i for i, p in enumerate(panels) if name in p.characters) + 1}")
        if len(alone) < id_length:
            raise ValueError(f"id_length: {id_length} is larger than the {len(alone)} panel(s) in which "
                             f"'[{name}]' appears alone; lower id_length or add panels of [{name}]")
        references[name] = alone[:id_length]
    for i, p in enumerate(panels):
        for n in p.characters:
            if len(p.characters) > 1 and min(references[n]) > i:
                raise ValueError(f"story: panel {i + 1} names '[{n}]' before its reference panels "
                                 f"{[r + 1 for r in references[n]]}; introduce [{n}] alone first")
    return Story(panels=panels, references=references, characters=order)


# ----------------------------------------------------------------------------- models

@dataclass
class StoryModels:
    """Diffusers components of an SD1.5 or SDXL checkpoint."""
    arch: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    scheduler: object
    tokenizer: object
    text_encoder_2: Optional[torch.nn.Module] = None
    tokenizer_2: object = None
    name: str = ""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def read_config(arch: str, part: str) -> dict:
    path = CONFIG_DIR / arch / f"{part}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise KinemaError(f"config {path}: missing or not JSON ({exc}); the pack's configs/ folder is incomplete") from exc


def build_models(arch: str, configs: Optional[dict] = None, device: str | torch.device = "meta") -> StoryModels:
    """Instantiate the components from configs (the shipped ones unless ``configs`` maps
    part -> config dict). ``device="meta"`` allocates no weights (loading assigns them)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if arch not in ARCHS:
        raise ValueError(f"arch: '{arch}' is not one of {ARCHS}")
    cfg = {part: (configs or {}).get(part) or read_config(arch, part)
           for part in (["unet", "vae", "text_encoder", "scheduler"] + (["text_encoder_2"] if arch == "sdxl" else []))}

    def text_cfg(d):
        d = {k: v for k, v in d.items() if k not in ("architectures", "model_type")}
        return CLIPTextConfig(**d)

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        te = CLIPTextModel(text_cfg(cfg["text_encoder"]))
        te2 = CLIPTextModelWithProjection(text_cfg(cfg["text_encoder_2"])) if arch == "sdxl" else None
    scheduler = DDIMScheduler.from_config(cfg["scheduler"])
    return StoryModels(arch=arch, unet=unet, vae=vae, text_encoder=te, scheduler=scheduler,
                       tokenizer=clip_tokenizer(), text_encoder_2=te2,
                       tokenizer_2=clip_tokenizer(pad="!") if arch == "sdxl" else None)


SDXL_MARK = "conditioner.embedders.1.model.ln_final.weight"
SD15_MARK = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


def detect_arch(sd: dict, name: str = "checkpoint") -> str:
    if SDXL_MARK in sd:
        return "sdxl"
    if SD15_MARK in sd:
        return "sd15"
    some = ", ".join(sorted(sd)[:3])
    raise KinemaError(f"{name}: not an SD1.5 or SDXL single-file checkpoint: expected '{SD15_MARK}' "
                      f"or '{SDXL_MARK}', found keys like {some}")


# keys that original checkpoints carry and diffusers does not use
_IGNORED = re.compile(
    r"^(model_ema\.|cond_stage_model\.transformer\.text_model\.embeddings\.position_ids$|"
    r"conditioner\.embedders\.0\.transformer\.text_model\.embeddings\.position_ids$|"
    r"conditioner\.embedders\.1\.model\.(logit_scale|attn_mask)$|"
    r"alphas_cumprod|alphas_cumprod_prev|betas$|log_one_minus_alphas_cumprod|model_ema|posterior_|"
    r"sqrt_|denoiser\.)")


def convert_checkpoint(sd: dict, models: StoryModels, name: str = "checkpoint") -> None:
    """Map original LDM/SGM keys to the diffusers components (diffusers' own converters)
    and load them strictly. Every checkpoint key must be used or be a known unused key."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    from . import sd_checkpoint

    unet_sd = sd_checkpoint.unet_state_dict(sd, name, config=dict(models.unet.config))
    vae_sd = sd_checkpoint.vae_state_dict(sd, dict(models.vae.config), name)
    te_sd = sd_checkpoint.text_state_dict(sd, models.text_encoder)
    if models.arch == "sd15":
        te_prefix = ("cond_stage_model.",)
        te2_sd = None
    else:
        te2_sd = sd_checkpoint.clip_text_layout(
            convert_open_clip_checkpoint(models.text_encoder_2, sd, prefix="conditioner.embedders.1.model."),
            models.text_encoder_2)
        te_prefix = ("conditioner.embedders.",)
    if te2_sd is not None:
        known2 = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                  "text_projection", "logit_scale", "attn_mask"}
        odd = sorted(k for k in sd if k.startswith("conditioner.embedders.1.model.")
                     and not k[len("conditioner.embedders.1.model."):].startswith("transformer.resblocks.")
                     and k[len("conditioner.embedders.1.model."):] not in known2)
        if odd:
            raise KinemaError(f"{name}: unknown second text encoder keys (e.g. {odd[:3]})")
    used_prefixes = ("model.diffusion_model.", "first_stage_model.") + te_prefix
    stray = sorted(k for k in sd if not k.startswith(used_prefixes) and not _IGNORED.match(k))
    if stray:
        raise KinemaError(f"{name}: {len(stray)} keys belong to no known component (e.g. {stray[:3]})")
    load_strict(models.unet, unet_sd, f"{name} (UNet)")
    load_strict(models.vae, vae_sd, f"{name} (VAE)")
    load_strict(models.text_encoder, te_sd, f"{name} (text encoder)")
    if te2_sd is not None:
        load_strict(models.text_encoder_2, te2_sd, f"{name} (second text encoder)")


def load_checkpoint(path: Path, dtype: torch.dtype = torch.float16, device=None,
                    configs: Optional[dict] = None) -> StoryModels:
    """Build diffusers models from an SD1.5 / SDXL single-file checkpoint (configs: part ->
    config dict overriding the shipped ones, for tests)."""
    path = Path(path)
    if not path.is_file():
        raise KinemaError(f"checkpoint {path}: file not found")
    sd = read_state_dict(path)
    arch = detect_arch(sd, path.name)
    models = build_models(arch, configs=configs)
    convert_checkpoint(sd, models, path.name)
    del sd
    models.name = path.name
    for m in (models.unet, models.vae, models.text_encoder, models.text_encoder_2):
        if m is not None:
            m.to(device=device or "cpu", dtype=dtype).eval().requires_grad_(False)
    return models


# ----------------------------------------------------------------------------- attention processor

class _Batch:
    """Which story panels the current UNet batch holds (set by the sampler)."""

    def __init__(self):
        self.panels: list = []
        self.groups = 1


class StoryAttnProcessor:
    """Diffusers attention processor for an up-block ``attn1``: projections from the
    module, consistent attention from the run state."""

    def __init__(self, name: str, state: ConsistentSelfAttention, batch: _Batch):
        self.name = name
        self.state = state
        self.batch = batch

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is not None:
            raise ValueError(f"{self.name}: consistent attention replaces self-attention only")
        residual = hidden_states
        ndim = hidden_states.dim()
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if getattr(attn, "group_norm", None) is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        out = self.state.attend(q, k, v, attn.heads, self.name, self.batch.panels, self.batch.groups)
        out = attn.to_out[1](attn.to_out[0](out.to(q.dtype)))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if getattr(attn, "residual_connection", False):
            out = out + residual
        return out / getattr(attn, "rescale_output_factor", 1.0)


def up_block_self_attention_names(unet) -> list:
    return [n for n in unet.attn_processors if n.startswith("up_blocks.") and ".attn1." in n]


# ----------------------------------------------------------------------------- sampling

@torch.no_grad()
def encode_prompts(models: StoryModels, prompts: list) -> tuple:
    """(context (B, 77, C), pooled (B, 1280) or None)."""
    dev = models.device
    ids = models.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt").input_ids.to(dev)
    if models.arch == "sd15":
        return models.text_encoder(ids).last_hidden_state.to(models.dtype), None
    ids2 = models.tokenizer_2(prompts, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids.to(dev)
    h1 = models.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    out2 = models.text_encoder_2(ids2, output_hidden_states=True)
    ctx = torch.cat([h1, out2.hidden_states[-2]], dim=-1)
    return ctx.to(models.dtype), out2.text_embeds.to(models.dtype)


@dataclass
class StorySettings:
    width: int = 768
    height: int = 768
    steps: int = 35
    cfg: float = 5.0
    seed: int = 0
    sa32: float = 0.5
    sa64: float = 0.5
    batch_size: int = 2  # later panels denoised at once (the sliding window)
    freeu: bool = True
    schedule: str = "lowvram"
    negative: str = ""
    bank_device: Optional[str] = None  # default: the model's device


def _check_settings(s: StorySettings, models: StoryModels) -> None:
    mult = models.vae_scale * 2 ** (len(models.unet.config.block_out_channels) - 1)
    for name in ("width", "height"):
        v = getattr(s, name)
        if v < mult or v % mult:
            raise ValueError(f"{name}: {v} is not a positive multiple of {mult} (the model's size step)")
    if s.steps < 1:
        raise ValueError(f"steps: {s.steps} must be at least 1")
    if s.batch_size < 1:
        raise ValueError(f"batch_size: {s.batch_size} must be at least 1")


@torch.no_grad()
def generate_story(models: StoryModels, story: Story, settings: StorySettings,
                   progress: Optional[Callable] = None) -> torch.Tensor:
    """Images of every panel, (P, H, W, 3) float 0-1, in story order.

    Reference panels of each character are denoised together (write phase, banked);
    every other panel is then denoised in windows of ``settings.batch_size`` panels,
    reading the bank. Panel ``p``'s initial noise comes from ``seed + p``.
    """
    s = settings
    _check_settings(s, models)
    unet, dev, dtype = models.unet, models.device, models.dtype
    layout = story.layout
    n_panels = layout.n_panels
    state = ConsistentSelfAttention(layout, sa32=s.sa32, sa64=s.sa64, seed=s.seed, schedule=s.schedule,
                                    keep_bank=True,
                                    bank_device=torch.device(s.bank_device) if s.bank_device else None)
    lh, lw = s.height // models.vae_scale, s.width // models.vae_scale
    state.latent_hw = (lh, lw)
    batch = _Batch()
    groups = 2 if s.cfg > 1.0 else 1

    prompts = [p.prompt for p in story.panels]
    ctx, pooled = encode_prompts(models, prompts)
    neg_ctx, neg_pooled = encode_prompts(models, [s.negative] * 1)
    if models.arch == "sdxl" and not s.negative:
        neg_ctx, neg_pooled = torch.zeros_like(neg_ctx), torch.zeros_like(neg_pooled)

    noise = []
    for p in range(n_panels):
        gen = torch.Generator().manual_seed((int(s.seed) + p) & SEED_MAX)
        noise.append(torch.randn(1, unet.config.in_channels, lh, lw, generator=gen))
    noise = torch.cat(noise).to(dev, dtype)

    phases = [list(refs) for refs in story.references.values()]
    rest = [p for p in range(n_panels) if p not in layout.reference_of]
    phases += [rest[i:i + s.batch_size] for i in range(0, len(rest), s.batch_size)]

    saved = unet.attn_processors
    procs = dict(saved)
    for name in up_block_self_attention_names(unet):
        procs[name] = StoryAttnProcessor(name, state, batch)
    freeu_on = bool(s.freeu)
    bar = ProgressBar(len(phases) * s.steps, "story")
    latents_out = torch.empty_like(noise)
    try:
        unet.set_attn_processor(procs)
        if freeu_on:
            unet.enable_freeu(**FREEU_DEFAULTS)
        for panels in phases:
            batch.panels, batch.groups = panels, groups
            sched = copy.deepcopy(models.scheduler)
            sched.set_timesteps(s.steps, device=dev)
            lat = noise[panels] * sched.init_noise_sigma
            cond = ctx[panels]
            uncond = neg_ctx.expand(len(panels), -1, -1)
            context = torch.cat([uncond, cond]) if groups == 2 else cond
            added = None
            if models.arch == "sdxl":
                pool = pooled[panels]
                pool = torch.cat([neg_pooled.expand(len(panels), -1), pool]) if groups == 2 else pool
                tid = torch.tensor([s.height, s.width, 0, 0, s.height, s.width], device=dev, dtype=dtype)
                added = {"text_embeds": pool, "time_ids": tid.expand(pool.shape[0], -1)}
            for i, t in enumerate(sched.timesteps):
                check_interrupt()
                state.set_step(i)
                x = torch.cat([lat] * groups)
                x = sched.scale_model_input(x, t)
                eps = unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
                if groups == 2:
                    e_u, e_c = eps.chunk(2)
                    eps = e_u + s.cfg * (e_c - e_u)
                lat = sched.step(eps, t, lat).prev_sample
                bar.update()
                if progress is not None:
                    progress()
            latents_out[panels] = lat
            check_interrupt()
        state.bank.clear()
    finally:
        unet.set_attn_processor(saved)
        if freeu_on:
            unet.disable_freeu()
    return decode(models, latents_out)


@torch.no_grad()
def decode(models: StoryModels, latents: torch.Tensor) -> torch.Tensor:
    """(P, 4, h, w) latents -> (P, H, W, 3) float 0-1 images, one panel at a time."""
    vae = models.vae
    vdtype = next(vae.parameters()).dtype
    upcast = vdtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    out = []
    for lat in latents:
        z = lat[None] / vae.config.scaling_factor
        if upcast:
            img = vae.float().decode(z.float()).sample
            vae.to(vdtype)
        else:
            img = vae.decode(z.to(vdtype)).sample
        out.append(((img.float() + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0).cpu())
    return torch.stack(out)


# ----------------------------------------------------------------------------- on ComfyUI's models

class NativeConsistentAttention:
    """An ``attn1`` replacement patch for ComfyUI's UNet (``set_model_attn1_replace``).

    ComfyUI calls ``patch(q, k, v, extra_options)`` with projected (B, N, heads*dim)
    tensors, one latent row per panel for each CFG chunk in ``extra_options["cond_or_uncond"]``
    (batched or one by one). The step comes from the sampler's sigmas.

    Two ways to use it:

    - the whole story as one latent batch under ComfyUI's KSampler (``state`` None): the run
      state (step, sampled tokens) lives here and starts afresh whenever the sampling schedule
      or the latent shape changes (a new batch);
    - one phase of a story run (``state`` and ``panels`` given): the latent batch holds
      ``panels``, and the shared ``state`` keeps the reference bank between phases.

    Copies of a model's options share this object (``deepcopy`` returns it): it is the state of
    one run, not a setting.
    """

    def __init__(self, layout: StoryLayout, *, sa32: float = 0.5, sa64: float = 0.5, seed: int = 0,
                 schedule: str = "lowvram", state: Optional[ConsistentSelfAttention] = None,
                 panels: Optional[list] = None):
        self.layout = layout
        self.kwargs = dict(sa32=sa32, sa64=sa64, seed=seed, schedule=schedule)
        self.shared = state is not None
        self.state = state if state is not None else None
        if state is None:
            ConsistentSelfAttention(layout, **self.kwargs)  # validate now
        self.panels = list(range(layout.n_panels)) if panels is None else [int(p) for p in panels]
        self._run = None
        self._last_sigma = None

    def __deepcopy__(self, memo):
        return self

    def to(self, device):
        return self

    def _step(self, extra_options) -> int:
        sigmas = extra_options.get("sigmas")
        sigma = float(sigmas.flatten()[0]) if isinstance(sigmas, torch.Tensor) else float(sigmas or 0.0)
        schedule = extra_options.get("sample_sigmas")
        if isinstance(schedule, torch.Tensor) and schedule.numel() > 1:
            return int((schedule[:-1].float().cpu() > sigma * (1 + 1e-5) + 1e-8).sum())
        # no schedule given: count sigma changes
        if self._last_sigma is None:
            self.state.set_step(0)
        elif sigma != self._last_sigma:
            self.state.set_step(self.state.step + 1)
        self._last_sigma = sigma
        return self.state.step

    def __call__(self, q, k, v, extra_options):
        chunks = list(extra_options.get("cond_or_uncond") or [0])
        groups = len(chunks)
        n = len(self.panels)
        if q.shape[0] != groups * n:
            what = "the story has" if not self.shared else "this phase holds"
            raise ValueError(f"latent batch: {q.shape[0] // max(groups, 1)} images but {what} {n} panels; "
                             f"set the latent batch size to {n}")
        shape = tuple(extra_options.get("original_shape") or ())
        if not self.shared:
            schedule = extra_options.get("sample_sigmas")
            run = (shape, tuple(schedule.flatten().tolist()) if isinstance(schedule, torch.Tensor) else None)
            if self.state is None or run != self._run:
                self.state = ConsistentSelfAttention(self.layout, **self.kwargs)
                self._run, self._last_sigma = run, None
        if len(shape) >= 4:
            self.state.latent_hw = (int(shape[-2]), int(shape[-1]))
        self.state.set_step(self._step(extra_options))
        block = extra_options.get("block") or ("output", 0)
        layer = (block[0], block[1], extra_options.get("block_index", 0))
        return self.state.attend(q, k, v, int(extra_options["n_heads"]), layer, self.panels, groups, chunks)


def _output_blocks(model):
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    blocks = getattr(unet, "output_blocks", None)
    if blocks is None:
        raise ValueError("model: it has no UNet output blocks; consistent attention needs an SD1.5 / SDXL-family "
                         "UNet model")
    return unet, blocks


def patch_comfy_model(model, patch: NativeConsistentAttention):
    """A clone of a ComfyUI MODEL whose UNet output-block self-attentions run ``patch``."""
    clone = model.clone()
    _unet, blocks = _output_blocks(clone)
    count = 0
    for i, block in enumerate(blocks):
        for layer in block:
            tbs = getattr(layer, "transformer_blocks", None)
            if tbs is None:
                continue
            for t in range(len(tbs)):
                clone.set_model_attn1_replace(patch, "output", i, t)
                count += 1
    if count == 0:
        raise ValueError("model: its UNet output blocks have no self-attention to patch")
    return clone


class FreeU:
    """FreeU as StoryDiffusion runs it (diffusers' ``enable_freeu``): in every output block of
    the two deepest up levels, the first half of the backbone channels is scaled by ``b1`` /
    ``b2`` and the skip features are Fourier-filtered with ``s1`` / ``s2``. An
    ``output_block_patch`` for ComfyUI's UNet (diffusers' own ``apply_freeu`` does the maths).
    ComfyUI's FreeU nodes pick the stage by channel count instead, which on SD1.5 puts both
    1280-channel levels in stage 1: a different result, hence this patch."""

    def __init__(self, blocks_per_level: list, s1: float, s2: float, b1: float, b2: float):
        self.blocks_per_level = list(blocks_per_level)  # output blocks of each up level, deepest first
        self.kwargs = dict(s1=s1, s2=s2, b1=b1, b2=b2)

    def level(self, block: int) -> int:
        for lvl, n in enumerate(self.blocks_per_level):
            if block < n:
                return lvl
            block -= n
        return len(self.blocks_per_level)

    def __call__(self, h, hsp, transformer_options):
        from diffusers.utils.torch_utils import apply_freeu
        block = transformer_options.get("block") or ("output", 0)
        return apply_freeu(self.level(int(block[1])), h, hsp, **self.kwargs)


def patch_freeu(model, **settings):
    """A clone of a ComfyUI MODEL with StoryDiffusion's FreeU (see :class:`FreeU`)."""
    clone = model.clone()
    unet, _blocks = _output_blocks(clone)
    per_level = [n + 1 for n in list(unet.num_res_blocks)[::-1]]
    clone.set_model_output_block_patch(FreeU(per_level, **(settings or FREEU_DEFAULTS)))
    return clone


def encode_story_prompts(clip, prompts: list, negative: str, size: Optional[tuple] = None,
                         zero_empty_negative: bool = False):
    """Panel prompts and the negative prompt -> ComfyUI CONDITIONING: one positive entry whose
    tensor holds one row per panel, and one negative entry. ``size`` (width, height), if given,
    goes into the SDXL size conditioning (original = target size, no crop), as the story
    pipeline does; ``zero_empty_negative``: an empty negative prompt is zeros (SDXL's convention)."""
    if clip is None:
        raise ValueError("clip: no text encoder given; connect the checkpoint's CLIP output")

    def enc(text):
        return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)

    encoded = [enc(p) for p in prompts]
    longest = max(c.shape[1] for c, _ in encoded)
    blank = None
    conds = []
    for c, _ in encoded:
        while c.shape[1] < longest:  # pad long-prompt chunks with empty-prompt chunks
            if blank is None:
                blank = enc("")[0]
            c = torch.cat([c, blank[:, :min(blank.shape[1], longest - c.shape[1])]], dim=1)
        conds.append(c)
    extra = {}
    if size is not None:
        w, h = int(size[0]), int(size[1])
        extra = dict(width=w, height=h, target_width=w, target_height=h, crop_w=0, crop_h=0)
    pooled = [p for _, p in encoded]
    meta = dict(extra, pooled_output=torch.cat(pooled)) if all(p is not None for p in pooled) else dict(extra)
    neg_c, neg_p = enc(negative)
    if zero_empty_negative and not negative:
        neg_c = torch.zeros_like(neg_c)
        neg_p = None if neg_p is None else torch.zeros_like(neg_p)
    neg_meta = dict(extra, pooled_output=neg_p) if neg_p is not None else dict(extra)
    return [[torch.cat(conds), meta]], [[neg_c, neg_meta]]


def _rows(conditioning, rows) -> list:
    """The CONDITIONING entry restricted to some panel rows (batched tensors are sliced)."""
    c, meta = conditioning[0]
    idx = torch.as_tensor(rows)
    meta = {k: (v[idx] if isinstance(v, torch.Tensor) and v.shape[0] == c.shape[0] and c.shape[0] > 1 else v)
            for k, v in meta.items()}
    return [[c[idx] if c.shape[0] > 1 else c, meta]]


def comfy_arch(model) -> str:
    """"sdxl" for an SDXL-family ComfyUI MODEL, "sd15" for the SD1.x family; anything else is
    refused (consistent attention and the DDIM settings are those of these two)."""
    base = getattr(model, "model", None)
    name = type(base).__name__
    if name.startswith("SDXL"):
        return "sdxl"
    latent = getattr(base, "latent_format", None)
    if type(latent).__name__ == "SD15" and getattr(getattr(base, "diffusion_model", None), "output_blocks", None):
        return "sd15"
    raise ValueError(f"model: {name} with {type(latent).__name__} latents is neither an SD1.5 nor an SDXL-family "
                     f"model; load an SD1.5 or SDXL checkpoint")


@torch.no_grad()
def generate_story_comfy(model, clip, vae, story: Story, settings: StorySettings, arch: str) -> torch.Tensor:
    """The story batch on ComfyUI's own MODEL / CLIP / VAE (from its checkpoint loader, with any
    LoRA or patch upstream): the same phases, prompts, noise and DDIM as :func:`generate_story`,
    sampled by ComfyUI's sampler. Returns (P, H, W, 3) float 0-1 in story order.

    ``arch``: "sd15" or "sdxl" (which DDIM configuration; SDXL's empty negative prompt is zeros).
    """
    from .. import runtime
    s = settings
    if s.steps < 1:
        raise ValueError(f"steps: {s.steps} must be at least 1")
    if s.batch_size < 1:
        raise ValueError(f"batch_size: {s.batch_size} must be at least 1")
    latent_format = model.get_model_object("latent_format")
    channels = int(getattr(latent_format, "latent_channels", 4))
    factor = 8
    levels = len(model.get_model_object("diffusion_model").num_res_blocks)
    mult = factor * 2 ** (levels - 1)
    for name in ("width", "height"):
        v = getattr(s, name)
        if v < mult or v % mult:
            raise ValueError(f"{name}: {v} is not a positive multiple of {mult} (the model's size step)")
    layout = story.layout
    lh, lw = s.height // factor, s.width // factor
    positive, negative = encode_story_prompts(clip, [p.prompt for p in story.panels], s.negative,
                                              (s.width, s.height), zero_empty_negative=arch == "sdxl")
    sigmas = ddim_sigmas(model.get_model_object("model_sampling").sigmas, s.steps, read_config(arch, "scheduler"))
    # DDIM starts from x_T = noise in its own (variance-preserving) variables, which is
    # noise * sqrt(1 + sigma_T^2) in ComfyUI's; ComfyUI's sampler multiplies the noise it is
    # given by sigma_T (or by sqrt(1 + sigma_T^2) at the model's largest sigma)
    s0 = float(sigmas[0])
    start = 1.0 if runtime.starts_from_max_noise(model, s0) else (1.0 + s0 * s0) ** 0.5 / s0
    state = ConsistentSelfAttention(layout, sa32=s.sa32, sa64=s.sa64, seed=s.seed, schedule=s.schedule,
                                    keep_bank=True,
                                    bank_device=torch.device(s.bank_device) if s.bank_device else None)
    state.latent_hw = (lh, lw)
    base = patch_freeu(model) if s.freeu else model
    phases = [list(refs) for refs in story.references.values()]
    rest = [p for p in range(layout.n_panels) if p not in layout.reference_of]
    phases += [rest[i:i + s.batch_size] for i in range(0, len(rest), s.batch_size)]
    # DDIM's last step ends at alphas_cumprod[0]: scale as its output is (sqrt(alpha_0) x)
    last = float(sigmas[-1])
    out = torch.empty(layout.n_panels, channels, lh, lw)
    for panels in phases:
        patched = patch_comfy_model(base, NativeConsistentAttention(layout, state=state, panels=panels))
        noise = torch.cat([torch.randn(1, channels, lh, lw, generator=torch.Generator().manual_seed((int(s.seed) + p) & SEED_MAX))
                           for p in panels]) * start
        latent = runtime.sample(patched, noise, _rows(positive, panels), negative, sigmas, s.cfg, seed=s.seed)
        out[panels] = latent.float().cpu() / (1.0 + last * last) ** 0.5
        runtime.check_interrupt()
    state.bank.clear()
    images = vae.decode(out)
    return images.reshape(-1, *images.shape[-3:]).float().cpu().clamp(0, 1)


# ----------------------------------------------------------------------------- comic pages

def comic_pages(images: torch.Tensor, captions: list, columns: int = 2, rows: int = 2, gap: int = 16,
                caption_height: int = 48, font_size: int = 20, background: float = 1.0) -> torch.Tensor:
    """Lay panels out on pages in a grid with each caption under its panel.

    images: (P, H, W, 3) float 0-1; captions: up to P strings (missing ones are blank).
    Returns (pages, page_H, page_W, 3) float 0-1 with ``columns x rows`` panels a page.
    """
    from PIL import Image, ImageDraw, ImageFont

    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected (P, H, W, 3), got {tuple(images.shape)}")
    if columns < 1 or rows < 1:
        raise ValueError(f"columns/rows: {columns}x{rows} must be at least 1x1")
    n, h, w, _ = images.shape
    per_page = columns * rows
    cap_h = caption_height if any((c or "").strip() for c in captions) else 0
    cell_w, cell_h = w, h + cap_h
    page_w = columns * cell_w + (columns + 1) * gap
    n_pages = (n + per_page - 1) // per_page
    used_rows = [min(rows, (min(n - pg * per_page, per_page) + columns - 1) // columns) for pg in range(n_pages)]
    page_h = max(used_rows) * cell_h + (max(used_rows) + 1) * gap
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # older Pillow
        font = ImageFont.load_default()
    shade = int(round(max(0.0, min(1.0, background)) * 255))
    ink = (0, 0, 0) if shade > 127 else (255, 255, 255)
    pages = []
    for pg in range(n_pages):
        page = Image.new("RGB", (page_w, page_h), (shade, shade, shade))
        draw = ImageDraw.Draw(page)
        for slot in range(per_page):
            idx = pg * per_page + slot
            if idx >= n:
                break
            r, c = divmod(slot, columns)
            x0 = gap + c * (cell_w + gap)
            y0 = gap + r * (cell_h + gap)
            arr = (images[idx].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            page.paste(Image.fromarray(arr), (x0, y0))
            text = (captions[idx] if idx < len(captions) else "") or ""
            if cap_h and text.strip():
                lines = _wrap(draw, text.strip(), font, w - 8)
                line_h = font_size + 4
                max_lines = max(1, (cap_h - 4) // line_h)
                if len(lines) > max_lines:
                    lines = lines[:max_lines]
                    lines[-1] = lines[-1].rstrip(". ") + "..."
                for li, line in enumerate(lines):
                    tw = draw.textlength(line, font=font)
                    draw.text((x0 + (w - tw) / 2, y0 + h + 2 + li * line_h), line, fill=ink, font=font)
        pages.append(torch.from_numpy(np.asarray(page, dtype=np.float32) / 255.0))
    return torch.stack(pages)


def _wrap(draw, text: str, font, width: int) -> list:
    words, lines, cur = text.split(), [], ""
    for word in words:
        trial = f"{cur} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = word
    if cur:
        lines.append(cur)
    return lines
