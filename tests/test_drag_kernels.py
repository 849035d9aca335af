"""Puppet-Master kernels: drag encoding, pos-emb, tokens, all-to-first attention."""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kinema.kernels.attention import all_to_first_attention
from kinema.kernels.drag import (
    DragEmbedding, DragModulation, drag_context, drag_modulate, drag_token_inputs, drag_token_mlp, drag_tokens,
    drag_validity, encode_drags, interpolate_drag_frames, sample_points,
    sincos_pos_embed_2d, track_length,
)


def _fx(fixtures_dir, name):
    return load_file(str(fixtures_dir / "puppet_master" / name))


# ---------------------------------------------------------------- drag encoding
@pytest.mark.parametrize("r", [32, 16, 8])
def test_drag_encoding_matches_fixture_exactly(fixtures_dir, r):
    d = _fx(fixtures_dir, "drag_encoding.safetensors")
    got = encode_drags(d["drags"], r)
    assert got.shape == d[f"encoding_r{r}"].shape
    assert torch.equal(got, d[f"encoding_r{r}"])


def test_drag_encoding_rounds_half_to_even():
    # u*r = 23 (odd) -> cell 22, offset 1.0 ; u*r = 22 (even) -> cell 22, offset 0.0
    r = 32
    drags = torch.tensor([[[[23 / 32, 22 / 32, 1.0, 0.0]]]])
    e = encode_drags(drags, r)[0, 0]
    assert e[0, 22, 22] == 1.0 and e[1, 22, 22] == 0.0
    # x = 1 -> last cell, offset 1 ; y = 0 -> cell 0, offset 0
    assert e[2, 0, r - 1] == 1.0 and e[3, 0, r - 1] == 0.0
    # floor() would have put x = 23/32 in cell 23
    assert (e[0, :, 23] == -1).all()
    # each channel has exactly one written pixel
    assert ((e != -1).flatten(1).sum(1) <= 1).all()


def test_drag_encoding_final_channels_and_validity():
    drags = torch.zeros(1, 3, 2, 4)
    drags[0, :, 0] = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.6, 0.5], [0.5, 0.5, 0.7, 0.5]])
    e = encode_drags(drags, 8)
    # drag 1 is all zero: nothing written
    assert (e[:, :, 6:] == -1).all()
    # the final channels show the last frame's end on every frame
    for k in range(3):
        cx = int(torch.round(torch.tensor(0.7 * 8 - 0.5)))
        assert e[0, k, 4, 4, cx] == pytest.approx(0.7 * 8 - cx)


def test_drag_at_corner_needs_explicit_validity():
    """The released encoding treats a drag whose four numbers are 0 as absent: a drag that starts
    at the (0, 0) corner vanishes on frame 0. An explicit validity mask keeps it."""
    drags = interpolate_drag_frames(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.5, 0.5]]), 14)[None]
    implicit = encode_drags(drags, 8)
    assert (implicit[0, 0, :6] == -1).all()          # frame 0 dropped
    valid = torch.ones(1, 14, 1, dtype=torch.bool)
    explicit = encode_drags(drags, 8, valid=valid)
    assert explicit[0, 0, 0, 0, 0] == 0.0 and explicit[0, 0, 2, 0, 0] == 0.0
    assert torch.equal(implicit[:, 1:], explicit[:, 1:])


def test_bad_drag_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="drags"):
        encode_drags(torch.zeros(2, 14, 5), 8)


# ---------------------------------------------------------------- pos-emb and tokens
def test_sincos_table_layout():
    t = sincos_pos_embed_2d(64, 8, dtype=torch.float64)
    assert t.shape == (64, 64)
    y, x = 3, 5
    row = t[y * 8 + x]
    w = torch.tensor([10000 ** (-i / 16) for i in range(16)], dtype=torch.float64)
    assert torch.allclose(row[:16], torch.sin(x * w)) and torch.allclose(row[16:32], torch.cos(x * w))
    assert torch.allclose(row[32:48], torch.sin(y * w)) and torch.allclose(row[48:], torch.cos(y * w))


def test_sample_points_hits_pixel_centres_and_clamps():
    f = torch.arange(16.0).reshape(1, 1, 4, 4)
    pts = torch.tensor([[[1.5 / 4, 2.5 / 4], [0.0, 0.0], [1.0, 1.0]]])
    s = sample_points(f, pts)[0, :, 0]
    assert s.tolist() == [f[0, 0, 2, 1].item(), 0.0, 15.0]


def test_tokens_order_masking_and_context():
    torch.manual_seed(0)
    b, k, n, c, r, dim = 2, 3, 2, 4, 8, 16
    drags = torch.rand(b, k, n, 4)
    drags[1, :, 1] = 0  # unused in video 1
    drags[0, 1, 0] = 0  # absent on one frame only: still gets a token
    h = torch.randn(b * k, c, r, r)
    pos = sincos_pos_embed_2d(8, r)
    x = drag_token_inputs(h, drags.flatten(0, 1), pos)
    assert x.shape == (b * k, n, 2 * c + 16)
    # start features first, then end features, then the two pos-embs
    assert torch.allclose(x[..., :c], sample_points(h, drags.flatten(0, 1)[..., :2]))
    assert torch.allclose(x[..., c:2 * c], sample_points(h, drags.flatten(0, 1)[..., 2:]))
    mlp = drag_token_mlp(c, 8, dim)
    used = drag_validity(drags).any(dim=1)
    tok = drag_tokens(mlp, h, drags.flatten(0, 1), pos, used)
    assert (tok[k:, 1] == 0).all() and (tok[:k, 1] != 0).any() and (tok[1, 0] != 0).any()
    ctx = drag_context(torch.randn(b * k, 1, dim), tok)
    assert ctx.shape == (b * k, 1 + n, dim)


