"""LVDM UNet: forward parity with the official module (tiny config), context split rule,
dual cross-attention and the 256 model's learned image gate."""
import json

import pytest
import torch
from safetensors import safe_open

from kinema.kernels.attention import multihead_attention
from kinema.kernels.dual_attention import dual_cross_attention, per_frame_context
from kinema.pipelines.dynamicrafter.unet import CrossAttention, DynamiCrafterUNet, UNetConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def _load(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _tiny_unet(t, meta, prefix="state_dict."):
    unet = DynamiCrafterUNet(UNetConfig.from_dict(json.loads(meta["unet_config"]))).eval()
    sd = {k[len(prefix):]: v.float() for k, v in t.items() if k.startswith(prefix)}
    unet.load_state_dict(sd, strict=True)
    return unet


def test_unet_tiny_parity(fixtures_dir):
    t, meta = _load(fixtures_dir / "dynamicrafter" / "unet_tiny.safetensors")
    unet = _tiny_unet(t, meta)
    dbg = {}
    with torch.no_grad():
        y = unet(t["input.x"], t["input.timesteps"], t["input.context"], t["input.fs"], debug=dbg)
    for name in ["emb", "context_frames", "h_after_init_attn", "h_after_middle_block"]:
        torch.testing.assert_close(dbg[name], t[f"dbg.{name}"], atol=1e-4, rtol=1e-4, msg=name)
    torch.testing.assert_close(y, t["output.y"], atol=1e-4, rtol=1e-4)


def test_unet_default_fs_is_used(fixtures_dir):
    t, meta = _load(fixtures_dir / "dynamicrafter" / "unet_tiny.safetensors")
    unet = _tiny_unet(t, meta)
    x, ts, ctx = t["input.x"][:1], t["input.timesteps"][:1], t["input.context"][:1]
    with torch.no_grad():
        a = unet(x, ts, ctx, None)
        b = unet(x, ts, ctx, torch.tensor([unet.cfg.default_fs]))
        c = unet(x, ts, ctx, torch.tensor([unet.cfg.default_fs + 1]))
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-4


def test_context_split_rule():
    g = torch.Generator().manual_seed(0)
    T = 4
    ctx = torch.randn(2, 77 + 16 * T, 8, generator=g)
    f = per_frame_context(ctx, T)
    assert f.shape == (2 * T, 93, 8)
    for b in range(2):
        for t in range(T):
            torch.testing.assert_close(f[b * T + t, :77], ctx[b, :77])
            torch.testing.assert_close(f[b * T + t, 77:], ctx[b, 77 + 16 * t: 77 + 16 * (t + 1)])
    # 256 image tokens with 8 frames: no split, every frame sees the whole context
    ctx = torch.randn(1, 77 + 256, 8, generator=g)
    f = per_frame_context(ctx, 8)
    assert f.shape == (8, 333, 8)
    torch.testing.assert_close(f[5], ctx[0])
    assert per_frame_context(ctx, 16).shape == (16, 93, 8)


def test_dual_attention_is_sum_of_streams():
    g = torch.Generator().manual_seed(1)
    q, kt, vt, ki, vi = (torch.randn(3, n, 16, generator=g) for n in (5, 7, 7, 4, 4))
    out = dual_cross_attention(q, kt, vt, ki, vi, heads=2, scale=0.5)

    def ref(q, k, v):
        qh, kh, vh = (z.view(3, -1, 2, 8).transpose(1, 2) for z in (q, k, v))
        w = torch.softmax(qh @ kh.transpose(-1, -2) * 8 ** -0.5, -1)
        return (w @ vh).transpose(1, 2).reshape(3, -1, 16)

    torch.testing.assert_close(out, ref(q, kt, vt) + 0.5 * ref(q, ki, vi), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(multihead_attention(q, kt, vt, 2), ref(q, kt, vt), atol=1e-5, rtol=1e-5)


def test_learned_image_gate():
    torch.manual_seed(0)
    attn = CrossAttention(16, 8, heads=2, dim_head=8, image_cross_attention=True, learnable_scale=True)
    fixed = CrossAttention(16, 8, heads=2, dim_head=8, image_cross_attention=True, learnable_scale=False)
    fixed.load_state_dict({k: v for k, v in attn.state_dict().items() if k != "alpha"})
    x, ctx = torch.randn(2, 6, 16), torch.randn(2, 77 + 5, 8)
    with torch.no_grad():
        # alpha = 0 -> tanh(0) + 1 = 1: same as the fixed scale 1
        torch.testing.assert_close(attn(x, ctx), fixed(x, ctx))
        attn.alpha.fill_(-50.0)  # gate closed: text stream only
        text_only = fixed.to_out(multihead_attention(fixed.to_q(x), fixed.to_k(ctx[:, :77]), fixed.to_v(ctx[:, :77]), 2))
        torch.testing.assert_close(attn(x, ctx), text_only, atol=1e-5, rtol=1e-5)
        attn.alpha.fill_(0.3)
        assert (attn(x, ctx) - fixed(x, ctx)).abs().max() > 1e-4
