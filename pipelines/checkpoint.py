"""Reading model files safely: safetensors, or torch pickles with ``weights_only=True`` (no code
from a model file is ever executed). The one reader of every system's loader.

A file that cannot be read gives a :class:`~..runtime.KinemaError` in the pack's own words:
the file and its folder, what is wrong with it, what was expected there and what to do.
torch's own text (its advice about ``weights_only``, its requests to file an issue) never
reaches the user: the cause is recognised and said plainly instead.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from ..runtime import KinemaError

ANY_MODEL = "a model file: .safetensors, or a torch checkpoint (.ckpt, .pt, .pth, .bin) of tensors"
FETCH_AGAIN = "download it again from its official source (an interrupted download or copy is the usual cause)"
ZIP_MAGIC = b"PK\x03\x04"


def where(path: Path) -> str:
    """How messages name a file: its name and its folder."""
    return f"'{path.name}' in {path.parent}"


def _global_named(text: str) -> str | None:
    """The Python object a refused pickle asks for (``posix.system``), from torch's message."""
    m = re.search(r"GLOBAL\s+([\w.]+)", text)
    return m.group(1) if m else None


def unreadable(path, error: BaseException, expected: str = ANY_MODEL) -> KinemaError:
    """The error for a model file whose reader failed with ``error``: what is wrong, said in
    the pack's words (never the reader's own text), the file, its folder, what was expected
    and what to do."""
    path = Path(path)
    text = str(error)
    size = path.stat().st_size if path.is_file() else 0
    name = f"'{path.name}' ({size:,} bytes) in {path.parent}"
    refused = _global_named(text)
    if refused:
        return KinemaError(
            f"{name} was not loaded: besides tensors it holds a Python object ({refused}) that would run code "
            f"when read, so it is not a plain weights file. Nothing from it was run. Expected {expected}: use "
            f"the file from its official source (or a .safetensors copy) and remove this one from the folder.")
    if path.suffix.lower() == ".safetensors":
        detail = text.split("deserializing header:", 1)[1].strip() if "deserializing header:" in text else ""
        what = "it is not a valid safetensors file" + (f" (its header: {detail[:80]})" if detail else
                                                        " (damaged or cut off)")
    elif isinstance(error, EOFError) or "central directory" in text or "end of file" in text.lower():
        what = "it ends too early (the file is cut off)"
    elif "zip archive" in text or "PytorchStreamReader" in text or "inline_container" in text:
        what = "it starts like a torch checkpoint (a zip archive), but its contents are damaged"
    elif _head(path) == b"\x80":
        what = ("it is a Python pickle that is not a plain torch checkpoint of tensors (the safe reader refuses "
                "it; nothing from it was run)")
    else:
        what = "it is neither a torch checkpoint of tensors nor a safetensors file"
    return KinemaError(f"{name} could not be read: {what}. Expected {expected}; {FETCH_AGAIN}, or remove it "
                       f"from the folder.")


def _head(path: Path, n: int = 1) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""


def _load_pickle(path: Path, mmap: bool):
    is_zip = _head(path, 4) == ZIP_MAGIC
    with warnings.catch_warnings():  # torch warns about pickle protocols and asks to file issues
        warnings.simplefilter("ignore")
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap and is_zip)


def _unwrap(data):
    """A state dict nested under ``state_dict`` (LDM / Lightning) or ``model`` (some
    segment-anything copies), at most three levels deep."""
    for _ in range(3):
        if not isinstance(data, dict):
            break
        if isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        elif isinstance(data.get("model"), dict) and not any(isinstance(v, torch.Tensor) for v in data.values()):
            data = data["model"]
        else:
            break
    return data


def summarize_keys(keys, limit: int = 6) -> str:
    """Key groups of a mapping, for messages: ``encoder.down.* (12), decoder.up.* (9), ...``."""
    groups: dict[str, int] = {}
    whole = set()  # groups that are a key of their own
    for k in keys:
        parts = str(k).split(".")
        prefix = ".".join(parts[:2]) if len(parts) > 2 else parts[0]
        groups[prefix] = groups.get(prefix, 0) + 1
        if prefix == str(k):
            whole.add(prefix)
    items = sorted(groups.items(), key=lambda kv: -kv[1])
    text = ", ".join(p if (n == 1 and p in whole) else f"{p}.* ({n})" for p, n in items[:limit])
    if len(items) > limit:
        text += f", and {len(items) - limit} more groups"
    return text or "no keys"


