"""The semantic motion predictor and story transitions on tiny DynamiCrafter models: the
training-free interpolation, per-frame image contexts, the learned predictor, the file format,
and the assembled story video."""
import json

import pytest
import torch
from safetensors.torch import save_file

import tiny_dynamicrafter
import tiny_story_video
from kinema import runtime
from kinema.kernels.dual_attention import per_frame_context
from kinema.pipelines.dynamicrafter import convert
from kinema.pipelines.dynamicrafter import pipeline
from kinema.pipelines.story_video import predictor as story_predictor
from kinema.pipelines.story_video import transitions as story_transitions
from kinema.runtime import KinemaError

pytestmark = pytest.mark.usefixtures("one_thread")

_MODELS = {}


def tiny(variant="512"):
    if variant not in _MODELS:
        _MODELS[variant] = convert.convert(tiny_dynamicrafter.checkpoint(variant), f"tiny_{variant}", variant="512_interp")
    return _MODELS[variant]


def _image(seed, h=64, w=80):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _opts(**kw):
    base = dict(prompt="a walk", frames=4, steps=2, cfg=7.5, eta=1.0, seed=1, height=64, width=64)
    base.update(kw)
    return pipeline.AnimateOptions(**base)


def _learned(seed=0):
    """A tiny predictor with random (non-zero) output weights: a stand-in for a trained one."""
    torch.manual_seed(seed)
    m = story_predictor.SemanticMotionPredictor(tiny_story_video.predictor_config())
    torch.nn.init.normal_(m.proj_out.weight, std=0.5)
    return m.eval()


def _record_unet(model):
    calls = []
    orig = model.unet.forward

    def spy(x, t, ctx, fs=None, debug=None):
        calls.append(ctx.detach().clone())
        return orig(x, t, ctx, fs, debug)

    model.unet.forward = spy
    return calls, lambda: setattr(model.unet, "forward", orig)


def _frames_context(ctx, frames, model):
    """What each frame sees: (B, frames, L', C), from a shared (3-D) or per-frame (4-D) context."""
    if ctx.dim() == 4:
        return ctx
    cfg = model.unet.cfg
    per = per_frame_context(ctx, frames, cfg.text_context_len, cfg.image_tokens_per_frame)
    return per.reshape(ctx.shape[0], frames, per.shape[1], per.shape[2])


# ------------------------------------------------------------------------------ training-free

def test_interpolation_is_linear_with_exact_ends():
    g = torch.Generator().manual_seed(0)
    s, e = torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g)
    k = story_predictor.interpolate_tokens(s, e, 5)
    assert k.shape == (5, 5, 64)
    assert torch.equal(k[0], s) and torch.equal(k[4], e)
    for i, a in enumerate([0.0, 0.25, 0.5, 0.75, 1.0]):
        torch.testing.assert_close(k[i], (1 - a) * s + a * e, atol=1e-6, rtol=0)
    same = story_predictor.interpolate_tokens(s, s, 7)
    assert all(torch.equal(same[i], s) for i in range(7))
    with pytest.raises(ValueError, match="frames"):
        story_predictor.interpolate_tokens(s, e, 1)
    with pytest.raises(ValueError, match="keyframes"):
        story_predictor.interpolate_tokens(s, e[:4], 3)


@pytest.mark.parametrize("frames,cfg", [(4, 7.5), (3, 1.0), (6, 7.5)])
def test_identical_keyframes_give_exactly_the_single_image_context(frames, cfg):
    """Interpolation mode with the same picture twice: every frame's context is today's
    single-image context, and the video is bitwise the plain interpolation's (frames 6 > the
    tiny model's 4 runs in temporal windows; frames 3 < 4 sees the whole image context)."""
    model = tiny()
    img = _image(0)
    opts = _opts(frames=frames, cfg=cfg, window_overlap=2)
    calls, undo = _record_unet(model)
    try:
        plain = pipeline.interpolate(model, img, img, opts)
        n_plain = len(calls)
        motion = story_transitions.predict_motion(model, torch.cat([img, img]), frames, height=64, width=64)
        assert motion.mode == "interpolation" and motion.tokens.shape == (1, frames, 5, 64)
        ours = pipeline.generate(model, [img, img], opts, frame_tokens=motion.tokens[0])
    finally:
        undo()
    assert torch.equal(plain, ours)
    assert len(calls) == 2 * n_plain
    for a, b in zip(calls[:n_plain], calls[n_plain:]):
        n = b.shape[1]
        assert b.dim() == 4 and a.dim() == 3
        assert torch.equal(_frames_context(a, n, model), b)


