"""Motion-I2V stage 1 and stage 2 end to end with tiny random networks, SD1.5 single-file
checkpoint conversion, text encoding and input errors."""
import pytest
import torch
from safetensors.torch import save_file

from kinema import runtime
from kinema.kernels.field import MotionField
from kinema.kernels.motion_attention import rasterise_tracks_motion_i2v
from kinema.pipelines.motion_i2v import build, pipeline
from kinema.pipelines.motion_i2v.text import tokenize

H, W = 32, 48


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    return build.random_flow_model("tiny", 0), build.random_render_model("tiny", 0)


def _image(seed=0):
    return torch.rand(H, W, 3, generator=torch.Generator().manual_seed(seed))


def _condition(frames=16):
    return rasterise_tracks_motion_i2v([torch.tensor([[10, 10], [30, 20]])], H, W, 4, frames)


def _static():
    s = torch.zeros(H, W)
    s[:, :16] = 1.0
    return s


KW = dict(prompt="a boat", steps=2, guidance=3.0, device="cpu")


def test_stage1_shapes_determinism_and_static(models):
    fm, _ = models
    sp, mk = _condition()
    a = pipeline.predict_motion(fm, _image(), sp, mk, _static(), seed=3, **KW)
    b = pipeline.predict_motion(fm, _image(), sp, mk, _static(), seed=3, **KW)
    c = pipeline.predict_motion(fm, _image(), sp, mk, _static(), seed=4, **KW)
    assert isinstance(a, MotionField) and a.flow.shape == (16, H, W, 2)
    assert torch.equal(a.flow, b.flow) and not torch.equal(a.flow, c.flow)
    assert a.flow[0].abs().max() == 0
    assert a.flow[:, :, :16].abs().max() == 0 and a.flow[:, :, 16:].abs().max() > 0
    assert a.flow[..., 0].abs().max() <= W and a.flow[..., 1].abs().max() <= H


def test_stage2_frame0_and_static_region(models):
    _, rm = models
    g = torch.Generator().manual_seed(1)
    field = MotionField(torch.randn(16, H, W, 2, generator=g) * 3)
    field.flow[0] = 0
    r1 = pipeline.render_video(rm, _image(), field, _static(), seed=5, **KW)
    r2 = pipeline.render_video(rm, _image(), field, _static(), seed=5, **KW)
    assert r1.frames.shape == (16, H, W, 3) and 0 <= float(r1.frames.min()) <= float(r1.frames.max()) <= 1
    assert torch.equal(r1.frames, r2.frames)
    assert torch.equal(r1.latents[:, :, :1], r1.image_latent)       # frame 0 is the input image
    static_lat = r1.latents[..., :2]                                  # latent columns of the static band
    assert torch.equal(static_lat, r1.image_latent[..., :2].expand_as(static_lat))
    assert not torch.equal(r1.latents[:, :, 1:, :, 2:], r1.image_latent[..., 2:].expand(-1, -1, 15, -1, -1))
    # the flow matters: another motion field gives another video
    other = MotionField(torch.zeros(16, H, W, 2))
    r3 = pipeline.render_video(rm, _image(), other, _static(), seed=5, **KW)
    assert not torch.equal(r3.latents, r1.latents)


def test_weights_free_field_feeds_stage2_and_bf16(models):
    _, rm = models
    field = MotionField(torch.zeros(8, H, W, 2))
    rm16 = pipeline.RenderModel(rm.unet, rm.vae, rm.text, torch.bfloat16)
    r = pipeline.render_video(rm16, _image(), field, None, seed=0, **KW)
    assert r.frames.shape == (8, H, W, 3) and torch.isfinite(r.frames).all()
    assert next(rm.unet.parameters()).dtype == torch.bfloat16  # offloaded as used; restore for other tests
    for m in rm.modules():
        torch.nn.Module.to(m, dtype=torch.float32)


