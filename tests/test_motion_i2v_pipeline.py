"""Motion-I2V stage 1 and stage 2 end to end with tiny random networks, SD1.5 single-file
checkpoint conversion, text encoding and input errors."""
import pytest
import torch

from kinema import runtime
from kinema.kernels.field import MotionField
from kinema.kernels.motion_attention import rasterise_tracks_motion_i2v
from kinema.pipelines.motion_i2v import build, pipeline
from kinema.pipelines.motion_i2v.text import tokenize
import tiny_motion_i2v as tiny

H, W = 32, 48


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    return tiny.flow_model(0), tiny.render_model(0)


def _image(seed=0):
    return torch.rand(H, W, 3, generator=torch.Generator().manual_seed(seed))


def _condition(frames=16):
    return rasterise_tracks_motion_i2v([torch.tensor([[10, 10], [30, 20]])], H, W, 4, frames)


def _static():
    s = torch.zeros(H, W)
    s[:, :16] = 1.0
    return s


KW = dict(prompt="a boat", steps=2, guidance=3.0)


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


def test_stage2_builds_each_splat_once_per_run(models, monkeypatch):
    """The flow's splat at each token grid is built by the first motion module of that grid
    and reused by the others and by every later step; a run keeps one cache, freed with it."""
    _, rm = models
    runs, built = tiny.record_splats(monkeypatch, pipeline)
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in rm.unet.temporal_attentions()]
    field = MotionField(torch.randn(16, H, W, 2, generator=torch.Generator().manual_seed(1)) * 3)
    try:
        pipeline.render_video(rm, _image(), field, None, seed=5, **KW)
    finally:
        for hk in hooks:
            hk.remove()
    assert len(runs) == 1
    grids = {(H // 8 >> i, W // 8 >> i) for i in range(3)}
    assert len(built) == len(set(built)) and set(built) <= grids and len(built) >= 2
    assert len(calls) > 2 * len(built)  # many motion-module calls (2 steps x CFG batch) for few builds


def test_weights_free_field_feeds_stage2_and_bf16(models):
    _, rm = models
    field = MotionField(torch.zeros(8, H, W, 2))
    rm16 = tiny.render_model(0, torch.bfloat16)
    r = pipeline.render_video(rm16, _image(), field, None, seed=0, **KW)
    assert r.frames.shape == (8, H, W, 3) and torch.isfinite(r.frames).all()
    assert next(rm16.unet.parameters()).dtype == torch.bfloat16 and next(rm16.vae.parameters()).dtype == torch.float32


def test_comfy_conditioning_without_text_encoder(models):
    fm, rm = models
    no_text = tiny.render_model(0, text=False)
    cond = torch.randn(1, 77, 32)
    field = MotionField(torch.zeros(4, H, W, 2))
    r = pipeline.render_video(no_text, _image(), field, cond=cond, uncond=torch.zeros(1, 77, 32),
                              steps=1, guidance=2.0)
    assert r.frames.shape[0] == 4
    with pytest.raises(ValueError, match="no text encoder"):
        pipeline.render_video(no_text, _image(), field, prompt="x", steps=1)
    with pytest.raises(ValueError, match=r"positive conditioning: expected \(1, tokens, 32\)"):
        pipeline.render_video(no_text, _image(), field, cond=torch.zeros(1, 77, 768),
                              uncond=torch.zeros(1, 77, 32), steps=1)


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
        pipeline.render_video(rm, _image(), MotionField(torch.zeros(4, H, W, 2)), steps=3)
    assert len(calls) == 2


def test_tokenizer_layout():
    ids = tokenize(["a photo of a cat", "x " * 200])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == 49406 and ids[0, 6] == 49407 and (ids[0, 6:] == 49407).all()
    assert ids[1, -1] == 49407 and ids[1, 1] != 49407


# ------------------------------------------------ stage-1 files

def test_flow_model_from_files_is_sized_by_them(models, tmp_path):
    fm, _ = models
    files = tiny.save_flow_files(fm, tmp_path)
    flow = build.load_flow_model(files["flow_unet"], files["controlnet"], files["flow_vae"], "bf16")
    assert flow.dtype == torch.bfloat16 and flow.text is None and flow.image_vae is None
    cfg = flow.unet.config
    assert cfg["block_out_channels"] == [32, 64] and cfg["layers_per_block"] == 1
    assert cfg["down_block_types"] == ["CrossAttnDownBlock3D", "DownBlock3D"] and cfg["control_hidden"] == 16
    ref = fm.unet.state_dict()
    for k, v in flow.unet.state_dict().items():
        assert torch.equal(v.float(), ref[k].to(torch.bfloat16).float()), k
    ref = fm.flow_vae.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in flow.flow_vae.state_dict().items())
    # the wrong files, each named
    torch.save(fm.flow_vae.state_dict(), tmp_path / "vae_as_unet.bin")
    with pytest.raises(runtime.KinemaError, match="vae_as_unet.bin"):
        build.load_flow_model(tmp_path / "vae_as_unet.bin", files["controlnet"], files["flow_vae"])
    with pytest.raises(runtime.KinemaError, match="flow_unet.bin: not a diffusers VAE"):
        build.load_flow_model(files["flow_unet"], files["controlnet"], files["flow_unet"])
