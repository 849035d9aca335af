"""Training a tiny Follow-Your-Click model, built from tiny SD1.5 + motion-module files, on clips
the pack makes itself with the warp animator: the labels, the loss dropping, a bit-identical
resume, the command line, and the trained file sampling end to end."""
import csv
import shutil

import pytest
import torch

from kinema import runtime
from kinema.pipelines.follow_your_click import cli, convert, data, sd15, tiny, train
from kinema.pipelines.follow_your_click import pipeline as P
from kinema.runtime import KinemaError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("fyc_train")
    sd = tiny.save(tiny.sd15_checkpoint(seed=0), d / "tiny_sd15.safetensors")
    mm = tiny.save(tiny.motion_module(version=2, seed=1), d / "mm_sd_v15_v2.ckpt")
    assert cli.main(["build", "--sd15", str(sd), "--motion-module", str(mm), "--out", str(d / "fyc_init.safetensors")]) == 0
    clips = d / "clips"
    data.synthetic_clips(clips, count=3, frames=12, size=96, seed=0)
    frames_dir = clips / "frames_clip"                              # a folder of frames works as a clip too
    video = data.ClipFolder(clips).window(0, 0, 12, 1, 96, 96)
    frames_dir.mkdir()
    from PIL import Image
    for i, f in enumerate(video):
        Image.fromarray((f.numpy() * 255).round().astype("uint8")).save(frames_dir / f"{i:03d}.png")
    (frames_dir / "caption.txt").write_text("a patch slides")
    return d


def _cfg(d, out, **kw):
    base = dict(model=str(d / "fyc_init.safetensors"), sd15=str(d / "tiny_sd15.safetensors"), clips=str(d / "clips"),
                out=str(d / out), steps=4, frames=4, width=64, height=64, strides=[1, 2, 3], lr=1e-3,
                save_every=2, device="cpu", train="all", seed=0)
    base.update(kw)
    return train.TrainConfig(**base)


def test_clips_and_labels(setup):
    folder = data.ClipFolder(setup / "clips")
    assert [c.path.name for c in folder.clips] == ["clip_00.mp4", "clip_01.mp4", "clip_02.mp4", "frames_clip"]
    assert [c.frames for c in folder.clips] == [12, 12, 12, 12]
    assert folder.clips[3].caption == "a patch slides" and folder.clips[0].caption.startswith("the round patch")
    w = folder.window(1, 2, 5, 2, 64, 64)
    assert w.shape == (5, 64, 64, 3) and 0 <= float(w.min()) and float(w.max()) <= 1
    labels = data.analyse(folder.window(1, 0, 6, 2, 96, 96))
    assert labels.mask is not None and 0.01 < float(labels.mask.mean()) < 0.5
    assert float((labels.mask * labels.moving).sum() / labels.moving.sum()) > 0.5   # the mask covers what moves
    assert 1 <= labels.strength <= 10
    still = data.analyse(folder.window(1, 0, 1, 1, 96, 96).expand(4, -1, -1, -1).contiguous())
    assert still.mask is None and still.strength == 0
    # a faster version of the same motion gets a higher bucket
    slow = data.analyse(folder.window(1, 0, 6, 1, 96, 96)).strength
    fast = data.analyse(folder.window(1, 0, 6, 2, 96, 96)).strength
    assert fast > slow
    with pytest.raises(ValueError, match="beyond its 12 frames"):
        folder.window(0, 8, 4, 2, 64, 64)
    empty = setup / "empty"
    empty.mkdir(exist_ok=True)
    with pytest.raises(KinemaError, match="empty holds no video files"):
        data.ClipFolder(empty)
    with pytest.raises(KinemaError, match="clips: folder .*nope not found"):
        data.ClipFolder(setup / "nope")
    broken = setup / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(KinemaError, match="bad.mp4: could not be read as a video"):
        data.ClipFolder(broken)


