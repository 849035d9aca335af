"""The motion-field type that travels between Kinema nodes."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MotionField:
    """Per-frame displacement from frame 0.

    flow:  (F, H, W, 2) float32, pixels, x then y; ``flow[0]`` is zero. Pixel (x, y) of
           frame 0 is at (x, y) + flow[k, y, x] in frame k.
    mask:  (H, W) float in [0, 1] or None: the region the motion was meant for (1 = moves).
           Renderers may use it to keep everything else exactly still.
    """
    flow: torch.Tensor
    mask: torch.Tensor | None = None

    def __post_init__(self):
        if self.flow.ndim != 4 or self.flow.shape[-1] != 2:
            raise ValueError(f"motion field: flow must be (F, H, W, 2), got {tuple(self.flow.shape)}")
        if self.mask is not None and tuple(self.mask.shape) != tuple(self.flow.shape[1:3]):
            raise ValueError(f"motion field: mask {tuple(self.mask.shape)} does not match flow size "
                             f"{tuple(self.flow.shape[1:3])}")

    @property
    def frames(self) -> int:
        return int(self.flow.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return int(self.flow.shape[2]), int(self.flow.shape[1])
