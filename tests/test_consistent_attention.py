"""Consistent self-attention: parity with the official processors and properties."""
import pytest
import torch
from safetensors.torch import load_file

from kinema.kernels.attention import multihead_attention
from kinema.kernels.consistent_attention import (
    ConsistentSelfAttention, StoryLayout, consistent_attention, consistent_attention_dense)

ATOL = 1e-5
HEADS = 2


class Proj:
    """The SDXL attn1 projections of the fixture: to_q/k/v without bias, to_out with bias."""

    def __init__(self, d):
        self.wq, self.wk, self.wv = d["weight.to_q.weight"], d["weight.to_k.weight"], d["weight.to_v.weight"]
        self.wo, self.bo = d["weight.to_out.0.weight"], d["weight.to_out.0.bias"]

    def qkv(self, h):
        return h @ self.wq.T, h @ self.wk.T, h @ self.wv.T

    def out(self, o):
        return o @ self.wo.T + self.bo


def run_phase(state, proj, hidden, panels, groups=2):
    q, k, v = proj.qkv(hidden)
    return proj.out(state.attend(q, k, v, HEADS, "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
                                 panels, groups))


def assert_phase(state, proj, d, hidden, panels, want):
    """Run the fixture's hidden states ``hidden`` for ``panels`` and compare with its ``want``."""
    out = run_phase(state, proj, d[hidden], panels)
    assert (out - d[want]).abs().max() < ATOL, want
    return out


def story_state(masks, gate=True, schedule="lowvram", keep_bank=True):
    # panels 0, 1: references of A; panel 2: a later panel with A
    layout = StoryLayout([("A",), ("A",), ("A",)], {"A": [0, 1]})
    return ConsistentSelfAttention(
        layout, schedule=schedule, keep_bank=keep_bank,
        mask_sampler=lambda step, n, panels, rate: masks[panels],
        gate_sampler=lambda step, layer, unit: gate)


@pytest.fixture(scope="module")
def lowvram(fixtures_dir):
    return load_file(str(fixtures_dir / "story_diffusion" / "consistent_attention_lowvram.safetensors"))


@pytest.fixture(scope="module")
def app(fixtures_dir):
    return load_file(str(fixtures_dir / "story_diffusion" / "consistent_attention_app.safetensors"))


@pytest.mark.parametrize("rate", ["sa1p0", "sa0p0", "sa0p5"])
def test_lowvram_parity(lowvram, rate):
    d = lowvram
    proj = Proj(d)
    state = story_state(d[f"{rate}.index_mask"])
    state.set_step(1)
    assert_phase(state, proj, d, "in.write_hidden.A", [0, 1], f"{rate}.write_out.A")
    # the bank holds the sampled reference tokens (projected): compare with the official bank
    bank_k = torch.stack([state.bank[(1, 0, "A", g)][0] for g in (0, 1)])  # one entry per CFG half
    bank_v = torch.stack([state.bank[(1, 0, "A", g)][1] for g in (0, 1)])
    ref_hidden = torch.cat([d[f"{rate}.bank.A.0"], d[f"{rate}.bank.A.1"]], dim=1)
    assert bank_k.shape == (2, ref_hidden.shape[1], 64)
    assert torch.allclose(bank_k, ref_hidden @ proj.wk.T, atol=ATOL, rtol=0)
    assert torch.allclose(bank_v, ref_hidden @ proj.wv.T, atol=ATOL, rtol=0)
    assert_phase(state, proj, d, "in.read_hidden", [2], f"{rate}.read_out")


def test_lowvram_step0_and_gate_off(lowvram):
    d = lowvram
    proj = Proj(d)
    state = story_state(d["sa1p0.index_mask"])
    state.set_step(0)
    write = assert_phase(state, proj, d, "in.write_hidden.A", [0, 1], "step0.write_out.A")
    assert (write - d["ref.plain_write"]).abs().max() < ATOL
    off = story_state(d["sa1p0.index_mask"], gate=False)
    off.set_step(1)
    assert_phase(off, proj, d, "in.write_hidden.A", [0, 1], "gateoff.write_out.A")
    assert_phase(off, proj, d, "in.read_hidden", [2], "gateoff.read_out")


def app_masks(mask, n=256, ref=2):
    """Per-image token masks from the official (T*n, T*n) mask: the read row shows every
    reference image's sampled tokens."""
    read_row = mask[ref * n]
    per_image = torch.stack([read_row[j * n:(j + 1) * n] for j in range(ref)] + [read_row[ref * n:]])
    # the write rows use the same shared row
    for i in range(ref):
        for j in range(ref):
            if i != j:
                assert torch.equal(mask[i * n, j * n:(j + 1) * n], per_image[j])
    return per_image


