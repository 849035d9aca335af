"""The one place that talks to ComfyUI.

Inside ComfyUI this module uses ``folder_paths``, ``comfy.model_management``,
``comfy.model_patcher`` and ``comfy.utils``; outside it (tests, the headless runner, scripts)
it falls back to plain equivalents:

- model folders under ``$KINEMA_MODELS_DIR`` (default ``./models``), one sub-folder per
  kind (``sams``, ``checkpoints``, ``animatediff_models``, ``kinema/<system>``);
- the best available torch device (CUDA, then MPS, then CPU), or ``$KINEMA_DEVICE``;
- models: every network the pack loads is a :class:`ManagedModel`. Inside ComfyUI it is held
  by a ``ModelPatcher`` and :func:`load_models` brings it to the device through
  ``comfy.model_management.load_models_gpu`` right before use, so ComfyUI can evict it (and
  others), honours ``--lowvram`` / ``--novram`` / ``--cpu`` / ``--reserve-vram`` and frees it
  on "Unload models". Outside ComfyUI :func:`load_models` moves it to the device;
- a terminal progress bar;
- interrupts through :class:`Interrupted`, raised by :func:`check_interrupt`.

The headless runner can also bring ComfyUI's own nodes into its process when a ComfyUI
checkout is importable (:func:`comfyui_root`, :func:`load_comfyui_nodes`,
:func:`execute_in_comfyui`), so workflows that use core nodes (checkpoint loaders,
KSampler, ...) run headless too.

Every other module imports from here, never from ComfyUI.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import re
import sys
import time
from contextlib import contextmanager
import uuid
from pathlib import Path

import torch

try:  # inside ComfyUI (or where it is importable)
    import folder_paths  # type: ignore  # noqa: F401
    import comfy.model_management  # type: ignore  # noqa: F401
    import comfy.model_patcher  # type: ignore  # noqa: F401
    import comfy.ops  # type: ignore  # noqa: F401
    import comfy.utils  # type: ignore  # noqa: F401
except Exception:  # standalone
    pass


# ComfyUI's modules when this process has loaded them - at import above, or later (the headless
# runner loads ComfyUI into its process when a workflow needs core nodes); None otherwise.
def _fp():
    return sys.modules.get("folder_paths")


def _mm():
    return sys.modules.get("comfy.model_management")


def _cu():
    return sys.modules.get("comfy.utils")


def in_comfyui() -> bool:
    """True when ComfyUI runs in this process (its model management is then used)."""
    return _mm() is not None and _fp() is not None


def __getattr__(name):
    if name == "IN_COMFYUI":
        return in_comfyui()
    raise AttributeError(name)

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# Folder kinds this pack reads. ``kinema/<system>`` folders are registered with ComfyUI.
KINEMA_SYSTEMS = ("follow_your_click", "motion_i2v", "dynamicrafter", "story_diffusion", "puppet_master")


class KinemaError(Exception):
    """A problem with a model file or the environment (not with a node's inputs)."""


class Interrupted(Exception):
    """Raised between steps when the user cancels (standalone runs)."""


def register_model_folders() -> None:
    """Register ``models/kinema/<system>``, and ``models/sams`` and ``models/animatediff_models``
    unless another pack did, with ComfyUI (no-op outside ComfyUI)."""
    if _fp() is None:
        return
    base = Path(_fp().models_dir) / "kinema"
    for system in KINEMA_SYSTEMS:
        key = f"kinema/{system}"
        path = str(base / system)
        if key in _fp().folder_names_and_paths:
            paths, exts = _fp().folder_names_and_paths[key]
            if path not in paths:
                paths.append(path)
        else:
            _fp().folder_names_and_paths[key] = ([path], set(MODEL_EXTENSIONS))
    for shared in ("sams", "animatediff_models"):  # also read by other packs, which may register them first
        if shared not in _fp().folder_names_and_paths:
            _fp().folder_names_and_paths[shared] = (
                [str(Path(_fp().models_dir) / shared)], set(MODEL_EXTENSIONS))


def models_dir() -> Path:
    if _fp() is not None:
        return Path(_fp().models_dir)
    return Path(os.environ.get("KINEMA_MODELS_DIR", "models")).resolve()


def list_models(folder: str) -> list[str]:
    """File names (relative to the folder) of model files in a model folder kind."""
    if _fp() is not None:
        try:
            return sorted(_fp().get_filename_list(folder))
        except Exception:
            return []
    root = models_dir() / folder
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)).replace(os.sep, "/") for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in MODEL_EXTENSIONS)


def _folder_hint(folder: str) -> str:
    return f"models/{folder}/"


def model_choices(folder: str) -> list[str]:
    """A loader's file choices: the files in a model folder kind, or one entry that says the
    folder is empty (choosing it gives a clear error)."""
    return list_models(folder) or [f"(no files in {_folder_hint(folder)})"]


def model_path(folder: str, name: str) -> Path:
    """Full path of ``name`` in model folder kind ``folder``; a clear error if absent."""
    if not name or (name.startswith("(no files in ") and name.endswith(")")):
        raise KinemaError(f"no model file chosen for '{folder}': put one in {_folder_hint(folder)} (ComfyUI's models "
                          f"folder), press R in ComfyUI to refresh the lists, and pick it")
    if _fp() is not None:
        full = _fp().get_full_path(folder, name)
        if full is None:
            paths = ", ".join(_fp().get_folder_paths(folder)) if folder in _fp().folder_names_and_paths else ""
            raise KinemaError(f"model file '{name}' not found in {_folder_hint(folder)}"
                              + (f" ({paths})" if paths else "") + "; put it there and press R to refresh")
        return Path(full)
    root = (models_dir() / folder).resolve()
    full = (root / name).resolve()
    if root not in full.parents or not full.is_file():
        raise KinemaError(f"model file '{name}' not found in {root}")
    return full


