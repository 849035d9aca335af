"""Checkpoint conversion against the key manifests of the four released models, variant
detection from keys, and clear errors for wrong files."""
import json

import pytest
import torch

import tiny_dynamicrafter
from ldm_layout import vae_to_ldm
from kinema.pipelines import sd_checkpoint
from kinema.pipelines.dynamicrafter import convert
from kinema.pipelines.dynamicrafter.sampler import DiffusionSchedule, ScheduleConfig
from kinema.runtime import KinemaError

VARIANTS = ["256", "512", "1024", "512_interp"]


def _manifest(fixtures_dir, name):
    return json.load(open(fixtures_dir / "dynamicrafter" / f"key_manifest_{name}.json"))


def _meta_sd(man, variant, checkpoint_names=True):
    """A state dict of meta tensors with the manifest's keys/shapes (checkpoint naming), with
    real schedule buffers so the variant can be read from them."""
    sd = {k: torch.empty(s, device="meta") for k, s in man["keys"].items()}
    if checkpoint_names:
        for ck, mk in (man.get("checkpoint_key_renames (checkpoint name -> model name)") or {}).items():
            sd[ck] = sd.pop(mk)
    base = "512" if variant == "512_interp" else variant
    sch = DiffusionSchedule(ScheduleConfig.from_dict(convert.variants()["variants"][base]["schedule"]))
    if "scale_arr" in sd:
        sd["scale_arr"] = sch.scale_arr
    return sd


@pytest.mark.parametrize("name", VARIANTS)
def test_manifest_converts_with_every_key_accounted(fixtures_dir, name):
    man = _manifest(fixtures_dir, name)
    sd = _meta_sd(man, name)
    model = convert.convert(sd, f"key_manifest_{name}")
    expect = "512" if name == "512_interp" else name
    assert model.variant == expect
    # every parameter of every part came from the checkpoint (nothing left on meta unset,
    # and load_state_dict raised on any missing key); count elements consumed
    consumed = sum(p.numel() for p in model.parameters())
    unused = convert._unused_patterns(sd)
    unused_elems = sum(v.numel() for k, v in sd.items() if any(p.match(k) for p in unused))
    assert consumed + unused_elems == man["num_elements"]
    cfg = model.info["unet"]
    assert cfg["model_channels"] == 320 and cfg["channel_mult"] == [1, 2, 4, 4]
    assert cfg["attention_resolutions"] == [1, 2, 4] or sorted(cfg["attention_resolutions"]) == [1, 2, 4]
    assert cfg["num_res_blocks"] == 2 and cfg["context_dim"] == 1024 and cfg["num_head_channels"] == 64
    assert cfg["image_cross_attention_scale_learnable"] == (name == "256")
    assert model.info["resampler"] == {"dim": 1024, "depth": 4, "dim_head": 64, "heads": 12, "num_queries": 16,
                                       "embedding_dim": 1280, "output_dim": 1024, "ff_mult": 4, "video_length": 16}
    assert model.info["text"]["layers"] == 24 and model.info["text"]["heads"] == 16
    assert model.info["vision"] == {"width": 1280, "layers": 32, "heads": 16, "patch_size": 14, "image_size": 224,
                                    "mlp_ratio": 4.0}
    # text tower runs 23 of its 24 blocks (penultimate layer)
    assert len(model.text_encoder.transformer.resblocks) == 23


def test_unused_allow_list_is_exactly_what_is_left(fixtures_dir):
    man = _manifest(fixtures_dir, "512")
    sd = _meta_sd(man, "512")
    unused = convert._unused_patterns(sd)
    left = sorted(k for k in sd if any(p.match(k) for p in unused))
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in left
    assert "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight" not in left
    assert "embedder.model.visual.proj" in left and "embedder.model.token_embedding.weight" in left
    assert not any(k.startswith(("model.diffusion_model.", "image_proj_model.", "first_stage_model.")) for k in left)


def test_256_accepts_both_fs_names(fixtures_dir):
    man = _manifest(fixtures_dir, "256")
    for ckpt_names in (True, False):
        model = convert.convert(_meta_sd(man, "256", checkpoint_names=ckpt_names), "m256")
        assert model.variant == "256"