def test_distinct_keyframes_give_a_context_that_moves_from_start_to_end():
    model = tiny()
    a, b = _image(1), _image(2)
    motion = story_transitions.predict_motion(model, torch.cat([a, b]), 4, height=64, width=64)
    calls, undo = _record_unet(model)
    try:
        pipeline.generate(model, [a, b], _opts(cfg=1.0, steps=1), frame_tokens=motion.tokens[0])
        pipeline.animate(model, a, _opts(cfg=1.0, steps=1))
        pipeline.animate(model, b, _opts(cfg=1.0, steps=1))
    finally:
        undo()
    ctx, only_a, only_b = calls[0][0], _frames_context(calls[1], 4, model)[0], _frames_context(calls[2], 4, model)[0]
    assert torch.equal(ctx[0], only_a[0]) and torch.equal(ctx[3], only_b[3])   # ends: the keyframes' own
    img = ctx[:, 77:]
    steps = [float((img[t + 1] - img[t]).norm()) for t in range(3)]
    assert min(steps) > 0
    assert torch.equal(ctx[:, :77], ctx[:1, :77].expand(4, -1, -1))            # text is shared


def test_learned_predictor_varies_the_context_per_frame():
    """Same picture twice: the interpolation is constant, a learned predictor is not; its
    frames' contexts are the resampler's output for its tokens (independent recomputation)."""
    model = tiny()
    img = _image(3)
    pred = runtime.ManagedModel(_learned(), "tiny predictor")
    motion = story_transitions.predict_motion(model, torch.cat([img, img]), 4, predictor=pred, height=64, width=64)
    assert motion.mode == "learned: tiny predictor"
    tok = motion.tokens[0]
    assert torch.equal(tok[0], tok[3])                                    # the keyframes stay
    assert (tok[1] - tok[0]).abs().max() > 1e-2 and (tok[2] - tok[1]).abs().max() > 1e-2
    calls, undo = _record_unet(model)
    try:
        pipeline.generate(model, [img, img], _opts(cfg=1.0, steps=1), frame_tokens=tok)
    finally:
        undo()
    ctx = calls[0][0]
    with torch.no_grad():
        full = model.image_proj(tok)                                       # (4, 64, 32)
    for t in range(4):
        torch.testing.assert_close(ctx[t, 77:], full[t, 16 * t:16 * (t + 1)], atol=1e-6, rtol=0)
    assert (ctx[1, 77:] - ctx[0, 77:]).abs().max() > 1e-3


def test_windows_take_each_frames_own_slot():
    """Frames beyond the model's length: frame f in a window starting at s reads slot f - s of
    its own image context."""
    model = tiny()
    tok = torch.randn(6, 5, 64, generator=torch.Generator().manual_seed(4))
    calls, undo = _record_unet(model)
    try:
        pipeline.generate(model, [_image(5), _image(6)], _opts(frames=6, cfg=1.0, steps=1, window_overlap=2),
                   frame_tokens=tok)
    finally:
        undo()
    assert [c.shape[1] for c in calls] == [4, 4]                          # windows at 0 and 2
    with torch.no_grad():
        full = model.image_proj(tok)
    for start, c in zip((0, 2), calls):
        for j in range(4):
            torch.testing.assert_close(c[0, j, 77:], full[start + j, 16 * j:16 * (j + 1)], atol=1e-6, rtol=0)


