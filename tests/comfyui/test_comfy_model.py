"""runtime.comfy_model: one of the pack's networks as a ComfyUI MODEL that ComfyUI's own
sampler drives, checked against the same Euler steps written out by hand."""
import torch

import comfy.sample
import comfy.samplers
from kinema import runtime


class Toy(torch.nn.Module):
    """eps = W x + b + a * t / 1000 + mean of an extra 'shift' condition."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Conv2d(4, 4, 1)
        self.a = torch.nn.Parameter(torch.tensor(0.3))
        self.calls = []

    @property
    def dtype(self):
        return self.lin.weight.dtype

    def forward(self, x, t, context=None, control=None, transformer_options=None, shift=None, **kw):
        self.calls.append((x.shape[0], None if context is None else tuple(context.shape)))
        out = self.lin(x) + self.a * (t / 1000.0)[:, None, None, None]
        if shift is not None:
            out = out + shift
        return out


def test_comfyui_sampler_drives_a_pack_network():
    torch.manual_seed(0)
    net = Toy()
    sampling = runtime.discrete_model_sampling("eps", "linear", 0.00085, 0.012)
    model = runtime.comfy_model(net, "Kinema toy", sampling,
                                conds=lambda kw, c: {"shift": c.constant(float(kw.get("shift", 0.0)))})
    assert model.model.kinema_name == "Kinema toy"
    ctx = torch.zeros(1, 3, 8)
    positive, negative = [[ctx, {"shift": 0.5}]], [[ctx, {"shift": -0.5}]]
    sigmas = torch.tensor([8.0, 3.0, 1.0, 0.0])
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    latent = torch.zeros_like(noise)
    got = comfy.sample.sample_custom(model, noise, 2.0, comfy.samplers.sampler_object("euler"), sigmas,
                                     positive, negative, latent, disable_pbar=True, seed=0)
    assert "Kinema toy" in runtime.loaded_model_names()
    # the same, by hand: ComfyUI's eps parametrisation, CFG on the denoised outputs, Euler
    x = noise * sigmas[0]
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            t = sampling.timestep(s.reshape(1)).expand(2)
            xin = x / (s ** 2 + 1) ** 0.5

            def denoised(shift):
                return x - s * (net.lin(xin) + net.a * (t / 1000.0)[:, None, None, None] + shift)

            d_c, d_u = denoised(0.5), denoised(-0.5)
            den = d_u + 2.0 * (d_c - d_u)
            x = x + (x - den) / s * (s_next - s)
    assert torch.allclose(got * 0.18215, x, atol=1e-4)  # ComfyUI returns the latent in the VAE's scale
    assert all(ctx_shape == (2, 3, 8) or ctx_shape == (4, 3, 8) for _, ctx_shape in net.calls)
