"""The consistent-attention patch inside ComfyUI's own UNetModel (ComfyUI in this process)."""
import torch

from kinema.kernels.attention import multihead_attention
from kinema.nodes import story as story_nodes

STORY = "[A] a knight in red armour\n[A] the knight on a horse\n[NC] a castle\n[A] the knight sleeping"


def test_patch_in_real_comfyui():
    import comfy.model_patcher
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                     channel_mult=(1, 2), num_head_channels=16, use_spatial_transformer=True,
                     transformer_depth=[0, 1], transformer_depth_middle=1, transformer_depth_output=[2, 2, 0, 0],
                     context_dim=32, use_linear_in_transformer=True, operations=comfy.ops.disable_weight_init)
    for p in unet.parameters():  # disable_weight_init leaves weights uninitialised
        torch.nn.init.normal_(p, std=0.05)
    unet.eval()
    model = comfy.model_patcher.ModelPatcher(torch.nn.Module(), torch.device("cpu"), torch.device("cpu"))
    model.model.diffusion_model = unet
    (patched,) = story_nodes.KinemaConsistentAttentionPatch().patch(model, STORY, "", 2, 1.0, 1.0, 0, "lowvram")
    to = patched.model_options["transformer_options"]
    replace = to["patches_replace"]["attn1"]
    assert len(replace) == 4  # two output blocks with two transformer blocks each
    seen = []

    def recorder(inner):
        def call(q, k, v, extra_options):
            out = inner(q, k, v, extra_options)
            plain = multihead_attention(q, k, v, extra_options["n_heads"])
            seen.append((extra_options["block"], extra_options["block_index"], inner.state.step,
                         (out - plain).flatten(1).abs().max(1).values))
            return out
        return call

    opts = dict(to, patches_replace={"attn1": {key: recorder(p) for key, p in replace.items()}},
                cond_or_uncond=[1, 0])
    x = torch.randn(8, 4, 8, 8)
    ctx = torch.randn(8, 77, 32)
    sigmas = torch.tensor([10.0, 5.0, 1.0, 0.0])
    with torch.no_grad():
        out = unet(x, torch.full((8,), 500.0), context=ctx,
                   transformer_options=dict(opts, sigmas=sigmas[1].repeat(8), sample_sigmas=sigmas))
        plain = unet(x, torch.full((8,), 500.0), context=ctx, transformer_options={})
    assert len(seen) == 4 and all(step == 1 for _, _, step, _ in seen)
    assert {(b[0], b[1], i) for b, i, _, _ in seen} == set(replace)
    diffs = torch.stack([d for *_, d in seen])  # (layers, rows)
    assert diffs[:, [2, 6]].max() < 1e-5  # the [NC] panel is plain self-attention
    assert diffs[:, [0, 1, 3, 4, 5, 7]].max() > 1e-3  # the others are not (where the gate let them)
    assert (out - plain)[[2, 6]].abs().max() < (out - plain)[[3, 7]].abs().max()
