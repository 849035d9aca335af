"""Training a tiny Follow-Your-Click model, built from tiny SD1.5 + motion-module files, on clips
the pack makes itself with the warp animator: the labels, the loss dropping, a bit-identical
resume, the command line, and the trained file sampling end to end."""
import csv
import shutil

import pytest
import torch

from kinema import runtime
from kinema.pipelines.clips import make_warp_clips
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
    make_warp_clips(clips, count=3, size=96, frames=12, seed=0, video=True)
    for i in range(3):
        (clips / f"clip_{i:02d}.txt").write_text("the disc slides")
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


def test_clips(setup):
    folder = data.ClipFolder(setup / "clips")
    assert [c.path.name for c in folder.clips] == ["clip_00.mp4", "clip_01.mp4", "clip_02.mp4", "frames_clip"]
    assert [c.frames for c in folder.clips] == [12, 12, 12, 12]
    assert folder.clips[3].caption == "a patch slides" and folder.clips[0].caption == "the disc slides"
    w = folder.window(1, 2, 5, 2, 64, 64)
    assert w.shape == (5, 64, 64, 3) and 0 <= float(w.min()) and float(w.max()) <= 1
    # the frame folder holds the first video's frames: the same window (up to the video codec)
    assert (folder.window(3, 1, 4, 3, 64, 64) - folder.window(0, 1, 4, 3, 64, 64)).abs().mean() < 0.02
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
    with pytest.raises(KinemaError, match="bad.mp4 could not be read as a video"):
        data.ClipFolder(broken)


def _disc_video(speed512: float, size: int = 128, frames: int = 8):
    """A striped disc sliding right at a known speed (px per frame at 512 px) over a still
    texture, rendered by the warp animator; returns (video, the disc on frame 0)."""
    from kinema.kernels.field import MotionField
    from kinema.kernels.masks import blur
    from kinema.kernels.motion import dense_motion
    from kinema.pipelines.warp_animator import animate
    g = torch.Generator().manual_seed(0)
    tex = blur(torch.rand(1, 3, size, size, generator=g), 2.0)[0].permute(1, 2, 0)
    tex = (tex - tex.min()) / (tex.max() - tex.min())
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    cx, cy, r = 0.4 * size, 0.47 * size, 0.125 * size
    disc = (((xs - cx) ** 2 + (ys - cy) ** 2) <= r * r).float()
    stripes = (0.7 + 0.3 * ((xs // 4) % 2))[..., None]
    img = tex * (1 - disc[..., None]) + disc[..., None] * torch.tensor([0.9, 0.2, 0.2]) * stripes
    d = speed512 * size / 512
    flow = dense_motion([torch.tensor([[cx, cy], [cx + d * (frames - 1), cy]])], (size, size), frames, region=disc,
                        easing="linear")
    return animate(img, MotionField(flow, disc), progress=False), disc


@pytest.mark.parametrize("speed512", [1.25, 3.5, 6.5])
def test_labels_find_the_moving_object_and_its_strength(speed512):
    """Known motion: the mask is the disc (IoU), the strength the bucket of its true speed."""
    from kinema.kernels.flow import strength_bucket
    video, disc = _disc_video(speed512)
    labels = data.analyse(video)
    iou = float((labels.mask * disc).sum() / ((labels.mask + disc) > 0).sum())
    assert iou > 0.7, iou
    truth = strength_bucket(speed512 * 7, (512, 512), 8)
    assert abs(labels.strength - truth) <= 1, (labels.strength, truth)
    # a large window is analysed at 256 px and its mask scaled back to the full size
    big = torch.nn.functional.interpolate(video.permute(0, 3, 1, 2), scale_factor=4, mode="bilinear")
    large = data.analyse(big.permute(0, 2, 3, 1).contiguous())
    assert large.mask.shape == (512, 512) and abs(large.strength - labels.strength) <= 1


def test_still_and_faster_windows(setup):
    folder = data.ClipFolder(setup / "clips")
    still = data.analyse(folder.window(1, 0, 1, 1, 96, 96).expand(4, -1, -1, -1).contiguous())
    assert still.mask is None and still.strength == 0
    video, _ = _disc_video(1.25, frames=12)
    assert data.analyse(video[::2].contiguous()).strength > data.analyse(video[:6].contiguous()).strength


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