def input_dir() -> Path:
    if _fp() is not None:
        return Path(_fp().get_input_directory())
    return Path(os.environ.get("KINEMA_INPUT_DIR", "input")).resolve()


def output_dir() -> Path:
    if _fp() is not None:
        return Path(_fp().get_output_directory())
    return Path(os.environ.get("KINEMA_OUTPUT_DIR", "output")).resolve()


def temp_dir() -> Path:
    if _fp() is not None:
        return Path(_fp().get_temp_directory())
    return Path(os.environ.get("KINEMA_TEMP_DIR", "temp")).resolve()


DEVICE_HELP = "cpu, cuda, cuda:N, mps or xpu"


def parse_device(name: str, what: str = "device") -> torch.device:
    """A device name given by a person (``--device``, ``$KINEMA_DEVICE``) -> torch.device.

    Unknown names and devices this machine does not have are refused with a ValueError
    that names ``what`` and the choices."""
    text = str(name).strip().lower()
    m = re.fullmatch(r"(cpu|cuda|mps|xpu)(?::(\d+))?", text)
    if not m or (m.group(1) in ("cpu", "mps") and m.group(2) is not None):
        raise ValueError(f"{what}: {name!r} is not a device this pack can use; use {DEVICE_HELP}")
    kind, index = m.group(1), m.group(2)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what}: {name!r} asked for, but torch {torch.__version__} sees no CUDA GPU here; "
                             f"use cpu")
        if index is not None and int(index) >= torch.cuda.device_count():
            raise ValueError(f"{what}: {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif kind == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise ValueError(f"{what}: 'mps' asked for, but Apple's Metal (MPS) is not available here; use cpu")
    elif kind == "xpu":
        xpu = getattr(torch, "xpu", None)
        if xpu is None or not xpu.is_available():
            raise ValueError(f"{what}: {name!r} asked for, but torch sees no Intel XPU here; use cpu")
    return torch.device(text)


def device() -> torch.device:
    """The device heavy work runs on: ComfyUI's choice inside ComfyUI; outside it
    ``$KINEMA_DEVICE`` (checked by :func:`parse_device`) or the best available."""
    if _mm() is not None:
        return _mm().get_torch_device()
    name = os.environ.get("KINEMA_DEVICE")
    if name:
        return parse_device(name, "KINEMA_DEVICE")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def offload_device() -> torch.device:
    if _mm() is not None:
        return _mm().unet_offload_device()
    return torch.device("cpu")


def free_memory() -> None:
    """Give cached accelerator memory back (after a model is offloaded)."""
    if _mm() is not None:
        _mm().soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def available_memory() -> int | None:
    """Bytes of CPU memory this process can still take: the least of the system's available
    memory (``MemAvailable``), the cgroup's limit less its usage, and the address-space limit
    (``RLIMIT_AS``) less what the process has mapped. None where none of them can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            mapped = 0
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmSize:"):
                    mapped = int(line.split()[1]) * 1024
            found.append(soft - mapped)
    except (ImportError, OSError, ValueError):
        pass
    return max(min(found), 0) if found else None


def check_memory(need: int, what: str, lower: str) -> None:
    """Refuse work that needs more memory than is free, before allocating it: a ValueError
    that names ``what`` (the inputs), the figure, and ``lower`` (what to reduce)."""
    free = available_memory()
    if free is not None and need > free:
        gib = 2 ** 30
        raise ValueError(f"{what} needs about {need / gib:.1f} GB of memory, but only {free / gib:.1f} GB is "
                         f"free; {lower}")


@contextmanager
def one_thread():
    """Run the enclosed work on one torch thread, then restore the thread count. For the
    weights-free nodes: their many small tensor operations gain nothing from more threads, and
    on a busy machine waiting threads make them several times slower."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)
# ------------------------------------------------------------------------------------------
# models under ComfyUI's model management

class HeldModule(torch.nn.Module):
    """The module a ``ModelPatcher`` holds for a :class:`ManagedModel`: a plain container, so
    that ComfyUI can set its bookkeeping attributes (``device``, ...) whatever the wrapped
    class allows. ``kinema_name`` says what it is (shown in ComfyUI's log and listings)."""

    def __init__(self, module: torch.nn.Module, name: str):
        super().__init__()
        self.inner = module
        self.kinema_name = name

    def extra_repr(self) -> str:
        return self.kinema_name


def _castable_layers(module: torch.nn.Module) -> None:
    """Give plain torch layers ComfyUI's castable classes (same parameters, same forward), so
    that under ``--lowvram`` / ``--novram`` ComfyUI can keep their weights off the device and
    cast them per call, as it does for its own models. Only exact torch classes change."""
    ops = sys.modules["comfy.ops"].disable_weight_init
    kinds = {torch.nn.Linear: ops.Linear, torch.nn.Conv1d: ops.Conv1d, torch.nn.Conv2d: ops.Conv2d,
             torch.nn.Conv3d: ops.Conv3d, torch.nn.GroupNorm: ops.GroupNorm, torch.nn.LayerNorm: ops.LayerNorm,
             torch.nn.Embedding: ops.Embedding, torch.nn.ConvTranspose2d: ops.ConvTranspose2d}
    for m in module.modules():
        new = kinds.get(type(m))
        if new is not None:
            m.__class__ = new


def _place_uncast(patcher, device_to, *_args) -> None:
    """After ComfyUI loaded a model (maybe partly): put every tensor that it neither loaded
    nor casts per call on the device too (parameters of non-leaf modules such as learned
    queries or position tables, and buffers). They are small next to the layers."""
    if device_to is None:
        return
    for m in patcher.model.modules():
        cast = bool(getattr(m, "comfy_cast_weights", False))
        for name, p in m.named_parameters(recurse=False):
            if cast and name in ("weight", "bias"):
                continue
            if p.device != torch.device(device_to):
                p.data = p.data.to(device_to)
        for name, b in list(m.named_buffers(recurse=False)):
            if b is not None and b.device != torch.device(device_to):
                m._buffers[name] = b.to(device_to)


class ManagedModel:
    """One network of the pack under ComfyUI's model management.

    ``module`` is the network (any ``torch.nn.Module``); ``name`` says what it is; ``patcher``:
    the ModelPatcher that already holds ``module``, if one does (inside ComfyUI). Call
    :func:`load_models` right before using it: inside ComfyUI that is
    ``comfy.model_management.load_models_gpu`` on its ``ModelPatcher`` (``self.patcher``),
    which may first unload other models, or load this one only partly under ``--lowvram``
    (then its layers cast their weights per call); outside ComfyUI the module moves to
    :func:`device`. Run inputs on :attr:`device` - never on the device of the weights, which
    may still be the offload device in a partial load.
    """

    def __init__(self, module: torch.nn.Module, name: str, *, load_device=None, offload_device=None,
                 patcher=None):
        self.module = module.eval().requires_grad_(False)
        self.name = name
        self.patcher = None
        if patcher is not None:
            # ``module`` is already held by a ModelPatcher (e.g. a MODEL from :func:`comfy_model`):
            # the pack's code and ComfyUI's sampler then load the same weights through that one
            # patcher, and ComfyUI's bookkeeping of where they are stays right
            self.patcher = patcher
            self._load_device = patcher.load_device
        elif _mm() is not None:
            import comfy.model_patcher as patcher_module  # type: ignore
            _castable_layers(module)
            held = HeldModule(module, name)
            self.patcher = patcher_module.ModelPatcher(
                held, load_device=torch.device(load_device) if load_device is not None else _mm().get_torch_device(),
                offload_device=torch.device(offload_device) if offload_device is not None
                else _mm().unet_offload_device())
            self.patcher.add_callback(patcher_module.CallbacksMP.ON_LOAD, _place_uncast)
            self._load_device = self.patcher.load_device
        else:
            self._load_device = torch.device(load_device) if load_device is not None else device()

    @property
    def device(self) -> torch.device:
        """Where inputs go when the model runs."""
        return self._load_device

    @property
    def dtype(self) -> torch.dtype:
        for p in self.module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def __repr__(self) -> str:
        return f"ManagedModel({self.name}, {type(self.module).__name__}, device={self.device})"


def _patchers(models) -> list:
    """ModelPatchers of :class:`ManagedModel` objects and of ComfyUI's own model objects
    (MODEL = ModelPatcher; VAE, CLIP and CLIP_VISION carry ``.patcher``)."""
    out = []
    for m in models:
        if m is None:
            continue
        p = m.patcher if isinstance(m, ManagedModel) or hasattr(m, "patcher") else m
        if p is None:
            continue
        if hasattr(p, "get_nested_additional_models"):
            for extra in p.get_nested_additional_models():
                if extra not in out:
                    out.append(extra)
        if p not in out:
            out.append(p)
    return out


def load_models(*models, memory_required: int = 0) -> None:
    """Bring models to their device right before use.

    Inside ComfyUI: ``load_models_gpu`` with the models' patchers; ``memory_required`` (bytes)
    is the working memory the next step needs besides the weights, so ComfyUI frees that much
    first. Outside ComfyUI: each :class:`ManagedModel` moves to its device.
    """
    if _mm() is not None:
        patchers = _patchers(models)
        if patchers:
            _mm().load_models_gpu(patchers, memory_required=int(memory_required))
        return
    for m in models:
        if isinstance(m, ManagedModel):
            m.module.to(m.device)


def on_unload(model: ManagedModel, callback) -> None:
    """Call ``callback()`` whenever ComfyUI unloads ``model`` (memory pressure elsewhere on the
    device, "Unload models", "Free memory"). Does nothing outside ComfyUI."""
    if model.patcher is None:
        return
    from comfy.model_patcher import CallbacksMP  # type: ignore
    model.patcher.add_callback(CallbacksMP.ON_DETACH, lambda *_args: callback())


def on_sampling_end(model, callback) -> None:
    """Call ``callback()`` whenever a sampling of the MODEL ``model`` (a ComfyUI ModelPatcher) or
    of a clone of it ends, however it ends: to release what one run kept."""
    from comfy.patcher_extension import CallbacksMP  # type: ignore
    model.add_callback(CallbacksMP.ON_CLEANUP, lambda *_args: callback())


def queue_busy() -> bool:
    """True while ComfyUI is executing a prompt (False outside a ComfyUI server)."""
    found = prompt_server()
    if found is None:
        return False
    queue = getattr(found[0], "prompt_queue", None)
    if queue is None:
        return False
    running, _queued = queue.get_current_queue_volatile()
    return bool(running)


def inference_memory(latent_shape, dtype=torch.float16, factor: float = 1.0) -> int:
    """Working memory (bytes) a UNet step over a latent batch of ``latent_shape`` (N, C, h, w)
    roughly needs with memory-efficient attention; what :func:`load_models` is told to keep free
    besides the weights (ComfyUI estimates its own UNets the same way)."""
    n = int(latent_shape[0])
    area = n * int(torch.tensor(latent_shape[2:]).prod())
    size = torch.tensor([], dtype=dtype).element_size()
    return int(area * size * 0.01 * factor * 1024 * 1024)


def sample(model, noise: torch.Tensor, positive, negative, sigmas: torch.Tensor, cfg: float, *,
           latent: torch.Tensor | None = None, sampler: str = "euler", denoise_mask: torch.Tensor | None = None,
           seed: int = 0) -> torch.Tensor:
    """ComfyUI's own sampler over explicit ``sigmas`` (what ``SamplerCustom`` does): model
    patches, CFG, progress bar, latent previews and interrupt all come from ComfyUI.

    model: a MODEL; noise: (B, C, h, w) standard normal (ComfyUI scales it by the first sigma);
    positive / negative: CONDITIONING; latent: the starting latent in the VAE's space (zeros
    by default); denoise_mask: 1 where sampling may change the latent. Returns the sampled
    latent in the VAE's space. Needs ComfyUI.
    """
    if _mm() is None:
        raise KinemaError("this node samples with ComfyUI's own sampler: run it inside ComfyUI, or with the "
                          "headless runner where ComfyUI can be imported (COMFYUI_DIR)")
    import comfy.sample  # type: ignore
    import comfy.samplers  # type: ignore
    import latent_preview  # type: ignore

    if latent is None:
        latent = torch.zeros_like(noise)
    steps = max(len(sigmas) - 1, 1)
    callback = latent_preview.prepare_callback(model, steps)
    return comfy.sample.sample_custom(model, noise, float(cfg), comfy.samplers.sampler_object(sampler), sigmas,
                                      positive, negative, latent, noise_mask=denoise_mask, callback=callback,
                                      disable_pbar=not _cu().PROGRESS_BAR_ENABLED, seed=int(seed))


def _model_sampling(base: str, prediction: str, settings: dict):
    """An instance of ComfyUI's ``comfy.model_sampling.<base>`` schedule for ``prediction``
    ("eps" or "v") built from ``settings`` (its ``sampling_settings``)."""
    if _mm() is None:
        raise KinemaError("a ComfyUI noise schedule was asked for outside ComfyUI")
    import comfy.model_sampling as ms  # type: ignore

    kinds = {"eps": ms.EPS, "v": ms.V_PREDICTION}
    if prediction not in kinds:
        raise ValueError(f"prediction: {prediction!r} is not one of {', '.join(kinds)}")
    config = type("Settings", (), {"sampling_settings": dict(settings)})()
    return type(f"Kinema{base}", (getattr(ms, base), kinds[prediction]), {})(config)


def discrete_model_sampling(prediction: str = "eps", beta_schedule: str = "linear", linear_start: float = 0.00085,
                            linear_end: float = 0.012, zero_snr: bool = False, timesteps: int = 1000):
    """ComfyUI's discrete noise schedule object (``model_sampling``) for a model trained with
    another schedule than the one ComfyUI assumes for its base (set it with
    ``clone.add_object_patch("model_sampling", ...)``). ``beta_schedule`` uses ComfyUI's names:
    "linear" is diffusers' "scaled_linear", "sqrt_linear" is diffusers' "linear".
    ``prediction``: "eps" or "v". Needs ComfyUI."""
    return _model_sampling("ModelSamplingDiscrete", prediction, dict(
        beta_schedule=beta_schedule, linear_start=float(linear_start), linear_end=float(linear_end),
        timesteps=int(timesteps), zsnr=bool(zero_snr)))


class ComfyConds:
    """What a model's conditioning hook builds ComfyUI's per-sample conditions with (see
    :func:`comfy_model`): ``cross_attn`` for cross-attention context (batched and padded by
    ComfyUI), ``noise_shape`` for tensors laid out like the latent (cropped with areas),
    ``constant`` for anything passed as it is."""

    def __init__(self):
        import comfy.conds  # type: ignore
        self._c = comfy.conds

    def cross_attn(self, t):
        return self._c.CONDCrossAttn(t)

    def noise_shape(self, t):
        return self._c.CONDNoiseShape(t)

    def constant(self, value):
        return self._c.CONDConstant(value)

    def regular(self, t):
        """A tensor with one row per latent (repeated to the batch, concatenated across conds)."""
        return self._c.CONDRegular(t)


def comfy_model(diffusion_model: torch.nn.Module, name: str, model_sampling, *, conds=None,
                latent_format: str = "SD15", memory_usage_factor: float = 2.0, load_device=None,
                offload_device=None):
    """A ComfyUI MODEL (a ``ModelPatcher`` over a ``BaseModel``) around one of the pack's
    networks, so that ComfyUI's KSampler, SamplerCustomAdvanced, model patches, previews and
    model management work on it.

    ``diffusion_model`` is called as ComfyUI calls its UNets: ``(x, t, context=..., control=...,
    transformer_options=..., **extra)`` with x the model input (the noisy latent scaled for the
    noise level, with any ``c_concat`` channels appended), t the timestep, and ``extra`` what
    ``conds`` made; it must have a ``dtype`` attribute. ``model_sampling``: the noise schedule
    (e.g. :func:`discrete_model_sampling`). ``conds(kwargs, ComfyConds()) -> dict``: turns a
    CONDITIONING entry's dict (``kwargs``: its keys, plus ``cross_attn``, ``noise``, ``device``)
    into the model's inputs, e.g. ``{"c_crossattn": c.cross_attn(kwargs["cross_attn"])}``.
    ``latent_format``: the name of ComfyUI's latent format (previews, VAE scaling). Needs ComfyUI.
    """
    if _mm() is None:
        raise KinemaError("a ComfyUI MODEL was asked for outside ComfyUI")
    import comfy.latent_formats as lf  # type: ignore
    import comfy.model_base as mb  # type: ignore
    import comfy.model_patcher as mp  # type: ignore
    import comfy.supported_models_base as smb  # type: ignore

    class Config(smb.BASE):
        unet_config = {}
        unet_extra_config = {}

    config = Config({"disable_unet_model_creation": True})
    config.latent_format = getattr(lf, latent_format)()
    config.memory_usage_factor = memory_usage_factor
    kind = mb.ModelType.V_PREDICTION if "V_PREDICTION" in [b.__name__ for b in type(model_sampling).__mro__] \
        else mb.ModelType.EPS

    class KinemaModel(mb.BaseModel):
        def extra_conds(self, **kwargs):
            out = conds(kwargs, ComfyConds()) if conds is not None else {}
            if "c_crossattn" not in out and kwargs.get("cross_attn") is not None:
                out["c_crossattn"] = ComfyConds().cross_attn(kwargs["cross_attn"])
            return out

    _castable_layers(diffusion_model)
    base = KinemaModel(config, model_type=kind)
    base.diffusion_model = diffusion_model.eval().requires_grad_(False)
    base.model_sampling = model_sampling
    base.kinema_name = name
    patcher = mp.ModelPatcher(
        base, load_device=torch.device(load_device) if load_device is not None else _mm().get_torch_device(),
        offload_device=torch.device(offload_device) if offload_device is not None else _mm().unet_offload_device())
    patcher.add_callback(mp.CallbacksMP.ON_LOAD, _place_uncast)
    return patcher


def continuous_edm_sampling(prediction: str = "v", sigma_min: float = 0.002, sigma_max: float = 700.0,
                            sigma_data: float = 1.0):
    """ComfyUI's continuous EDM noise schedule (``model_sampling``; SVD's): timestep 0.25 ln sigma,
    input x / sqrt(sigma^2 + sigma_data^2). ``prediction``: "v" or "eps". Needs ComfyUI."""
    return _model_sampling("ModelSamplingContinuousEDM", prediction, dict(
        sigma_min=float(sigma_min), sigma_max=float(sigma_max), sigma_data=float(sigma_data)))


def add_injection(patcher, key: str, inject, eject) -> None:
    """Give a MODEL clone modules that are inserted when ComfyUI loads it (``inject(patcher)``)
    and taken out when it unloads it or loads another clone of the same model
    (``eject(patcher)``) - the motion-module lifecycle of AnimateDiff-style packs."""
    from comfy.patcher_extension import PatcherInjection  # type: ignore
    patcher.set_injections(key, [PatcherInjection(inject=inject, eject=eject)])


def comfy_vae(state_dict: dict, ddconfig: dict, embed_dim: int):
    """A ComfyUI VAE (what VAE Encode / VAE Decode take) from a KL autoencoder's weights:
    ``state_dict`` in the LDM layout or diffusers' (ComfyUI converts it), ``ddconfig`` the LDM
    encoder/decoder settings (``ch``, ``ch_mult``, ``num_res_blocks``, ``z_channels``, ...) and
    ``embed_dim`` the latent channels. The weights are copied. Needs ComfyUI."""
    if _mm() is None:
        raise KinemaError("a ComfyUI VAE was asked for outside ComfyUI")
    import comfy.sd  # type: ignore
    return comfy.sd.VAE(sd=state_dict, config={"params": {"ddconfig": dict(ddconfig), "embed_dim": int(embed_dim)}})


def comfy_sampler(function, **options):
    """A ComfyUI SAMPLER (what SamplerCustom / SamplerCustomAdvanced take) running
    ``function(model, x, sigmas, extra_args=None, callback=None, disable=None, **options)``
    with ComfyUI's sampler protocol: ``model(x, sigma * ones, **extra_args)`` gives the guided
    denoised latent, ``x`` arrives scaled by the first sigma, and ``callback({"x", "i",
    "sigma", "sigma_hat", "denoised"})`` after each step drives the progress bar, previews and
    interrupt. Needs ComfyUI."""
    if _mm() is None:
        raise KinemaError("a ComfyUI sampler was asked for outside ComfyUI")
    import comfy.samplers  # type: ignore
    return comfy.samplers.KSAMPLER(function, extra_options=dict(options))


def starts_from_max_noise(model, sigma: float) -> bool:
    """Whether ComfyUI's samplers treat ``sigma`` as the model's largest noise level (then they
    scale the starting noise by sqrt(1 + sigma^2) instead of sigma)."""
    import math
    sigma_max = float(model.get_model_object("model_sampling").sigma_max)
    return math.isclose(sigma_max, float(sigma), rel_tol=1e-05) or float(sigma) > sigma_max


def loaded_model_names() -> list[str]:
    """Names of the pack's models ComfyUI holds loaded now (newest first); [] outside ComfyUI."""
    if _mm() is None:
        return []
    names = []
    for lm in _mm().current_loaded_models:
        patcher = lm.model
        name = getattr(getattr(patcher, "model", None), "kinema_name", None)
        if name is not None:
            names.append(name)
    return names


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively: x86 with AMX-BF16 or AVX512-BF16 (torch's
    matrix kernels then run bf16 at about twice the fp32 rate, where other CPUs emulate it more
    slowly than fp32). Read from torch's own CPU probe, else from ``/proc/cpuinfo``."""
    probe = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", None)
    if probe is not None:
        try:
            caps = probe()
            return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))
        except Exception:  # noqa: BLE001  (an older or unusual build: ask the kernel instead)
            pass
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def _comfyui_precision_forced() -> bool:
    """Whether ComfyUI was started with an explicit model precision (``--fp32-unet``,
    ``--bf16-unet``, ``--force-fp32``, ...), which then decides."""
    cli = sys.modules.get("comfy.cli_args")
    args = getattr(cli, "args", None)
    names = ("fp32_unet", "fp64_unet", "bf16_unet", "fp16_unet", "fp8_e4m3fn_unet", "fp8_e5m2_unet",
             "fp8_e8m0fnu_unet", "force_fp32", "force_fp16")
    return args is not None and any(bool(getattr(args, n, False)) for n in names)


