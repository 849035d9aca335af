"""Click-to-mask nodes and the live mask-preview route."""
import asyncio
import base64
import io
import json
import os
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from kinema.nodes import routes
from kinema.nodes import segment as nodes
from kinema.nodes._ui import save_temp_png
from kinema.formats import parse_points
from kinema.pipelines import segment as seg
from kinema.runtime import KinemaError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CLICK = '{"positive": [[230, 150]], "negative": [], "box": null}'
SMALL_CLICK = '{"positive": [[115, 75]], "negative": [], "box": null}'  # the same click on the cat at 226x150


def cat_batch(size=None) -> torch.Tensor:
    rgb = cv2.imread(str(ASSETS / "chelsea.jpg"))[..., ::-1].copy()
    if size is not None:
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    frame = torch.from_numpy(rgb).float() / 255.0
    return torch.stack([frame, frame.flip(1)])  # (2, 300, 451, 3); only frame 0 is segmented


def tiny_sam_state(seed=0):
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    model = Sam(
        image_encoder=ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2, out_chans=16,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                                      window_size=2, global_attn_indexes=()),
        prompt_encoder=PromptEncoder(embed_dim=16, image_embedding_size=(4, 4), input_image_size=(64, 64),
                                     mask_in_chans=8),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=16, iou_head_hidden_dim=16,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=16, mlp_dim=32, num_heads=8)),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.state_dict()


