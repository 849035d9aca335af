"""Click -> mask pipeline: SAM loading and prediction (tiny random SAM), classical backend on
real photos, preview and mask refinement."""
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from kinema.formats import Points
from kinema.pipelines import segment
from kinema.runtime import KinemaError

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def load_photo(name: str) -> torch.Tensor:
    bgr = cv2.imread(str(ASSETS / name))
    return torch.from_numpy(bgr[..., ::-1].copy()).float() / 255.0


def tiny_sam(seed: int = 0, decoder_depth: int = 1):
    """The real SAM architecture at toy size (64 px input, 4x4 tokens), random weights."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    model = Sam(
        image_encoder=ImageEncoderViT(
            img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0, out_chans=16,
            qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
            window_size=2, global_attn_indexes=(1,)),
        prompt_encoder=PromptEncoder(embed_dim=16, image_embedding_size=(4, 4), input_image_size=(64, 64),
                                     mask_in_chans=8),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=decoder_depth, embedding_dim=16, mlp_dim=32, num_heads=8),
            transformer_dim=16, iou_head_depth=2, iou_head_hidden_dim=24),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim > 1 else 0.1) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model.eval()


@pytest.fixture(scope="module")
def sam_model():
    return tiny_sam()


@pytest.fixture(scope="module")
def sam_file(tmp_path_factory, sam_model):
    path = tmp_path_factory.mktemp("sams") / "tiny_sam.pth"
    torch.save(sam_model.state_dict(), path)
    return path


def small_image(seed=1, h=48, w=40):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(h, w, 3, generator=g)


def pts(pos=(), neg=(), box=None):
    return Points(torch.tensor(pos, dtype=torch.float32).reshape(-1, 2),
                  torch.tensor(neg, dtype=torch.float32).reshape(-1, 2),
                  None if box is None else torch.tensor(box, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# loading


@pytest.mark.parametrize("name, dims", [("vit_b", (768, 12, 12, (2, 5, 8, 11))),
                                        ("vit_l", (1024, 24, 16, (5, 11, 17, 23))),
                                        ("vit_h", (1280, 32, 16, (7, 15, 23, 31)))])
def test_variant_detection_on_released_layouts(name, dims):
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        official = sam_model_registry[name]()
    sd = official.state_dict()
    cfg = segment.config_from_state_dict(sd, name)
    assert cfg.variant == name
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.global_attn_indexes) == dims
    assert (cfg.img_size, cfg.window_size, cfg.prompt_dim, cfg.decoder_depth) == (1024, 14, 256, 2)
    ours = segment.build_sam(cfg, device="meta").state_dict()
    assert ours.keys() == sd.keys()
    assert all(tuple(ours[k].shape) == tuple(sd[k].shape) for k in sd)


def test_tiny_config_read_from_shapes(sam_model):
    cfg = segment.config_from_state_dict(sam_model.state_dict())
    assert cfg.variant == "custom"
    assert (cfg.img_size, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.window_size) == (64, 32, 2, 2, 2)
    assert cfg.global_attn_indexes == (1,)
    assert (cfg.prompt_dim, cfg.mask_in_chans, cfg.decoder_depth, cfg.decoder_mlp_dim) == (16, 8, 1, 32)
    assert (cfg.iou_head_depth, cfg.iou_head_hidden_dim, cfg.num_multimask_outputs) == (2, 24, 3)


@pytest.mark.parametrize("fmt", ["pth", "pth_nested_model", "pth_nested_state_dict", "safetensors"])
def test_load_round_trip(tmp_path, sam_model, fmt):
    sd = sam_model.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "sam.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "sam.pth"
        obj = {"model": sd} if fmt == "pth_nested_model" else {"state_dict": sd, "epoch": 3} \
            if fmt == "pth_nested_state_dict" else sd
        torch.save(obj, path)
    loaded = segment.load_sam(path, decoder_dtype=torch.float32)
    assert loaded.variant == "custom" and loaded.name == path.name
    got = loaded.model.state_dict()
    assert got.keys() == sd.keys()
    for k in sd:
        assert torch.equal(got[k], sd[k]), k
    assert torch.equal(loaded.model.pixel_mean.flatten(), torch.tensor([123.675, 116.28, 103.53]))


def test_half_precision_file_loads_as_float(tmp_path, sam_model):
    path = tmp_path / "sam_fp16.pth"
    torch.save({k: v.half() for k, v in sam_model.state_dict().items()}, path)
    loaded = segment.load_sam(path, decoder_dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())


def test_non_sam_checkpoint_is_rejected(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "sd15_unet.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3)}, str(path))
    with pytest.raises(KinemaError) as e:
        segment.load_sam(path)
    msg = str(e.value)
    assert "sd15_unet.safetensors" in msg and "image_encoder.*" in msg and "model.diffusion_model" in msg


@pytest.mark.parametrize("keys, found", [
    (["image_encoder.trunk.patch_embed.proj.weight", "sam_prompt_encoder.pe_layer.x", "sam_mask_decoder.iou_token.weight"],
     "found no prompt_encoder.*, mask_decoder.* keys"),  # SAM 2
    (["image_encoder.patch_embed.seq.0.c.weight", "prompt_encoder.no_mask_embed.weight", "mask_decoder.iou_token.weight"],
     "key 'image_encoder.patch_embed.proj.weight' is missing"),  # MobileSAM (TinyViT encoder)
])
def test_other_segmenters_are_named_as_such(tmp_path, keys, found):
    path = tmp_path / "other.pth"
    torch.save({"model": {k: torch.zeros(2, 2) for k in keys}}, path)
    with pytest.raises(KinemaError) as e:
        segment.load_sam(path)
    assert "other.pth" in str(e.value) and found in str(e.value) and "ViT-B/L/H" in str(e.value)


def test_truncated_and_corrupt_files_are_rejected(tmp_path, sam_file):
    data = sam_file.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(KinemaError, match=r"cut\.pth.*could not be read.*ViT-B/L/H"):
        segment.load_sam(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01not a safetensors file" * 10)
    with pytest.raises(KinemaError, match=r"junk\.safetensors.*could not be read"):
        segment.load_sam(junk)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(KinemaError, match=r"empty\.pth.*empty"):
        segment.load_sam(empty)


def test_pickled_code_is_not_executed(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pth"
    torch.save({"image_encoder.x": Boom()}, path)
    with pytest.raises(KinemaError, match="evil.pth"):
        segment.load_sam(path)


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, sam_model):
    sd = dict(sam_model.state_dict())
    del sd["mask_decoder.iou_token.weight"]
    sd["mask_decoder.hf_token.weight"] = torch.zeros(1, 16)  # an HQ-SAM extra
    path = tmp_path / "odd.pth"
    torch.save(sd, path)
    with pytest.raises(KinemaError) as e:
        segment.load_sam(path)
    msg = str(e.value)
    assert "odd.pth" in msg and "mask_decoder.iou_token.weight" in msg and "mask_decoder.hf_token.weight" in msg

    sd = dict(sam_model.state_dict())
    sd["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 17)
    torch.save(sd, path)
    with pytest.raises(KinemaError, match=r"odd.pth.*1 with other shapes.*no_mask_embed.weight: found \(1, 17\), expected \(1, 16\)"):
        segment.load_sam(path)


# ---------------------------------------------------------------------------------------------
# prediction


def test_prediction_matches_segment_anything_predictor(sam_model, sam_file):
    from segment_anything import SamPredictor

    segmenter = segment.load_sam(sam_file, decoder_dtype=torch.float32)
    image = small_image()
    ref = SamPredictor(sam_model)
    ref.set_image(segment.to_uint8(image))
    cases = [pts([[10, 20]]), pts([[10, 20], [30, 5]], [[2, 40]], box=[5, 3, 35, 44]), pts(box=[3, 3, 30, 40])]
    for p in cases:
        for multimask in (True, False):
            pred = segmenter.predict(image, p, multimask=multimask)
            coords = torch.cat([p.positive, p.negative]).numpy()
            labels = np.array([1] * len(p.positive) + [0] * len(p.negative))
            masks, scores, _ = ref.predict(point_coords=coords if len(coords) else None,
                                           point_labels=labels if len(coords) else None,
                                           box=None if p.box is None else p.box.numpy(),
                                           multimask_output=multimask)
            assert pred.masks.shape == (3 if multimask else 1, 48, 40)
            np.testing.assert_allclose(pred.scores.numpy(), scores, atol=1e-5)
            assert np.array_equal(pred.masks.numpy(), masks)
            best = int(np.argmax(scores))
            assert pred.best == best
            assert np.array_equal(pred.mask.numpy(), masks[best].astype(np.float32))
            assert pred.score == pytest.approx(float(scores[best]))


def test_multimask_keeps_best_scoring_mask(sam_file):
    segmenter = segment.load_sam(sam_file)
    image = small_image(3)
    pred = segmenter.predict(image, pts([[12, 30]]), multimask=True)
    assert pred.scores.shape == (3,)
    assert pred.score == pytest.approx(float(pred.scores.max()))
    mask, score = segment.segment(image, pts([[12, 30]]), segmenter, multimask=True)
    assert torch.equal(mask, pred.masks[int(pred.scores.argmax())].float())
    assert score == pytest.approx(pred.score)


def test_embedding_cache_reuses_and_is_bounded(sam_file):
    segmenter = segment.load_sam(sam_file, cache_size=2)
    calls = []
    segmenter.model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    a, b, c = small_image(1), small_image(2), small_image(3)
    first = segmenter.predict(a, pts([[5, 5]]))
    segmenter.predict(a, pts([[20, 30]], [[3, 3]]))
    segmenter.predict(a.clone(), pts([[5, 5]]))  # same content, different tensor
    assert len(calls) == 1
    assert segmenter.embeddings.hits == 2
    segmenter.predict(b, pts([[5, 5]]))
    assert len(calls) == 2
    again = segmenter.predict(a, pts([[5, 5]]))
    assert len(calls) == 2 and torch.equal(again.masks, first.masks)
    segmenter.predict(c, pts([[5, 5]]))  # evicts b, the least recently used
    assert len(calls) == 3 and len(segmenter.embeddings) == 2
    segmenter.predict(a, pts([[5, 5]]))
    assert len(calls) == 3
    segmenter.predict(b, pts([[5, 5]]))
    assert len(calls) == 4


def test_prediction_needs_a_positive_click_or_box(sam_file):
    segmenter = segment.load_sam(sam_file)
    with pytest.raises(ValueError, match="points: there is no positive click"):
        segmenter.predict(small_image(), pts(neg=[[3, 3]]))


# ---------------------------------------------------------------------------------------------
# after segmentation


def test_refine_mask_grow_shrink_feather():
    m = torch.zeros(21, 21)
    m[10, 10] = 1
    grown = segment.refine_mask(m, grow=3)
    assert grown.sum() == 29  # the digital disc of radius 3
    assert grown[10, 13] == 1 and grown[10, 14] == 0
    square = torch.zeros(21, 21)
    square[5:16, 5:16] = 1
    shrunk = segment.refine_mask(square, grow=-2)
    assert shrunk.sum() == 49 and shrunk[7:14, 7:14].min() == 1
    full = torch.ones(8, 8)
    assert segment.refine_mask(full, grow=-1).sum() == 64  # the image edge is not an object edge
    soft = segment.refine_mask(square, feather=4)
    assert 0 <= float(soft.min()) and float(soft.max()) <= 1
    assert 0 < float(soft[10, 4]) < 1 and float(soft[10, 10]) > 0.9
    assert torch.equal(segment.refine_mask(square), square)


def test_overlay_tints_and_marks():
    img = torch.full((60, 80, 3), 0.5)
    mask = torch.zeros(60, 80)
    mask[10:40, 10:50] = 1
    p = pts([[20, 20]], [[70, 50]], box=[5, 5, 55, 45])
    out = segment.overlay(img, mask, p)
    assert out.shape == (60, 80, 3) and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.allclose(out[20, 20], torch.tensor([0.0, 1.0, 0.0]))  # positive: green
    assert torch.allclose(out[50, 70], torch.tensor([1.0, 0.0, 0.0]))  # negative: red
    assert torch.allclose(out[30, 30], 0.5 * img[30, 30] + 0.5 * torch.tensor([0.15, 0.45, 1.0]), atol=2e-3)
    assert torch.allclose(out[55, 20], img[55, 20], atol=2e-3)  # untouched outside
    with pytest.raises(ValueError, match="mask"):
        segment.overlay(img, torch.zeros(10, 10))
