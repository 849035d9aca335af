"""The loaders' "auto" precision: bf16 on CPUs with native bf16, and every model path in bf16
within tolerance of the same weights in fp32 (tiny models, same inputs and seeds)."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tiny_dynamicrafter
import tiny_motion_i2v
import tiny_puppet_master
from kinema import runtime
from kinema.kernels.field import MotionField

BF16, FP32 = torch.bfloat16, torch.float32


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 difference of a (low precision) from b (fp32)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.fixture
def native_bf16(monkeypatch):
    """A CPU with native bf16, whatever this machine is."""
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setenv("KINEMA_DEVICE", "cpu")


# ---------------------------------------------------------------------------------- the choice

def test_native_bf16_is_read_from_the_cpu(monkeypatch):
    """The answer is the CPU's own flags (read here from /proc/cpuinfo), from torch's probe or,
    without it, from the kernel's list."""
    text = Path("/proc/cpuinfo").read_text()
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    expected = bool(flags & {"amx_bf16", "avx512_bf16"})
    assert runtime.cpu_has_native_bf16() is expected

    def broken():
        raise RuntimeError("no probe")

    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", broken)
    assert runtime.cpu_has_native_bf16() is expected


def test_default_dtype_choice(monkeypatch):
    assert runtime._mm() is None  # standalone: the pack's own rules
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.default_dtype("cpu") == BF16
    assert runtime.default_dtype("cpu", supported=(torch.float16, FP32)) == FP32
    assert runtime.default_dtype("cuda") == torch.float16
    assert runtime.default_dtype("mps") == torch.float16
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.default_dtype("cpu") == FP32


# ------------------------------------------------------------------------ each model path

def test_puppet_master_auto_is_bf16_and_close_to_fp32(native_bf16, tmp_path, monkeypatch):
    from kinema.nodes import puppet_master as pm_nodes
    from kinema.pipelines.puppet_master import denoise

    monkeypatch.setenv("KINEMA_MODELS_DIR", str(tmp_path))
    folder = tmp_path / "kinema" / "puppet_master"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tiny_puppet_master.unet(0).state_dict().items()},
              str(folder / "tiny.safetensors"))
    (model,) = pm_nodes.KinemaPuppetMasterLoader().load("tiny.safetensors", "auto")
    assert model.dtype == BF16 and next(model.unet.parameters()).dtype == BF16
    fp32 = tiny_puppet_master.unet(0)
    g = torch.Generator().manual_seed(0)
    lat, emb = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 1, 32, generator=g)
    drags = torch.zeros(1, 14, 5, 4)
    drags[0, :, 0] = torch.tensor([0.3, 0.3, 0.6, 0.4])
    x = torch.randn(1, 14, 4, 8, 8, generator=g)
    with torch.no_grad():  # one UNet evaluation (measured: 3-6 % apart on this random network)
        one = [unet(x.to(dt), torch.tensor([0.5]), lat.to(dt), emb.to(dt), drags)
               for unet, dt in ((fp32, FP32), (model.unet, BF16))]
    assert rel(one[1], one[0]) < 0.1
    sampler = tiny_puppet_master.puppet_master(0).sampler
    run = lambda unet: denoise(unet, lat, emb, drags, 3, 3.0, torch.Generator().manual_seed(1),  # noqa: E731
                               sampler, progress=False)
    ref, low = run(fp32), run(model.unet)
    # a 3-step sampling from sigma 700 carries each step's difference on (measured: 10 %)
    assert low.dtype == FP32 and torch.isfinite(low).all() and rel(low, ref) < 0.2


def test_motion_i2v_flow_loader_auto_is_bf16(native_bf16, tmp_path, monkeypatch):
    from kinema.nodes import motion_i2v as mnodes

    monkeypatch.setenv("KINEMA_MODELS_DIR", str(tmp_path))
    folder = tmp_path / "kinema" / "motion_i2v"
    folder.mkdir(parents=True)
    files = tiny_motion_i2v.save_flow_files(tiny_motion_i2v.flow_model(0), folder)
    (flow,) = mnodes.KinemaMotionI2VFlowLoader().load(files["flow_unet"].name, files["controlnet"].name,
                                                      files["flow_vae"].name, "auto")
    assert flow.dtype == BF16