def test_missing_key_is_an_error(fixtures_dir):
    sd = _meta_sd(_manifest(fixtures_dir, "512"), "512")
    del sd["model.diffusion_model.output_blocks.3.1.proj_out.weight"]
    with pytest.raises(KinemaError, match="video UNet.*missing"):
        convert.convert(sd, "broken.ckpt")
    sd = _meta_sd(_manifest(fixtures_dir, "512"), "512")
    sd["model.diffusion_model.extra.weight"] = torch.empty(3, device="meta")
    with pytest.raises(KinemaError, match="unexpected"):
        convert.convert(sd, "broken.ckpt")
    sd = _meta_sd(_manifest(fixtures_dir, "512"), "512")
    sd["something_else"] = torch.empty(3, device="meta")
    with pytest.raises(KinemaError, match="unexpected keys"):
        convert.convert(sd, "broken.ckpt")


def test_partial_checkpoint_is_named(fixtures_dir):
    sd = _meta_sd(_manifest(fixtures_dir, "512"), "512")
    sd = {k: v for k, v in sd.items() if not k.startswith("embedder.")}
    with pytest.raises(KinemaError, match=r"partial.*embedder"):
        convert.convert(sd, "unet_only.safetensors")


def test_variant_detection_rules(fixtures_dir):
    for name in VARIANTS:
        sd = _meta_sd(_manifest(fixtures_dir, name), name)
        v, _ = convert.detect_variant(sd)
        assert v == ("512" if name == "512_interp" else name)
    # pruned copy without buffers: v-model reported as 512, 256 still found by its gates
    sd = {k: v for k, v in _meta_sd(_manifest(fixtures_dir, "1024"), "1024").items() if "." in k}
    assert convert.detect_variant(sd)[0] == "512"
    sd = {k: v for k, v in _meta_sd(_manifest(fixtures_dir, "256"), "256").items() if "." in k}
    assert convert.detect_variant(sd)[0] == "256"


def test_forced_variant_mismatch(fixtures_dir):
    sd = _meta_sd(_manifest(fixtures_dir, "256"), "256")
    with pytest.raises(KinemaError, match="256 model"):
        convert.convert(sd, "dc256.ckpt", variant="1024")
    with pytest.raises(ValueError, match="variant"):
        convert.convert(sd, "dc256.ckpt", variant="2048")


SD15_KEYS = {
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
}


@pytest.mark.parametrize("keys, what", [
    (SD15_KEYS, "Stable Diffusion 1.x"),
    ({"conditioner.embedders.0.transformer.text_model.x": (1,), "model.diffusion_model.input_blocks.0.0.weight": (1,)},
     "SDXL"),
    ({"conditioner.embedders.0.open_clip.model.x": (1,), "model.diffusion_model.input_blocks.1.0.time_stack.0.w": (1,)},
     "Stable Video Diffusion"),
    ({"down_blocks.0.motion_modules.0.temporal_transformer.norm.weight": (1,)}, "AnimateDiff"),
    ({"model.diffusion_model.input_blocks.1.0.temopral_conv.conv1.0.weight": (1,)}, "VideoCrafter"),
    ({"encoder.down.0.block.0.conv1.weight": (1,)}, "VAE"),
])
def test_wrong_file_is_named(keys, what):
    sd = {k: torch.empty(s, device="meta") for k, s in keys.items()}
    with pytest.raises(KinemaError, match=f"wrong.ckpt.*not a DynamiCrafter.*{what}"):
        convert.convert(sd, "wrong.ckpt")


def test_unreadable_files(tmp_path):
    p = tmp_path / "garbage.safetensors"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(KinemaError, match="garbage.safetensors"):
        convert.read_state_dict(p)
    with pytest.raises(KinemaError, match="missing.ckpt.*file not found.*DynamiCrafter"):
        convert.read_state_dict(tmp_path / "missing.ckpt")
    q = tmp_path / "list.pt"
    torch.save([1, 2, 3], q)
    with pytest.raises(KinemaError, match="list.pt"):
        convert.read_state_dict(q)


