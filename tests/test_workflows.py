"""Every example workflow converts to the API format with known nodes; the weights-free ones
run headless end to end and write their outputs."""
import json
from pathlib import Path

import pytest
from PIL import Image, ImageSequence

from kinema import runner

WORKFLOWS = sorted((Path(__file__).resolve().parent.parent / "workflows").glob("*.json"))
WEIGHTS_FREE = ["click_drag_animate", "motion_brush_direction", "measure_motion_strength"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_converts_with_known_nodes(path):
    wf = runner.load_workflow(path)
    assert "nodes" in wf and "links" in wf, "example workflows are saved in the UI format"
    classes = runner.node_classes()
    types = {n["type"] for n in wf["nodes"]} - set(runner.SKIP_UI_TYPES)
    unknown_kinema = sorted(t for t in types if t.startswith("Kinema") and t not in classes)
    assert not unknown_kinema, f"unregistered Kinema nodes: {unknown_kinema}"
    if types - set(classes):
        return  # uses ComfyUI core nodes: converted and run against a real ComfyUI in tests/comfyui
    api = runner.to_api(wf)
    for nid, node in api.items():
        cls = classes[node["class_type"]]
        required = cls.INPUT_TYPES().get("required", {})
        missing = [k for k in required if k not in node["inputs"]]
        assert not missing, f"node {nid} ({node['class_type']}) lacks {missing}"


@pytest.mark.parametrize("name", WEIGHTS_FREE)
def test_weights_free_workflow_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("KINEMA_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("KINEMA_TEMP_DIR", str(tmp_path / "temp"))
    api = runner.to_api(runner.load_workflow(Path(__file__).resolve().parent.parent / "workflows" / f"{name}.json"))
    ui = runner.run(api)
    files = [Path(i["path"]) for d in ui.values() for i in d.get("images", []) if "path" in i]
    texts = [t for d in ui.values() for t in d.get("text", [])]
    assert files or texts
    for f in files:
        assert f.is_file() and f.stat().st_size > 0
        if f.suffix == ".webp":
            frames = list(ImageSequence.Iterator(Image.open(f)))
            assert len(frames) == 16
    if name == "measure_motion_strength":
        assert len(texts) == 2 and all("bucket" in t for t in texts)


TITLE_HEIGHT = 30  # the frontend draws a node's title bar above its position
EDITOR_MIN = (420, 460)  # web/js/kinema_editors.js gives editor nodes at least this size
EDITOR_TYPES = {"KinemaClickToMask", "KinemaMotionFromDrags", "KinemaMotionBrush", "KinemaMotionI2VPredictMotion",
                "KinemaPuppetMasterAnimate", "KinemaPuppetMasterConditioning"}


def _box(node):
    (x, y), (w, h) = node["pos"], node["size"]
    if node["type"] in EDITOR_TYPES:
        w, h = max(w, EDITOR_MIN[0]), max(h, EDITOR_MIN[1])
    return x, y - TITLE_HEIGHT, x + w, y + h


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_nodes_do_not_overlap(path):
    """No node (a Note included) covers another, with the sizes the workflow saves. The real
    frontend's own sizes are checked in tests/comfyui/test_real_frontend.py."""
    nodes = runner.load_workflow(path)["nodes"]
    boxes = {n["id"]: (n["type"], _box(n)) for n in nodes}
    hits = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            (ta, A), (tb, B) = boxes[a["id"]], boxes[b["id"]]
            if A[0] < B[2] and B[0] < A[2] and A[1] < B[3] and B[1] < A[3]:
                hits.append(f"{a['id']} {ta} / {b['id']} {tb}")
    assert not hits, hits


def test_wan_track_workflow_feeds_the_drag_tracks_to_wan():
    """workflows/wan_track_to_video_drags.json: the drag editor's wan_tracks output goes to core
    WanTrackToVideo's tracks, for a video of the size the drag node maps the tracks to."""
    wf = runner.load_workflow(Path(__file__).resolve().parent.parent / "workflows" / "wan_track_to_video_drags.json")
    nodes = {n["id"]: n for n in wf["nodes"]}
    drag = next(n for n in wf["nodes"] if n["type"] == "KinemaMotionFromDrags")
    wan = next(n for n in wf["nodes"] if n["type"] == "WanTrackToVideo")
    slot = [o["name"] for o in drag["outputs"]].index("wan_tracks")
    link = next(l for l in wf["links"] if l[1] == drag["id"] and l[2] == slot)
    assert link[3] == wan["id"] and wan["inputs"][link[4]]["name"] == "tracks"
    # widget values: drag = [tracks, frames, strength, easing, falloff, wan_width, wan_height];
    # WanTrackToVideo = [tracks (linked, its widget value unused), width, height, length, ...]
    assert drag["widgets_values"][5:7] == wan["widgets_values"][1:3] == [832, 480]
    assert {nodes[l[1]]["type"] for l in wf["links"] if l[3] == wan["id"]} >= {"CLIPTextEncode", "VAELoader",
                                                                               "LoadImage", "CLIPVisionEncode"}
