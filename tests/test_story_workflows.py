"""The story example workflows: well-formed UI graphs whose Kinema widgets match the nodes,
and the two story-batch workflows run headless with tiny models."""
import json
from pathlib import Path

import pytest

from kinema.nodes import story as ns

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
        assert n["type"] in ns.NODE_CLASS_MAPPINGS or n["type"] in CORE, n["type"]
        if n["type"] in ns.NODE_CLASS_MAPPINGS:
            assert len(n["widgets_values"]) == len(widget_names(ns.NODE_CLASS_MAPPINGS[n["type"]])), n["type"]
    for link_id, src, sslot, dst, dslot, typ in wf["links"]:
        assert nodes[src]["outputs"][sslot]["type"] == typ
        assert link_id in nodes[src]["outputs"][sslot]["links"]
        assert nodes[dst]["inputs"][dslot]["link"] == link_id
        assert nodes[dst]["inputs"][dslot]["type"] == typ
    assert wf["last_link_id"] == max(l[0] for l in wf["links"])


def run_headless(wf, overrides, replace):
    """Execute a graph of Kinema nodes in dependency order; ``replace`` maps node types to
    callables standing in for nodes outside the pack."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {l[0]: l for l in wf["links"]}
    results = {}

    def run(nid):
        if nid in results:
            return results[nid]
        node = nodes[nid]
        linked = {}
        for inp in node["inputs"]:
            if inp["link"] is not None:
                _, src, sslot, *_ = links[inp["link"]]
                linked[inp["name"]] = run(src)[sslot]
        if node["type"] in replace:
            results[nid] = replace[node["type"]](**linked)
            return results[nid]
        cls = ns.NODE_CLASS_MAPPINGS[node["type"]]
        kwargs = dict(zip(widget_names(cls), node["widgets_values"]))
        kwargs.pop("control_after_generate", None)
        kwargs.update(linked)
        kwargs.update(overrides.get(node["type"], {}))
        if node["type"] == "KinemaStoryLoader":
            results[nid] = replace["models"]()
        else:
            results[nid] = getattr(cls(), cls.FUNCTION)(**kwargs)
        return results[nid]

    for nid in nodes:
        run(nid)
    return results


@pytest.mark.parametrize("name,arch", [("story_panels_sd15", "sd15"), ("story_comic_sdxl", "sdxl")])
def test_story_workflow_runs_headless(name, arch, monkeypatch):
    from test_story_pipeline import tiny_models
    monkeypatch.setenv("KINEMA_DEVICE", "cpu")
    wf = load(name)
    saved = []
    replace = {"models": lambda: (tiny_models(arch),), "SaveImage": lambda images: saved.append(images) or ()}
    small = {"KinemaStoryBatch": {"width": 16, "height": 16, "steps": 1}}
    run_headless(wf, small, replace)
    story = next(n for n in wf["nodes"] if n["type"] == "KinemaStoryBatch")["widgets_values"][0]
    n_panels = len([line for line in story.splitlines() if line.strip()])
    (images,) = saved
    if name == "story_panels_sd15":
        assert images.shape == (n_panels, 16, 16, 3)
    else:  # 6 panels, 3 x 2 on one page with captions under them
        assert images.shape[0] == 1 and images.shape[-1] == 3
        assert images.shape[2] == 3 * 16 + 4 * 16