@pytest.mark.parametrize("rate", ["sa1p0", "sa0p0", "sa0p5"])
def test_app_parity(app, rate):
    d = app
    proj = Proj(d)
    state = story_state(app_masks(d[f"{rate}.attn_mask"]), schedule="app")
    state.set_step(5)
    assert_phase(state, proj, d, "in.write_hidden", [0, 1], f"{rate}.write_out")
    assert_phase(state, proj, d, "in.read_hidden", [2], f"{rate}.read_out")


def test_app_early_and_gate_off(app):
    d = app
    proj = Proj(d)
    masks = app_masks(d["sa0p5.attn_mask"])
    state = story_state(masks, schedule="app")
    state.set_step(2)
    assert_phase(state, proj, d, "in.write_hidden", [0, 1], "early.write_out")
    assert_phase(state, proj, d, "in.read_hidden", [2], "early.read_out")
    # the early read is not plain attention: it sees every reference token
    assert (d["early.read_out"] - d["ref.plain_read"]).abs().max() > 1e-3
    off = story_state(masks, schedule="app", gate=False)
    off.set_step(5)
    assert_phase(off, proj, d, "in.write_hidden", [0, 1], "gateoff.write_out")
    assert_phase(off, proj, d, "in.read_hidden", [2], "gateoff.read_out")


def test_in_batch_equals_write_then_read(lowvram):
    """All panels in one batch (the native-sampler route) give the official two-pass result."""
    d = lowvram
    proj = Proj(d)
    state = story_state(d["sa0p5.index_mask"], keep_bank=False)
    state.set_step(1)
    w, r = d["in.write_hidden.A"], d["in.read_hidden"]
    hidden = torch.cat([w[0:2], r[0:1], w[2:4], r[1:2]])  # [u1 u2 u3 c1 c2 c3]
    out = run_phase(state, proj, hidden, [0, 1, 2])
    assert (out[[0, 1, 3, 4]] - d["sa0p5.write_out.A"]).abs().max() < ATOL
    assert (out[[2, 5]] - d["sa0p5.read_out"]).abs().max() < ATOL


def test_without_cfg(lowvram):
    """One group (no CFG batch) works and equals the conditional half; the official code
    assumes an even [uncond, cond] batch."""
    d = lowvram
    proj = Proj(d)
    state = story_state(d["sa0p5.index_mask"])
    state.set_step(1)
    out = run_phase(state, proj, d["in.write_hidden.A"][2:], [0, 1], groups=1)
    assert (out - d["sa0p5.write_out.A"][2:]).abs().max() < ATOL
    read = run_phase(state, proj, d["in.read_hidden"][1:], [2], groups=1)
    assert (read - d["sa0p5.read_out"][1:]).abs().max() < ATOL


# ----------------------------------------------------------------------------- properties

def random_case(b=5, n=24, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, d, generator=g) for _ in range(3))
    masks = torch.rand(b, n, generator=g) < 0.5
    return q, k, v, masks


def test_rate_zero_is_plain():
    q, k, v, _ = random_case()
    sources = [[j for j in range(5) if j != i] for i in range(5)]
    zero = torch.zeros(5, 24, dtype=torch.bool)
    out = consistent_attention(q, k, v, 2, sources, zero)
    assert torch.allclose(out, multihead_attention(q, k, v, 2), atol=1e-6)
    layout = StoryLayout([("A",), ("A",), ("A",), ()], {"A": [0, 1]})
    state = ConsistentSelfAttention(layout, sa32=0.0, sa64=0.0, seed=3)
    state.set_step(7)
    qq, kk, vv = q[:4], k[:4], v[:4]
    assert torch.allclose(state.attend(qq, kk, vv, 2, "l", [0, 1, 2, 3]), multihead_attention(qq, kk, vv, 2), atol=1e-6)


@pytest.mark.parametrize("merge", [True, False])
def test_merged_equals_untiled(merge, monkeypatch):
    """Own-token attention merged with each extra block by log-sum-exp (the CPU route), or keys
    concatenated per row (elsewhere), equals one joint masked attention over the batch."""
    import kinema.kernels.consistent_attention as ca
    if not merge:
        monkeypatch.setattr(ca, "_merge_in_place", lambda q: False)
    q, k, v, masks = random_case()
    sources = [[1, 2], [0, 2], [0, 1], [0, 1], []]
    dense = consistent_attention_dense(q, k, v, 2, sources, masks)
    bank = [None, None, None, [(k[4, :5], v[4, :5]), (k[4, 5:9], v[4, 5:9])], None]
    for chunk in (None, 1, 7):
        extras = [[(k[j][masks[j]], v[j][masks[j]]) for j in src] for src in sources]
        assert torch.allclose(ca.attention_with_extra_keys(q, k, v, 2, extras, chunk), dense, atol=1e-5)
    assert torch.allclose(consistent_attention(q, k, v, 2, sources, masks), dense, atol=1e-5)
    # a bank entry (two blocks) attended as well: the same as those tokens as one more source row
    with_bank = consistent_attention(q, k, v, 2, sources, masks, bank)
    m = masks.clone()
    m[4] = False
    m[4, :9] = True
    src = [list(s) for s in sources]
    src[3] = [4] + src[3]
    assert torch.allclose(with_bank, consistent_attention_dense(q, k, v, 2, src, m), atol=1e-5)
    assert torch.allclose(with_bank[[0, 1, 2, 4]], dense[[0, 1, 2, 4]], atol=1e-6)


