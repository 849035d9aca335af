"""Schedules and DDIM arrays against the official sampler, and the step-count rule."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kinema.pipelines.dynamicrafter.sampler import DDIMSampler, DiffusionSchedule, ScheduleConfig, ddim_timesteps


pytestmark = pytest.mark.usefixtures("one_thread")


CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "dynamicrafter" / "variants.json"


def _load(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _schedule_from_meta(meta, variant):
    """The variant's settings, with the sampler flags the fixture was made with."""
    d = dict(json.load(open(CONFIGS))["variants"][variant]["schedule"])
    d["parameterization"] = meta["parameterization"]
    d["zero_snr"] = meta["rescale_betas_zero_snr"] == "True"
    d["spacing"] = meta["timestep_spacing"]
    if meta["use_dynamic_rescale"] != "True":
        d["base_scale"] = None
    return ScheduleConfig.from_dict(d)


def test_variant_settings_match_official_configs(fixtures_dir):
    for variant in ("256", "512", "1024"):
        with safe_open(str(fixtures_dir / "dynamicrafter" / f"ddim_schedule_{variant}.safetensors"), "pt") as f:
            meta = f.metadata()
        assert ScheduleConfig.from_dict(json.load(open(CONFIGS))["variants"][variant]["schedule"]) == \
            _schedule_from_meta(meta, variant)


@pytest.mark.parametrize("variant", ["256", "512", "1024"])
def test_schedule_parity(fixtures_dir, variant):
    t, meta = _load(fixtures_dir / "dynamicrafter" / f"ddim_schedule_{variant}.safetensors")
    sch = DiffusionSchedule(_schedule_from_meta(meta, variant))
    for name in ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "scale_arr"]:
        if f"model.{name}" not in t:
            assert name != "scale_arr" or sch.scale_arr is None
            continue
        torch.testing.assert_close(getattr(sch, name), t[f"model.{name}"], atol=0, rtol=0, msg=name)
    torch.testing.assert_close(sch.betas64, t["f64.betas"], atol=1e-15, rtol=0)
    torch.testing.assert_close(sch.alphas_cumprod64, t["f64.alphas_cumprod"], atol=1e-15, rtol=0)
    # exact_count=False: the released step count (differs only when steps do not divide 1000)
    ddim = DDIMSampler(sch, steps=int(meta["ddim_steps"]), eta=float(meta["ddim_eta"]), exact_count=False)
    torch.testing.assert_close(ddim.timesteps, t["ddim.ddim_timesteps"], atol=0, rtol=0)
    torch.testing.assert_close(ddim.alphas, t["ddim.ddim_alphas"], atol=0, rtol=0)
    torch.testing.assert_close(ddim.alphas_prev, t["ddim.ddim_alphas_prev"], atol=0, rtol=0)
    torch.testing.assert_close(ddim.sigmas, t["ddim.ddim_sigmas"], atol=1e-12, rtol=0)
    torch.testing.assert_close(ddim.sqrt_one_minus_alphas, t["ddim.ddim_sqrt_one_minus_alphas"], atol=0, rtol=0)
    if "ddim.ddim_scale_arr" in t:
        torch.testing.assert_close(ddim.scale_arr, t["ddim.ddim_scale_arr"], atol=0, rtol=0)
        torch.testing.assert_close(ddim.scale_arr_prev, t["ddim.ddim_scale_arr_prev"], atol=0, rtol=0)


def test_zero_snr_endpoints():
    sch = DiffusionSchedule(ScheduleConfig())
    assert sch.alphas_cumprod[-1].item() == 0.0 and sch.betas[-1].item() == 1.0
    torch.testing.assert_close(sch.alphas_cumprod[:4],
                               torch.tensor([0.99914998, 0.99823344, 0.99731266, 0.99638760]), atol=1e-7, rtol=0)


def test_trailing_spacing():
    ts = ddim_timesteps(50, "uniform_trailing")
    assert ts[0] == 19 and ts[-1] == 999 and len(ts) == 50
    assert len(ddim_timesteps(30, "uniform_trailing")) == 30


def test_uniform_spacing_step_count():
    # The released sampler builds arange(0, 1000, 1000 // S) + 1, which has 31 entries for
    # S = 30: the loop then runs one step more than asked. We keep exactly S steps and keep
    # the released count available.
    released = ddim_timesteps(30, "uniform", exact_count=False)
    ours = ddim_timesteps(30, "uniform")
    assert len(released) == 31 and len(ours) == 30
    np.testing.assert_array_equal(ours, released[:30])
    np.testing.assert_array_equal(ddim_timesteps(50, "uniform"), np.arange(0, 1000, 20) + 1)