def _existing(path, expected: str) -> Path:
    """``path`` as a Path, or a KinemaError if it is missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise KinemaError(f"{where(path)}: file not found. Expected {expected}.")
    if path.stat().st_size == 0:
        raise KinemaError(f"{where(path)} is empty (0 bytes). Expected {expected}; {FETCH_AGAIN}.")
    return path


def read_state_dict(path, prefixes: tuple[str, ...] | None = None, *, expected: str = ANY_MODEL,
                    mmap: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` / ``.ckpt`` / ``.bin`` / ``.pt`` / ``.pth`` file.

    A dict nested under ``state_dict`` or ``model`` is unwrapped, a ``module.`` prefix on every
    key is stripped, and entries that are not tensors (epoch counters, ...) are left out.
    ``prefixes``: keep only keys starting with one of them (safetensors files then read only
    those tensors, so a part of a large file costs only its own size). ``expected``: what the
    file should be, for messages. ``mmap``: map a zip-format torch checkpoint instead of reading
    it (for files of many gigabytes).
    Errors (``KinemaError``) name the file and its folder and say what was found.
    """
    path = _existing(path, expected)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as fh:
                names = list(fh.keys())
                if not names:
                    raise KinemaError(f"{where(path)} holds no tensors. Expected {expected}.")
                data = {k: fh.get_tensor(k) for k in names if prefixes is None or k.startswith(prefixes)}
                if not data:
                    return {}
        else:
            data = _load_pickle(path, mmap)
    except KinemaError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt, truncated, refused, or not a weights file
        raise unreadable(path, e, expected) from None
    data = _unwrap(data)
    if not isinstance(data, dict):
        raise KinemaError(f"{where(path)} holds a {type(data).__name__}, not a mapping of tensor names to tensors. "
                          f"Expected {expected}.")
    if data and all(str(k).startswith("module.") for k in data):
        data = {str(k)[len("module."):]: v for k, v in data.items()}
    sd = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise KinemaError(f"{where(path)} holds no tensors (keys: {summarize_keys(data.keys())}). Expected {expected}.")
    if prefixes is not None:
        sd = {k: v for k, v in sd.items() if k.startswith(prefixes)}
    return sd


def read_header(path, expected: str = ANY_MODEL) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(metadata, tensor name -> shape) of a ``.safetensors`` file, from its header only (no
    tensor is read, so a large file can be checked before it is loaded)."""
    path = _existing(path, expected)
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {}), {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise unreadable(path, e, expected) from None


# ----------------------------------------------------------------------------- strict key checks

CHECK_ADVICE = ("Use the file as released for this model: a file of another model, another model size or a "
                "partial copy does not fit")


def _shape(v) -> tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def key_mismatch(expected: dict, found: dict, allow_missing: tuple[str, ...] = ()) -> str:
    """What differs between two layouts (name -> tensor, ``torch.Size`` or shape tuple): missing
    keys (except those starting with ``allow_missing``), unexpected keys and keys of other shapes,
    each counted with a few examples in ``expected``'s order; "" when they match."""
    missing = [k for k in expected if k not in found and not k.startswith(allow_missing)]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k}: found {_shape(found[k])}, expected {_shape(expected[k])}"
              for k in expected if k in found and _shape(found[k]) != _shape(expected[k])]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} with other shapes (e.g. {shapes[0]})")
    return "; ".join(parts)


def check_keys(expected: dict, found: dict, what: str, *, allow_missing: tuple[str, ...] = (),
               advice: str = CHECK_ADVICE) -> None:
    """The one strict key check of every loader: a :class:`KinemaError` unless ``found`` has
    exactly ``expected``'s keys and shapes. ``what`` names the file (and the part of it, e.g.
    ``"'model.ckpt' (VAE)"``); ``advice`` says what to do."""
    detail = key_mismatch(expected, found, allow_missing)
    if detail:
        raise KinemaError(f"{what}: does not match the expected layout: {detail}. {advice}.")


def load_strict(module: torch.nn.Module, sd: dict, what: str, *, advice: str = CHECK_ADVICE) -> torch.nn.Module:
    """Check ``sd`` against ``module``'s state dict (:func:`check_keys`; the module is usually
    built on the meta device, so nothing is allocated before the file is known to fit), then load
    it strictly, taking over the tensors. Non-persistent CLIP ``position_ids`` buffers, which no
    file needs to carry, are rebuilt; any other tensor left on the meta device is an error."""
    check_keys(module.state_dict(), sd, what, advice=advice)
    module.load_state_dict(sd, strict=True, assign=True)
    for mod_name, mod in module.named_modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_meta and name == "position_ids":
                mod._buffers[name] = torch.arange(buf.shape[-1]).expand(buf.shape)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers())
            if t.is_meta and n not in sd]
    if left:
        raise KinemaError(f"{what}: left {len(left)} tensors unset (e.g. {left[0]})")
    return module
