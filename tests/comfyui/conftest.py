"""Fixtures for the suite against a real ComfyUI.

These tests run in a process that imported ComfyUI before the pack (``KINEMA_IN_COMFYUI=1``
with ``COMFYUI_DIR``; ``scripts/test`` starts it), and start real ComfyUI servers. In any other
process they skip - and fail under ``KINEMA_REQUIRE_ALL=1``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import server_files  # noqa: E402

IN_COMFYUI = os.environ.get("KINEMA_IN_COMFYUI") == "1"


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.comfyui)
            if not IN_COMFYUI:
                item.add_marker(pytest.mark.skip(
                    reason="needs a ComfyUI process: run scripts/test (or KINEMA_IN_COMFYUI=1 COMFYUI_DIR=... "
                           "pytest tests/comfyui), see docs/testing.md"))


@pytest.fixture(scope="session")
def model_files(tmp_path_factory):
    """A models folder with a tiny file under every name the example workflows use."""
    return server_files.make(tmp_path_factory.mktemp("model-files"))


@pytest.fixture(scope="session")
def comfy(tmp_path_factory, model_files):
    cdir = harness.comfyui_dir()
    if cdir is None:
        pytest.skip("COMFYUI_DIR is not set (see docs/testing.md, 'Against a real ComfyUI')")
    if not (cdir / "main.py").is_file():
        pytest.skip(f"COMFYUI_DIR={cdir} holds no main.py")
    py = harness.comfyui_python(cdir)
    server = harness.ComfyServer(cdir, py, tmp_path_factory.mktemp("comfyui-base"))
    server_files.link_into(model_files, server.base / "models")
    server.start()
    yield server
    server.stop()
    # keep the server log with the screenshots
    out = harness.ROOT / "test-artifacts" / "comfyui"
    out.mkdir(parents=True, exist_ok=True)
    (out / "comfyui.log").write_text(server.log())


@pytest.fixture(scope="session")
def object_info(comfy):
    return comfy.get("/object_info", timeout=120)


@pytest.fixture(scope="session")
def workflows():
    return sorted((harness.ROOT / "workflows").glob("*.json"))


def load_json(p: Path) -> dict:
    return json.loads(p.read_text())


@pytest.fixture(scope="session")
def models_dir():
    """ComfyUI's models folder in this process (a temporary base folder, see tests/conftest.py)."""
    import folder_paths
    return Path(folder_paths.models_dir)


@pytest.fixture(scope="session")
def tiny_sd15(models_dir):
    """File name (in models/checkpoints) of a tiny SD1.5 checkpoint ComfyUI's loaders accept."""
    import tiny_models
    tiny_models.sd15_checkpoint(models_dir / "checkpoints" / "tiny_sd15.safetensors")
    return "tiny_sd15.safetensors"


@pytest.fixture(scope="session")
def sd15_core(tiny_sd15):
    """(MODEL, CLIP, VAE) of the tiny SD1.5 file from ComfyUI's own CheckpointLoaderSimple."""
    import nodes
    return nodes.CheckpointLoaderSimple().load_checkpoint(tiny_sd15)[:3]
