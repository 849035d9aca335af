"""The CLIP tokenizer, over the BPE vocabulary that ships inside the ``open_clip`` package.

Every CLIP text encoder of the SD family (SD1.5's ViT-L/14, SDXL's ViT-L/14 and OpenCLIP
ViT-bigG/14, OpenCLIP ViT-H/14) uses the same 49,408-token byte-level BPE. The vocabulary and
merges are read by open_clip's own tokenizer, so nothing is fetched from a hub; they are handed
to ``transformers.CLIPTokenizer``, the interface diffusers' pipelines call. Usage::

    tok = clip_tokenizer()             # SD1.5 / SDXL text_encoder (pads with <|endoftext|>)
    tok2 = clip_tokenizer(pad="!")     # SDXL text_encoder_2 (pads with "!", id 0)
    ids = tok(["a cat"], padding="max_length", max_length=77, truncation=True,
              return_tensors="pt").input_ids    # (1, 77)
"""
from __future__ import annotations

import functools

from ..runtime import KinemaError

START, END = "<|startoftext|>", "<|endoftext|>"  # transformers' names; open_clip's differ, same ids


@functools.lru_cache(maxsize=2)
def clip_tokenizer(pad: str = END, max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` over open_clip's vocabulary.

    pad: padding token (``<|endoftext|>`` for CLIP ViT-L, ``"!"`` for SDXL's second
    encoder). At most two tokenizers are kept.
    """
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError:
        raise KinemaError("the CLIP tokenizer needs the 'open_clip_torch' package (pip install open_clip_torch)") from None
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    start, end = bpe.sot_token_id, bpe.eot_token_id
    vocab = {token: i for token, i in bpe.encoder.items() if i not in (start, end)}
    vocab.update({START: start, END: end})
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, unk_token=END, bos_token=START, eos_token=END, pad_token=END)
    # set after construction: a pad token given to the constructor becomes a special token that
    # prompts are split on, so "hi!!" would lose its own token "!!" to two pad tokens "!"
    tok.pad_token = pad
    tok.model_max_length = max_length
    return tok
