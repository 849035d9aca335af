"""Story nodes: comic layout, the native-sampler patch (ComfyUI's attn1-replace contract; the
patch inside a real ComfyUI UNet is in tests/comfyui/test_story_native.py), the story batch node."""
from types import SimpleNamespace

import pytest
import torch

from kinema.kernels.attention import multihead_attention
from kinema.nodes import story as story_nodes
from kinema.pipelines import story as story_pipeline

STORY = "[A] a knight in red armour\n[A] the knight on a horse\n[NC] a castle\n[A] the knight sleeping"


def test_node_declarations():
    for cls in story_nodes.NODE_CLASS_MAPPINGS.values():
        spec = cls.INPUT_TYPES()
        for name, (kind, *opts) in spec["required"].items():
            assert opts and opts[0].get("tooltip"), f"{cls.__name__}.{name} has no tooltip"
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
        assert cls.CATEGORY.startswith("Kinema/") and cls.DESCRIPTION and hasattr(cls, cls.FUNCTION)
    assert set(story_nodes.NODE_DISPLAY_NAME_MAPPINGS) == set(story_nodes.NODE_CLASS_MAPPINGS)


# ----------------------------------------------------------------------------- comic layout

def test_comic_layout_pages():
    panels = torch.zeros(5, 40, 30, 3)
    for i in range(5):
        panels[i, ..., i % 3] = 1.0
    node = story_nodes.KinemaComicLayout()
    (pages,) = node.layout(panels, "one\ntwo\nthree\nfour\nfive", 2, 2, 4, 20, 10, 1.0)
    assert pages.shape == (2, 2 * 60 + 3 * 4, 2 * 30 + 3 * 4, 3)
    # panel 2 (index 1) sits top right, green; panel 5 (index 4) on page 2 top left, green too
    assert torch.equal(pages[0, 4:44, 38:68], panels[1])
    assert torch.equal(pages[1, 4:44, 4:34], panels[4])
    # a caption is drawn under each panel (dark pixels in its strip), nothing under missing slots
    strip = pages[0, 44:64, 4:34]
    assert (strip < 0.5).any()
    assert (pages[1, 44:64, 38:68] == 1.0).all()
    (plain,) = node.layout(panels, "", 3, 1, 0, 20, 10, 0.0)
    assert plain.shape == (2, 40, 90, 3)  # no captions -> no strip


def test_comic_layout_errors():
    node = story_nodes.KinemaComicLayout()
    with pytest.raises(ValueError, match="panels: expected an IMAGE batch"):
        node.layout(torch.zeros(2, 8, 8), "", 2, 2, 4, 20, 10, 1.0)
    with pytest.raises(ValueError, match="captions: 3 lines for 2 panels"):
        node.layout(torch.zeros(2, 8, 8, 3), "a\nb\nc", 2, 2, 4, 20, 10, 1.0)


# ----------------------------------------------------------------------------- native patch

class _Patcher:
    """The part of ComfyUI's ModelPatcher the patch node uses: clone() and
    set_model_attn1_replace(), over a UNet with output_blocks of transformer layers."""

    def __init__(self, unet, patches=None):
        self.model = SimpleNamespace(diffusion_model=unet)
        self.patches = dict(patches or {})

    def clone(self):
        return _Patcher(self.model.diffusion_model, self.patches)

    def set_model_attn1_replace(self, patch, block_name, number, transformer_index=None):
        self.patches[(block_name, number, transformer_index)] = patch


def _unet(depths):
    blocks = []
    for d in depths:
        layers = [torch.nn.Identity()]
        if d:
            layers.append(SimpleNamespace(transformer_blocks=[None] * d))
        blocks.append(layers)
    return SimpleNamespace(output_blocks=blocks)


def test_patch_registers_every_up_block_self_attention():
    # an SDXL-shaped UNet: output blocks 0-2 with 10 transformer blocks, 3-5 with 2, 6-8 none
    model = _Patcher(_unet([10, 10, 10, 2, 2, 2, 0, 0, 0]))
    node = story_nodes.KinemaConsistentAttentionPatch()
    (patched,) = node.patch(model, STORY, "", 2, 0.5, 0.5, 3, "lowvram")
    assert model.patches == {}  # the input model is untouched
    assert len(patched.patches) == 36
    assert set(k[1] for k in patched.patches) == {0, 1, 2, 3, 4, 5}
    with pytest.raises(ValueError, match="no UNet output blocks"):
        node.patch(SimpleNamespace(clone=lambda: SimpleNamespace(model=None)), STORY, "", 2, 0.5, 0.5, 0, "lowvram")


def _call(patch, q, k, v, step, sample_sigmas, cond_or_uncond=(1, 0), block=("output", 4), index=1, shape=None):
    opts = {"n_heads": 2, "dim_head": 8, "block": block, "block_index": index,
            "cond_or_uncond": list(cond_or_uncond), "sigmas": sample_sigmas[step].repeat(q.shape[0]),
            "sample_sigmas": sample_sigmas, "original_shape": shape or [q.shape[0], 4, 8, 8]}
    return patch(q, k, v, opts)


