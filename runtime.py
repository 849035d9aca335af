"""The one place that talks to ComfyUI.

Inside ComfyUI this module uses ``folder_paths``, ``comfy.model_management`` and
``comfy.utils``; outside it (tests, the headless runner, scripts) it falls back to plain
equivalents:

- model folders under ``$KINEMA_MODELS_DIR`` (default ``./models``), one sub-folder per
  kind (``sams``, ``checkpoints``, ``animatediff_models``, ``kinema/<system>``);
- the best available torch device (CUDA, then MPS, then CPU), or ``$KINEMA_DEVICE``;
- a terminal progress bar;
- interrupts through :class:`Interrupted`, raised by :func:`check_interrupt`.

Every other module imports from here, never from ComfyUI.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

try:  # inside ComfyUI
    import folder_paths as _folder_paths  # type: ignore
    import comfy.model_management as _mm  # type: ignore
    import comfy.utils as _comfy_utils  # type: ignore
except Exception:  # standalone
    _folder_paths = None
    _mm = None
    _comfy_utils = None

IN_COMFYUI = _folder_paths is not None

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# Folder kinds this pack reads. ``kinema/<system>`` folders are registered with ComfyUI.
KINEMA_SYSTEMS = ("follow_your_click", "motion_i2v", "dynamicrafter", "story_diffusion", "puppet_master")


class KinemaError(Exception):
    """A problem with a model file or the environment (not with a node's inputs)."""


class Interrupted(Exception):
    """Raised between steps when the user cancels (standalone runs)."""


def register_model_folders() -> None:
    """Register ``models/kinema/<system>`` with ComfyUI (no-op outside ComfyUI)."""
    if _folder_paths is None:
        return
    base = Path(_folder_paths.models_dir) / "kinema"
    for system in KINEMA_SYSTEMS:
        key = f"kinema/{system}"
        path = str(base / system)
        if key in _folder_paths.folder_names_and_paths:
            paths, exts = _folder_paths.folder_names_and_paths[key]
            if path not in paths:
                paths.append(path)
        else:
            _folder_paths.folder_names_and_paths[key] = ([path], set(MODEL_EXTENSIONS))
    if "sams" not in _folder_paths.folder_names_and_paths:
        _folder_paths.folder_names_and_paths["sams"] = (
            [str(Path(_folder_paths.models_dir) / "sams")], set(MODEL_EXTENSIONS))


def models_dir() -> Path:
    if _folder_paths is not None:
        return Path(_folder_paths.models_dir)
    return Path(os.environ.get("KINEMA_MODELS_DIR", "models")).resolve()


def list_models(folder: str) -> list[str]:
    """File names (relative to the folder) of model files in a model folder kind."""
    if _folder_paths is not None:
        try:
            return sorted(_folder_paths.get_filename_list(folder))
        except Exception:
            return []
    root = models_dir() / folder
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)).replace(os.sep, "/") for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in MODEL_EXTENSIONS)


def model_path(folder: str, name: str) -> Path:
    """Full path of ``name`` in model folder kind ``folder``; a clear error if absent."""
    if not name:
        raise KinemaError(f"no model file chosen for '{folder}': put one in models/{folder}/ and pick it")
    if _folder_paths is not None:
        full = _folder_paths.get_full_path(folder, name)
        if full is None:
            raise KinemaError(f"model file '{name}' not found in models/{folder}/")
        return Path(full)
    root = (models_dir() / folder).resolve()
    full = (root / name).resolve()
    if root not in full.parents or not full.is_file():
        raise KinemaError(f"model file '{name}' not found in {root}")
    return full


def input_dir() -> Path:
    if _folder_paths is not None:
        return Path(_folder_paths.get_input_directory())
    return Path(os.environ.get("KINEMA_INPUT_DIR", "input")).resolve()


def output_dir() -> Path:
    if _folder_paths is not None:
        return Path(_folder_paths.get_output_directory())
    return Path(os.environ.get("KINEMA_OUTPUT_DIR", "output")).resolve()


def temp_dir() -> Path:
    if _folder_paths is not None:
        return Path(_folder_paths.get_temp_directory())
    return Path(os.environ.get("KINEMA_TEMP_DIR", "temp")).resolve()


def device() -> torch.device:
    """The device heavy work runs on."""
    if _mm is not None:
        return _mm.get_torch_device()
    name = os.environ.get("KINEMA_DEVICE")
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def offload_device() -> torch.device:
    if _mm is not None:
        return _mm.unet_offload_device()
    return torch.device("cpu")


def free_memory() -> None:
    """Give cached accelerator memory back (after a model is offloaded)."""
    if _mm is not None:
        _mm.soft_empty_cache()
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


def check_interrupt() -> None:
    """Raise if the user asked to stop. Call between steps of long work."""
    if _mm is not None:
        _mm.throw_exception_if_processing_interrupted()


class ProgressBar:
    """ComfyUI's progress bar inside ComfyUI, a terminal bar outside.

    ``ProgressBar(total, desc)``; ``update(n=1)``. The terminal bar writes to stderr and
    only when ``KINEMA_PROGRESS`` is not ``0``.
    """

    def __init__(self, total: int, desc: str = "kinema"):
        self.total = max(int(total), 1)
        self.n = 0
        self.desc = desc
        self._comfy = _comfy_utils.ProgressBar(self.total) if _comfy_utils is not None else None
        self._term = self._comfy is None and os.environ.get("KINEMA_PROGRESS", "1") != "0" and sys.stderr.isatty()
        self._t0 = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n = min(self.n + n, self.total)
        if self._comfy is not None:
            self._comfy.update_absolute(self.n, self.total)
        elif self._term:
            width = 24
            done = int(width * self.n / self.total)
            dt = time.perf_counter() - self._t0
            sys.stderr.write(f"\r{self.desc}: [{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} {dt:.1f}s")
            if self.n >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def prompt_server():
    """``(PromptServer.instance, aiohttp.web)`` inside a running ComfyUI server, else None.
    Set ``KINEMA_NO_ROUTES=1`` to keep the pack's HTTP routes off."""
    if _folder_paths is None or os.environ.get("KINEMA_NO_ROUTES") == "1":
        return None
    try:
        from server import PromptServer  # type: ignore
        from aiohttp import web  # type: ignore
    except Exception:
        return None
    instance = getattr(PromptServer, "instance", None)
    return None if instance is None else (instance, web)
