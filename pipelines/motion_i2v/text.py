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
        from .loading import check_keys
        with torch.device("cpu"):
            self.model = CLIPTextModel(CLIPTextConfig(**config)).eval().requires_grad_(False)
        # position_ids: an index buffer some checkpoints carry and current models rebuild
        sd = {k: v for k, v in state_dict.items() if not k.endswith("embeddings.position_ids")}
        expected = {k: v.shape for k, v in self.model.state_dict().items() if not k.endswith("position_ids")}
        if not any(k.startswith("text_model.") for k in expected):  # newer transformers drop the prefix
            sd = {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in sd.items()}
        check_keys(expected, sd, f"{name} (text encoder)")
        self.model.load_state_dict(sd, strict=False)

    def to(self, device=None, dtype=None):
        self.model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode(self, texts: list[str], device=None) -> torch.Tensor:
        """(N, 77, D); ``device``: where the model runs (default: where its weights are)."""
        ids = tokenize(texts).to(device if device is not None else next(self.model.parameters()).device)
        return self.model(input_ids=ids).last_hidden_state
