"""The headless runner: UI -> API conversion, execution order, overrides, clear errors."""
import json

import pytest
import torch

from kinema import runner
from kinema.nodes.core_io import CORE_NODES


class Brighten:
    CATEGORY = "test"
    FUNCTION = "go"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "amount": ("FLOAT", {"default": 0.1}),
                             "seed": ("INT", {"default": 0}), "mode": (["add", "mul"],)},
                "optional": {"note": ("STRING", {"forceInput": True})}}

    def go(self, image, amount, seed, mode, note=None):
        return ((image + amount).clamp(0, 1) if mode == "add" else image * amount,)


def _classes():
    c = dict(CORE_NODES)
    c["Brighten"] = Brighten
    return c


def _ui_workflow():
    return {
        "nodes": [
            {"id": 1, "type": "LoadImage", "mode": 0, "inputs": [], "widgets_values": ["chelsea.jpg", "image"],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}]},
            {"id": 2, "type": "Brighten", "mode": 0, "widgets_values": [0.5, 123, "randomize", "mul"],
             "inputs": [{"name": "image", "type": "IMAGE", "link": 2}]},
            {"id": 5, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 1}],
             "outputs": [{"links": [2]}]},
            {"id": 3, "type": "SaveImage", "mode": 0, "widgets_values": ["test/out"],
             "inputs": [{"name": "images", "type": "IMAGE", "link": 3}]},
            {"id": 4, "type": "Note", "mode": 0, "widgets_values": ["hello"]},
        ],
        "links": [[1, 1, 0, 5, 0, "IMAGE"], [2, 5, 0, 2, 0, "IMAGE"], [3, 2, 0, 3, 0, "IMAGE"]],
    }


def test_ui_to_api_maps_widgets_links_and_reroutes():
    api = runner.ui_to_api(_ui_workflow(), _classes())
    assert set(api) == {"1", "2", "3"}
    assert api["1"]["inputs"] == {"image": "chelsea.jpg"}
    # the seed's control_after_generate value is skipped
    assert api["2"]["inputs"] == {"amount": 0.5, "seed": 123, "mode": "mul", "image": ["1", 0]}
    assert api["3"]["inputs"] == {"filename_prefix": "test/out", "images": ["2", 0]}


def test_run_saves_and_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("KINEMA_OUTPUT_DIR", str(tmp_path))
    api = runner.ui_to_api(_ui_workflow(), _classes())
    ui = runner.run(api, _classes(), overrides={"2": {"amount": 1.0}})
    paths = [i["path"] for i in ui["3"]["images"]]
    assert len(paths) == 1 and paths[0].startswith(str(tmp_path))
    from PIL import Image
    out = torch.from_numpy(__import__("numpy").asarray(Image.open(paths[0]), dtype="float32") / 255)
    src, _ = CORE_NODES["LoadImage"]().load_image("chelsea.jpg")
    assert torch.allclose(out, src[0], atol=1 / 255 + 1e-6)  # amount 1.0 * image == image


def test_api_format_passes_through_and_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("KINEMA_OUTPUT_DIR", str(tmp_path))
    api = runner.ui_to_api(_ui_workflow(), _classes())
    assert runner.to_api(api, _classes()) is api
    with pytest.raises(runner.WorkflowError, match="unknown node type 'Nope'"):
        runner.run({"1": {"class_type": "Nope", "inputs": {}}}, _classes())
    with pytest.raises(runner.WorkflowError, match="no node with id 9"):
        runner.run(api, _classes(), overrides={"9": {"x": 1}})
    with pytest.raises(runner.WorkflowError, match="no output node"):
        runner.run({"1": api["1"]}, _classes())
    with pytest.raises(runner.WorkflowError, match="neither the UI format"):
        runner.to_api({"foo": 1}, _classes())
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(runner.WorkflowError, match="not valid JSON"):
        runner.load_workflow(bad)


def test_missing_image_names_the_input():
    with pytest.raises(ValueError, match="image: 'missing.png' not found"):
        CORE_NODES["LoadImage"]().load_image("missing.png")


def test_save_prefix_cannot_escape_output(tmp_path, monkeypatch):
    monkeypatch.setenv("KINEMA_OUTPUT_DIR", str(tmp_path / "out"))
    with pytest.raises(ValueError, match="outside the output folder"):
        CORE_NODES["SaveImage"]().save_images(torch.zeros(1, 4, 4, 3), "../../evil")


def test_primitive_node_value_and_server_input_types():
    wf = _ui_workflow()
    wf["nodes"].append({"id": 7, "type": "PrimitiveNode", "mode": 0, "widgets_values": [0.25, "fixed"],
                        "outputs": [{"name": "FLOAT", "type": "FLOAT", "links": [9]}]})
    wf["nodes"][1]["inputs"].append({"name": "amount", "type": "FLOAT", "link": 9, "widget": {"name": "amount"}})
    wf["links"].append([9, 7, 0, 2, 1, "FLOAT"])
    api = runner.ui_to_api(wf, _classes())
    assert api["2"]["inputs"]["amount"] == 0.25 and "7" not in api
    # the same conversion driven by a server's /object_info "input" entries
    served = {name: cls.INPUT_TYPES() for name, cls in _classes().items()}
    assert runner.ui_to_api(wf, input_types=served) == api
