"""Reading model files safely: safetensors, or torch pickles with ``weights_only=True`` (no code
from a model file is ever executed). Shared by every system's loader."""
from __future__ import annotations

from pathlib import Path

import torch

from ..runtime import KinemaError


def read_state_dict(path, prefixes: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` / ``.ckpt`` / ``.bin`` / ``.pt`` / ``.pth`` file.

    A dict nested under ``state_dict`` is unwrapped and ``module.`` prefixes are stripped.
    ``prefixes``: keep only keys starting with one of them (safetensors files then read only
    those tensors, so a part of a large file costs only its own size).
    Errors (``KinemaError``) name the file and say what was found.
    """
    path = Path(path)
    if not path.is_file():
        raise KinemaError(f"{path}: file not found")
    kind = "safetensors" if path.suffix.lower() == ".safetensors" else "a torch checkpoint"
    try:
        if kind == "safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as fh:
                sd = {k: fh.get_tensor(k) for k in fh.keys() if prefixes is None or k.startswith(prefixes)}
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or not a weights file
        raise KinemaError(f"{path.name}: could not be read as {kind} ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise KinemaError(f"{path.name}: expected a mapping of tensor names to tensors, found {type(sd).__name__}")
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}
    if prefixes is not None:
        sd = {k: v for k, v in sd.items() if k.startswith(prefixes)}
    return sd