def test_comfy_conditioning_without_text_encoder(models):
    fm, rm = models
    no_text = pipeline.RenderModel(rm.unet, rm.vae, None)
    cond = torch.randn(1, 77, 32)
    field = MotionField(torch.zeros(4, H, W, 2))
    r = pipeline.render_video(no_text, _image(), field, cond=cond, uncond=torch.zeros(1, 77, 32),
                              steps=1, guidance=2.0, device="cpu")
    assert r.frames.shape[0] == 4
    with pytest.raises(ValueError, match="no text encoder"):
        pipeline.render_video(no_text, _image(), field, prompt="x", steps=1, device="cpu")
    with pytest.raises(ValueError, match=r"positive conditioning: expected \(1, tokens, 32\)"):
        pipeline.render_video(no_text, _image(), field, cond=torch.zeros(1, 77, 768),
                              uncond=torch.zeros(1, 77, 32), steps=1, device="cpu")


def test_clear_errors_for_frames_and_sizes(models):
    fm, rm = models
    sp, mk = _condition(17)
    with pytest.raises(ValueError, match="at most 16"):
        pipeline.predict_motion(fm, _image(), sp, mk, **KW)
    with pytest.raises(ValueError, match="at most 16"):
        pipeline.render_video(rm, _image(), MotionField(torch.zeros(17, H, W, 2)), **KW)
    with pytest.raises(ValueError, match="brush: mask"):
        pipeline.render_video(rm, _image(), MotionField(torch.zeros(4, H, W, 2)), torch.zeros(8, 8), **KW)
    sp, mk = _condition()
    with pytest.raises(ValueError, match="mask"):
        pipeline.predict_motion(fm, _image(), sp, mk[:, :8], **KW)
    with pytest.raises(ValueError, match="multiple of 8"):
        pipeline.render_video(rm, _image(), MotionField(torch.zeros(4, 30, 44, 2)), **KW)


def test_interrupt_between_steps(models, monkeypatch):
    _, rm = models
    calls = []

    def stop():
        calls.append(1)
        if len(calls) == 2:
            raise runtime.Interrupted()
    monkeypatch.setattr(runtime, "check_interrupt", stop)
    with pytest.raises(runtime.Interrupted):
        pipeline.render_video(rm, _image(), MotionField(torch.zeros(4, H, W, 2)), steps=3, device="cpu")
    assert len(calls) == 2


def test_tokenizer_layout():
    ids = tokenize(["a photo of a cat", "x " * 200])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == 49406 and ids[0, 6] == 49407 and (ids[0, 6:] == 49407).all()
    assert ids[1, -1] == 49407 and ids[1, 1] != 49407


# ------------------------------------------------ SD1.5 single-file checkpoint (LDM layout)

_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _unet_to_ldm(sd, layers, up_has_attn):
    out = {}
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for k, v in sd.items():
        p = k.split(".")
        head = next((t for t in top if k.startswith(t + ".")), None)
        if head is not None:
            new = top[head] + k[len(head):]
        elif p[0] == "down_blocks":
            i, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
            if kind == "resnets":
                new = f"input_blocks.{(layers + 1) * i + j + 1}.0.{_RES[rest[0]]}.{rest[1]}"
            elif kind == "attentions":
                new = f"input_blocks.{(layers + 1) * i + j + 1}.1." + ".".join(rest)
            else:
                new = f"input_blocks.{(layers + 1) * (i + 1)}.0.op.{rest[-1]}"
        elif p[0] == "up_blocks":
            i, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
            n = layers + 1
            if kind == "resnets":
                new = f"output_blocks.{n * i + j}.0.{_RES[rest[0]]}.{rest[1]}"
            elif kind == "attentions":
                new = f"output_blocks.{n * i + j}.1." + ".".join(rest)
            else:
                new = f"output_blocks.{n * i + layers}.{2 if up_has_attn[i] else 1}.conv.{rest[-1]}"
        else:  # mid_block
            kind, j, rest = p[1], int(p[2]), p[3:]
            new = (f"middle_block.1." + ".".join(rest)) if kind == "attentions" else \
                f"middle_block.{2 * j}.{_RES[rest[0]]}.{rest[1]}"
        out["model.diffusion_model." + new] = v
    return out


