"""Load the repository root as the package ``kinema``, the way ComfyUI loads a custom-node
folder (by path, under whatever name the folder has), so tests import ``kinema.*``."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("KINEMA_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KINEMA_PROGRESS", "0")


def _load_pack():
    if "kinema" in sys.modules:
        return sys.modules["kinema"]
    spec = importlib.util.spec_from_file_location("kinema", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kinema"] = mod
    spec.loader.exec_module(mod)
    return mod


_load_pack()


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
