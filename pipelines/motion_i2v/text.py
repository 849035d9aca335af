"""Standalone SD1.5 prompt encoding without any hub access.

The CLIP BPE vocabulary is the one that ships inside the installed ``open_clip`` package
(``bpe_simple_vocab_16e6.txt.gz``, the same merges as OpenAI CLIP); the text model is a
transformers ``CLIPTextModel`` built from ``configs/motion_i2v/text_encoder.json`` and loaded
from the checkpoint's ``cond_stage_model.transformer.*`` weights.
"""
from __future__ import annotations

import torch

from ...runtime import KinemaError

CONTEXT = 77
SOT, EOT = 49406, 49407


class ClipBPETokenizer:
    """SD1.5 tokenisation: ``[SOT] + bpe(text)[:75] + [EOT]``, padded with EOT to 77."""

    def __init__(self):
        try:
            from open_clip.tokenizer import SimpleTokenizer
        except Exception as e:  # pragma: no cover - depends on the environment
            raise KinemaError(f"open_clip is not installed ({e}); install open_clip_torch to encode prompts "
                              f"without ComfyUI, or connect a CONDITIONING input") from None
        self._tok = SimpleTokenizer()

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """texts -> (N, 77) int64."""
        out = torch.full((len(texts), CONTEXT), EOT, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [SOT] + self._tok.encode(t)[: CONTEXT - 2] + [EOT]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


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
        self.tokenizer = ClipBPETokenizer()

    def to(self, device=None, dtype=None):
        self.model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        p = next(self.model.parameters())
        ids = self.tokenizer(texts).to(p.device)
        return self.model(input_ids=ids).last_hidden_state
