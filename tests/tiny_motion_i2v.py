"""Small random Motion-I2V networks of the released structure, for tests and benchmarks."""
import json
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from kinema.pipelines.motion_i2v import loading
from kinema.pipelines.motion_i2v.pipeline import FlowModel, RenderModel
from kinema.pipelines.motion_i2v.text import TextEncoder

CONFIGS = Path(__file__).resolve().parent / "configs" / "motion_i2v"


def config(name: str) -> dict:
    return json.loads((CONFIGS / f"tiny_{name}.json").read_text())


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw every parameter (including zero-initialised outputs) so all paths carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module.eval().requires_grad_(False)


def text_encoder(seed: int = 0) -> TextEncoder:
    cfg = config("text_encoder")
    g = torch.Generator().manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return TextEncoder(cfg, model.state_dict(), "random")


def flow_model(seed: int = 0, dtype=torch.float32, text: bool = True, cross_attention_dim: int | None = None) -> FlowModel:
    """``cross_attention_dim``: the text width the flow UNet attends to (768 for SD1.5's CLIP)."""
    cfg = config("stage1_flow_unet")
    if cross_attention_dim:
        cfg["cross_attention_dim"] = cross_attention_dim
    unet = randomise(loading.build_flow_unet(cfg, "cpu"), seed)
    fvae = randomise(loading.build_vae(config("flow_vae"), "cpu"), seed + 1)
    ivae = randomise(loading.build_vae(config("image_vae"), "cpu"), seed + 2)
    return FlowModel(unet, fvae, ivae, text_encoder(seed) if text else None, dtype)


def render_model(seed: int = 0, dtype=torch.float32, text: bool = True) -> RenderModel:
    unet = randomise(loading.build_render_unet(config("stage2_unet"), "cpu"), seed)
    vae = randomise(loading.build_vae(config("image_vae"), "cpu"), seed + 2)
    return RenderModel(unet, vae, text_encoder(seed) if text else None, dtype)


def save_flow_files(fm: FlowModel, folder: Path) -> dict:
    """The released stage-1 file set of ``fm`` in ``folder``: flow UNet, ControlNet, flow VAE."""
    usd = fm.unet.state_dict()
    files = {"flow_unet": folder / "flow_unet.bin", "controlnet": folder / "controlnet.bin",
             "flow_vae": folder / "vae_flow.bin"}
    torch.save({k: v for k, v in usd.items() if not k.startswith("controlnet.")}, files["flow_unet"])
    torch.save({k: v for k, v in usd.items() if k.startswith("controlnet.")}, files["controlnet"])
    torch.save(fm.flow_vae.state_dict(), files["flow_vae"])
    return files


def record_splats(monkeypatch, module) -> tuple[list, list]:
    """For one test: ``(runs, built)``, the splat caches ``module`` (a module that makes one
    ``FlowSplats`` per run, e.g. ``pipeline`` or ``native``) makes, and the token grids (h, w)
    whose first-frame splat gets built, in order."""
    from kinema.kernels import motion_attention as kma
    runs, built = [], []

    class Recording(kma.FlowSplats):
        def __init__(self):
            super().__init__()
            runs.append(self)

    real = kma.FirstFrameSplat.__init__

    def counting(self, flow_tokens, *args, **kwargs):
        built.append(tuple(flow_tokens.shape[2:4]))
        real(self, flow_tokens, *args, **kwargs)

    monkeypatch.setattr(module, "FlowSplats", Recording)
    monkeypatch.setattr(kma.FirstFrameSplat, "__init__", counting)
    return runs, built
