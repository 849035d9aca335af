"""Follow-Your-Click nodes headless (a diffusers VAE behind ComfyUI's VAE interface stands in for
Load Checkpoint's VAE outside ComfyUI), and the one-strength-for-every-backend nodes, checked
against the Motion strength node's own measurement."""
import json
from pathlib import Path

import pytest
import torch

from kinema import runtime
from kinema.kernels import strength as S
from kinema.kernels.field import MotionField
from kinema.kernels.motion import dense_motion
from kinema.nodes import follow_your_click as N
from kinema.nodes.motion import KinemaMotionStrength
from kinema.pipelines.follow_your_click import convert, sd15, tiny
from kinema.runtime import KinemaError

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    fyc = root / "kinema" / "follow_your_click"
    sd = tiny.save(tiny.sd15_checkpoint(seed=0), root / "checkpoints" / "tiny_sd15.safetensors")
    mm = tiny.save(tiny.motion_module(seed=1), root / "animatediff_models" / "mm_tiny.ckpt")
    model = convert.build_from_sd15(sd, mm)
    tiny._randomise(model.motion_embedding, torch.Generator().manual_seed(2))
    convert.save_unet(model, fyc / "fyc_tiny.safetensors")
    tiny.save(tiny.sd15_checkpoint(seed=0), fyc / "not_fyc.safetensors")
    return root