def _vae_to_ldm(sd, n_blocks):
    out = {}
    att = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
    for k, v in sd.items():
        p = k.split(".")
        if p[1] in ("down_blocks", "up_blocks"):
            i = int(p[2]) if p[1] == "down_blocks" else n_blocks - 1 - int(p[2])
            side = "down" if p[1] == "down_blocks" else "up"
            if p[3] == "resnets":
                name = "nin_shortcut" if p[5] == "conv_shortcut" else p[5]
                new = f"{p[0]}.{side}.{i}.block.{p[4]}.{name}.{p[-1]}"
            else:
                new = f"{p[0]}.{side}.{i}.{'downsample' if side == 'down' else 'upsample'}.conv.{p[-1]}"
        elif len(p) > 2 and p[1] == "mid_block":
            if p[2] == "resnets":
                new = f"{p[0]}.mid.block_{int(p[3]) + 1}.{p[4]}.{p[-1]}"
            else:
                new = f"{p[0]}.mid.attn_1.{att[p[4]]}.{p[-1]}"
                if v.ndim == 2:
                    v = v[:, :, None, None]
        elif len(p) > 2 and p[1] == "conv_norm_out":
            new = f"{p[0]}.norm_out.{p[-1]}"
        else:
            new = k
        out["first_stage_model." + new] = v
    return out


def _write_sd_checkpoint(path, rm):
    cfg = rm.unet.config
    unet2d = {k: v for k, v in rm.unet.state_dict().items() if ".motion_modules." not in k}
    up_attn = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    sd = _unet_to_ldm(unet2d, cfg["layers_per_block"], up_attn)
    sd.update(_vae_to_ldm(rm.vae.state_dict(), len(rm.vae.config.block_out_channels)))
    sd.update({"cond_stage_model.transformer.text_model." + k: v for k, v in rm.text.model.state_dict().items()})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def test_sd_single_file_checkpoint_and_motion_files_load(models, tmp_path):
    fm, rm = models
    _write_sd_checkpoint(tmp_path / "sd15.safetensors", rm)
    motion = {k: v for k, v in rm.unet.state_dict().items() if ".motion_modules." in k}
    half = dict(list(motion.items())[: len(motion) // 2])
    torch.save(half, tmp_path / "mm_v2.ckpt")           # a partial first file ...
    torch.save(motion, tmp_path / "motion_block.bin")    # ... overridden by the complete block
    loaded = build.load_render_model(tmp_path / "sd15.safetensors", [tmp_path / "mm_v2.ckpt",
                                                                      tmp_path / "motion_block.bin"], arch="tiny")
    for a, b in ((loaded.unet, rm.unet), (loaded.vae, rm.vae), (loaded.text.model, rm.text.model)):
        ref = b.state_dict()
        for k, v in a.state_dict().items():
            assert torch.equal(v, ref[k]), k
    assert torch.allclose(loaded.text.encode(["a boat"]), rm.text.encode(["a boat"]))
    with pytest.raises(runtime.KinemaError, match="mm_v2.ckpt: does not match.*missing"):
        build.load_render_model(tmp_path / "sd15.safetensors", [tmp_path / "mm_v2.ckpt"], arch="tiny")
    # stage 1 from files: flow UNet + ControlNet + flow VAE, image VAE and CLIP from the checkpoint
    usd = fm.unet.state_dict()
    torch.save({k: v for k, v in usd.items() if not k.startswith("controlnet.")}, tmp_path / "unet.bin")
    torch.save({k: v for k, v in usd.items() if k.startswith("controlnet.")}, tmp_path / "controlnet.bin")
    torch.save(fm.flow_vae.state_dict(), tmp_path / "vae_flow.bin")
    flow = build.load_flow_model(tmp_path / "unet.bin", tmp_path / "controlnet.bin", tmp_path / "vae_flow.bin",
                                 tmp_path / "sd15.safetensors", "fp16", arch="tiny")
    assert flow.dtype == torch.float16 and flow.text is not None