def test_modulation_and_embedding_start_as_identity():
    emb = DragEmbedding(30, 2 * 8, (16, 32, 32))
    assert [m.out_channels for m in [emb.conv_in, *emb.blocks, emb.conv_out]] == [16, 16, 32, 32, 32, 16]
    h = torch.randn(2, 8, 4, 4)
    ss = emb(torch.randn(2, 30, 4, 4))
    assert torch.equal(drag_modulate(h, ss), h)  # zero conv_out: no change at init
    ss = torch.cat([torch.full((2, 8, 4, 4), 1.0), torch.full((2, 8, 4, 4), 0.5)], dim=1)
    assert torch.allclose(drag_modulate(h, ss), 2 * h + 0.5)


def test_modulation_once_per_video_equals_per_step_modulation():
    """Two videos of 4 frames at r = 6: the first with a drag, the second drag-free (the
    unconditional half). Computed once, the second from a single frame, the modulation equals
    the embedder run on every row; the embedder sees 4 + 1 rows."""
    torch.manual_seed(0)
    emb = DragEmbedding(12, 2 * 8, (8, 8, 8))
    with torch.no_grad():
        emb.conv_out.weight.normal_(0, 0.1)
        emb.conv_out.bias.normal_(0, 0.1)
    drags = torch.zeros(2, 4, 2, 4)
    drags[0, :, 0] = interpolate_drag_frames(torch.tensor([[0.3, 0.4]]), torch.tensor([[0.6, 0.5]]), 4)[:, 0]
    image = encode_drags(drags, 6).flatten(0, 1)
    seen = []
    emb.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    h = torch.randn(8, 8, 6, 6)
    with torch.no_grad():
        want = drag_modulate(h, emb(image))
        seen.clear()
        mod = DragModulation(emb, image, torch.tensor([True, False]))
        got = mod(h)
        again = mod(h * 2)
    assert seen == [5]
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(again, drag_modulate(h * 2, emb(image)), atol=1e-6)
    assert not torch.allclose(got[:4], h[:4])  # the drag changes the features
    with pytest.raises(ValueError, match="7 rows for 2 videos of 4 frames"):
        mod(h[:7])


def test_interpolation_and_track_length():
    d = interpolate_drag_frames(torch.tensor([[0.2, 0.3]]), torch.tensor([[0.8, 0.3]]), 14)
    assert d.shape == (14, 1, 4)
    assert torch.allclose(d[:, 0, :2], torch.tensor([0.2, 0.3]).expand(14, 2))
    assert torch.allclose(d[0, 0, 2:], torch.tensor([0.2, 0.3])) and torch.allclose(d[-1, 0, 2:], torch.tensor([0.8, 0.3]))
    assert torch.allclose(d[7, 0, 2], torch.tensor(0.2 + 0.6 * 7 / 13))
    tr = torch.tensor([[0.0, 0.0], [10.0, 0.0], [10.0, 10.0]])
    assert track_length(tr) == 20.0


# ---------------------------------------------------------------- all-to-first
def _a2f_reference_inputs(d):
    w = {k[len("weight."):]: v for k, v in d.items() if k.startswith("weight.")}
    x = d["in.hidden_states"]
    return w, x


def test_all_to_first_matches_fixture(fixtures_dir):
    d = _fx(fixtures_dir, "all_to_first_attention.safetensors")
    w, x = _a2f_reference_inputs(d)
    first = x[::14]
    q = F.linear(x, w["to_q.weight"])
    k = F.linear(first, w["to_k.weight"])
    v = F.linear(first, w["to_v.weight"])
    out = all_to_first_attention(q, k, v, num_frames=14, heads=2)
    out = F.linear(out, w["to_out.0.weight"], w["to_out.0.bias"])
    diff = (out - d["out.hidden_states"]).abs().max().item()
    assert diff < 1e-5, diff


def test_all_to_first_one_frame_is_self_attention():
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 10, 8), torch.randn(3, 10, 8), torch.randn(3, 10, 8)
    out = all_to_first_attention(q, k, v, num_frames=1, heads=2)
    qh, kh, vh = (t.reshape(3, 10, 2, 4).transpose(1, 2) for t in (q, k, v))
    att = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(4), dim=-1) @ vh
    assert torch.allclose(out, att.transpose(1, 2).reshape(3, 10, 8), atol=1e-6)


def test_all_to_first_any_frame_count():
    """The released processor assumes 14 frames when it picks frame 0. With 7-frame videos that
    would take video 1's keys from video 0's frame 7; here each video uses its own frame 0."""
    torch.manual_seed(2)
    b, f = 2, 7
    x = torch.randn(b * f, 5, 8)
    out = all_to_first_attention(x, x, x, num_frames=f, heads=1)
    for vid in range(b):
        first = x[vid * f]
        for fr in range(f):
            qx = x[vid * f + fr]
            ref = torch.softmax(qx @ first.T / math.sqrt(8), -1) @ first
            assert torch.allclose(out[vid * f + fr], ref, atol=1e-6)
    # the 14-frame assumption would pick row 0 for every row of this batch
    wrong_keys = x.view(-1, 14, 5, 8)[:, 0]
    assert not torch.allclose(wrong_keys[0], x[f])
    with pytest.raises(ValueError, match="7-frame"):
        all_to_first_attention(x[:13], x[:13], x[:13], num_frames=7, heads=1)
