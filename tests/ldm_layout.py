"""diffusers names -> the original (LDM) single-file names, for writing test checkpoints in the
released layout. Written independently of the loaders, which read that layout with diffusers'
own converters (pipelines/sd_checkpoint.py); the round-trip tests check that the two agree."""
import re


LDM_UNET = "model.diffusion_model."
LDM_VAE = "first_stage_model."

_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
           ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]


def unet_to_ldm(sd: dict, cfg: dict) -> dict:
    """``UNet2DConditionModel`` keys (config ``cfg``: ``layers_per_block``,
    ``block_out_channels``, ``up_block_types``) -> ``model.diffusion_model.*`` keys."""
    n = cfg["layers_per_block"]
    levels = len(cfg["block_out_channels"])
    prefix = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
              "mid_block.resnets.1": "middle_block.2"}
    for i in range(levels):
        for j in range(n):
            prefix[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{(n + 1) * i + j + 1}.0"
            prefix[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{(n + 1) * i + j + 1}.1"
        prefix[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(n + 1) * (i + 1)}.0.op"
        has_attn = cfg["up_block_types"][i].startswith("CrossAttn")
        for j in range(n + 1):
            prefix[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{(n + 1) * i + j}.0"
            prefix[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{(n + 1) * i + j}.1"
        prefix[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{(n + 1) * i + n}.{2 if has_attn else 1}.conv"
    out = {}
    for key, value in sd.items():
        best = max((p for p in prefix if key.startswith(p + ".")), key=len)
        rest = key[len(best):]
        if ".resnets." in best or best.startswith("mid_block.resnets"):
            for ldm, dif in _RESNET:
                rest = rest.replace("." + dif + ".", "." + ldm + ".")
        out[LDM_UNET + prefix[best] + rest] = value
    return out


def vae_to_ldm(sd: dict, prefix: str = LDM_VAE) -> dict:
    """``AutoencoderKL`` keys -> ``first_stage_model.*`` keys (attention weights as the 1x1
    convolutions of the released files)."""
    levels = len({m.group(1) for k in sd for m in [re.match(r"decoder\.up_blocks\.(\d+)\.", k)] if m})
    out = {}
    for key, value in sd.items():
        k = key
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
                   lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.block.{m.group(2)}", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                   lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.upsample", k)
        k = k.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        k = k.replace("mid_block.attentions.0", "mid.attn_1").replace("conv_norm_out", "norm_out")
        k = k.replace("conv_shortcut", "nin_shortcut")
        if "mid.attn_1" in k:
            k = (k.replace("group_norm", "norm").replace("to_q", "q").replace("to_k", "k").replace("to_v", "v")
                 .replace("to_out.0", "proj_out"))
            if k.endswith("weight") and value.dim() == 2:
                value = value[:, :, None, None]
        out[prefix + k] = value
    return out


def text_to_ldm(sd: dict, prefix: str = "cond_stage_model.transformer.") -> dict:
    """``CLIPTextModel`` keys -> the files' ``cond_stage_model.transformer.text_model.*`` keys."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in sd.items() if not k.endswith("position_ids")}



