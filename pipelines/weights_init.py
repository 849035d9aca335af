"""PyTorch's default initialisation of new layers, drawn from a local ``torch.Generator``.

Modules draw their initial weights from the global RNG when they are constructed; seeding it in
the pack would change every later draw of the host process (ComfyUI's included). Layers that
start from scratch (Follow-Your-Click's new embeddings, a semantic motion predictor before its
training) are built on the meta device instead and given their weights here: the same
distributions as ``reset_parameters`` of each layer type, from the caller's generator.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def default_init(module: nn.Module, generator: torch.Generator, device="cpu", leave: tuple[str, ...] = ()) -> nn.Module:
    """Give ``module`` (possibly on the meta device) real tensors on ``device`` initialised as
    PyTorch does: Linear / Conv weights Kaiming-uniform (a = sqrt(5)), biases uniform within
    1 / sqrt(fan_in), norms ones and zeros, Embedding standard normal. Parameters of other
    modules must be named in ``leave`` (the caller initialises them); any other is refused."""
    module.to_empty(device=device)
    with torch.no_grad():
        for prefix, m in module.named_modules():
            own = {n: p for n, p in m.named_parameters(recurse=False)
                   if (f"{prefix}.{n}" if prefix else n) not in leave}
            if isinstance(m, (nn.Linear, *_CONVS)):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
                if m.bias is not None:
                    bound = 1 / math.sqrt(m.weight[0].numel())
                    nn.init.uniform_(m.bias, -bound, bound, generator=generator)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                for name, p in own.items():
                    p.fill_(1.0 if name == "weight" else 0.0)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, generator=generator)
            elif own:
                raise TypeError(f"default_init: no default initialisation for the parameters {sorted(own)} of "
                                f"{type(m).__name__}; initialise them explicitly")
    return module
