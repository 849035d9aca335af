"""CLIP tokenizers built from the BPE vocabulary that ships inside the ``open_clip`` package.

Every CLIP text encoder of the SD family (SD1.5's ViT-L/14, SDXL's ViT-L/14 and OpenCLIP
ViT-bigG/14, OpenCLIP ViT-H/14) uses the same 49,408-token byte-level BPE. Building the
tokenizer from ``open_clip/bpe_simple_vocab_16e6.txt.gz`` means nothing is fetched from a
hub. Usage::

    tok = clip_tokenizer()             # SD1.5 / SDXL text_encoder (pads with <|endoftext|>)
    tok2 = clip_tokenizer(pad="!")     # SDXL text_encoder_2 (pads with "!", id 0)
    ids = tok(["a cat"], padding="max_length", max_length=77, truncation=True,
              return_tensors="pt").input_ids    # (1, 77)
"""
from __future__ import annotations

import functools
import gzip
from pathlib import Path

from ..runtime import KinemaError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # the merges CLIP uses; the file holds more
VOCAB_SIZE = 49408
START, END = "<|startoftext|>", "<|endoftext|>"


def bpe_path() -> Path:
    """Path of the BPE merges file inside the installed ``open_clip`` package (found
    without importing the package)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise KinemaError("the CLIP tokenizer needs the 'open_clip_torch' package (pip install open_clip_torch)")
    path = Path(list(spec.submodule_search_locations)[0]) / BPE_FILE
    if not path.is_file():
        raise KinemaError(f"CLIP vocabulary {path} not found: expected it inside the open_clip package; "
                          f"reinstall open_clip_torch")
    return path


def _byte_symbols() -> list:
    """The 256 printable stand-ins for bytes used by byte-level BPE, in CLIP's vocabulary
    order: printable bytes keep their own character and come first, the other bytes map to
    code points from 256 on, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    kept = set(keep)
    rest = [b for b in range(256) if b not in kept]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(rest))]


def clip_vocabulary(path: Path | None = None) -> tuple[dict, list]:
    """(token -> id dict of 49,408 entries, list of merges "a b") from the BPE file."""
    path = Path(path) if path is not None else bpe_path()
    try:
        lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    except OSError as exc:
        raise KinemaError(f"CLIP vocabulary {path}: not a readable gzip text file ({exc})") from exc
    merges = lines[1:1 + N_MERGES]
    if len(merges) != N_MERGES:
        raise KinemaError(f"CLIP vocabulary {path}: expected at least {N_MERGES} merges, found {len(merges)}")
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [START, END]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise KinemaError(f"CLIP vocabulary {path}: expected {VOCAB_SIZE} tokens, built {len(vocab)}")
    return vocab, merges


@functools.lru_cache(maxsize=2)
def clip_tokenizer(pad: str = END, max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` over the open_clip vocabulary.

    pad: padding token (``<|endoftext|>`` for CLIP ViT-L, ``"!"`` for SDXL's second
    encoder). At most two tokenizers are kept.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], unk_token=END, bos_token=START, eos_token=END, pad_token=pad)
    tok.model_max_length = max_length
    return tok
