"""The multi-head attention helper every attention kernel calls, against the textbook formula
written out per head (all-to-first attention is in test_drag_kernels)."""
import math

import pytest
import torch

from kinema.kernels.attention import all_to_first_attention, merge_heads, multihead_attention, split_heads


def _by_hand(q, k, v, heads, mask=None, scale=None):
    """softmax(q_h k_h^T * scale) v_h for each head h (channel chunk), concatenated; float64."""
    q, k, v = q.double(), k.double(), v.double()
    dq, dv = q.shape[-1] // heads, v.shape[-1] // heads
    scale = 1.0 / math.sqrt(dq) if scale is None else scale
    outs = []
    for h in range(heads):
        s = q[..., h * dq:(h + 1) * dq] @ k[..., h * dq:(h + 1) * dq].transpose(-1, -2) * scale
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        outs.append(torch.softmax(s, dim=-1) @ v[..., h * dv:(h + 1) * dv])
    return torch.cat(outs, dim=-1)


def test_matches_per_head_softmax():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 5, 12, generator=g), torch.randn(3, 7, 12, generator=g)
    v = torch.randn(3, 7, 6, generator=g)  # values may be narrower than queries and keys
    got = multihead_attention(q, k, v, 3)
    assert got.shape == (3, 5, 6)
    assert (got.double() - _by_hand(q, k, v, 3)).abs().max() < 1e-5
    scaled = multihead_attention(q, k, v, 3, scale=0.2)
    assert (scaled.double() - _by_hand(q, k, v, 3, scale=0.2)).abs().max() < 1e-5
    mask = torch.rand(5, 7, generator=g) < 0.6
    mask[:, 0] = True  # every query sees at least one key
    masked = multihead_attention(q, k, v, 3, mask=mask)
    assert (masked.double() - _by_hand(q, k, v, 3, mask=mask)).abs().max() < 1e-5


def test_heads_are_contiguous_channel_chunks():
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 8)
    h = split_heads(x, 4)
    assert h.shape == (2, 4, 3, 2)
    assert torch.equal(h[1, 2, 0], x[1, 0, 4:6])
    assert torch.equal(merge_heads(h), x)


def test_width_not_divisible_by_heads():
    x = torch.zeros(1, 2, 10)
    with pytest.raises(ValueError, match="10 channels do not split into 3 heads"):
        multihead_attention(x, x, x, 3)
    with pytest.raises(ValueError, match="all_to_first_attention: 10 channels"):
        all_to_first_attention(x, x, x, 1, 3)