def _softmax_attention(q, k, v, heads):
    """softmax(q k^T / sqrt(d)) v for each head, written out: q (Nq, D), k and v (Nk, D)."""
    d = q.shape[-1] // heads
    out = []
    for h in range(heads):
        part = slice(h * d, (h + 1) * d)
        weights = torch.softmax(q[:, part] @ k[:, part].T / d ** 0.5, dim=-1)
        out.append(weights @ v[:, part])
    return torch.cat(out, dim=-1)


def test_patch_is_softmax_attention_over_own_and_shared_reference_tokens():
    layout = story_pipeline.parse_story(STORY, id_length=2).layout
    patch = story_pipeline.NativeConsistentAttention(layout, sa32=0.5, sa64=0.5, seed=9)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(8, 16, 16, generator=gen) for _ in range(3))  # [uncond x4, cond x4]
    sigmas = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.0])
    _call(patch, q, k, v, 1, sigmas)  # the first call starts the run's state
    # fix the two random draws: which reference tokens are shared, and whether a unit is consistent
    shared = {0: torch.arange(16) % 2 == 0, 1: torch.arange(16) % 3 == 0}
    patch.state.mask_sampler = lambda step, n, panels, rate: torch.stack([shared[p] for p in panels])
    patch.state.gate_sampler = lambda step, layer, unit: True
    got = _call(patch, q, k, v, 2, sigmas)
    # panels 0 and 1 are the knight's references and read each other's shared tokens, panel 3
    # (the knight again) reads both, the [NC] panel 2 only itself; in both guidance halves
    reads = {0: [1], 1: [0], 2: [], 3: [0, 1]}
    for half in range(2):
        for panel, sources in reads.items():
            row = half * 4 + panel
            keys = torch.cat([k[row]] + [k[half * 4 + s][shared[s]] for s in sources])
            values = torch.cat([v[row]] + [v[half * 4 + s][shared[s]] for s in sources])
            assert torch.allclose(got[row], _softmax_attention(q[row], keys, values, 2), atol=1e-5), row


def test_patch_follows_comfy_batches():
    layout = story_pipeline.parse_story(STORY, id_length=2).layout
    patch = story_pipeline.NativeConsistentAttention(layout, sa32=0.5, sa64=0.5, seed=9)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(8, 16, 16, generator=gen) for _ in range(3))  # [uncond x4, cond x4]
    sigmas = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.0])
    got = _call(patch, q, k, v, 2, sigmas)
    assert patch.state.step == 2
    # the NC panel is plain attention, the others are not
    plain = multihead_attention(q, k, v, 2)
    assert torch.allclose(got[[2, 6]], plain[[2, 6]], atol=1e-6)
    # cond and uncond run as separate chunks give the same rows
    cond_only = _call(patch, q[4:], k[4:], v[4:], 2, sigmas, cond_or_uncond=(0,))
    assert torch.allclose(cond_only, got[4:], atol=1e-6)
    # a new run (another schedule or size) starts a fresh state; the same inputs give the same result
    first_state = patch.state
    _call(patch, q, k, v, 0, torch.tensor([10.0, 5.0, 0.0]))
    assert patch.state is not first_state
    again = _call(patch, q, k, v, 2, sigmas)
    assert torch.allclose(again, got, atol=1e-6)
    with pytest.raises(ValueError, match="latent batch: 3 images but the story has 4 panels"):
        _call(patch, q[:6], k[:6], v[:6], 1, sigmas)


# ----------------------------------------------------------------------------- story batch node

def test_story_batch_node_checks_the_story_first():
    # the story is parsed before any model is touched (the node runs on ComfyUI's models:
    # tests/comfyui/test_story_core.py)
    node = story_nodes.KinemaStoryBatch()
    with pytest.raises(ValueError, match="story: it is empty"):
        node.generate(None, None, None, " ", "", 2, "", "", 32, 32, 1, 5.0, 3, 0.5, 0.5, 2, True, "lowvram")
    with pytest.raises(ValueError, match="never appears alone"):
        node.generate(None, None, None, "[A] [B] together\n[A] alone", "", 1, "", "", 32, 32, 1, 5.0, 3, 0.5, 0.5, 2,
                      True, "lowvram")


class _Clip:
    """ComfyUI's CLIP object interface: tokenize() and encode_from_tokens(); prompts longer
    than six words take two 77-token chunks."""

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_pooled=False):
        chunks = 2 if len(tokens.split()) > 6 else 1
        seed = sum(map(ord, tokens)) % 1000
        cond = torch.randn(1, 77 * chunks, 8, generator=torch.Generator().manual_seed(seed))
        return cond, torch.full((1, 4), float(len(tokens)))


def test_story_conditioning_batches_panels():
    story = STORY + "\n[A] the knight rides through a very long and winding valley at dawn"
    pos, neg, count, captions = story_nodes.KinemaStoryConditioning().encode(_Clip(), story, "", 2, "{prompt}", "ugly")
    assert count == 5 and len(captions.splitlines()) == 5
    cond, meta = pos[0]
    assert cond.shape == (5, 154, 8) and meta["pooled_output"].shape == (5, 4)
    clip = _Clip()
    first, _ = clip.encode_from_tokens(clip.tokenize("a knight in red armour"))
    blank, _ = clip.encode_from_tokens(clip.tokenize(""))
    assert torch.equal(cond[0, :77], first[0]) and torch.equal(cond[0, 77:], blank[0])
    assert neg[0][0].shape == (1, 77, 8)