def test_frame_token_errors():
    model = tiny()
    img = _image(0)
    with pytest.raises(ValueError, match="frame_tokens"):
        pipeline.generate(model, [img, img], _opts(), frame_tokens=torch.zeros(3, 5, 64))
    with pytest.raises(ValueError, match="frame_tokens"):
        pipeline.generate(model, [img, img], _opts(), frame_tokens=torch.zeros(4, 257, 1280))
    with pytest.raises(ValueError, match="frames"):
        story_transitions.predict_motion(model, torch.cat([img, img]), 2)
    with pytest.raises(ValueError, match="keyframes.*at least 2"):
        story_transitions.predict_motion(model, img, 4)
    big = runtime.ManagedModel(story_predictor.SemanticMotionPredictor(story_predictor.PredictorConfig(width=64, depth=1, heads=2)), "vit-h")
    with pytest.raises(ValueError, match="another image encoder"):
        story_transitions.predict_motion(model, torch.cat([img, img]), 4, predictor=big, height=64, width=64)


# ------------------------------------------------------------------------------ the predictor

def test_untrained_predictor_is_the_interpolation_and_keyframes_stay():
    torch.manual_seed(0)
    m = story_predictor.SemanticMotionPredictor(tiny_story_video.predictor_config())
    g = torch.Generator().manual_seed(1)
    s, e = torch.randn(2, 5, 64, generator=g), torch.randn(2, 5, 64, generator=g)
    with torch.no_grad():
        assert torch.equal(m(s, e, 5), story_predictor.interpolate_tokens(s, e, 5))
        out = _learned()(s, e, 5)
    assert torch.equal(out[:, 0], s) and torch.equal(out[:, 4], e)
    inner = (out - story_predictor.interpolate_tokens(s, e, 5))[:, 1:4]
    assert inner.abs().amax(dim=(0, 2, 3)).min() > 1e-2
    # any length works (continuous time embedding)
    assert _learned()(s, e, 9).shape == (2, 9, 5, 64)


def test_config_validation():
    story_predictor.PredictorConfig.from_dict({"width": 64, "heads": 4, "_doc": "comments are allowed"})
    for bad, msg in (({"widht": 64}, "unknown field"), ({"width": 30, "heads": 4}, "divisible"),
                     ({"depth": 0}, "depth"), ({"space": "pooled"}, "space"), ({"mlp_ratio": -1}, "mlp_ratio"),
                     ([1, 2], "JSON object")):
        with pytest.raises(ValueError, match=msg):
            story_predictor.PredictorConfig.from_dict(bad)
    cfg = story_predictor.default_config()
    assert (cfg.tokens, cfg.token_width) == (257, 1280)       # ViT-H/14 at 224: 16 x 16 patches + class


def test_file_format(tmp_path):
    m = _learned(2)
    path = story_predictor.save_predictor(m, tmp_path / "p.safetensors", training={"steps": 7})
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as fh:               # the documented header
        meta = fh.metadata()
        assert set(fh.keys()) == set(m.state_dict())
    assert meta["format"] == "kinema.semantic_motion_predictor" and meta["format_version"] == "1"
    assert json.loads(meta["config"]) == {"space": "openclip_vit_tokens_before_ln_post", "token_width": 64,
                                          "tokens": 5, "width": 32, "depth": 1, "heads": 2, "mlp_ratio": 2.0}
    assert story_predictor.training_info(path) == {"steps": 7}
    back = story_predictor.load_predictor(path)
    s, e = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    with torch.no_grad():
        assert torch.equal(back(s, e, 4), m(s, e, 4))
    half = story_predictor.load_predictor(story_predictor.save_predictor(m, tmp_path / "h.safetensors", dtype=torch.float16), torch.float16)
    assert half.proj_out.weight.dtype == torch.float16


