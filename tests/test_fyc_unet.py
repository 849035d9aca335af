"""The Follow-Your-Click UNet against the official fixtures: the module tree against the key
manifest, the 9-channel input (exact) and the embeddings (1e-5) against conditioning.safetensors,
also for frame counts, sizes, fps and strengths the fixture does not hold; and the official
quirks, each behaving as the weights mean."""
import json

import pytest
import torch
from diffusers.models.embeddings import Timesteps
from diffusers.models.resnet import ResnetBlock2D
from safetensors.torch import load_file

from kinema.pipelines.follow_your_click import convert
from kinema.pipelines.follow_your_click.unet import FYCUNet, conditioning_input, load_config, mask_condition
from kinema.pipelines.motion_i2v.modules import ResnetBlock, joint_group_norm

pytestmark = pytest.mark.usefixtures("one_thread")
CASES = ("with_mask", "no_mask", "no_mask_partial_first_frame")


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    d = fixtures_dir / "follow_your_click"
    return load_file(str(d / "conditioning.safetensors")), json.loads((d / "key_manifest.json").read_text())


def _fixture_unet(fx) -> FYCUNet:
    """The fixture's tiny UNet (32 channels on 4 levels, one layer per block) with its stored
    embedding and conv_in weights."""
    tensors, _ = fx
    cfg = dict(load_config("unet"), block_out_channels=[32, 32, 32, 32], layers_per_block=1, cross_attention_dim=32)
    torch.manual_seed(0)
    model = FYCUNet(cfg).eval()
    sd = model.state_dict()
    for k, v in tensors.items():
        if k.startswith("param."):
            sd[k[len("param."):]] = v
    model.load_state_dict(sd)
    return model


def test_module_tree_equals_key_manifest(fixture):
    _, manifest = fixture
    ref = manifest["keys"]
    ours = {k: list(v.shape) for k, v in convert.build_unet(load_config("unet")).state_dict().items()}
    assert len(ref) == manifest["n_keys"] == 1254
    assert ours == ref
    assert sum(".motion_modules." in k for k in ours) == manifest["n_motion_module_keys"] == 560
    # the config read back from the manifest's shapes is the released one
    meta = {k: torch.empty(s, device="meta") for k, s in ref.items()}
    assert convert.config_from_state_dict(meta, "manifest") == load_config("unet")


def test_sinusoids_match(fixture):
    tensors, _ = fixture
    v = tensors["emb.values"]
    model = _fixture_unet(fixture)
    torch.testing.assert_close(model.time_proj(v), tensors["emb.time_proj"], atol=1e-6, rtol=0)
    torch.testing.assert_close(Timesteps(320, True, 0)(v), tensors["emb.time_proj_320"], atol=1e-6, rtol=0)


def test_embedding_parity_for_every_value_combination(fixture):
    """emb(t, fps, s) = TimeEmb(t) + FpsEmb(fps) + MotionEmb(s): the step-0 embedding of every case
    (t=501, fps=2, s=4), and every combination of the fixture's values, from the per-term outputs
    the official modules gave."""
    tensors, _ = fixture
    model = _fixture_unet(fixture)
    with torch.no_grad():
        for case in CASES:
            fps = tensors[f"{case}.fps_tensor_to_unet"]
            flow = tensors[f"{case}.flow_control_to_unet"]
            t = tensors[f"{case}.timestep_step0"]
            emb = model.embedding(t, fps, flow, batch=2)
            torch.testing.assert_close(emb, tensors[f"{case}.emb_step0"], atol=1e-5, rtol=0)
        values = tensors["emb.values"].tolist()
        parts = {n: tensors[f"emb.{n}_embedding_out"] for n in ("time", "fps", "motion")}
        grid = torch.tensor([(a, b, c) for a in range(len(values)) for b in range(len(values)) for c in range(len(values))])
        vals = torch.tensor(values)[grid]
        emb = model.embedding(vals[:, 0], vals[:, 1], vals[:, 2], batch=len(grid))
        want = parts["time"][grid[:, 0]] + parts["fps"][grid[:, 1]] + parts["motion"][grid[:, 2]]
        torch.testing.assert_close(emb, want, atol=1e-5, rtol=0)


def _inputs(tensors, case):
    z_img = tensors[f"{case}.first_image_latents"]
    mask = None
    if case == "with_mask":
        mask_u8 = tensors["with_mask.mask_image_u8"]
        mask = mask_condition(mask_u8[..., 0].float() / 255.0, (8, 8))     # the R channel, as the scripts read it
    partial = tensors.get(f"{case}.partial_mask")
    return z_img, mask, partial


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("step", [0, 1])
def test_nine_channel_input_is_exact(fixture, case, step):
    tensors, _ = fixture
    ref = tensors[f"{case}.unet_input_step{step}"]                 # (2, 9, 16, 8, 8): [negative; positive]
    z_img, mask, partial = _inputs(tensors, case)
    x_in = conditioning_input(ref[:1, :4], z_img, mask, partial)
    assert torch.equal(torch.cat([x_in, x_in]), ref)


