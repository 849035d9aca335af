"""Story batches end to end with tiny random SD1.5 / SDXL architectures; story parsing;
the shipped configs; checkpoint loading errors."""
import pytest
import torch

from kinema.pipelines import story as story_pipeline
from kinema.kernels.consistent_attention import ConsistentSelfAttention, StoryLayout
from kinema.runtime import KinemaError

TEXT_CFG = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
            "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu",
            "projection_dim": 32, "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
VAE_CFG = {"block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
           "up_block_types": ["UpDecoderBlock2D"] * 2, "latent_channels": 4, "layers_per_block": 1,
           "norm_num_groups": 4, "sample_size": 32, "scaling_factor": 0.18215}
TINY = {
    "sd15": {
        "unet": {"block_out_channels": [16, 32], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1,
                 "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 8, "sample_size": 16},
        "vae": VAE_CFG, "text_encoder": TEXT_CFG,
    },
    "sdxl": {
        "unet": {"block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1,
                 "transformer_layers_per_block": [1, 2], "cross_attention_dim": 64, "attention_head_dim": [2, 4],
                 "norm_num_groups": 8, "sample_size": 16, "use_linear_projection": True,
                 "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                 "projection_class_embeddings_input_dim": 6 * 8 + 32},
        "vae": VAE_CFG, "text_encoder": TEXT_CFG, "text_encoder_2": dict(TEXT_CFG, hidden_act="gelu"),
    },
}

STORY = """[Lily] a girl with red hair in a garden #Lily in the garden
[Lily] a girl with red hair reading a book
[NC] an empty street at night
[Lily] a girl with red hair at the beach
[Lily] eating an ice cream #Ice cream!"""


def tiny_models(arch):
    torch.manual_seed(0)
    m = story_pipeline.build_models(arch, configs=TINY[arch], device="cpu")
    for mod in (m.unet, m.vae, m.text_encoder, m.text_encoder_2):
        if mod is not None:
            mod.eval().requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def sd15():
    return tiny_models("sd15")


@pytest.fixture(scope="module")
def sdxl():
    return tiny_models("sdxl")


def settings(**kw):
    base = dict(width=16, height=16, steps=2, cfg=5.0, seed=7, batch_size=2)
    base.update(kw)
    return story_pipeline.StorySettings(**base)


# ----------------------------------------------------------------------------- parsing

def test_parse_story():
    st = story_pipeline.parse_story(STORY, id_length=2, style="comic, {prompt}")
    assert len(st.panels) == 5
    assert st.references == {"Lily": [0, 1]}
    assert st.panels[2].characters == ()
    assert st.panels[0].caption == "Lily in the garden"
    assert st.panels[1].caption == "a girl with red hair reading a book"
    assert st.panels[0].prompt == "comic, a girl with red hair in a garden"
    two = story_pipeline.parse_story("[A] x\n[B] y\n[A] [B] together\n[NC] sky", id_length=1,
                         characters="[A] a tall man\n[B] a small dog")
    assert two.references == {"A": [0], "B": [1]}
    assert two.panels[2].characters == ("A", "B")
    assert two.panels[2].prompt == "a tall man, a small dog, together"


@pytest.mark.parametrize("text,kw,match", [
    ("", {}, "story: it is empty"),
    ("  \n \n", {}, "story: it is empty"),
    ("[A] x\n[B] y\n[C] z", {"id_length": 2}, "3 character\\(s\\) need 2 reference"),
    ("[A] x", {"id_length": 1, "characters": "[A] a\n[B] b"}, "2 character\\(s\\) need 1"),
    ("[A] x\n[A] y\n[Bob] z", {"id_length": 1, "characters": "[A] a man"}, "'\\[Bob\\]', which is not in characters"),
    ("[A] x\n[A] [B] y\n[A] z", {"id_length": 1}, "'\\[B\\]' never appears alone"),
    ("[A] x\n[A] y\n[A] v\n[B] z\n[B] w\n[NC] u", {"id_length": 3}, "id_length: 3 is larger than the 2 panel"),
    ("[A] x", {"id_length": 5}, "id_length: 5 is outside"),
    ("[] x", {"id_length": 1}, "empty \\[\\] name"),
])
def test_parse_errors(text, kw, match):
    with pytest.raises(ValueError, match=match):
        story_pipeline.parse_story(text, **kw)


# ----------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_story_batch(arch, request):
    models = request.getfixturevalue(arch)
    story = story_pipeline.parse_story(STORY, id_length=2)
    saved = dict(models.unet.attn_processors)
    out = story_pipeline.generate_story(models, story, settings())
    assert out.shape == (5, 16, 16, 3) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    # the model is left as it was: processors restored, FreeU off
    assert {k: type(v) for k, v in models.unet.attn_processors.items()} == {k: type(v) for k, v in saved.items()}
    again = story_pipeline.generate_story(models, story, settings())
    assert torch.equal(out, again)
    # another size and another number of panels on the same models just work
    small = story_pipeline.generate_story(models, story_pipeline.parse_story("[A] x\n[A] y\n[A] z", id_length=1),
                              settings(width=24, height=16, freeu=False, steps=1))
    assert small.shape == (3, 16, 24, 3)


def test_window_size_does_not_change_panels(sd15):
    """Later panels read the bank: denoising them one at a time or together gives the same
    images (the memory-bounded route equals one big batch)."""
    story = story_pipeline.parse_story(STORY, id_length=2)
    one = story_pipeline.generate_story(sd15, story, settings(batch_size=1, sa32=1.0, sa64=1.0))
    three = story_pipeline.generate_story(sd15, story, settings(batch_size=3, sa32=1.0, sa64=1.0))
    assert torch.allclose(one, three, atol=1e-4)


def test_processor_in_the_unet(sd15):
    """The installed processors change later panels' UNet output (rate 1 vs 0, gate on) and
    leave the no-character panel alone."""
    unet = sd15.unet
    layout = StoryLayout([("A",), ("A",), (), ("A",)], {"A": [0, 1]})
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=gen)
    ctx = torch.randn(4, 77, 32, generator=gen)
    saved = unet.attn_processors
    outs = []
    try:
        for rate in (0.0, 1.0):
            state = ConsistentSelfAttention(layout, sa32=rate, sa64=rate, gate_sampler=lambda *a: True)
            state.latent_hw = (8, 8)
            state.set_step(3)
            batch = story_pipeline._Batch()
            batch.panels, batch.groups = [0, 1, 2, 3], 1
            procs = dict(saved)
            for name in story_pipeline.up_block_self_attention_names(unet):
                procs[name] = story_pipeline.StoryAttnProcessor(name, state, batch)
            unet.set_attn_processor(procs)
            outs.append(unet(x, 500, encoder_hidden_states=ctx).sample)
    finally:
        unet.set_attn_processor(saved)
    plain = unet(x, 500, encoder_hidden_states=ctx).sample
    assert torch.allclose(outs[0], plain, atol=1e-5)
    assert torch.allclose(outs[1][2], plain[2], atol=1e-5)
    for p in (0, 1, 3):
        assert (outs[1][p] - plain[p]).abs().max() > 1e-3


def test_bad_settings(sd15):
    story = story_pipeline.parse_story(STORY, id_length=2)
    with pytest.raises(ValueError, match="width: 30 is not a positive multiple of 4"):
        story_pipeline.generate_story(sd15, story, settings(width=30))


# ----------------------------------------------------------------------------- configs and files

@pytest.mark.parametrize("arch,expected", [
    ("sd15", {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}),
    ("sdxl", {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
              "text_encoder_2": 694_659_840}),
])
def test_shipped_configs_match_released_models(arch, expected):
    m = story_pipeline.build_models(arch, device="meta")
    for part, count in expected.items():
        assert sum(p.numel() for p in getattr(m, part).parameters()) == count, part
    assert up_attn(m) == {"sd15": 9, "sdxl": 36}[arch]


def up_attn(m):
    return len(story_pipeline.up_block_self_attention_names(m.unet))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(KinemaError, match="file not found"):
        story_pipeline.load_checkpoint(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(KinemaError, match="bad.safetensors.*could not be read: it is not a valid safetensors file"):
        story_pipeline.load_checkpoint(bad)
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, str(other))
    with pytest.raises(KinemaError, match="not an SD1.5 or SDXL single-file checkpoint"):
        story_pipeline.load_checkpoint(other)
