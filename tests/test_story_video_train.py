"""The semantic motion predictor's trainer on a tiny set the pack makes itself (warp-animator
clips, as frame folders and as .mp4 read with PyAV) and the tiny DynamiCrafter's image encoder."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tiny_dynamicrafter
import tiny_story_video
from kinema.pipelines.dynamicrafter import convert
from kinema.pipelines.dynamicrafter import pipeline
from kinema.pipelines.story_video import predictor as story_predictor
from kinema.pipelines.story_video import train
from kinema.runtime import KinemaError

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("predictor_data")
    folders = train.make_warp_clips(root / "clips", count=8, size=64, frames=12, seed=0)
    videos = train.make_warp_clips(root / "videos", count=2, size=64, frames=12, seed=1, video=True)
    save_file(tiny_dynamicrafter.checkpoint("512"), str(root / "dc.safetensors"))
    return {"root": root, "folders": folders, "videos": videos, "encoder": root / "dc.safetensors"}


def _opts(tiny_set, run, **kw):
    base = dict(data=[str(tiny_set["root"] / "clips"), str(tiny_set["root"] / "videos")],
                encoder=str(tiny_set["encoder"]), out=str(run / "predictor.safetensors"), work_dir=str(run),
                config=tiny_story_video.predictor_config().to_dict(), frames=6, height=64, width=64, steps=6, batch=8,
                lr=3e-3, warmup=10, log_every=2, save_every=3, device="cpu")
    base.update(kw)
    return train.TrainOptions(**base)


def test_practice_clips_are_real_animations(tiny_set):
    from PIL import Image
    import numpy as np
    clip = tiny_set["folders"][0]
    frames = [np.asarray(Image.open(p), dtype=np.float32) for p in sorted(clip.iterdir())]
    assert len(frames) == 12 and frames[0].shape == (64, 64, 3)
    moved = [np.abs(f - frames[0]).mean() for f in frames]
    assert moved[0] == 0 and all(b >= a - 0.5 for a, b in zip(moved, moved[1:])) and moved[-1] > 3
    # ease-in-out: the middle step changes the picture more than the first one
    steps = [np.abs(b - a).mean() for a, b in zip(frames, frames[1:])]
    assert steps[5] > 1.5 * steps[0]
    # a video decodes to the same number of frames, close to the folder's of the same seed
    vid = list(train.read_frames(tiny_set["videos"][0]))
    assert len(vid) == 12 and vid[0].shape == (64, 64, 3)


def test_encoder_from_a_dynamicrafter_checkpoint_matches_the_models(tiny_set):
    enc = train.load_image_encoder(tiny_set["encoder"])
    model = convert.convert(tiny_dynamicrafter.checkpoint("512"), "tiny")
    x = pipeline.prepare_image(torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0)), 64, 64)
    with torch.no_grad():
        assert torch.equal(enc(x), model.encode_image_tokens(x))
    # an OpenCLIP-style file (visual.*) works too
    sd = tiny_dynamicrafter.checkpoint("512")
    plain = {k[len(convert.VISION):]: v for k, v in sd.items() if k.startswith(convert.VISION + "visual.")}
    save_file(plain, str(tiny_set["root"] / "openclip.safetensors"))
    with torch.no_grad():
        assert torch.equal(train.load_image_encoder(tiny_set["root"] / "openclip.safetensors")(x), enc(x))
    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(tiny_set["root"] / "unet.safetensors"))
    with pytest.raises(KinemaError, match="unet.safetensors.*no OpenCLIP image encoder"):
        train.load_image_encoder(tiny_set["root"] / "unet.safetensors")


def test_loss_drops_below_the_interpolation(tiny_set, tmp_path):
    out = train.train(_opts(tiny_set, tmp_path, steps=400, log_every=50, save_every=1000), log=lambda m: None)
    log = [json.loads(l) for l in (tmp_path / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(50, 401, 50)) and log == out["log_lines"]
    assert out["data"]["clips"] == 10 and out["data"]["windows"] == 10 * (12 - 5)
    first, last = log[0], log[-1]
    # the untrained predictor is the interpolation: the first losses match it closely
    assert abs(first["loss"] - first["interpolation_loss"]) < 0.1 * first["interpolation_loss"]
    assert last["loss"] < 0.8 * last["interpolation_loss"]
    assert last["loss"] < 0.8 * first["loss"]
    # the written predictor loads and is no longer the interpolation
    pred = story_predictor.load_predictor(out["out"])
    info = story_predictor.training_info(out["out"])
    assert info["steps"] == 400 and info["frames"] == 6 and info["last_log"]["step"] == 400
    s, e = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    with torch.no_grad():
        assert (pred(s, e, 6) - story_predictor.interpolate_tokens(s, e, 6)).abs().max() > 1e-3


def test_resume_continues_bit_for_bit(tiny_set, tmp_path):
    straight = train.train(_opts(tiny_set, tmp_path / "a"), log=lambda m: None)
    train.train(_opts(tiny_set, tmp_path / "b", steps=3), log=lambda m: None)
    state = torch.load(tmp_path / "b" / train.STATE, weights_only=True)
    assert state["step"] == 3
    resumed = train.train(_opts(tiny_set, tmp_path / "b", resume=True), log=lambda m: None)
    a = story_predictor.load_predictor(straight["out"]).state_dict()
    b = story_predictor.load_predictor(resumed["out"]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [{k: v for k, v in r.items() if k != "seconds"} for r in straight["log_lines"]]
    lb = [{k: v for k, v in r.items() if k != "seconds"} for r in resumed["log_lines"]]
    assert [r["step"] for r in la] == [2, 4, 6] and [r["step"] for r in lb] == [2, 3, 4, 6]
    assert la == [r for r in lb if r["step"] != 3]      # step 3: where the first run stopped
    # the embeddings were cached and reused
    assert len(list((tmp_path / "b" / "embeddings").iterdir())) == 10


def test_trainer_refuses_what_would_lose_work_or_cannot_work(tiny_set, tmp_path):
    train.train(_opts(tiny_set, tmp_path / "r", steps=2), log=lambda m: None)
    with pytest.raises(ValueError, match="already holds a run"):
        train.train(_opts(tiny_set, tmp_path / "r", steps=2), log=lambda m: None)
    with pytest.raises(ValueError, match=r"resume: these settings differ.*'lr'"):
        train.train(_opts(tiny_set, tmp_path / "r", steps=4, lr=1e-2, resume=True), log=lambda m: None)
    with pytest.raises(ValueError, match="resume: no trainer_state"):
        train.train(_opts(tiny_set, tmp_path / "new", resume=True), log=lambda m: None)
    (tmp_path / "taken.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="out: .*already exists"):
        train.train(_opts(tiny_set, tmp_path / "n2", out=str(tmp_path / "taken.safetensors")), log=lambda m: None)
    with pytest.raises(ValueError, match="no clip is long enough"):
        train.train(_opts(tiny_set, tmp_path / "n3", frames=13), log=lambda m: None)
    with pytest.raises(ValueError, match="data: .* does not exist"):
        train.train(_opts(tiny_set, tmp_path / "n4", data=[str(tmp_path / "missing")]), log=lambda m: None)
    with pytest.raises(ValueError, match="config: tokens 257 x 1280 do not fit"):
        train.train(_opts(tiny_set, tmp_path / "n5", config={}), log=lambda m: None)
    with pytest.raises(ValueError, match="frames"):
        train.train(_opts(tiny_set, tmp_path / "n6", frames=2), log=lambda m: None)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(KinemaError, match="bad.mp4 could not be read as a video"):
        train.train(_opts(tiny_set, tmp_path / "n7", data=[str(tmp_path / "bad.mp4")]), log=lambda m: None)


def test_command_line(tiny_set, tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(tiny_story_video.predictor_config().to_dict()))
    args = [sys.executable, str(ROOT / "train_motion_predictor.py"), "--data", str(tiny_set["root"] / "clips"),
            "--encoder", str(tiny_set["encoder"]), "--out", str(tmp_path / "cli.safetensors"),
            "--work-dir", str(tmp_path / "run"), "--config", str(cfg), "--frames", "6", "--height", "64",
            "--width", "64", "--steps", "4", "--batch", "2", "--log-every", "2", "--device", "cpu"]
    env = {"KINEMA_PROGRESS": "0", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "step 4/4" in res.stdout and "wrote" in res.stdout
    assert story_predictor.training_info(tmp_path / "cli.safetensors")["steps"] == 4
    res = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 2 and "already holds a run" in res.stdout


@pytest.mark.hardware
def test_trains_on_cuda_in_bf16(tiny_set, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = train.train(_opts(tiny_set, tmp_path, steps=20, log_every=10, device="cuda", precision="bf16"),
                   log=lambda m: None)
    assert [r["step"] for r in out["log_lines"]] == [10, 20]
    assert all(r["loss"] == r["loss"] for r in out["log_lines"])          # finite, not NaN
    assert story_predictor.training_info(out["out"])["steps"] == 20