def test_vae_of_the_released_layout_converts_with_diffusers(fixtures_dir):
    """The released VAE keys go through diffusers' own converter onto the model our loader
    builds: every tensor is used, every parameter gets one of the right shape."""
    from diffusers import AutoencoderKL
    man = _manifest(fixtures_dir, "1024")
    ldm = {k[len(convert.VAE):]: torch.zeros(s) for k, s in man["keys"].items() if k.startswith(convert.VAE)}
    cfg = convert.vae_config(ldm)
    assert cfg["block_out_channels"] == [128, 256, 512, 512]
    prefixed = {convert.VAE + k: v for k, v in ldm.items()}
    got = sd_checkpoint.vae_state_dict(prefixed, cfg)
    with torch.device("meta"):
        want = AutoencoderKL(**cfg).state_dict()
    assert sorted(got) == sorted(want) and all(got[k].shape == want[k].shape for k in want)
    with pytest.raises(KinemaError, match=r"x.ckpt \(VAE\).*of which only"):
        sd_checkpoint.vae_state_dict(dict(prefixed, **{convert.VAE + "encoder.extra.weight": torch.zeros(1)}), cfg,
                                     "x.ckpt")


def test_vae_written_independently_reads_back_equal():
    """A VAE written in the LDM layout by the tests' own writer and read by the loader (diffusers'
    converter): two implementations of the mapping agree tensor for tensor."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=32)
    ldm = vae_to_ldm(vae.state_dict(), "")
    got = sd_checkpoint.vae_state_dict({convert.VAE + k: v for k, v in ldm.items()}, convert.vae_config(ldm))
    want = vae.state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("variant", ["256", "512", "1024"])
def test_tiny_checkpoints_load_and_detect(tmp_path, variant):
    from safetensors.torch import save_file
    sd = tiny_dynamicrafter.checkpoint(variant)
    p = tmp_path / "renamed_to_confuse_1024.safetensors"
    save_file(sd, str(p))
    model = convert.load_dynamicrafter(p)
    assert model.variant == variant
    assert model.temporal_length == 4
    # weights arrive unchanged
    torch.testing.assert_close(model.unet.input_blocks[0][0].weight,
                               sd["model.diffusion_model.input_blocks.0.0.weight"])
    vae_w = model.vae.decoder.mid_block.attentions[0].to_q.weight
    torch.testing.assert_close(vae_w, sd["first_stage_model.decoder.mid.attn_1.q.weight"][:, :, 0, 0])


def test_sd15_file_error(tmp_path):
    from safetensors.torch import save_file
    p = tmp_path / "v1-5-pruned-emaonly.safetensors"
    save_file({k: torch.zeros(s) for k, s in SD15_KEYS.items()}, str(p))
    with pytest.raises(KinemaError, match="v1-5-pruned-emaonly.safetensors.*Stable Diffusion 1.x"):
        convert.load_dynamicrafter(p)


@pytest.mark.parametrize("variant, dtype", [("512", torch.float16), ("256", torch.bfloat16)])
def test_pruned_half_precision_copy(tmp_path, variant, dtype):
    """Pruned copies: half-precision tensors, no schedule buffers, no unused encoder pieces."""
    from safetensors.torch import save_file
    sd = tiny_dynamicrafter.checkpoint(variant)
    unused = convert._unused_patterns(sd)
    # keep the text tower's last block: only the full-size ViT-H tower tells a dropped one apart
    pruned = {k: v.to(dtype) for k, v in sd.items()
              if not any(p.match(k) for p in unused) or ".transformer.resblocks." in k}
    assert len(pruned) < len(sd)
    p = tmp_path / "pruned.safetensors"
    save_file(pruned, str(p))
    model = convert.load_dynamicrafter(p, dtype=dtype)
    assert model.variant == variant and model.unet.dtype == dtype
    assert len(model.text_encoder.transformer.resblocks) == 1


def test_vit_h_text_tower_without_its_last_block(fixtures_dir):
    sd = _meta_sd(_manifest(fixtures_dir, "512"), "512")
    sd = {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.model.transformer.resblocks.23.")}
    model = convert.convert(sd, "pruned_text.safetensors")
    assert len(model.text_encoder.transformer.resblocks) == 23


def test_lightning_ckpt_with_nested_state_dict(tmp_path):
    sd = tiny_dynamicrafter.checkpoint("1024")
    p = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "epoch": 3}, p)
    model = convert.load_dynamicrafter(p)
    assert model.variant == "1024" and model.settings()["defaults"]["fs"] == 10