SEED_MAX = 0xFFFFFFFFFFFFFFFF  # ComfyUI's own seed maximum (KSampler's noise_seed); seeds wrap at it

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS = ("auto", *DTYPES)


def dtype_named(name, params: int = 0, what: str = "precision") -> torch.dtype:
    """The one map from a precision name to a dtype, for every loader: ``auto`` is
    :func:`default_dtype` for a model of ``params`` parameters; a ``torch.dtype`` passes through."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return default_dtype(params=params)
    if name not in DTYPES:
        raise ValueError(f"{what}: {name!r} is not one of {', '.join(PRECISIONS)}")
    return DTYPES[name]


def default_dtype(load_device=None, supported=(torch.float16, torch.bfloat16, torch.float32),
                  params: int = 0) -> torch.dtype:
    """The weight dtype a loader's "auto" picks for a model of ``params`` parameters on
    ``load_device`` (default: :func:`device`).

    - A CPU with native bf16 (:func:`cpu_has_native_bf16`): bf16, also inside ComfyUI, whose own
      choice is fp32 on every CPU; bf16 runs the pack's models 1.7-3x faster there and stays
      within tolerance of fp32 (tests/test_precision.py). A ComfyUI precision flag
      (``--fp32-unet``, ``--force-fp32``, ...) still wins.
    - Otherwise inside ComfyUI: its own choice (``unet_dtype``).
    - Otherwise fp16 (or bf16) on a GPU, fp16 on MPS, fp32 on other CPUs.
    """
    dev = torch.device(load_device) if load_device is not None else device()
    if (dev.type == "cpu" and torch.bfloat16 in supported and cpu_has_native_bf16()
            and not _comfyui_precision_forced()):
        return torch.bfloat16
    if _mm() is not None:
        return _mm().unet_dtype(device=dev, model_params=params, supported_dtypes=list(supported))
    if dev.type == "cuda":
        if torch.float16 in supported:
            return torch.float16
        if torch.bfloat16 in supported and torch.cuda.is_bf16_supported():
            return torch.bfloat16
    if dev.type == "mps" and torch.float16 in supported:
        return torch.float16
    return torch.float32


class OverTime(Exception):
    """Raised by :func:`check_interrupt` in work run under :func:`time_limit` once its time is up."""


# the deadline (time.monotonic()) of the work running in this thread or task, if it has one
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("kinema_deadline", default=None)


@contextlib.contextmanager
def time_limit(deadline: float):
    """Run the enclosed work against a deadline (a ``time.monotonic()`` value): from then on
    :func:`check_interrupt` raises :class:`OverTime`. Such work is not part of a prompt (a live
    preview answering an HTTP request), so there ComfyUI's interrupt flag, which belongs to the
    running prompt, is neither read nor cleared."""
    token = _DEADLINE.set(float(deadline))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def check_interrupt() -> None:
    """Raise if the user asked to stop (or, under :func:`time_limit`, if the time is up). Call
    between steps of long work."""
    deadline = _DEADLINE.get()
    if deadline is not None:
        if time.monotonic() > deadline:
            raise OverTime("the time for this work is up")
        return
    if _mm() is not None:
        _mm().throw_exception_if_processing_interrupted()


def draw_terminal_bar(desc: str, n: int, total: int, t0: float) -> None:
    """One line of a terminal progress bar on stderr (redrawn in place, ends at total)."""
    width = 24
    total = max(int(total), 1)
    n = min(int(n), total)
    done = int(width * n / total)
    dt = time.perf_counter() - t0
    sys.stderr.write(f"\r{desc}: [{'#' * done}{'.' * (width - done)}] {n}/{total} {dt:.1f}s")
    if n >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _terminal_progress() -> bool:
    return os.environ.get("KINEMA_PROGRESS", "1") != "0" and sys.stderr.isatty()


class ProgressBar:
    """ComfyUI's progress bar inside ComfyUI, a terminal bar outside.

    ``ProgressBar(total, desc)``; ``update(n=1)``. The terminal bar writes to stderr and
    only when ``KINEMA_PROGRESS`` is not ``0``.
    """

    def __init__(self, total: int, desc: str = "kinema"):
        self.total = max(int(total), 1)
        self.n = 0
        self.desc = desc
        self._comfy = _cu().ProgressBar(self.total) if _cu() is not None else None
        self._term = self._comfy is None and _terminal_progress()
        self._t0 = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n = min(self.n + n, self.total)
        if self._comfy is not None:
            self._comfy.update_absolute(self.n, self.total)
        elif self._term:
            draw_terminal_bar(self.desc, self.n, self.total, self._t0)


def prompt_server():
    """``(PromptServer.instance, aiohttp.web)`` inside a running ComfyUI server, else None.
    Set ``KINEMA_NO_ROUTES=1`` to keep the pack's HTTP routes off."""
    if _fp() is None or os.environ.get("KINEMA_NO_ROUTES") == "1":
        return None
    try:
        from server import PromptServer  # type: ignore
        from aiohttp import web  # type: ignore
    except Exception:
        return None
    instance = getattr(PromptServer, "instance", None)
    return None if instance is None else (instance, web)