def test_loss_drops(setup):
    trainer = train.Trainer(_cfg(setup, "run_loss", steps=12, save_every=100), log=lambda s: None)
    evals = [trainer.batch(torch.Generator().manual_seed(100 + i)) for i in range(2)]
    cases = [(torch.tensor([t]), torch.randn(evals[0]["x0"].shape, generator=torch.Generator().manual_seed(t)))
             for t in (150, 450, 750, 950)]

    def held_out() -> float:
        with torch.no_grad():
            return sum(float(trainer.loss(b, t, n)) for b in evals for t, n in cases) / (len(evals) * len(cases))

    before = held_out()
    final = trainer.run(progress=False)
    after = held_out()
    assert after < 0.8 * before, (before, after)
    rows = list(csv.DictReader((setup / "run_loss" / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert {int(r["fps"]) for r in rows} <= {1, 2, 3} and all(0 <= int(r["strength"]) <= 10 for r in rows)
    assert final.is_file() and convert.load_unet(final).conv_in.weight.shape[1] == 9


def _weights(path):
    return convert.load_unet(path).state_dict()


def test_resume_is_bit_identical(setup):
    straight = train.Trainer(_cfg(setup, "run_a"), log=lambda s: None)
    straight.run(progress=False)
    first = train.Trainer(_cfg(setup, "run_b", steps=2), log=lambda s: None)
    first.run(progress=False)
    resumed = train.Trainer(_cfg(setup, "run_b", steps=4), resume="latest", log=lambda s: None)
    assert resumed.step == 2
    resumed.run(progress=False)
    a, b = _weights(setup / "run_a" / "final.safetensors"), _weights(setup / "run_b" / "final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = (setup / "run_a" / "loss.csv").read_text()
    assert la == (setup / "run_b" / "loss.csv").read_text() and la.count("\n") == 5
    # the untrained start differs: the run did change the weights
    init = _weights(setup / "fyc_init.safetensors")
    assert any(not torch.equal(a[k], init[k]) for k in a)
    # resuming an over-run log trims it; a mismatched run is refused
    with pytest.raises(ValueError, match="resume: the checkpoint was trained with frames=4"):
        train.Trainer(_cfg(setup, "run_b", frames=6), resume=str(setup / "run_b" / "checkpoints" / "step_000002"))
    with pytest.raises(KinemaError, match="not a checkpoint folder"):
        train.Trainer(_cfg(setup, "run_b"), resume=str(setup))


def test_motion_set_trains_only_the_official_modules(setup):
    trainer = train.Trainer(_cfg(setup, "run_motion", steps=1, train="motion"), log=lambda s: None)
    before = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    trainer.run(progress=False)
    after = trainer.unet.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(any(s in k for s in ("motion_modules.", "conv_in", "motion_embedding", "fps_embedding"))
                           for k in changed)
    assert any(k.startswith("conv_in") for k in changed) and any(".motion_modules." in k for k in changed)


def test_command_line_and_bad_settings(setup, capsys):
    out = setup / "run_cli"
    shutil.rmtree(out, ignore_errors=True)
    args = ["train", "--model", str(setup / "fyc_init.safetensors"), "--sd15", str(setup / "tiny_sd15.safetensors"),
            "--clips", str(setup / "clips"), "--out", str(out), "--steps", "1", "--frames", "4", "--width", "64",
            "--height", "64", "--device", "cpu"]
    assert cli.main(args) == 0 and (out / "final.safetensors").is_file() and (out / "config.json").is_file()
    assert cli.main(args[:-2] + ["--device", "cpu", "--precision", "bf16"]) == 2
    assert "mixed precision needs a CUDA device" in capsys.readouterr().err
    assert cli.main(args + ["--frames", "30"]) == 2
    assert "at most 24" in capsys.readouterr().err
    assert cli.main(["build", "--sd15", str(setup / "clips"), "--motion-module", "x", "--out", str(out / "x.ckpt")]) == 2
    for bad, match in ((dict(train="lora"), "train: 'lora'"), (dict(width=60), "multiples of 8"),
                       (dict(strides=[0]), "strides"), (dict(first_frame_mask_rates=[1.0]), "first_frame_mask_rates")):
        with pytest.raises(ValueError, match=match):
            _cfg(setup, "x", **bad).check()
    with pytest.raises(KinemaError, match="no clip has 13 frames"):
        train.Trainer(_cfg(setup, "x", frames=13, strides=[1]), log=lambda s: None).train_step()


def test_trained_file_samples_end_to_end(setup):
    """The trained tiny file loads and animates a picture with a clicked region; outside the
    region every frame is the picture (the frames of a 12-step model are noise otherwise)."""
    model = convert.load_unet(setup / "run_loss" / "final.safetensors")
    vae = sd15.DiffusersVAE(sd15.load_vae(setup / "tiny_sd15.safetensors"))
    text = sd15.TextEncoder(sd15.load_text_encoder(setup / "tiny_sd15.safetensors"))
    img = data.ClipFolder(setup / "clips").window(0, 0, 1, 1, 64, 64)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 8:40] = 1.0
    frames = P.animate(runtime.ManagedModel(model, "FYC"), vae, img, text(["the patch slides"]), text([""]),
                       P.FYCOptions(frames=4, width=64, height=64, steps=3, strength=6), mask=mask)
    assert frames.shape == (4, 64, 64, 3)
    outside = mask[0] == 0
    assert (frames - img[0])[:, outside].abs().max() <= 1 / 255


@pytest.mark.hardware
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision(setup, precision):
    """Autocast over fp32 weights on CUDA (fp16 with a gradient scaler): finite losses, the weights
    stay fp32 and change."""
    trainer = train.Trainer(_cfg(setup, f"run_{precision}", device="cuda", precision=precision), log=lambda s: None)
    start = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    trainer.run(progress=False)
    rows = list(csv.DictReader((setup / f"run_{precision}" / "loss.csv").open()))
    assert len(rows) == 4 and all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)
    after = trainer.unet.state_dict()
    assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(after[k], start[k]) for k in after)
