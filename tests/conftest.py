"""Load the repository root as the package ``kinema``, the way ComfyUI loads a custom-node
folder (by path, under whatever name the folder has), so tests import ``kinema.*``.

Two kinds of test process (``scripts/test`` runs both):

- the standalone suite (``tests/``, without ``tests/comfyui``): the pack as the headless
  runner and scripts use it, no ComfyUI in the process;
- the ComfyUI suite (``tests/comfyui``, with ``KINEMA_IN_COMFYUI=1``): a real ComfyUI
  (``COMFYUI_DIR``) is imported first, exactly as when ComfyUI loads the pack, so the pack
  runs under ComfyUI's model management, and its core loaders and samplers are at hand.

``KINEMA_REQUIRE_ALL=1`` (set by CI) turns every skip - missing fixtures, no ComfyUI, no
browser, a package not installed - into a failure, except for tests marked ``hardware``
(they need a GPU, which CI does not have).
"""
import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("KINEMA_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"
REQUIRE_ALL = os.environ.get("KINEMA_REQUIRE_ALL") == "1"
IN_COMFYUI = os.environ.get("KINEMA_IN_COMFYUI") == "1"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KINEMA_PROGRESS", "0")


def comfyui_dir() -> Path | None:
    d = os.environ.get("COMFYUI_DIR")
    return Path(d).resolve() if d else None


def _import_comfyui() -> None:
    """Import ComfyUI from ``COMFYUI_DIR`` the way its ``main.py`` prepares it (CPU, a temporary
    base folder for models/input/output, no argument parsing), before the pack is loaded."""
    cdir = comfyui_dir()
    if cdir is None or not (cdir / "comfy").is_dir():
        raise RuntimeError(f"KINEMA_IN_COMFYUI=1 needs COMFYUI_DIR pointing at a ComfyUI checkout "
                           f"(got {os.environ.get('COMFYUI_DIR')!r})")
    if str(cdir) not in sys.path:
        sys.path.insert(0, str(cdir))
    from comfy.cli_args import args
    args.cpu = True
    args.base_directory = os.environ.get("KINEMA_COMFYUI_BASE")
    if not args.base_directory:
        # the session's own folder: its model files are links to gigabyte-sized tiny checkpoints,
        # which would outlive pytest's own temporary folders if this one stayed behind
        args.base_directory = tempfile.mkdtemp(prefix="kinema-comfyui-")
        atexit.register(shutil.rmtree, args.base_directory, ignore_errors=True)
    for sub in ("models", "input", "output", "temp", "user", "custom_nodes"):
        Path(args.base_directory, sub).mkdir(parents=True, exist_ok=True)
    import folder_paths  # noqa: F401  (reads args.base_directory)
    import comfy.model_management  # noqa: F401


def _load_pack():
    if "kinema" in sys.modules:
        return sys.modules["kinema"]
    spec = importlib.util.spec_from_file_location("kinema", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kinema"] = mod
    spec.loader.exec_module(mod)
    return mod


if IN_COMFYUI:
    _import_comfyui()
_load_pack()


def _no_skip(report, hardware: bool) -> None:
    if REQUIRE_ALL and report.skipped and not hardware:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but KINEMA_REQUIRE_ALL=1 requires it to run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _no_skip(outcome.get_result(), item.get_closest_marker("hardware") is not None)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _no_skip(outcome.get_result(), False)


@pytest.fixture(scope="session")
def fixtures_dir():
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES} (set KINEMA_SHARED)")
    return FIXTURES


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (small tensors are faster so), then restore the count.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
