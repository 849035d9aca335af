"""Precision and cached per-run tensors inside ComfyUI's model management: the loaders' "auto"
precision on native-bf16 CPUs, SAM's bf16 decoder as a managed model, and Puppet-Master's drag
embeddings computed once in a partial (lowvram) load."""
import copy

import torch

import comfy.model_management as mm
from comfy.cli_args import args
import tiny_puppet_master
from kinema import runtime


def test_default_dtype_inside_comfyui(monkeypatch):
    """ComfyUI picks fp32 on every CPU; the pack's loaders pick bf16 where the CPU has it
    natively, unless ComfyUI was told a precision."""
    cpu = torch.device("cpu")
    assert runtime._mm() is not None
    assert mm.unet_dtype(device=cpu) == torch.float32
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.default_dtype(cpu) == torch.bfloat16
    for flag, want in (("fp32_unet", torch.float32), ("bf16_unet", torch.bfloat16), ("force_fp32", None)):
        monkeypatch.setattr(args, flag, True)
        assert runtime.default_dtype(cpu) == (want or mm.unet_dtype(device=cpu, supported_dtypes=[
            torch.float16, torch.bfloat16, torch.float32]))
        monkeypatch.setattr(args, flag, False)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.default_dtype(cpu) == torch.float32


def test_sam_bf16_decoder_under_model_management(monkeypatch):
    from kinema.formats import parse_points
    from kinema.pipelines import segment as seg

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    cfg = seg.SamConfig(img_size=256, embed_dim=64, depth=2, num_heads=2, window_size=4, global_attn_indexes=(1,),
                        prompt_dim=64, mask_in_chans=8, decoder_depth=2, decoder_mlp_dim=128, iou_head_hidden_dim=64)
    torch.manual_seed(0)
    model = seg.build_sam(cfg).eval()
    low = seg.SamSegmenter(copy.deepcopy(model), name="tiny", device="cpu")
    ref = seg.SamSegmenter(model, name="tiny fp32", device="cpu", decoder_dtype=torch.float32)
    assert low.decoder_dtype == torch.bfloat16 and low.managed.patcher is not None
    image = torch.rand(96, 128, 3, generator=torch.Generator().manual_seed(3))
    pts = parse_points({"positive": [[40, 30]]}, (128, 96))
    a, b = low.predict(image, pts), ref.predict(image, pts)
    assert any(n.startswith("SAM") for n in runtime.loaded_model_names())
    union = float((a.masks | b.masks).sum())
    assert float((a.masks & b.masks).sum()) >= 0.97 * union and torch.allclose(a.scores, b.scores, atol=0.03)


def test_puppet_master_drag_embeddings_in_a_partial_load(monkeypatch):
    """A partly loaded UNet (its layers cast their weights per call) computes each drag embedding
    once per sampling, on the run's device, and samples what the fully loaded one does."""
    from kinema.pipelines.puppet_master import denoise

    mm.unload_all_models()
    dev = torch.device("cpu", 0)  # a device of its own to ComfyUI, so a budget applies
    pm = tiny_puppet_master.puppet_master(0)
    part = runtime.ManagedModel(pm.unet, "Puppet-Master UNet (partial)", load_device=dev, offload_device="cpu")
    g = torch.Generator().manual_seed(0)
    lat, emb = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 1, 32, generator=g)
    drags = torch.zeros(1, 14, 5, 4)
    drags[0, :, 0] = torch.tensor([0.3, 0.3, 0.6, 0.4])
    run = lambda: denoise(pm.unet, lat, emb, drags, 3, 3.0, torch.Generator().manual_seed(1), pm.sampler,  # noqa: E731
                          progress=False, device=part.device)
    runtime.load_models(part)
    full = run()
    assert part.patcher.loaded_size() == part.patcher.model_size()
    # ComfyUI never budgets a CPU device when it loads, but it frees room on one: with no free
    # memory left on ``cpu:0``, asking for half the UNet's size unloads about half of it
    monkeypatch.setattr(mm, "get_free_memory", lambda device=None, torch_free_too=False:
                        (0, 0) if torch_free_too else 0)
    mm.free_memory(0.5 * part.patcher.model_size(), dev)
    assert 0 < part.patcher.loaded_size() < part.patcher.model_size()
    rows = []
    convs = [c for b in list(pm.unet.down_blocks) + list(pm.unet.up_blocks) for c in getattr(b, "flow_convs", [])]
    hooks = [c.register_forward_hook(lambda m, a, out: rows.append(a[0].shape[0])) for c in convs]
    try:
        partial = run()
    finally:
        for h in hooks:
            h.remove()
        monkeypatch.undo()
        mm.free_memory(1e30, dev)
    assert rows == [15] * len(convs)  # once per sampling: 14 frames + 1 of the drag-free half
    assert torch.allclose(partial, full, atol=1e-5)