def test_mask_channel_reads_any_non_black_pixel(fixture):
    tensors, _ = fixture
    mask_u8 = tensors["with_mask.mask_image_u8"]
    m = mask_condition(mask_u8[..., 0].float() / 255.0, (8, 8))
    assert torch.equal(m, tensors["with_mask.first_images_mask"][:, :, 0])
    assert bool(((mask_u8[..., 0] > 0) & (mask_u8[..., 0] < 8)).any())   # the faint patch counts as inside
    # other latent sizes: nearest resize by a whole factor samples every k-th pixel
    for k in (2, 4, 16):
        got = mask_condition(mask_u8[..., 0].float() / 255.0, (64 // k, 64 // k))
        assert torch.equal(got[0, 0], (mask_u8[::k, ::k, 0] > 0).float())


@pytest.mark.parametrize("case", CASES)
def test_nine_channel_input_for_other_frame_counts_and_sizes(fixture, case):
    """The input is per frame and per latent cell: fewer frames are the fixture's first frames,
    more frames repeat its later frames, a crop of the latent is the crop of the input."""
    tensors, _ = fixture
    ref = tensors[f"{case}.unet_input_step0"][:1]
    z_img, mask, partial = _inputs(tensors, case)
    for f in (2, 5, 8):
        assert torch.equal(conditioning_input(ref[:, :4, :f], z_img, mask, partial), ref[:, :, :f])
    z24 = torch.randn(1, 4, 24, 8, 8)
    x24 = conditioning_input(z24, z_img, mask, partial)
    assert torch.equal(x24[:, 4:, :16], ref[:, 4:]) and torch.equal(x24[:, :4], z24)
    assert torch.equal(x24[:, 4:, 16:], ref[:, 4:, 1:2].expand(-1, -1, 8, -1, -1))
    ys, xs = slice(1, 6), slice(2, 7)            # a 5x5 latent
    crop = conditioning_input(ref[:, :4, :, ys, xs], z_img[..., ys, xs],
                              None if mask is None else mask[..., ys, xs],
                              None if partial is None else partial[..., ys, xs])
    assert torch.equal(crop, ref[..., ys, xs])
    # a batch of two pictures: each row is its own picture's input (the official code cannot batch)
    z2 = torch.stack([z_img[0], -z_img[0]])
    both = conditioning_input(ref[:, :4].expand(2, -1, -1, -1, -1), z2, mask, partial)
    assert torch.equal(both[:1], ref) and torch.equal(both[1:, 5:, 0], -ref[:, 5:, 0])


def test_quirk_in_channels_is_the_input_width(fixture):
    """Official: the config registers in_channels = 4 while conv_in takes 9 (the pipeline draws
    noise from that 4 by luck). Ours says what each number is."""
    _, manifest = fixture
    model = _fixture_unet(fixture)
    assert manifest["unet.in_channels_attribute"] == 4
    assert model.in_channels == 9 == model.conv_in.weight.shape[1] and model.latent_channels == 4
    with pytest.raises(ValueError, match=r"sample: expected \(B, 9, F, h, w\)"):
        model(torch.zeros(1, 4, 2, 8, 8), 1, torch.zeros(1, 3, 32), 2, 4)


def test_quirk_motion_term_is_never_dropped(fixture):
    """Official: the motion-strength term is added only when the fps condition is on, and the
    scripts' --use_fps_condition defaults to off, so both disappear silently. Ours needs both,
    and the strength always acts."""
    model = _fixture_unet(fixture)
    with torch.no_grad():
        a = model.embedding(501, 2, 4, batch=1)
        b = model.embedding(501, 2, 7, batch=1)
        assert (a - b).abs().max() > 1e-3
        for fps, s in ((None, 4), (2, None)):
            with pytest.raises(ValueError, match="fps and motion strength"):
                model.embedding(501, fps, s, batch=1)


def test_forward_runs_and_limits_frames(fixture):
    model = _fixture_unet(fixture)
    x = torch.randn(2, 9, 3, 8, 8)
    ctx = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = model(x, torch.tensor([501, 501]), ctx, torch.tensor([2, 3]), torch.tensor([4, 0]))
        assert out.shape == (2, 4, 3, 8, 8)
        # each clip of a batch is computed on its own (norms over frames stay within a clip)
        alone = model(x[1:], 501, ctx[1:], 3, 0)
        torch.testing.assert_close(alone, out[1:], atol=1e-3, rtol=1e-3)   # float reordering only
        with pytest.raises(ValueError, match="frames: 25; Follow-Your-Click renders at most 24"):
            model(torch.zeros(1, 9, 25, 8, 8), 1, torch.zeros(1, 3, 32), 2, 4)
        with pytest.raises(ValueError, match="fps: expected a number or 1 values"):
            model(torch.zeros(1, 9, 2, 8, 8), 1, torch.zeros(1, 3, 32), torch.tensor([2, 3]), 4)


def test_joint_frame_group_norm():
    """AnimateDiff v1 applies nn.GroupNorm to the 5-D video: statistics over all frames of a clip."""
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 8, affine=False)
    x = torch.randn(2 * 3, 8, 5, 5) * torch.arange(1, 7).view(6, 1, 1, 1)    # frames of different scale
    y = joint_group_norm(norm, x, 3).reshape(2, 3, 4, 2, 5, 5)
    mean = y.mean(dim=(1, 3, 4, 5))
    var = y.var(dim=(1, 3, 4, 5), unbiased=False)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.ones_like(var), atol=1e-3, rtol=0)
    per_frame = norm(x).reshape(2, 3, 4, 2, 5, 5)
    assert (per_frame - y).abs().max() > 0.1

    kw = dict(in_channels=8, out_channels=16, temb_channels=12, groups=4, eps=1e-5)
    torch.manual_seed(1)
    plain = ResnetBlock2D(**kw).eval()
    joint = ResnetBlock(**kw, joint_frames=True).eval()
    joint.load_state_dict(plain.state_dict())
    temb = torch.randn(6, 12)
    with torch.no_grad():
        torch.testing.assert_close(joint(x, temb, 1), plain(x, temb))        # one frame: the 2-D block
        assert (joint(x, temb, 3) - plain(x, temb)).abs().max() > 1e-2
