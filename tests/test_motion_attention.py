"""Motion-augmented temporal attention, flow normalisation and track rasterisation:
exact small cases and parity with the Motion-I2V reference fixtures."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kinema.kernels.motion_attention import (
    FirstFrameSplat, FlowSplats, apply_static, brush_to_static, denormalise_flow, frame_strides, interleave_warped,
    motion_augmented_attention, normalise_flow, rasterise_tracks_motion_i2v,
    resize_flow, sinusoidal_position_encoding, sparse_vae_input, splat_first_frame,
    temporal_self_attention, tracks_to_grid)

ATOL = RTOL = 1e-4
CASES = ("A_zero_flow", "B_integer_flow", "C_batch2_integer_flow")
P = "param.temporal_transformer.transformer_blocks.0."


@pytest.fixture(scope="module")
def att(fixtures_dir):
    return load_file(str(fixtures_dir / "motion_i2v" / "motion_attention.safetensors"))


@pytest.fixture(scope="module")
def norm(fixtures_dir):
    d = fixtures_dir / "motion_i2v"
    return load_file(str(d / "flow_normalisation.safetensors")), json.loads((d / "flow_normalisation.json").read_text())


def _projs(t, k):
    pre = f"{P}attention_blocks.{k}."
    wq, wk, wv = t[pre + "to_q.weight"], t[pre + "to_k.weight"], t[pre + "to_v.weight"]
    wo, bo = t[pre + "to_out.0.weight"], t[pre + "to_out.0.bias"]
    return (lambda x: x @ wq.T, lambda x: x @ wk.T, lambda x: x @ wv.T, lambda x: x @ wo.T + bo,
            t[pre + "pos_encoder.pe"])


def _flow(t, c):  # (B, F, 2, H0, W0) -> ours (B, F, H0, W0, 2)
    return t[f"{c}.flow_pre"].permute(0, 1, 3, 4, 2)


def _diff(a, b):
    return float((a - b).abs().max())


def test_position_encoding_matches_stored_buffer(att):
    pe = att[P + "attention_blocks.0.pos_encoder.pe"]
    assert _diff(sinusoidal_position_encoding(32, 64), pe) < 1e-6


@pytest.mark.parametrize("case", CASES)
def test_flow_resize_matches(att, case):
    ours = resize_flow(_flow(att, case), (8, 8))[:, 1:]
    ref = att[f"{case}.flow_resized_for_splat"]
    b = ours.shape[0]
    assert _diff(ours.reshape(b * 3, 8, 8, 2).permute(0, 3, 1, 2), ref) < 1e-5


@pytest.mark.parametrize("case", ("A_zero_flow", "B_integer_flow"))
@pytest.mark.parametrize("k", (0, 1))
def test_splat_matches_single_batch(att, case, k):
    src = att[f"{case}.attn{k}.splat_src"][:1]
    flow = att[f"{case}.flow_resized_for_splat"].permute(0, 2, 3, 1)[None]
    out = splat_first_frame(src, flow)[0]
    assert _diff(out, att[f"{case}.attn{k}.warped"]) < 1e-5


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("k", (0, 1))
def test_attention_given_reference_warp(att, case, k):
    """The attention alone: feed the consumed splat output, compare the block output."""
    x = att[f"{case}.attn{k}.in"]
    b = x.shape[0] // 4
    q, kk, v, o, pe = _projs(att, k)
    warped = att[f"{case}.attn{k}.warped"].reshape(b, 3, 64, 8, 8)
    inter = {}
    out = motion_augmented_attention(x, _flow(att, case), (8, 8), 4, q, kk, v, o, 2, pe,
                                     warped=warped, intermediates=inter)
    assert _diff(out, att[f"{case}.attn{k}.out"]) < ATOL
    if k == 0:
        assert _diff(inter["seq_pe"], att[f"{case}.attn0.seq_pe"]) < 1e-5


@pytest.mark.parametrize("case", ("A_zero_flow", "B_integer_flow"))
@pytest.mark.parametrize("k", (0, 1))
def test_attention_with_our_splat(att, case, k):
    x = att[f"{case}.attn{k}.in"]
    q, kk, v, o, pe = _projs(att, k)
    out = motion_augmented_attention(x, _flow(att, case), (8, 8), 4, q, kk, v, o, 2, pe)
    assert torch.allclose(out, att[f"{case}.attn{k}.out"], atol=ATOL, rtol=RTOL)


def test_batch_quirk_reproduced_only_on_request(att):
    """Case C: the released code tiles frame 0 over the batch (items swap frame-0 features).
    With the flag we reproduce its splat exactly; by default each item warps its own frame 0."""
    c = "C_batch2_integer_flow"
    x = att[f"{c}.attn0.in"]
    q, kk, v, o, pe = _projs(att, 0)
    official = motion_augmented_attention(x, _flow(att, c), (8, 8), 4, q, kk, v, o, 2, pe,
                                          official_batch_tiling=True)
    assert _diff(official, att[f"{c}.attn0.out"]) < ATOL
    inter = {}
    ours = motion_augmented_attention(x, _flow(att, c), (8, 8), 4, q, kk, v, o, 2, pe, intermediates=inter)
    # per-item: batch item b uses only its own frame 0
    for b in range(2):
        solo = motion_augmented_attention(x[4 * b:4 * b + 4], _flow(att, c)[b:b + 1], (8, 8), 4, q, kk, v, o, 2, pe)
        assert _diff(ours[4 * b:4 * b + 4], solo) < 1e-5
    assert _diff(ours, official) > 1e-2  # the two behaviours really differ


@pytest.mark.parametrize("tiling", (False, True))
def test_first_frame_splat_is_built_once_and_matches(tiling):
    """The precomputed splat of frame 0 equals splat_first_frame for any features (in the
    attention's (B, N, F-1, C) layout), with either batch pairing."""
    g = torch.Generator().manual_seed(2)
    ftok = (torch.rand(2, 3, 5, 6, 2, generator=g) - 0.5) * 5
    plan = FirstFrameSplat(ftok, official_batch_tiling=tiling)
    for seed in (3, 4):
        z0 = torch.randn(2, 7, 5, 6, generator=torch.Generator().manual_seed(seed))
        want = splat_first_frame(z0, ftok, official_batch_tiling=tiling)      # (B, F-1, C, h, w)
        got = plan(z0.flatten(2).transpose(1, 2))                            # (B, N, F-1, C)
        assert torch.allclose(got, want.flatten(3).permute(0, 3, 1, 2), atol=1e-6)
    with pytest.raises(ValueError, match=r"must be \(2, 30, C\)"):
        plan(torch.zeros(1, 30, 7))


def test_flow_splats_keyed_by_flow_and_grid(att):
    """One cache serves every call of a run: a splat per (flow, grid), reused, and the same
    result as a call without the cache; another flow tensor gets its own; clear() frees them."""
    c = "B_integer_flow"
    x, flow = att[f"{c}.attn0.in"], _flow(att, c)
    q, kk, v, o, pe = _projs(att, 0)
    splats = FlowSplats()
    first = motion_augmented_attention(x, flow, (8, 8), 4, q, kk, v, o, 2, pe, splats=splats)
    plan = splats.get(flow, (8, 8), 1, x.device)
    again = motion_augmented_attention(x, flow, (8, 8), 4, q, kk, v, o, 2, pe, splats=splats)
    assert len(splats) == 1 and splats.get(flow, (8, 8), 1, x.device) is plan
    assert torch.equal(first, again)
    assert torch.allclose(first, motion_augmented_attention(x, flow, (8, 8), 4, q, kk, v, o, 2, pe), atol=1e-6)
    small = torch.nn.functional.avg_pool2d(x.transpose(1, 2).reshape(4, 64, 8, 8), 2).flatten(2).transpose(1, 2)
    motion_augmented_attention(small, flow, (4, 4), 4, q, kk, v, o, 2, pe, splats=splats)
    assert len(splats) == 2
    motion_augmented_attention(x, flow.clone(), (8, 8), 4, q, kk, v, o, 2, pe, splats=splats)
    assert len(splats) == 3
    splats.clear()
    assert len(splats) == 0


def test_affine_projections_with_bias_match_the_interleaved_form():
    """Projections with a bias: splatting after projecting (and adding the projected position
    codes) equals projecting the interleaved, position-coded sequence, holes included."""
    g = torch.Generator().manual_seed(7)
    b, f, h, w, c = 2, 3, 4, 5, 8
    x = torch.randn(b * f, h * w, c, generator=g)
    flow = (torch.rand(b, f, h, w, 2, generator=g) - 0.5) * 6
    lin = [torch.nn.Linear(c, c) for _ in range(4)]
    for m in lin:
        torch.nn.init.normal_(m.bias, std=0.5, generator=g)
    pe = sinusoidal_position_encoding(32, c)
    with torch.no_grad():
        got = motion_augmented_attention(x, flow, (h, w), f, *lin, 2, pe)
        inter = {}
        motion_augmented_attention(x, flow, (h, w), f, *lin, 2, pe, intermediates=inter)
        seq = inter["seq_pe"]                                    # (B*N, 2F-1, C), official order
        heads = [t.view(b * h * w, -1, 2, c // 2).transpose(1, 2)
                 for t in (lin[0](seq[:, 0::2]), lin[1](seq), lin[2](seq))]
        att = F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(b, h * w, f, c)
        want = lin[3](att.transpose(1, 2).reshape(b * f, h * w, c))
    assert (inter["warped"] == 0).any()  # some holes
    assert torch.allclose(got, want, atol=1e-5)


def test_interleave_order():
    frames = torch.arange(3.0).view(1, 3, 1, 1).expand(1, 3, 2, 1)
    warped = (10 + torch.arange(1.0, 3.0)).view(1, 2, 1, 1).expand(1, 2, 2, 1)
    seq = interleave_warped(frames, warped)
    assert seq[0, :, 0, 0].tolist() == [0.0, 11.0, 1.0, 12.0, 2.0]


def test_zero_flow_single_frame_reduces_to_self_attention():
    """With one frame the sequence is just x0: motion-augmented == stock temporal attention."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 8, generator=g)
    lin = torch.nn.Linear(8, 8)
    ident = lambda t: t  # noqa: E731
    a = motion_augmented_attention(x, torch.zeros(2, 1, 2, 3, 2), (2, 3), 1, lin, ident, ident, ident, 2)
    b = temporal_self_attention(x, 1, lin, ident, ident, ident, 2)
    assert torch.allclose(a, b, atol=1e-6)


def test_too_many_frames_and_bad_grid_are_clear_errors():
    x = torch.zeros(17, 4, 8)
    ident = lambda t: t  # noqa: E731
    with pytest.raises(ValueError, match="at most 16"):
        motion_augmented_attention(x, torch.zeros(1, 17, 2, 2, 2), (2, 2), 17, ident, ident, ident, ident, 2)
    with pytest.raises(ValueError, match="grid"):
        motion_augmented_attention(torch.zeros(4, 4, 8), torch.zeros(1, 4, 2, 2, 2), (3, 2), 4,
                                   ident, ident, ident, ident, 2)
    with pytest.raises(ValueError, match="flow batch"):
        motion_augmented_attention(torch.zeros(8, 4, 8), torch.zeros(3, 4, 2, 2, 2), (2, 2), 4,
                                   ident, ident, ident, ident, 2)


# --------------------------------------------------------------- normalisation / rasters

@pytest.mark.parametrize("case", ("R1_two_tracks_no_brush", "R2_two_tracks_with_brush"))
def test_rasterisation_and_normalisation_match(norm, case):
    t, meta = norm
    cm = meta["cases"][case]
    h, w = cm["grid_HW"]
    grid = tracks_to_grid([torch.tensor(tr, dtype=torch.float32) for tr in cm["tracks_canvas_512x320"]],
                          (512, 320), (w, h))
    assert [g.tolist() for g in grid] == cm["tracks_grid_int"]
    sparse, mask = rasterise_tracks_motion_i2v(grid, h, w, cm["flow_unit_id"], 16)
    static = brush_to_static(t[f"{case}.brush_painted_u8"])
    assert torch.equal(static, t[f"{case}.brush_mask"])
    sparse, mask = apply_static(sparse, mask, static)
    v = normalise_flow(sparse, w, h)
    assert _diff(v, t[f"{case}.input_drag"]) < 1e-6
    assert torch.equal(mask, t[f"{case}.mask_drag"])
    assert _diff(sparse_vae_input(v, mask), t[f"{case}.vae_flow_encode_input"]) < 1e-6
    m = mask.permute(3, 0, 1, 2)[None]  # (1, 1, F-1, H, W)
    assert torch.equal(m[..., ::8, ::8], t[f"{case}.control_mask_channel"])
    assert torch.equal(frame_strides(16), t[f"{case}.stride"])


def test_dense_normalisation_and_denormalisation_match(norm):
    t, _ = norm
    flow = t["D_dense.flow_px"].permute(0, 2, 3, 1)
    v = normalise_flow(flow, 32, 24)
    assert _diff(v, t["D_dense.normalised"]) < 1e-6
    assert _diff(sparse_vae_input(v, torch.ones_like(v[..., :1])), t["D_dense.vae_flow_encode_input"]) < 1e-6
    out = denormalise_flow(t["D_dense.decoded_stub"][0].permute(1, 0, 2, 3), 32, 24, t["D_dense.brush_static"])
    assert _diff(out.permute(0, 3, 1, 2), t["D_dense.flow_pre"]) < 1e-5
    assert float(out.abs()[..., 0].max()) <= 32 and float(out.abs()[..., 1].max()) <= 24  # clamped


def test_anchor_is_static_and_single_click_moves_one_pixel():
    sparse, mask = rasterise_tracks_motion_i2v([torch.tensor([[10, 10]])], 32, 32, 2, 16,
                                               anchors=torch.tensor([[25.0, 25.0]]))
    assert torch.allclose(sparse[-1, 10, 10], torch.tensor([1.0, 1.0]))  # the released demo's rule
    assert sparse[:, 23:27, 23:27].abs().max() == 0 and mask[:, 23:27, 23:27].min() == 1


def test_empty_brush_means_everything_moves():
    assert brush_to_static(torch.zeros(4, 5)).sum() == 0
    s = brush_to_static(torch.tensor([[1.0, 0.0]]))
    assert s.tolist() == [[0.0, 1.0]]


def test_soft_splat_identity_scaling():
    z0 = torch.randn(1, 3, 4, 4)
    out = splat_first_frame(z0, torch.zeros(1, 2, 4, 4, 2))
    assert torch.allclose(out[0, 0], z0[0] / 1.0000001, atol=1e-7)
    assert F.mse_loss(out[0, 1], z0[0]) < 1e-12