# ---- ComfyUI's own nodes in a process that is not a ComfyUI server (the headless runner) ----

def comfyui_root() -> Path | None:
    """A ComfyUI checkout this process can import: ``$COMFYUI_DIR``, else one already on
    ``sys.path`` (a folder holding ``nodes.py``, ``folder_paths.py`` and ``comfy/``)."""
    def is_checkout(p: Path) -> bool:
        return (p / "nodes.py").is_file() and (p / "folder_paths.py").is_file() and (p / "comfy").is_dir()

    env = os.environ.get("COMFYUI_DIR")
    if env:
        return Path(env).resolve() if is_checkout(Path(env)) else None
    for entry in sys.path:
        if entry and is_checkout(Path(entry)):
            return Path(entry).resolve()
    return None


def _point_folders(fp, models: Path, inputs: Path, outputs: Path, temp: Path) -> None:
    """Point ComfyUI's ``folder_paths`` at these folders (in memory only): every model kind
    under ``models`` with the same sub-folder as in ComfyUI's own layout."""
    old = Path(fp.models_dir).resolve()
    for key, (paths, exts) in list(fp.folder_names_and_paths.items()):
        moved = []
        for p in paths:
            try:
                moved.append(str(models / Path(p).resolve().relative_to(old)))
            except ValueError:  # not under the models folder (e.g. custom_nodes)
                moved.append(p)
        fp.folder_names_and_paths[key] = (moved, exts)
    fp.models_dir = str(models)
    for kind in KINEMA_SYSTEMS:
        fp.folder_names_and_paths.setdefault(f"kinema/{kind}", ([str(models / "kinema" / kind)], set(MODEL_EXTENSIONS)))
    fp.folder_names_and_paths.setdefault("sams", ([str(models / "sams")], set(MODEL_EXTENSIONS)))
    for folder in (inputs, outputs, temp):  # ComfyUI's nodes list them (as ComfyUI makes them at start)
        folder.mkdir(parents=True, exist_ok=True)
    fp.set_input_directory(str(inputs))
    fp.set_output_directory(str(outputs))
    fp.set_temp_directory(str(temp))
    cache = getattr(fp, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.clear()


def load_comfyui_nodes(device_name: str | None = None, log=None) -> dict:
    """Import ComfyUI's ``nodes`` module (and its built-in extra nodes) into this process
    and return its ``NODE_CLASS_MAPPINGS``. The checkout is only read, never written (no
    bytecode caches; ComfyUI's base folder is under :func:`temp_dir`), and its folders are
    pointed at this pack's model / input / output / temp folders (:func:`models_dir`, ...)
    in memory. ``device_name`` (``cpu``, ``cuda:1``, ...) picks
    ComfyUI's device when ComfyUI is first imported here. Raises KinemaError when no
    checkout is importable or its imports fail."""
    root = comfyui_root()
    if root is None:
        where = os.environ.get("COMFYUI_DIR")
        raise KinemaError(f"COMFYUI_DIR={where} is not a ComfyUI checkout (no nodes.py, folder_paths.py, comfy/)"
                          if where else "ComfyUI is not importable: set COMFYUI_DIR to a ComfyUI checkout")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    # this process's folders, read before ComfyUI is imported (afterwards these functions answer
    # with ComfyUI's folders, which are then pointed at them)
    folders = (models_dir(), input_dir(), output_dir(), temp_dir())
    quiet = logging.root.manager.disable
    logging.disable(logging.WARNING)  # ComfyUI's import chatter (optional packages it lacks)
    sys.dont_write_bytecode = True  # no __pycache__ in the checkout, now or on later imports
    try:
        import comfy.options  # noqa: F401  (argument parsing stays off: ComfyUI's defaults)
        import comfy.cli_args as cli
        if "comfy.model_management" not in sys.modules:
            dev = parse_device(device_name, "--device") if device_name else None
            if dev is not None and dev.type == "cuda" and dev.index is not None:
                torch.cuda.set_device(dev.index)
            cli.args.cpu = (dev.type == "cpu") if dev is not None else not (
                torch.cuda.is_available() or (getattr(torch.backends, "mps", None) is not None
                                              and torch.backends.mps.is_available()))
        if "folder_paths" not in sys.modules and not getattr(cli.args, "base_directory", None):
            # ComfyUI makes its folders under the base folder when imported: ours, not the checkout
            cli.args.base_directory = str(folders[3] / "comfyui-base")
        import utils.extra_config  # noqa: F401  ComfyUI's `utils` package, before nodes.py shadows it
        import folder_paths
        import nodes
        failed = []
        if not any(str(getattr(c, "RELATIVE_PYTHON_MODULE", "")).startswith("comfy_extras.")
                   for c in nodes.NODE_CLASS_MAPPINGS.values()):
            failed = asyncio.run(nodes.init_builtin_extra_nodes()) or []
    except Exception as e:
        raise KinemaError(f"ComfyUI at {root} could not be imported into this Python ({type(e).__name__}: {e}); "
                          f"install its requirements here: {sys.executable} -m pip install -r "
                          f"{root / 'requirements.txt'}") from e
    finally:
        logging.disable(quiet)
    _point_folders(folder_paths, *folders)
    if log:
        version = ""
        try:
            import comfyui_version
            version = f" {comfyui_version.__version__}"
        except Exception:
            pass
        log(f"ComfyUI{version} from {root}: {len(nodes.NODE_CLASS_MAPPINGS)} core nodes"
            + (f" (not importable here: {', '.join(failed)})" if failed else ""))
    return dict(nodes.NODE_CLASS_MAPPINGS)


def is_comfyui_node(cls) -> bool:
    """True for a node class defined in the ComfyUI checkout (not this pack's, not a test's)."""
    root = comfyui_root()
    module = sys.modules.get(getattr(cls, "__module__", ""))
    path = getattr(module, "__file__", None)
    if root is None or not path:
        return False
    return root in Path(path).resolve().parents


class _RunnerServer:
    """What ComfyUI's executor talks to instead of its web server: node starts and their
    times go to ``log`` (one line each, as the standalone runner writes them)."""

    def __init__(self, log, types: dict):
        self.log = log
        self.types = types
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.running = None  # (node id, start time)

    def finish(self):
        if self.running is not None and self.log:
            nid, t0 = self.running
            self.log(f"[{nid}] done in {time.perf_counter() - t0:.2f}s")
        self.running = None

    def send_sync(self, event, data, sid=None):
        if event == "executing" and isinstance(data, dict) and data.get("node") is not None:
            self.finish()
            nid = str(data["node"])
            self.running = (nid, time.perf_counter())
            if self.log:
                self.log(f"[{nid}] {self.types.get(nid, '')}".rstrip())

    def send_progress_text(self, *args, **kwargs):
        pass


def execute_in_comfyui(prompt: dict, classes: dict, outputs: list[str], log=None) -> tuple[dict, dict | None]:
    """Run an API prompt with ComfyUI's own executor, in this process, with ``classes``
    ({node type: class}) standing in for ComfyUI's node table during the run (this pack's
    nodes and the runner's I/O nodes next to ComfyUI's). :func:`load_comfyui_nodes` first.

    Returns ``(ui, error)``: ``ui`` = {node id: UI dict} of the nodes that sent one, and
    ``error`` = None, or {"node_id", "node_type", "message", "type"} of the node that failed."""
    import comfy.utils
    import execution
    import nodes

    server = _RunnerServer(log, {k: v["class_type"] for k, v in prompt.items()})
    table = nodes.NODE_CLASS_MAPPINGS
    saved = dict(table)
    bars = {}

    def progress(value, total, preview=None, prompt_id=None, node_id=None):
        if _terminal_progress():
            key = node_id or server.last_node_id
            t0 = bars.setdefault(key, time.perf_counter())
            draw_terminal_bar(f"[{key}]", value, total, t0)

    def no_executor_traceback(record):  # the failing node comes back as `error`, said once
        return not (record.levelno >= logging.ERROR and Path(record.pathname).name == "execution.py")

    previous_hook = getattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    comfy.utils.set_progress_bar_global_hook(progress)
    logging.root.addFilter(no_executor_traceback)
    table.clear()
    table.update(classes)
    try:
        ex = execution.PromptExecutor(server)
        ex.execute(prompt, uuid.uuid4().hex, {"client_id": "kinema-runner"}, list(outputs))
        if ex.success:
            server.finish()
    finally:
        table.clear()
        table.update(saved)
        logging.root.removeFilter(no_executor_traceback)
        comfy.utils.set_progress_bar_global_hook(previous_hook)
    error = None
    for event, data in ex.status_messages:
        if event == "execution_error":
            error = {"node_id": str(data.get("node_id")), "node_type": data.get("node_type"),
                     "message": str(data.get("exception_message", "")).strip(),
                     "type": str(data.get("exception_type", ""))}
        elif event == "execution_interrupted":
            error = {"node_id": str(data.get("node_id")), "node_type": data.get("node_type"),
                     "message": "interrupted", "type": "Interrupted"}
    return dict(ex.history_result.get("outputs", {})), error
