"""OpenCLIP text/vision encoders: same results as open_clip's own modules with the same
weights (penultimate text layer, vision tokens before ln_post), bundled tokenizer."""
import open_clip
import pytest
import torch

from kinema.pipelines.dynamicrafter.encoders import CLIP_MEAN, CLIP_STD, TextEncoder, VisionEncoder, tokenize


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    cfg = dict(embed_dim=16, vision_cfg=dict(image_size=28, layers=2, width=64, head_width=32, patch_size=14),
               text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=3))
    m = open_clip.model.CLIP(**cfg).eval()
    with torch.no_grad():
        for p in m.parameters():          # no zero-initialised paths
            p.add_(0.05 * torch.randn_like(p))
    return m


def test_tokenizer_is_bundled():
    t = tokenize(["a photo of a cat", ""])
    assert t.shape == (2, 77) and t.dtype == torch.long
    assert t[0, 0] == 49406 and (t[0] == 49407).any() and t[1, 1] == 49407


def test_text_encoder_matches_open_clip_penultimate(clip):
    sd = {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}
    enc = TextEncoder(width=64, layers=3, heads=2, vocab_size=49408, context_length=77).eval()
    keep = {k: v for k, v in sd.items()
            if not k.startswith("transformer.resblocks.2.") and k not in ("text_projection", "logit_scale", "attn_mask")}
    enc.load_state_dict(keep, strict=True)
    tokens = tokenize(["a cat walking on the grass", "waves"])
    with torch.no_grad():
        ours = enc(tokens)
        x = clip.token_embedding(tokens) + clip.positional_embedding
        for blk in clip.transformer.resblocks[:-1]:
            x = blk(x, attn_mask=clip.attn_mask)
        ref = clip.ln_final(x)
    assert ours.shape == (2, 77, 64)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_vision_encoder_matches_open_clip_tokens(clip):
    sd = {k[len("visual."):]: v for k, v in clip.state_dict().items() if k.startswith("visual.")}
    enc = VisionEncoder(width=64, layers=2, heads=2, patch_size=14, image_size=28).eval()
    enc.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("ln_post", "proj"))}, strict=True)
    img = torch.rand(2, 3, 40, 56) * 2 - 1
    with torch.no_grad():
        ours = enc(img)
        pix = enc.preprocess(img)
        ref = clip.visual.transformer(clip.visual._embeds(pix))
    assert pix.shape == (2, 3, 28, 28) and ours.shape == (2, 5, 64)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_vision_preprocess_normalises_whole_frame():
    enc = VisionEncoder(width=64, layers=1, heads=1, patch_size=14, image_size=28)
    img = torch.full((1, 3, 30, 90), 0.2)          # wide frame: resized whole, no crop
    pix = enc.preprocess(img)
    expect = torch.tensor([(0.6 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]).view(1, 3, 1, 1)
    torch.testing.assert_close(pix, expect.expand_as(pix), atol=1e-5, rtol=1e-5)
