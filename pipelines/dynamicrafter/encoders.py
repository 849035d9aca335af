"""OpenCLIP ViT-H text and vision encoders as DynamiCrafter uses them.

Both are assembled from ``open_clip``'s transformer blocks so the released
``cond_stage_model.model.*`` / ``embedder.model.*`` weights load by name.

- Text: token + positional embedding, every residual block but the last (penultimate-layer
  features) under a causal mask, then ``ln_final`` -> (B, 77, width).
- Vision: the whole image resized to the CLIP input size, patch embedding, class token,
  positional embedding, ``ln_pre``, all blocks -> (B, 1 + patches, width); no ``ln_post``, no
  projection.

The BPE vocabulary is the one bundled with the ``open_clip`` package.
"""
from __future__ import annotations

import torch
import torch.nn as nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _transformer(width: int, layers: int, heads: int, mlp_ratio: float) -> nn.Module:
    from open_clip.transformer import Transformer
    return Transformer(width, layers, heads, mlp_ratio=mlp_ratio, act_layer=nn.GELU, batch_first=True)


def tokenize(texts: list[str], context_length: int = 77) -> torch.Tensor:
    """(B, context_length) int64 token ids with OpenCLIP's bundled BPE vocabulary."""
    import open_clip
    return open_clip.tokenize(list(texts), context_length=context_length)


class TextEncoder(nn.Module):
    """OpenCLIP text tower, penultimate layer. tokens (B, L) -> (B, L, width)."""

    def __init__(self, width: int = 1024, layers: int = 24, heads: int = 16, vocab_size: int = 49408,
                 context_length: int = 77, mlp_ratio: float = 4.0, skip_last: int = 1):
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, width))
        self.transformer = _transformer(width, layers - skip_last, heads, mlp_ratio)
        self.ln_final = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        dtype = self.token_embedding.weight.dtype
        x = self.token_embedding(tokens) + self.positional_embedding.to(dtype)
        n = tokens.shape[1]
        mask = torch.full((n, n), float("-inf"), device=x.device, dtype=dtype).triu_(1)
        x = self.transformer(x, attn_mask=mask)
        return self.ln_final(x)

    def encode(self, prompts: list[str], device=None) -> torch.Tensor:
        """Prompts -> (B, 77, width); ``device``: where the encoder runs (default: its weights')."""
        tokens = tokenize(prompts, self.context_length)
        return self.forward(tokens.to(device if device is not None else self.token_embedding.weight.device))


class VisionEncoder(nn.Module):
    """OpenCLIP ViT tokens before ``ln_post``. image (B, 3, H, W) in [-1, 1] -> (B, 1 + P, width)."""

    def __init__(self, width: int = 1280, layers: int = 32, heads: int = 16, patch_size: int = 14,
                 image_size: int = 224, mlp_ratio: float = 4.0):
        super().__init__()
        self.image_size = image_size
        grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _transformer(width, layers, heads, mlp_ratio)

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """[-1, 1] (B, 3, H, W) -> CLIP-normalised (B, 3, S, S): bicubic, antialiased, aligned corners."""
        import kornia
        x = kornia.geometry.transform.resize(image.float(), (self.image_size, self.image_size),
                                             interpolation="bicubic", align_corners=True, antialias=True)
        x = (x + 1.0) / 2.0
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        dtype = self.conv1.weight.dtype
        x = self.conv1(self.preprocess(image).to(dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(dtype)
        x = self.ln_pre(x)
        return self.transformer(x)
