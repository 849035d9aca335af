"""Puppet-Master UNet: key manifest, block and whole-UNet parity, checkpoint loading."""
import json

import pytest
import torch
from diffusers.models.unets.unet_3d_blocks import (
    CrossAttnDownBlockSpatioTemporal, CrossAttnUpBlockSpatioTemporal,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kinema.pipelines.puppet_master import (
    AllToFirstAttnProcessor, DragCondition, DragDownBlock, DragUpBlock, build_unet, load_json, load_unet,
)
from kinema.runtime import KinemaError


def _path(fixtures_dir, name):
    return str(fixtures_dir / "puppet_master" / name)


def _weights(d, dtype=torch.float32):
    return {k[len("weight."):]: v.to(dtype) for k, v in d.items() if k.startswith("weight.")}


def test_released_key_set_equals_manifest(fixtures_dir):
    manifest = json.load(open(_path(fixtures_dir, "key_manifest.json")))
    unet = build_unet(load_json("puppet_master/unet.json"), device="meta")
    sd = unet.state_dict()
    assert list(sd) == [e["key"] for e in manifest["keys"]]  # same keys, same order
    for e in manifest["keys"]:
        assert tuple(sd[e["key"]].shape) == tuple(e["shape"]), e["key"]
    assert sum(v.numel() for v in sd.values()) == manifest["counts"]["total_params"]
    assert not any(k.startswith("add_embedding") for k in sd)


def _block(kind, cfg):
    if kind == "down":
        stock = CrossAttnDownBlockSpatioTemporal(
            cfg["in_channels"], cfg["out_channels"], cfg["temb_channels"], num_layers=cfg["num_layers"],
            num_attention_heads=cfg["num_attention_heads"], cross_attention_dim=cfg["cross_attention_dim"])
        blk = DragDownBlock(stock, cfg["out_channels"], 30, cfg["drag_embedder_out_channels"], 64,
                            cfg["cross_attention_dim"])
    else:
        stock = CrossAttnUpBlockSpatioTemporal(
            cfg["in_channels"], cfg["out_channels"], cfg["prev_output_channel"], cfg["temb_channels"],
            resolution_idx=1, num_layers=cfg["num_layers"], num_attention_heads=cfg["num_attention_heads"],
            cross_attention_dim=cfg["cross_attention_dim"])
        blk = DragUpBlock(stock, cfg["out_channels"], 30, cfg["drag_embedder_out_channels"], 64,
                          cfg["cross_attention_dim"])
    for name, m in blk.named_modules():
        if name.endswith(".attn1") and "temporal" not in name:
            m.set_processor(AllToFirstAttnProcessor(14))
    return blk.eval()


@pytest.mark.parametrize("kind", ["down", "up"])
def test_drag_block_matches_fixture(fixtures_dir, kind):
    f = _path(fixtures_dir, f"drag_{kind}_block.safetensors")
    d = load_file(f)
    cfg = json.loads(safe_open(f, "pt").metadata()["config"])
    blk = _block(kind, cfg)
    blk.load_state_dict(_weights(d), strict=True)
    seen = {}

    def keep(name):
        return lambda m, i, o: seen.__setitem__(name, o)

    def keep_in(name):
        def fn(m, args, kwargs):
            seen[name + ".modulated"] = args[0]
            seen[name + ".context"] = kwargs["encoder_hidden_states"]
        return fn

    for i in range(cfg["num_layers"]):
        blk.resnets[i].register_forward_hook(keep(f"layer{i}.resnet_out"))
        blk.flow_convs[i].register_forward_hook(keep(f"layer{i}.flow_conv_out"))
        blk.attentions[i].register_forward_pre_hook(keep_in(f"layer{i}"), with_kwargs=True)
    drag = DragCondition.build(d["in.drags"])
    assert torch.equal(drag.image(8, torch.float32), d["in.flow"])
    args = (d["in.temb"], d["in.encoder_hidden_states"], d["in.image_only_indicator"], drag)
    with torch.no_grad():
        if kind == "down":
            h, states = blk(d["in.hidden_states"], *args)
            for i in range(3):
                assert torch.allclose(states[i], d[f"out.output_states.{i}"], atol=1e-4, rtol=1e-4)
        else:
            h = blk(d["in.hidden_states"], tuple(d[f"in.res_hidden_states.{i}"] for i in range(3)), *args)
    for name, got in seen.items():
        assert torch.allclose(got, d["dbg." + name], atol=1e-4, rtol=1e-4), name
    diff = (h - d["out.hidden_states"]).abs().max().item()
    assert diff < 1e-4, diff


@pytest.fixture(scope="module")
def tiny_fixture(fixtures_dir):
    f = _path(fixtures_dir, "tiny_unet_forward.safetensors")
    d = load_file(f)
    cfg = json.loads(safe_open(f, "pt").metadata()["config"])
    unet = build_unet(cfg)
    unet.load_state_dict(_weights(d), strict=True)
    return unet.eval(), d, cfg


def test_tiny_unet_matches_fixture(tiny_fixture):
    unet, d, _ = tiny_fixture
    with torch.no_grad():
        out = unet(d["in.sample"], d["in.timestep"], d["in.image_latents"], d["in.encoder_hidden_states"],
                   d["in.drags"])
    assert out.shape == (2, 14, 4, 32, 32)
    diff = (out - d["out.sample"]).abs().max().item()
    assert diff < 1e-4, diff


def test_up_block_norm_eps_matters(tiny_fixture):
    """The released drag up blocks use GroupNorm eps 1e-5 (stock SVD up blocks: 1e-6)."""
    unet, _, _ = tiny_fixture
    eps = {m.eps for b in unet.up_blocks[1:] for m in b.resnets.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert eps == {1e-5}
    eps_down = {m.eps for m in unet.down_blocks[0].resnets.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert eps_down == {1e-6}


def test_load_unet_checks_keys(tmp_path, fixtures_dir):
    import tiny_puppet_master
    cfg = tiny_puppet_master.configs()["unet"]
    torch.manual_seed(0)
    sd = build_unet(cfg).state_dict()
    good = tmp_path / "pm.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(good))
    unet = load_unet(good)  # sized by the file
    assert torch.equal(unet.state_dict()["conv_in.weight"], sd["conv_in.weight"])
    got = unet.config
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "drag_embedder_out_channels",
                "num_drags", "pos_embed_dim"):
        assert (list(got[key]) if isinstance(cfg[key], list) else got[key]) == cfg[key], key
    assert list(got["down_block_types"]) == ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"]
    torch.save(sd, tmp_path / "pm.bin")
    assert torch.equal(load_unet(tmp_path / "pm.bin").state_dict()["conv_in.weight"], sd["conv_in.weight"])
    # a stock SVD UNet (no drag modules, with add_embedding) is named as such
    stock = {k: v for k, v in sd.items() if ".flow_convs." not in k and ".drag_token_mlps." not in k}
    stock["add_embedding.linear_1.weight"] = torch.zeros(4, 4)
    bad = tmp_path / "svd_unet.safetensors"
    save_file(stock, str(bad))
    with pytest.raises(KinemaError, match="svd_unet.safetensors.*stock SVD UNet"):
        load_unet(bad)
    wrong = dict(sd)
    wrong["conv_in.weight"] = torch.zeros(8, 8, 3, 3)
    save_file({k: v.contiguous() for k, v in wrong.items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(KinemaError, match="conv_in.weight"):
        load_unet(tmp_path / "w.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(KinemaError, match="junk.safetensors"):
        load_unet(tmp_path / "junk.safetensors")


def test_drag_block_follows_dtype_changes(fixtures_dir):
    """The released blocks move their pos-emb tables to the first input's device/dtype once and keep
    them; here tables follow every call, so the same block runs in float32 and then float64."""
    f = _path(fixtures_dir, "drag_down_block.safetensors")
    d = load_file(f)
    cfg = json.loads(safe_open(f, "pt").metadata()["config"])
    blk = _block("down", cfg)
    blk.load_state_dict(_weights(d), strict=True)
    args = (d["in.temb"], d["in.encoder_hidden_states"], d["in.image_only_indicator"])
    with torch.no_grad():
        h32, _ = blk(d["in.hidden_states"], *args, DragCondition.build(d["in.drags"]))
        blk.double()
        h64, _ = blk(d["in.hidden_states"].double(), *(a.double() for a in args),
                     DragCondition.build(d["in.drags"].double()))
    assert h64.dtype == torch.float64
    assert (h64 - d["out.hidden_states"].double()).abs().max().item() < 1e-5
    assert (h32.double() - h64).abs().max().item() < 1e-5
