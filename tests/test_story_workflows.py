"""The story example workflows are well-formed UI graphs whose Kinema widgets match the nodes
(they run end to end, with ComfyUI's loaders, in tests/comfyui)."""
import json
from pathlib import Path

import pytest

from kinema.nodes import story as story_nodes

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
NAMES = ["story_panels_sd15", "story_comic_sdxl", "story_native_ksampler"]
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
CORE = {"SaveImage", "CheckpointLoaderSimple", "EmptyLatentImage", "KSampler", "VAEDecode",
        "PrimitiveStringMultiline"}


def load(name):
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def widget_names(cls):
    names = []
    for name, (kind, *_) in cls.INPUT_TYPES()["required"].items():
        if isinstance(kind, list) or kind in WIDGET_TYPES:
            names.append(name)
            if name == "seed":
                names.append("control_after_generate")
    return names


@pytest.mark.parametrize("name", NAMES)
def test_workflow_is_well_formed(name):
    wf = load(name)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for n in wf["nodes"]:
        assert n["type"] in story_nodes.NODE_CLASS_MAPPINGS or n["type"] in CORE, n["type"]
        if n["type"] in story_nodes.NODE_CLASS_MAPPINGS:
            assert len(n["widgets_values"]) == len(widget_names(story_nodes.NODE_CLASS_MAPPINGS[n["type"]])), n["type"]
    for link_id, src, sslot, dst, dslot, typ in wf["links"]:
        assert nodes[src]["outputs"][sslot]["type"] == typ
        assert link_id in nodes[src]["outputs"][sslot]["links"]
        assert nodes[dst]["inputs"][dslot]["link"] == link_id
        assert nodes[dst]["inputs"][dslot]["type"] == typ
    assert wf["last_link_id"] == max(l[0] for l in wf["links"])