@pytest.fixture()
def dirs(tmp_path, monkeypatch):
    for kind in ("models", "input", "temp"):
        (tmp_path / kind).mkdir()
    (tmp_path / "models" / "sams").mkdir()
    monkeypatch.setenv("KINEMA_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("KINEMA_INPUT_DIR", str(tmp_path / "input"))
    monkeypatch.setenv("KINEMA_TEMP_DIR", str(tmp_path / "temp"))
    monkeypatch.setenv("KINEMA_DEVICE", "cpu")
    return tmp_path


@pytest.fixture()
def sam_name(dirs):
    torch.save(tiny_sam_state(), dirs / "models" / "sams" / "tiny_sam.pth")
    return "tiny_sam.pth"


# ---------------------------------------------------------------------------------------------
# node definitions


@pytest.mark.parametrize("cls", [nodes.KinemaSAMLoader, nodes.KinemaClickToMask])
def test_node_definitions(cls, dirs):
    spec = cls.INPUT_TYPES()
    for group in spec.values():
        for name, (kind, *opts) in group.items():
            assert opts and opts[0].get("tooltip"), f"{cls.__name__}.{name} has no tooltip"
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
    assert cls.CATEGORY.startswith("Kinema/") and cls.DESCRIPTION and hasattr(cls, cls.FUNCTION)
    assert nodes.NODE_CLASS_MAPPINGS[cls.__name__] is cls and cls.__name__.startswith("Kinema")


def test_click_to_mask_inputs():
    spec = nodes.KinemaClickToMask.INPUT_TYPES()
    assert spec["required"]["points"][1]["default"] == '{"positive": [], "negative": [], "box": null}'
    assert spec["required"]["points"][1]["multiline"] is True
    assert spec["optional"]["sam"][0] == "KINEMA_SAM"
    assert spec["optional"]["negative_points"][1]["forceInput"] is True
    assert spec["required"]["multimask"][1]["default"] is True


# ---------------------------------------------------------------------------------------------
# loader


def test_loader_lists_and_loads(sam_name):
    combo = nodes.KinemaSAMLoader.INPUT_TYPES()["required"]["sam_name"][0]
    assert combo == [sam_name]
    (sam,) = nodes.KinemaSAMLoader().load(sam_name, device="cpu")
    assert isinstance(sam, seg.SamSegmenter) and sam.device.type == "cpu" and sam.name == sam_name
    # one model per file: a second load, and the live-mask route, get the same object
    (again,) = nodes.KinemaSAMLoader().load(sam_name, device="cpu")
    assert again is sam
    with pytest.raises(ValueError, match="device"):
        nodes.KinemaSAMLoader().load(sam_name, device="tpu")
    with pytest.raises(KinemaError, match="nope.pth"):
        nodes.KinemaSAMLoader().load("nope.pth", device="cpu")


def test_loader_rejects_wrong_file(dirs):
    (dirs / "models" / "sams" / "broken.pth").write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(KinemaError, match=r"broken\.pth.*ViT-B/L/H"):
        nodes.KinemaSAMLoader().load("broken.pth", device="cpu")


# ---------------------------------------------------------------------------------------------
# click to mask


def test_click_to_mask_classical(dirs):
    batch = cat_batch()
    out = nodes.KinemaClickToMask().run(batch, CLICK)
    mask, preview = out["result"]
    assert mask.shape == (1, 300, 451) and preview.shape == (1, 300, 451, 3)
    assert mask[0, 150, 230] == 1 and mask[0, 5, 445] == 0
    expected, _ = seg.segment(batch[0], parse_points(CLICK, (451, 300)))
    assert torch.equal(mask[0], expected)  # frame 0, not frame 1
    assert torch.allclose(preview[0, 150, 230], torch.tensor([0.0, 1.0, 0.0]))
    (bg,) = out["ui"]["kinema_bg"]
    assert bg["type"] == "temp" and bg["subfolder"] == ""
    saved = np.asarray(Image.open(dirs / "temp" / bg["filename"])).astype(np.float32) / 255
    assert saved.shape == (300, 451, 3) and np.abs(saved - batch[0].numpy()).max() <= 0.5 / 255 + 1e-6


def test_click_to_mask_grow_feather_and_kjnodes_points(dirs):
    batch = cat_batch((226, 150))
    click = '[[115, 75]]'
    base = nodes.KinemaClickToMask().run(batch, click)["result"][0]
    grown = nodes.KinemaClickToMask().run(batch, click, grow=5, feather=3)["result"][0]
    assert grown.sum() > base.sum() and bool((grown[base > 0] > 0.95).all())
    assert ((grown > 0) & (grown < 1)).any()  # a soft edge
    kj = nodes.KinemaClickToMask().run(batch, '[{"x": 115, "y": 75}]', negative_points='[{"x": 130, "y": 120}]')
    assert kj["result"][0][0, 120, 130] == 0 and kj["result"][0][0, 75, 115] == 1
    with pytest.raises(ValueError, match="grow: shrinking by 200 px removed the whole mask"):
        nodes.KinemaClickToMask().run(batch, click, grow=-200)


def test_click_to_mask_bad_inputs(dirs):
    batch = cat_batch()
    node = nodes.KinemaClickToMask()
    with pytest.raises(ValueError, match="points: there is no positive click and no box"):
        node.run(batch, '{"positive": [], "negative": [], "box": null}')
    with pytest.raises(ValueError, match="points: there is no positive click and no box"):
        node.run(batch, '{"positive": [], "negative": [[10, 10]]}')
    with pytest.raises(ValueError, match=r"points: \(500, 20\) is outside the 451x300 image"):
        node.run(batch, '[[500, 20]]')
    with pytest.raises(ValueError, match="points: not valid JSON"):
        node.run(batch, '{"positive": [[1, 2]')
    with pytest.raises(ValueError, match="negative_points"):
        node.run(batch, CLICK, negative_points='[{"x": 10}]')
    with pytest.raises(ValueError, match="image"):
        node.run(batch[0], CLICK)
    with pytest.raises(ValueError, match="image"):
        node.run(batch[:, :4, :4], '[[1, 1]]')
    with pytest.raises(ValueError, match="points: nothing was selected.*remove negative clicks"):
        node.run(cat_batch((226, 150)), '{"positive": [[100, 100]], "negative": [[100, 100]]}')
    with pytest.raises(ValueError, match="grow"):
        node.run(batch, CLICK, grow=1000)
    with pytest.raises(ValueError, match="feather"):
        node.run(batch, CLICK, feather=-1)


def test_click_to_mask_with_sam(sam_name):
    (sam,) = nodes.KinemaSAMLoader().load(sam_name, device="cpu")
    batch = cat_batch()[:, :120, :160]
    p = '{"positive": [[60, 40]], "negative": [[150, 100]], "box": null}'
    expected, _ = seg.segment(batch[0], parse_points(p, (160, 120)), sam, multimask=False)
    assert expected.sum() > 0  # this seed's tiny SAM selects something here
    out = nodes.KinemaClickToMask().run(batch, p, multimask=False, sam=sam)
    assert torch.equal(out["result"][0][0], expected)
    assert sam.embeddings.misses == 1 and sam.embeddings.hits == 1


def test_click_to_mask_empty_result_is_explained(sam_name):
    (sam,) = nodes.KinemaSAMLoader().load(sam_name, device="cpu")
    with torch.no_grad():  # a SAM whose every mask logit is 0: nothing passes the threshold
        for mlp in sam.model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.zero_()
    with pytest.raises(ValueError, match="points: nothing was selected.*multimask"):
        nodes.KinemaClickToMask().run(cat_batch()[:, :64, :64], '[[30, 30]]', sam=sam)


def test_save_temp_png(dirs):
    img = torch.rand(10, 12, 3, generator=torch.Generator().manual_seed(0))
    a = save_temp_png(img, "kinema_bg")
    b = save_temp_png(img.numpy(), "kinema_bg")
    assert a == b and a["filename"].startswith("kinema_bg_") and a["filename"].endswith(".png")
    assert save_temp_png(1 - img, "kinema_bg") != a
    back = np.asarray(Image.open(dirs / "temp" / a["filename"]))
    assert back.shape == (10, 12, 3) and np.array_equal(back, np.rint(img.numpy() * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="prefix"):
        save_temp_png(img, "../x")
    with pytest.raises(ValueError, match="image"):
        save_temp_png(img[..., 0], "kinema_bg")


# ---------------------------------------------------------------------------------------------
# live mask preview route


@pytest.fixture()
def cat_input(dirs):
    (dirs / "input" / "sub").mkdir()
    Image.open(ASSETS / "chelsea.jpg").resize((226, 150), Image.BILINEAR).save(dirs / "input" / "sub" / "cat.png")
    return {"filename": "cat.png", "subfolder": "sub", "type": "input"}


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_mask_preview_classical(dirs, cat_input):
    cache = seg.SamStore()
    body = routes.mask_preview({"image": cat_input, "points": SMALL_CLICK, "sam": "", "multimask": True},
                               dirs / "input", dirs / "temp", cache)
    assert (body["width"], body["height"], body["backend"], body["empty"]) == (226, 150, "classical", False)
    mask = _decode(body["mask"])
    assert mask.shape == (150, 226) and set(np.unique(mask)) == {0, 255}
    rgb = np.asarray(Image.open(dirs / "input" / "sub" / "cat.png"), dtype=np.float32) / 255
    expected, score = seg.segment(rgb, parse_points(SMALL_CLICK, (226, 150)))
    assert np.array_equal(mask > 0, expected.numpy() > 0) and body["score"] == pytest.approx(score)


def test_mask_preview_sam_cached_per_route(sam_name, dirs, cat_input):
    cache = seg.SamStore(max_files=1)
    req = {"image": cat_input, "points": SMALL_CLICK, "sam": sam_name, "multimask": True}
    first = routes.mask_preview(req, dirs / "input", dirs / "temp", cache)
    segmenter = cache.get(dirs / "models" / "sams" / sam_name)
    calls = []
    segmenter.model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    second = routes.mask_preview(dict(req, points='{"positive": [[50, 50]], "negative": [[115, 75]]}'),
                                 dirs / "input", dirs / "temp", cache)
    assert first["backend"] == second["backend"] == "sam"
    assert cache.loads == 1 and len(cache) == 1 and calls == []  # same model, embedding reused
    assert segmenter.embeddings.hits >= 1


@pytest.mark.parametrize("image, what", [
    ({"filename": "../secret.png", "subfolder": "", "type": "input"}, "'..'"),
    ({"filename": "cat.png", "subfolder": "../input/sub", "type": "input"}, "'..'"),
    ({"filename": "/etc/passwd", "subfolder": "", "type": "input"}, "absolute"),
    ({"filename": "cat.png", "subfolder": "/tmp", "type": "input"}, "absolute"),
    ({"filename": "C:\\secret.png", "subfolder": "", "type": "input"}, "absolute"),
    ({"filename": "cat.png", "subfolder": "sub", "type": "output"}, "type 'output' is not allowed"),
    ({"filename": "link.png", "subfolder": "", "type": "input"}, "outside the input folder"),
    ({"filename": "none.png", "subfolder": "", "type": "input"}, "not found"),
    ({"filename": "", "subfolder": "", "type": "input"}, "filename"),
    ("cat.png", "expected"),
])
def test_mask_preview_refuses_paths_outside(dirs, cat_input, image, what):
    secret = dirs / "secret.png"
    Image.new("RGB", (16, 16)).save(secret)
    os.symlink(secret, dirs / "input" / "link.png")
    status, body = routes.handle_mask_preview({"image": image, "points": "[[5, 5]]"}, dirs / "input",
                                              dirs / "temp", seg.SamStore())
    assert status == 400 and what in body["error"]


@pytest.mark.parametrize("change, what", [
    ({"points": '{"positive": [[1, 2]'}, "points: not valid JSON"),
    ({"points": "[[900, 5]]"}, "outside the 226x150 image"),
    ({"points": '{"positive": [], "negative": [[3, 3]]}'}, "points: there is no positive click"),
    ({"points": 5}, "points"),
    ({"multimask": "yes"}, "multimask"),
    ({"sam": "../../x.pth"}, "sam"),
    ({"sam": "absent.pth"}, "absent.pth"),
    ({"sam": 3}, "sam"),
    ({"colour": "red"}, "unknown field"),
])
def test_mask_preview_rejects_bad_requests(dirs, cat_input, change, what):
    payload = dict({"image": cat_input, "points": SMALL_CLICK, "sam": "", "multimask": True}, **change)
    status, body = routes.handle_mask_preview(payload, dirs / "input", dirs / "temp", seg.SamStore())
    assert status == 400 and what in body["error"]
    status, body = routes.handle_mask_preview(["not", "a", "dict"], dirs / "input", dirs / "temp",
                                              seg.SamStore())
    assert status == 400 and "JSON object" in body["error"]


def test_mask_preview_rejects_corrupt_picture(dirs):
    (dirs / "temp" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    status, body = routes.handle_mask_preview(
        {"image": {"filename": "bad.png", "type": "temp"}, "points": "[[1, 1]]"}, dirs / "input", dirs / "temp",
        seg.SamStore())
    assert status == 400 and "could not be read" in body["error"]


class _FakeRoutes(list):
    def post(self, path):
        def deco(fn):
            self.append(SimpleNamespace(path=path, handler=fn, method="POST"))
            return fn
        return deco


class _FakeWeb:
    @staticmethod
    def json_response(body, status=200):
        return status, body


class _FakeRequest:
    def __init__(self, payload=None, broken=False):
        self.payload, self.broken = payload, broken

    async def json(self):
        if self.broken:
            raise ValueError("Expecting value")
        return self.payload


def test_route_registration_and_handler(dirs, cat_input):
    assert routes.register_routes() is None  # not inside ComfyUI
    server = type("Server", (), {"routes": _FakeRoutes()})()
    handler = routes.register_routes(server=server, web=_FakeWeb)
    assert routes.register_routes(server=server, web=_FakeWeb) is handler  # registered once
    (route,) = server.routes
    assert route.path == "/kinema/mask_preview"
    status, body = asyncio.run(route.handler(_FakeRequest({"image": cat_input, "points": SMALL_CLICK})))
    assert status == 200 and body["width"] == 226
    status, body = asyncio.run(route.handler(_FakeRequest(broken=True)))
    assert status == 400 and "not valid JSON" in body["error"]
    status, body = asyncio.run(route.handler(_FakeRequest({"image": {"filename": "../x.png"}, "points": SMALL_CLICK})))
    assert status == 400 and ".." in body["error"]


def test_click_to_mask_caps_the_click_count(dirs):
    many = json.dumps({"positive": [[10 + i % 100, 10 + i // 100] for i in range(257)]})
    with pytest.raises(ValueError, match="points: 257 clicks is more than the 256"):
        nodes.KinemaClickToMask().run(cat_batch(), many)