def test_bad_steps_and_eta():
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(0, "uniform")
    with pytest.raises(ValueError, match="spacing"):
        ddim_timesteps(10, "leading-ish")
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(DiffusionSchedule(ScheduleConfig()), 10, eta=2.0)


def test_guidance_rescale_matches_definition():
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    o = DDIMSampler.guide(c, u, 7.5, 0.0)
    torch.testing.assert_close(o, u + 7.5 * (c - u))
    r = DDIMSampler.guide(c, u, 7.5, 1.0)
    torch.testing.assert_close(r.std(dim=(1, 2)), c.std(dim=(1, 2)))


def _loop_schedule(meta):
    """The schedule named by a loop fixture's metadata (its config file and sampler flags)."""
    import re
    name = re.search(r"inference_(\d+)_", meta["config_schedule"]).group(1)
    d = dict(json.load(open(CONFIGS))["variants"][name]["schedule"])
    d["parameterization"] = meta.get("parameterization", d["parameterization"])
    d["spacing"] = meta.get("timestep_spacing", d["spacing"])
    if meta.get("use_dynamic_rescale") == "False":
        d["base_scale"] = None
    return ScheduleConfig.from_dict(d)


def _loop_setup(fixtures_dir):
    from kinema.pipelines.dynamicrafter.unet import DynamiCrafterUNet, UNetConfig
    t, meta = _load(fixtures_dir / "dynamicrafter" / "ddim_loop_512.safetensors")
    unet = DynamiCrafterUNet(UNetConfig.from_dict(json.loads(meta["unet_config"]))).eval()
    unet.load_state_dict({k[len("unet_state_dict."):]: v.float() for k, v in t.items()
                          if k.startswith("unet_state_dict.")}, strict=True)
    sch = DiffusionSchedule(_loop_schedule(meta))
    ddim = DDIMSampler(sch, steps=int(meta["ddim_steps"]), eta=float(meta["ddim_eta"]), exact_count=False)
    fs = t["input.fs"]

    def model_fn(x, ts):
        xin = torch.cat([x, t["input.c_concat"]], dim=1)
        tt = torch.full((x.shape[0],), ts, dtype=torch.long)
        with torch.no_grad():
            return unet(xin, tt, t["input.context_cond"], fs), unet(xin, tt, t["input.context_uncond"], fs)

    return t, meta, ddim, model_fn


def test_ddim_loop_step_by_step(fixtures_dir):
    t, meta, ddim, model_fn = _loop_setup(fixtures_dir)
    cfg, rescale = float(meta["unconditional_guidance_scale"]), float(meta.get("guidance_rescale", 0.0))
    torch.testing.assert_close(ddim.timesteps.flip(0), t["trace.timesteps"], atol=0, rtol=0)
    n = len(ddim)
    assert t["input.noise_per_step"].shape[0] == n
    for k in range(n):          # trace index k = step k of the loop, i = n-1-k
        i = n - 1 - k
        x = t["trace.x"][k]
        oc, ou = model_fn(x, int(ddim.timesteps[i]))
        torch.testing.assert_close(oc, t["trace.model_out_cond"][k], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ou, t["trace.model_out_uncond"][k], atol=1e-4, rtol=1e-4)
        o = ddim.guide(oc, ou, cfg, rescale)
        x_prev, x0 = ddim.step(x, i, o, t["input.noise_per_step"][k])
        scale = t["trace.x"][k + 1].abs().max()
        assert (x0 - t["trace.pred_x0"][k]).abs().max() <= 1e-4 * max(1.0, t["trace.pred_x0"][k].abs().max())
        assert (x_prev - t["trace.x"][k + 1]).abs().max() <= 1e-4 * scale, f"step {k}"


def test_ddim_loop_end_to_end(fixtures_dir):
    t, meta, ddim, model_fn = _loop_setup(fixtures_dir)
    n = len(ddim)
    out = ddim.sample(model_fn, t["input.x_T"], cfg=float(meta["unconditional_guidance_scale"]),
                      guidance_rescale=float(meta.get("guidance_rescale", 0.0)),
                      noise_fn=lambda i: t["input.noise_per_step"][n - 1 - i])
    ref = t["output.samples"]
    assert (out - ref).abs().max() / ref.abs().max() <= 1e-4