def test_loader_errors(tmp_path):
    m = _learned()
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    good_meta = {"format": story_predictor.FORMAT, "format_version": "1", "config": json.dumps(m.config.to_dict())}

    def write(name, tensors, meta):
        p = tmp_path / name
        save_file(tensors, str(p), metadata=meta)
        return p

    with pytest.raises(KinemaError, match="does not exist"):
        story_predictor.load_predictor(tmp_path / "nope.safetensors")
    torch.save(sd, tmp_path / "p.ckpt")
    with pytest.raises(KinemaError, match="p.ckpt.*safetensors"):
        story_predictor.load_predictor(tmp_path / "p.ckpt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(KinemaError, match="junk.safetensors.*could not be read"):
        story_predictor.load_predictor(tmp_path / "junk.safetensors")
    dc = write("dc.safetensors", {k: v for k, v in list(tiny_dynamicrafter.checkpoint("512").items())[:400]}, None)
    with pytest.raises(KinemaError, match="dc.safetensors.*not a semantic motion predictor.*DynamiCrafter"):
        story_predictor.load_predictor(dc)
    with pytest.raises(KinemaError, match="version"):
        story_predictor.load_predictor(write("v.safetensors", sd, dict(good_meta, format_version="9")))
    with pytest.raises(KinemaError, match="not JSON"):
        story_predictor.load_predictor(write("j.safetensors", sd, dict(good_meta, config="{")))
    with pytest.raises(KinemaError, match="divisible"):
        story_predictor.load_predictor(write("c.safetensors", sd, dict(good_meta, config=json.dumps({"width": 32, "heads": 3}))))
    part = dict(sd)
    part.pop("proj_out.bias")
    part["extra.weight"] = torch.zeros(2)
    with pytest.raises(KinemaError, match=r"1 missing \(e.g. proj_out.bias\); 1 unexpected \(e.g. extra.weight\)"):
        story_predictor.load_predictor(write("k.safetensors", part, good_meta))
    wrong = dict(good_meta, config=json.dumps(dict(m.config.to_dict(), width=16)))
    with pytest.raises(KinemaError, match=r"with other shapes \(e.g. token_pos: found \(5, 32\), expected \(5, 16\)"):
        story_predictor.load_predictor(write("s.safetensors", sd, wrong))


# ------------------------------------------------------------------------------ story video

def test_story_video_layout_holds_and_prompts():
    model = tiny()
    panels = torch.cat([_image(10, 64, 64), _image(11, 64, 64), _image(12, 64, 64)])
    motion = story_transitions.predict_motion(model, panels, 4, height=64, width=64)
    assert motion.pairs == 2 and motion.frames == 4
    prompts = []
    orig = model.encode_text
    model.encode_text = lambda p: (prompts.append(p[0]), orig(p))[1]
    try:
        video = story_transitions.story_transitions(model, panels, motion, _opts(prompt="turns left\nwalks away", cfg=1.0), hold=2)
    finally:
        model.encode_text = orig
    assert prompts == ["turns left", "walks away"]
    # 3 panels x (1 + 2 holds) + 2 transitions x 2 frames between
    assert video.shape == (3 * 3 + 2 * 2, 64, 64, 3)
    for i, at in enumerate((0, 5, 10)):
        for k in range(3):
            torch.testing.assert_close(video[at + k], panels[i], atol=1e-6, rtol=0)
    between = torch.cat([video[3:5], video[8:10]])
    assert all((f - p).abs().max() > 1e-3 for f in between for p in panels)
    # the frames between are DynamiCrafter's for that pair, seed + i
    alone = pipeline.generate(model, [panels[1:2], panels[2:3]], _opts(prompt="walks away", cfg=1.0, seed=2),
                       frame_tokens=motion.tokens[1])
    torch.testing.assert_close(video[8:10], alone[1:3], atol=0, rtol=0)


def test_story_video_errors():
    model = tiny()
    panels = torch.cat([_image(1, 64, 64), _image(2, 64, 64), _image(3, 64, 64)])
    motion = story_transitions.predict_motion(model, panels[:2], 4, height=64, width=64)
    with pytest.raises(ValueError, match="motion: it holds 1 transition"):
        story_transitions.story_transitions(model, panels, motion, _opts())
    with pytest.raises(ValueError, match="motion: expected"):
        story_transitions.story_transitions(model, panels, motion.tokens, _opts())
    with pytest.raises(ValueError, match="hold_frames"):
        story_transitions.story_transitions(model, panels[:2], motion, _opts(), hold=-1)
    with pytest.raises(ValueError, match="panels"):
        story_transitions.story_transitions(model, panels[0], motion, _opts())


def test_unet_per_frame_context_shape_is_checked():
    model = tiny()
    x = torch.zeros(1, 8, 4, 8, 8)
    with pytest.raises(ValueError, match="per-frame context"):
        model.unet(x, torch.tensor([10]), torch.zeros(1, 3, 77 + 16, 32), torch.tensor([5]))
