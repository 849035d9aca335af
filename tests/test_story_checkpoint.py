"""Single-file checkpoints: a tiny SD1.5 / SDXL model saved in the original LDM / SGM key
layout loads back through the loader (diffusers' converters, strict key checks) with the
same weights; the CLIP tokenizer gives CLIP's ids."""
import re

import pytest
import torch
from safetensors.torch import save_file

from kinema.pipelines import story as story_pipeline
from kinema.pipelines.text_encoding import clip_tokenizer
from kinema.runtime import KinemaError
from ldm_layout import text_to_ldm, unet_to_ldm, vae_to_ldm
from test_story_pipeline import TINY, tiny_models

def open_clip_to_ldm(sd, prefix="conditioner.embedders.1.model."):
    out = {prefix + "logit_scale": torch.tensor(4.6)}
    layers = {}
    for key, value in sd.items():
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", key)
        if m:
            i, rest = m.groups()
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                layers.setdefault((i, rest.split(".")[-1]), {})[rest.split(".")[1]] = value
                continue
            rest = (rest.replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2")
                    .replace("self_attn.out_proj", "attn.out_proj").replace("mlp.fc1", "mlp.c_fc")
                    .replace("mlp.fc2", "mlp.c_proj"))
            out[f"{prefix}transformer.resblocks.{i}.{rest}"] = value
            continue
        name = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                "text_model.embeddings.position_embedding.weight": "positional_embedding",
                "text_model.final_layer_norm.weight": "ln_final.weight",
                "text_model.final_layer_norm.bias": "ln_final.bias"}.get(key)
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        else:
            assert name is not None, key
            out[prefix + name] = value
    for (i, kind), parts in layers.items():
        suffix = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        out[f"{prefix}transformer.resblocks.{i}.attn.{suffix}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


def to_single_file(models, arch):
    sd = {}
    sd.update(unet_to_ldm(models.unet.state_dict(), dict(models.unet.config)))
    sd.update(vae_to_ldm(models.vae.state_dict()))
    pre = "cond_stage_model.transformer." if arch == "sd15" else "conditioner.embedders.0.transformer."
    sd.update(text_to_ldm(models.text_encoder.state_dict(), pre))
    if arch == "sdxl":
        sd.update(open_clip_to_ldm(models.text_encoder_2.state_dict()))
    return {k: v.contiguous() for k, v in sd.items()}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_single_file_round_trip(arch, tmp_path):
    models = tiny_models(arch)
    path = tmp_path / f"tiny_{arch}.safetensors"
    save_file(to_single_file(models, arch), str(path))
    loaded = story_pipeline.load_checkpoint(path, dtype=torch.float32, configs=TINY[arch])
    assert loaded.arch == arch
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(models, part), getattr(loaded, part)
        if a is None:
            assert b is None
            continue
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb), part
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (part, k)
    ids = torch.tensor([[49406, 320, 2368, 49407] + [49407] * 73])
    assert torch.equal(models.text_encoder(ids).last_hidden_state, loaded.text_encoder(ids).last_hidden_state)
    # a checkpoint with a stray or missing key is refused with the key named
    sd = to_single_file(models, arch)
    sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    save_file(sd, str(path))
    with pytest.raises(KinemaError, match=r"\(UNet\): does not match the expected layout: .* of which only"):
        story_pipeline.load_checkpoint(path, dtype=torch.float32, configs=TINY[arch])
    sd.pop("model.diffusion_model.extra.weight")
    sd.pop(next(k for k in sd if k.startswith("first_stage_model.decoder")))
    save_file(sd, str(path))
    with pytest.raises(KinemaError, match=r"\(VAE\): does not match the expected layout: 1 missing"):
        story_pipeline.load_checkpoint(path, dtype=torch.float32, configs=TINY[arch])


def test_clip_tokenizer_ids():
    tok = clip_tokenizer()
    ids = tok(["a photo of a cat, highly detailed"], padding="max_length", max_length=77, truncation=True,
              return_tensors="pt").input_ids
    # the ids of CLIP's own tokenizer for this text
    assert ids[0, :11].tolist() == [49406, 320, 1125, 539, 320, 2368, 267, 5302, 12609, 49407, 49407]
    assert ids.shape == (1, 77)
    pad0 = clip_tokenizer(pad="!")(["a cat"], padding="max_length", max_length=6, return_tensors="pt").input_ids
    assert pad0[0].tolist() == [49406, 320, 2368, 49407, 0, 0]
    assert len(tok.get_vocab()) == 49408


def test_clip_tokenizer_ids_equal_open_clips_tokenize():
    """open_clip's tokenize (what the official SDXL code uses for its second text encoder) runs
    its own BPE over the same vocabulary: the ids agree, including text the pad token "!" is in."""
    import open_clip

    prompts = ["a photo of a cat, highly detailed", "A Man's HAT -- 3 dogs & 12 cats!!", "hi! there!",
               "café naïve déjà vu", "  lots   of   spaces\tand\nlines ", "word " * 100, ""]
    ref = open_clip.tokenize(prompts, context_length=77)  # pads with id 0
    ids = clip_tokenizer(pad="!")(prompts, padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids
    assert torch.equal(ids, ref)
    ids = clip_tokenizer()(prompts, padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt").input_ids
    assert torch.equal(ids[ref != 0], ref[ref != 0]) and bool((ids[ref == 0] == 49407).all())