@pytest.fixture
def env(models_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KINEMA_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("KINEMA_DEVICE", "cpu")
    monkeypatch.setenv("KINEMA_TEMP_DIR", str(tmp_path / "temp"))
    return models_dir


@pytest.fixture
def sd_parts(env):
    path = env / "checkpoints" / "tiny_sd15.safetensors"
    text = sd15.TextEncoder(sd15.load_text_encoder(path))
    cond = lambda s: [[text([s]), {}]]  # noqa: E731  (CONDITIONING as CLIP Text Encode gives it)
    return sd15.DiffusersVAE(sd15.load_vae(path)), cond


def test_node_contract():
    for name, cls in N.NODE_CLASS_MAPPINGS.items():
        assert name.startswith("Kinema") and name in N.NODE_DISPLAY_NAME_MAPPINGS
        assert cls.CATEGORY.startswith("Kinema/") and cls.DESCRIPTION
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        for section in ("required", "optional"):
            for inp, value in cls.INPUT_TYPES().get(section, {}).items():
                assert value[1].get("tooltip"), f"{name}.{inp} has no tooltip"
    from kinema.nodes import NODE_CLASS_MAPPINGS
    assert set(N.NODE_CLASS_MAPPINGS) <= set(NODE_CLASS_MAPPINGS)


def test_loader(env):
    files = N.KinemaFYCLoader.INPUT_TYPES()["required"]["unet_name"][0]
    assert files == ["fyc_tiny.safetensors", "not_fyc.safetensors"]
    (m,) = N.KinemaFYCLoader().load("fyc_tiny.safetensors", "bf16")
    assert isinstance(m, runtime.ManagedModel) and m.dtype == torch.bfloat16 and m.module.in_channels == 9
    with pytest.raises(KinemaError, match="not_fyc.safetensors: is a Stable Diffusion single-file checkpoint"):
        N.KinemaFYCLoader().load("not_fyc.safetensors", "fp32")
    with pytest.raises(KinemaError, match="'gone.ckpt' not found"):
        N.KinemaFYCLoader().load("gone.ckpt", "fp32")
    with pytest.raises(ValueError, match="precision"):
        N.KinemaFYCLoader().load("fyc_tiny.safetensors", "fp8")


def _run(sd_parts, **kw):
    vae, cond = sd_parts
    (model,) = N.KinemaFYCLoader().load("fyc_tiny.safetensors", "fp32")
    args = dict(fyc_model=model, vae=vae, positive=cond("the cat turns its head"), negative=cond(""),
                image=torch.rand(1, 48, 80, 3, generator=torch.Generator().manual_seed(0)), motion_strength=4, fps=2,
                frames=4, width=64, height=64, steps=2, cfg=7.5, seed=0)
    args.update(kw)
    return N.KinemaFYCAnimate().run(**args), args


def test_animate_node(sd_parts):
    out, args = _run(sd_parts)
    frames = out["result"][0]
    assert frames.shape == (4, 64, 64, 3)
    assert out["ui"]["animated"] == (True,) and out["ui"]["images"][0]["filename"].endswith(".webp")
    stronger = _run(sd_parts, motion_strength=9)[0]["result"][0]
    assert (stronger - frames).abs().max() > 1e-4
    mask = torch.zeros(1, 48, 80)
    mask[:, 10:40, 30:60] = 1.0
    regional = _run(sd_parts, mask=mask)[0]["result"][0]
    from kinema.kernels.regional import cover_crop, fit_mask
    img = cover_crop(args["image"].permute(0, 3, 1, 2), 64, 64).permute(0, 2, 3, 1)[0]
    outside = fit_mask(mask, 64, 64)[0, 0] == 0
    assert (regional - img)[:, outside].abs().max() <= 1 / 255


def test_animate_node_errors(sd_parts):
    vae, cond = sd_parts
    with pytest.raises(ValueError, match="fyc_model: expected a model from Load Follow-Your-Click Model"):
        _run(sd_parts, fyc_model=runtime.ManagedModel(torch.nn.Linear(2, 2), "x"))
    with pytest.raises(ValueError, match="vae: expected a VAE"):
        _run(sd_parts, vae="vae")
    with pytest.raises(ValueError, match="positive: expected CONDITIONING"):
        _run(sd_parts, positive=[])
    with pytest.raises(ValueError, match="frames: 30"):
        _run(sd_parts, frames=30)
    with pytest.raises(ValueError, match="mask: the mask is empty"):
        _run(sd_parts, mask=torch.zeros(1, 48, 80))


def test_strength_table_matches_dynamicrafter_defaults():
    variants = json.loads((ROOT / "configs" / "dynamicrafter" / "variants.json").read_text())["variants"]
    for v in S.DYNAMICRAFTER_VARIANTS:
        d = variants[v]["defaults"]
        fs = [S.dynamicrafter_fs(b, v) for b in range(11)]
        assert fs[4] == d["fs"]                                   # FYC's default strength -> the model's default
        lo, hi = d["fs_range"]
        assert min(fs) == lo and max(fs) == hi
        more_motion = fs if v == "256" else [-x for x in fs]       # 512/1024: lower fs = more motion
        assert more_motion == sorted(more_motion)
    (fyc, fs, speed), = [N.KinemaStrengthToBackends().map(7, "1024")["result"]]
    assert (fyc, fs, speed) == (7, S.dynamicrafter_fs(7, "1024"), S.bucket_speed(7))
    with pytest.raises(ValueError, match="bucket: 11"):
        S.dynamicrafter_fs(11)
    with pytest.raises(ValueError, match="variant"):
        S.dynamicrafter_fs(3, "2048")


@pytest.mark.parametrize("bucket", range(1, 11))
def test_scaled_motion_measures_as_its_bucket(bucket):
    """Scale a drag's motion field to a bucket; the Motion strength node measures that bucket."""
    h, w = 96, 128
    region = torch.zeros(h, w)
    region[30:70, 40:90] = 1.0
    flow = dense_motion([torch.tensor([[60.0, 50.0], [75.0, 58.0]])], (w, h), 16, region=region)
    field = MotionField(flow, region)
    scaled, k = N.KinemaScaleMotionToStrength().scale(field, bucket)
    assert k > 0
    measured = KinemaMotionStrength().measure(90.0, mask=region[None], motion=scaled)["result"]
    assert measured[2] == bucket
    torch.testing.assert_close(scaled.flow, flow * k)


def test_scale_motion_errors():
    flow = torch.zeros(4, 8, 8, 2)
    with pytest.raises(ValueError, match="does not move inside the mask"):
        N.KinemaScaleMotionToStrength().scale(MotionField(flow), 3)
    assert N.KinemaScaleMotionToStrength().scale(MotionField(flow), 0)[1] == 0.0
    with pytest.raises(ValueError, match="mask: the mask is 4x4 but the motion is 8x8"):
        N.KinemaScaleMotionToStrength().scale(MotionField(flow), 3, mask=torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="motion: expected a Kinema motion field"):
        N.KinemaScaleMotionToStrength().scale(flow, 3)


def test_docs_table_is_the_map():
    """docs/motion_strength.md shows what kernels/strength.py computes."""
    import re
    rows = [line for line in (ROOT / "docs" / "motion_strength.md").read_text().splitlines()
            if re.match(r"\| \d+ \|", line)]
    assert len(rows) == S.BUCKETS
    for b, row in enumerate(rows):
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert int(cells[0]) == b and float(cells[2]) == S.bucket_speed(b) and int(cells[3]) == b
        assert [int(c) for c in cells[4:7]] == [S.dynamicrafter_fs(b, v) for v in ("512", "1024", "256")]
