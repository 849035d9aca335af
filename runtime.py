"""The one place that talks to ComfyUI.

Inside ComfyUI this module uses ``folder_paths``, ``comfy.model_management`` and
``comfy.utils``; outside it (tests, the headless runner, scripts) it falls back to plain
equivalents:

- model folders under ``$KINEMA_MODELS_DIR`` (default ``./models``), one sub-folder per
  kind (``sams``, ``checkpoints``, ``animatediff_models``, ``kinema/<system>``);
- the best available torch device (CUDA, then MPS, then CPU), or ``$KINEMA_DEVICE``;
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
import logging
import os
import re
import sys
import time
import uuid
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
    if _mm is not None:
        return _mm.get_torch_device()
    name = os.environ.get("KINEMA_DEVICE")
    if name:
        return parse_device(name, "KINEMA_DEVICE")
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


def check_interrupt() -> None:
    """Raise if the user asked to stop. Call between steps of long work."""
    if _mm is not None:
        _mm.throw_exception_if_processing_interrupted()


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
        self._comfy = _comfy_utils.ProgressBar(self.total) if _comfy_utils is not None else None
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
    if _folder_paths is None or os.environ.get("KINEMA_NO_ROUTES") == "1":
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
            cli.args.base_directory = str(temp_dir() / "comfyui-base")
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
    _point_folders(folder_paths, models_dir(), input_dir(), output_dir(), temp_dir())
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
