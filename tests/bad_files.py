"""Bad model files, for the tests of the model-file reader (tests/test_checkpoint.py) and of every
loader in a real ComfyUI (tests/comfyui/test_bad_inputs.py): broken, cut off, foreign, and
pickles whose payload would write a marker file if anything ever loaded them unsafely."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file


class Payload:
    """Pickles to a call that writes ``marker`` when the pickle is loaded unsafely: Python's
    ``exec`` or ``os.system`` (``how``)."""

    def __init__(self, marker, how: str = "exec"):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "system":
            return (os.system, (f"touch {self.marker}",))
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


# kind -> what the reader's message says about it (None: the file is read, and refused by the
# loader's own checks)
KINDS = {
    "empty": "is empty (0 bytes)",
    "text": "neither a torch checkpoint",
    "truncated": "ends too early",
    "zip_not_torch": "contents are damaged",
    "zip_payload_exec": "holds a Python object (exec)",
    "zip_payload_system": "holds a Python object (posix.system)",
    "raw_pickle_exec": "holds a Python object (exec)",
    "raw_pickle_system": "Python pickle that is not a plain torch checkpoint",
    "safetensors_garbage": "not a valid safetensors file",
    "safetensors_huge_header": "not a valid safetensors file",
    "wrong_model": None,
    "list_pickle": "holds a list",
}


def write(kind: str, folder: Path, marker: Path, prefix: str = "") -> Path:
    """One bad file of ``kind`` in ``folder`` (named ``prefix`` + the kind's name); a payload
    in it would write ``marker``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = {"zip_payload_system": ".ckpt", "raw_pickle_exec": ".bin", "raw_pickle_system": ".pt",
             "safetensors_garbage": ".safetensors", "safetensors_huge_header": ".safetensors",
             "wrong_model": ".safetensors"}
    path = folder / f"{prefix}{kind}{names.get(kind, '.pth')}"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_bytes(b"<html>404 Not Found</html>\n")
    elif kind == "truncated":
        torch.save({"w": torch.zeros(64, 64)}, path)
        path.write_bytes(path.read_bytes()[:3000])
    elif kind == "zip_not_torch":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "a zip file, not a checkpoint")
    elif kind == "zip_payload_exec":
        torch.save({"w": torch.zeros(2), "x": Payload(marker)}, path)
    elif kind == "zip_payload_system":
        torch.save({"state_dict": {"w": Payload(marker, "system")}}, path)
    elif kind == "raw_pickle_exec":
        path.write_bytes(pickle.dumps({"w": Payload(marker)}, protocol=2))
    elif kind == "raw_pickle_system":
        path.write_bytes(pickle.dumps({"w": Payload(marker, "system")}, protocol=5))
    elif kind == "safetensors_garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    elif kind == "safetensors_huge_header":
        path.write_bytes(b"\xff" * 8 + b"{}")
    elif kind == "wrong_model":
        save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_out.bias": torch.zeros(3)},
                  str(path))
    elif kind == "list_pickle":
        torch.save([torch.zeros(2), 3], path)
    else:
        raise KeyError(kind)
    return path