def test_motion_i2v_both_stages_close_to_fp32():
    from kinema.kernels.motion_attention import rasterise_tracks_motion_i2v
    from kinema.pipelines.motion_i2v import pipeline

    h, w = 32, 48
    image = torch.rand(h, w, 3, generator=torch.Generator().manual_seed(0))
    sparse, mask = rasterise_tracks_motion_i2v([torch.tensor([[10, 10], [30, 20]])], h, w, 4, 8)
    kw = dict(prompt="a boat", steps=2, guidance=3.0, seed=3)
    flows = {dt: pipeline.predict_motion(tiny_motion_i2v.flow_model(0, dt), image, sparse, mask, **kw).flow
             for dt in (FP32, BF16)}
    assert rel(flows[BF16], flows[FP32]) < 0.05
    field = MotionField(torch.randn(8, h, w, 2, generator=torch.Generator().manual_seed(1)) * 3)
    field.flow[0] = 0
    renders = {dt: pipeline.render_video(tiny_motion_i2v.render_model(0, dt), image, field, None, **kw)
               for dt in (FP32, BF16)}
    assert rel(renders[BF16].latents, renders[FP32].latents) < 0.05
    assert float((renders[BF16].frames - renders[FP32].frames).abs().mean()) < 0.01


def test_dynamicrafter_auto_is_bf16_and_close_to_fp32(native_bf16, tmp_path, monkeypatch):
    from kinema.nodes import dynamicrafter as dc_nodes
    from kinema.pipelines.dynamicrafter import convert, pipeline

    monkeypatch.setenv("KINEMA_MODELS_DIR", str(tmp_path))
    (tmp_path / "kinema" / "dynamicrafter").mkdir(parents=True)
    save_file(tiny_dynamicrafter.checkpoint("512"), str(tmp_path / "kinema" / "dynamicrafter" / "tiny.safetensors"))
    (model,) = dc_nodes.KinemaDynamiCrafterLoader().load("tiny.safetensors", "auto")
    assert model.unet.dtype == BF16
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    opts = pipeline.AnimateOptions(prompt="a cat", frames=4, height=64, width=64, steps=2, cfg=3.0, seed=5)
    ref = pipeline.animate(convert.convert(tiny_dynamicrafter.checkpoint("512"), "tiny", dtype=FP32), image, opts)
    low = pipeline.animate(model, image, opts)
    assert float((low - ref).abs().mean()) < 0.01


def test_sam_decoder_auto_is_bf16_and_masks_match_fp32(native_bf16):
    from kinema.formats import parse_points
    from kinema.pipelines import segment as seg

    cfg = seg.SamConfig(img_size=256, embed_dim=64, depth=2, num_heads=2, window_size=4, global_attn_indexes=(1,),
                        prompt_dim=64, mask_in_chans=8, decoder_depth=2, decoder_mlp_dim=128, iou_head_hidden_dim=64)
    torch.manual_seed(0)
    model = seg.build_sam(cfg).eval()
    import copy
    low = seg.SamSegmenter(copy.deepcopy(model))
    ref = seg.SamSegmenter(model, decoder_dtype=FP32)
    assert low.decoder_dtype == BF16 and next(low.model.mask_decoder.parameters()).dtype == BF16
    assert next(low.model.image_encoder.parameters()).dtype == FP32  # the encoder stays fp32
    image = torch.rand(96, 128, 3, generator=torch.Generator().manual_seed(3))
    for click in ([[40, 30]], [[100, 70]]):
        pts = parse_points({"positive": click}, (128, 96))
        a, b = low.predict(image, pts), ref.predict(image, pts)
        assert torch.allclose(a.scores, b.scores, atol=0.03)
        for i in range(3):
            union = float((a.masks[i] | b.masks[i]).sum())
            assert float((a.masks[i] & b.masks[i]).sum()) >= 0.97 * union


def test_consistent_attention_bf16_close_to_fp32():
    from kinema.kernels.consistent_attention import ConsistentSelfAttention, StoryLayout

    layout = StoryLayout([("A",), ("A",), ("A",), ("A",)], {"A": [0, 1]})
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(8, 64, 32, generator=g) for _ in range(3))
    outs = {}
    for dt in (FP32, BF16):
        state = ConsistentSelfAttention(layout, seed=1, gate_sampler=lambda *a: True)
        state.set_step(3)
        outs[dt] = state.attend(q.to(dt), k.to(dt), v.to(dt), 2, "l", [0, 1, 2, 3], groups=2)
    assert outs[BF16].dtype == BF16 and rel(outs[BF16], outs[FP32]) < 0.01
