"""The pack's models live inside ComfyUI's model management.

- A workflow that loads a tiny SD1.5 file with ComfyUI's CheckpointLoaderSimple and feeds the
  Story and Motion-I2V nodes runs in ComfyUI's own executor; while it samples, ComfyUI's list of
  loaded models holds the Kinema models, and after "Unload models" / "Free memory" (what
  ComfyUI's prompt worker does for ``POST /free``) it holds none of them.
- With a small memory budget ComfyUI unloads one Kinema model to load another.
"""
import gc

import pytest
import torch

from comfy import model_management
import nodes as comfy_nodes
import tiny_motion_i2v
import tiny_models
from kinema import runtime
from kinema.nodes import NODE_CLASS_MAPPINGS as KINEMA

TRACKS = '{"tracks": [[{"x": 8, "y": 8}, {"x": 20, "y": 12}]], "anchors": []}'


@pytest.fixture(scope="module")
def files(models_dir, tiny_sd15):
    mi2v = models_dir / "kinema" / "motion_i2v"
    mi2v.mkdir(parents=True, exist_ok=True)
    tiny_motion_i2v.save_flow_files(tiny_motion_i2v.flow_model(0, text=False, cross_attention_dim=768), mi2v)
    tiny_models.motion_block(mi2v / "motion_block.bin", tiny_models.sd15_unet_module())
    return tiny_sd15


def _prompt(ckpt):
    n = lambda cls, **inputs: {"class_type": cls, "inputs": inputs}  # noqa: E731
    return {
        "1": n("CheckpointLoaderSimple", ckpt_name=ckpt),
        "2": n("CLIPTextEncode", clip=["1", 1], text="a red kite in the sky"),
        "3": n("CLIPTextEncode", clip=["1", 1], text="blurry"),
        "4": n("KinemaStoryBatch", model=["1", 0], clip=["1", 1], vae=["1", 2],
               story="[Kit] a red kite\n[Kit] the kite over a hill", characters="", id_length=1, style="{prompt}",
               negative="", width=48, height=32, steps=2, cfg=3.0, seed=1, sa32=0.5, sa64=0.5, batch_size=1,
               freeu=True, schedule="lowvram"),
        "5": n("KinemaMotionI2VFlowLoader", flow_unet="flow_unet.bin", controlnet="controlnet.bin",
               flow_vae="vae_flow.bin", precision="fp32"),
        "6": n("KinemaMotionI2VPredictMotion", flow_model=["5", 0], vae=["1", 2], positive=["2", 0],
               negative=["3", 0], image=["4", 0], tracks=TRACKS, width=48, height=32, flow_unit=4, steps=2,
               guidance=2.0, control_scale=1.0, seed=2),
        "7": n("KinemaMotionI2VRenderLoader", model=["1", 0], motion_block="motion_block.bin",
               animatediff_motion_module="none"),
        "8": n("KinemaMotionI2VRender", render_model=["7", 0], vae=["1", 2], positive=["2", 0], negative=["3", 0],
               image=["4", 0], motion=["6", 0], steps=2, guidance=2.0, seed=3, keep_still_outside_motion_mask=True),
        "9": n("PreviewImage", images=["8", 0]),
        "10": n("PreviewImage", images=["4", 0]),
    }


def test_workflow_models_are_managed_by_comfyui(files, monkeypatch):
    from kinema.pipelines.motion_i2v import native
    classes = {**comfy_nodes.NODE_CLASS_MAPPINGS, **KINEMA}
    seen = []
    # look at ComfyUI's list of loaded models while the models run: between the flow
    # predictor's steps, and inside ComfyUI's UNet each time a motion module runs
    check, run_module = runtime.check_interrupt, native._run_motion_module

    def look():
        seen.append(set(runtime.loaded_model_names()))

    monkeypatch.setattr(runtime, "check_interrupt", lambda: (look(), check()))
    monkeypatch.setattr(native, "_run_motion_module", lambda *a: (look(), run_module(*a))[1])
    ui, error = runtime.execute_in_comfyui(_prompt(files), classes, ["9", "10"])
    assert error is None, error
    assert ui["9"]["images"] and ui["10"]["images"]
    during = set().union(*seen)
    # sampled inside ComfyUI's model management: the flow predictor's parts and the motion
    # modules loaded next to ComfyUI's own SD1.5 UNet
    assert {"Motion-I2V flow UNet", "Motion-I2V flow VAE", "Motion-I2V motion modules"} <= during, during
    held = [lm.model for lm in model_management.current_loaded_models]
    assert any(type(p.model).__name__ == "BaseModel" for p in held)  # ComfyUI's SD1.5 model, sampled too

    # what ComfyUI's prompt worker does for POST /free {"unload_models": true, "free_memory": true}
    model_management.unload_all_models()
    gc.collect()
    model_management.soft_empty_cache()
    assert runtime.loaded_model_names() == []


def _module(mib: float, seed: int) -> torch.nn.Module:
    n = int(mib * 1024 * 1024 / 4 / 1024)
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(max(n // 1024, 1))])
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def test_comfyui_unloads_one_kinema_model_to_load_another(monkeypatch):
    """Two Kinema models on a device with room for one: loading the second makes ComfyUI unload
    the first. (CPU memory is never budgeted by ComfyUI, so the models load to ``cpu:0``, a
    distinct device to ComfyUI, and its free-memory figure is patched to a small budget.)"""
    model_management.unload_all_models()
    dev = torch.device("cpu", 0)
    small = runtime.ManagedModel(_module(16, 0), "Kinema small", load_device=dev, offload_device="cpu")
    large = runtime.ManagedModel(_module(32, 1), "Kinema large", load_device=dev, offload_device="cpu")
    need = lambda m: 1.1 * m.patcher.model_size() + model_management.minimum_inference_memory()  # noqa: E731
    budget = need(large) - 1024 * 1024   # room for the large one, or the small one, not both

    def free(device=None, torch_free_too=False):
        used = sum(lm.model_loaded_memory() for lm in model_management.current_loaded_models if lm.device == dev)
        left = max(budget - used, 0)
        return (left, left) if torch_free_too else left

    monkeypatch.setattr(model_management, "get_free_memory", free)
    runtime.load_models(small)
    assert runtime.loaded_model_names() == ["Kinema small"]
    runtime.load_models(large)
    assert runtime.loaded_model_names() == ["Kinema large"]   # the small one was unloaded for it
    assert small.patcher.loaded_size() == 0 and large.patcher.loaded_size() == large.patcher.model_size()
    x = torch.randn(2, 1024)
    with torch.no_grad():   # the unloaded model runs again once loaded again; this time ComfyUI
        runtime.load_models(small)     # needs only part of the large one's room: it unloads part of it
        assert torch.isfinite(small.module(x.to(small.device))).all()
    assert runtime.loaded_model_names() == ["Kinema small", "Kinema large"]
    assert small.patcher.loaded_size() == small.patcher.model_size()
    assert 0 < large.patcher.loaded_size() < large.patcher.model_size()
    with torch.no_grad():   # and the partly unloaded one still computes the same (its layers cast per call)
        want = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in large.module])
        want.load_state_dict({k: v.to("cpu") for k, v in large.module.state_dict().items()})
        assert torch.allclose(large.module(x), want(x))
    monkeypatch.undo()
    model_management.free_memory(1e30, dev)   # unload_all_models() clears only ComfyUI's main device
    assert runtime.loaded_model_names() == []