def test_one_panel_is_plain():
    q, k, v, _ = random_case(b=1)
    layout = StoryLayout([("A",)], {"A": [0]})
    state = ConsistentSelfAttention(layout, sa32=1.0, sa64=1.0, seed=1)
    for step in (0, 3, 30):
        state.set_step(step)
        assert torch.allclose(state.attend(q, k, v, 2, "l", [0]), multihead_attention(q, k, v, 2), atol=1e-6)


def test_batch_order_independence():
    """Later panels see the same references whatever their order in the batch; so do the
    references, up to their own permutation."""
    q, k, v, _ = random_case(b=5)
    layout = StoryLayout([("A",), ("A",), ("A",), ("A",), ()], {"A": [0, 1]})
    make = lambda: ConsistentSelfAttention(layout, sa32=0.5, sa64=0.5, seed=11)
    a, b = make(), make()
    a.set_step(4)
    b.set_step(4)
    out = a.attend(q, k, v, 2, "l", [0, 1, 2, 3, 4])
    perm = [3, 1, 4, 0, 2]
    out_p = b.attend(q[perm], k[perm], v[perm], 2, "l", perm)
    assert torch.allclose(out_p, out[perm], atol=1e-6)


def test_windowed_reads_equal_one_batch():
    """References written once with a bank, later panels read in small windows: the same
    as everything in one batch (the memory-bounded pipeline route)."""
    q, k, v, _ = random_case(b=6, seed=4)
    layout = StoryLayout([("A",), ("A",), ("B",), ("A", "B"), ("A",), ()], {"A": [0, 1], "B": [2]})
    ref = ConsistentSelfAttention(layout, seed=2)
    ref.set_step(6)
    full = ref.attend(q, k, v, 2, "l", list(range(6)))
    bank = ConsistentSelfAttention(layout, seed=2, keep_bank=True)
    bank.set_step(6)
    part = bank.attend(q[:3], k[:3], v[:3], 2, "l", [0, 1, 2])
    assert torch.allclose(part, full[:3], atol=1e-6)
    for lo, hi in ((3, 5), (5, 6)):
        got = bank.attend(q[lo:hi], k[lo:hi], v[lo:hi], 2, "l", list(range(lo, hi)))
        assert torch.allclose(got, full[lo:hi], atol=1e-5)


def test_seeded_and_redrawn_per_step():
    layout = StoryLayout([("A",), ("A",)], {"A": [0, 1]})
    a = ConsistentSelfAttention(layout, seed=5)
    b = ConsistentSelfAttention(layout, seed=5)
    c = ConsistentSelfAttention(layout, seed=6)
    a.set_step(3), b.set_step(3), c.set_step(3)
    ma, mb, mc = a.token_masks(64), b.token_masks(64), c.token_masks(64)
    assert torch.equal(ma[0], mb[0]) and not torch.equal(ma[0], mc[0])
    a.set_step(4)
    assert not torch.equal(a.token_masks(64)[0], ma[0])
    assert 0.3 < ma[0].float().mean() < 0.7


def test_rates_per_level():
    layout = StoryLayout([("A",), ("A",)], {"A": [0, 1]})
    state = ConsistentSelfAttention(layout, sa32=0.25, sa64=0.75)
    state.latent_hw = (128, 128)  # SDXL at 1024 px
    assert state.rate_for(32 * 32) == 0.25 and state.rate_for(64 * 64) == 0.75
    state.latent_hw = (64, 96)  # SD1.5 at 512x768: up levels 16x24, 32x48, 64x96
    assert state.rate_for(16 * 24) == 0.25 and state.rate_for(32 * 48) == 0.75


def test_bad_input():
    with pytest.raises(ValueError, match="sa32"):
        ConsistentSelfAttention(StoryLayout([("A",)], {"A": [0]}), sa32=1.5)
    with pytest.raises(ValueError, match="no reference panels"):
        StoryLayout([("A",), ("B",)], {"A": [0]})
    layout = StoryLayout([("A",), ("A",), ("A",)], {"A": [0, 1]})
    state = ConsistentSelfAttention(layout)
    state.set_step(3)
    q, k, v, _ = random_case(b=2)
    with pytest.raises(ValueError, match="keep a character's references together"):
        state.attend(q, k, v, 2, "l", [0, 2])
    with pytest.raises(ValueError, match="bank"):
        state.gate_sampler = lambda *a: True
        state.attend(q[:1], k[:1], v[:1], 2, "l", [2])
    with pytest.raises(ValueError, match="groups"):
        state.attend(q, k, v, 2, "l", [0], groups=3)
