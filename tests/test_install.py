"""Installing the pack: the requirements never move a user's torch, pyproject agrees with
requirements.txt, and the supported Python is one every resolved dependency accepts.

The resolve test asks pip itself (``pip install --dry-run --report``, with this machine's pip
configuration and indexes) what ``pip install -r requirements.txt`` would do in an environment
that has only torch and torchvision of a given version. The environment is a bare virtualenv
holding just the two packages' metadata, so no torch wheel is downloaded: pip has to fetch
torch only if something asks for another version, and then the test fails anyway."""
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import torchvision
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
CURRENT = (torch.__version__.split("+")[0], torchvision.__version__.split("+")[0])
# torch and the torchvision release made for it
TORCHES = [("2.4.1", "0.19.1"), ("2.5.1", "0.20.1"), CURRENT]


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def _fake_install(site: Path, name: str, version: str, requires=()) -> None:
    """What pip sees of an installed distribution: its metadata."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    meta = [f"Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(meta) + "\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


@pytest.fixture(scope="module")
def resolved(tmp_path_factory):
    """{torch version: pip's install report} for each environment in TORCHES."""
    out = {}
    for tv, tvv in TORCHES:
        env = tmp_path_factory.mktemp(f"torch-{tv}")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
        site = next(env.glob("lib/python3*/site-packages"))
        _fake_install(site, "torch", tv)
        _fake_install(site, "torchvision", tvv, [f"torch=={tv}"])
        report = env / "report.json"
        r = subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install",
                            "--dry-run", "--quiet", "--report", str(report), "-r", str(ROOT / "requirements.txt")],
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"pip could not resolve requirements.txt next to torch {tv}:\n{r.stderr[-3000:]}"
        out[tv] = json.loads(report.read_text())["install"]
    return out


@pytest.mark.parametrize("torch_version", [t for t, _ in TORCHES])
def test_requirements_leave_torch_alone(resolved, torch_version):
    install = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in resolved[torch_version]}
    moved = {k: v for k, v in install.items() if k in ("torch", "torchvision", "torchaudio") or k.startswith("nvidia-")}
    assert not moved, f"with torch {torch_version} installed, pip would install {moved}"
    # every package of ours is there (nothing resolved away)
    for req in _requirements():
        name = Requirement(req).name.lower().replace("_", "-")
        assert name in install, (name, sorted(install))


def test_supported_python_is_accepted_by_every_resolved_package(resolved):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lowest = SpecifierSet(project["requires-python"])
    assert str(lowest) == ">=3.11"
    for install in resolved.values():
        for item in install:
            needs = item["metadata"].get("requires_python")
            if needs:
                assert SpecifierSet(needs).contains("3.11"), (item["metadata"]["name"], needs)


def test_pyproject_lists_the_requirements():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert sorted(data["project"]["dependencies"]) == sorted(_requirements())
    comfy = data["tool"]["comfy"]
    assert comfy["Icon"].endswith("/assets/icon.png") and (ROOT / "assets" / "icon.png").is_file()
    assert comfy["requires-comfyui"].startswith(">=")


def test_setup_refuses_an_old_python_and_says_which(tmp_path):
    """scripts/setup on a fresh clone with Python 3.10: a clear message, no .venv made."""
    import shutil
    import subprocess
    repo = tmp_path / "kinema"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup", repo / "scripts" / "setup")
    for name in ("requirements.txt", "requirements-dev.txt"):
        shutil.copy(ROOT / name, repo / name)
    old = tmp_path / "python3.10"
    old.write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then exit 1; fi\necho "Python 3.10.12"\n')
    old.chmod(0o755)
    r = subprocess.run(["bash", str(repo / "scripts" / "setup")], env={"PATH": "/usr/bin:/bin", "PYTHON": str(old)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "Python 3.10.12 is too old" in r.stderr and "3.11 or newer" in r.stderr, r.stderr
    assert not (repo / ".venv").exists()
