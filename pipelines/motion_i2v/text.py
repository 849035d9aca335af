"""Standalone SD1.5 prompt encoding without any hub access.

The CLIP BPE vocabulary is the one that ships inside the installed ``open_clip`` package
(see ``pipelines/text_encoding.py``); the text model is a
transformers ``CLIPTextModel`` built from ``configs/motion_i2v/text_encoder.json`` and loaded
from the checkpoint's ``cond_stage_model.transformer.*`` weights.
"""
from __future__ import annotations

import torch

from ..text_encoding import clip_tokenizer

CONTEXT = 77


def tokenize(texts: list[str]) -> torch.Tensor:
    """SD1.5 tokenisation: ``[SOT] + bpe(text)[:75] + [EOT]``, padded with EOT to 77 -> (N, 77) int64."""
    tok = clip_tokenizer()
    return tok(list(texts), padding="max_length", max_length=CONTEXT, truncation=True,
               return_tensors="pt").input_ids


class TextEncoder:
    """CLIP text model + tokenizer -> (N, 77, D) last hidden states (what SD1.5 cross-attends to)."""

    def __init__(self, config: dict, state_dict: dict[str, torch.Tensor], name: str = "checkpoint"):
        from transformers import CLIPTextConfig, CLIPTextModel
        from ..checkpoint import load_strict
        from ..sd_checkpoint import clip_text_layout
        with torch.device("meta"):
            model = CLIPTextModel(CLIPTextConfig(**config))
        self.model = load_strict(model, clip_text_layout(state_dict, model),
                                 f"{name} (text encoder)").float().eval().requires_grad_(False)

    def to(self, device=None, dtype=None):
        self.model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode(self, texts: list[str], device=None) -> torch.Tensor:
        """(N, 77, D); ``device``: where the model runs (default: where its weights are)."""
        ids = tokenize(texts).to(device if device is not None else next(self.model.parameters()).device)
        return self.model(input_ids=ids).last_hidden_state
