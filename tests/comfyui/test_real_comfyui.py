"""The pack inside a real ComfyUI server, through its HTTP API.

Runs when COMFYUI_DIR points at a ComfyUI checkout (and a Python environment for it exists,
see tests/comfyui/setup_comfyui.sh); skipped otherwise.
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

import harness
import server_files

ROOT = harness.ROOT
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


def pack_nodes() -> dict:
    from kinema.nodes import NODE_CLASS_MAPPINGS  # the repo, loaded by tests/conftest.py
    return dict(NODE_CLASS_MAPPINGS)


def test_pack_loads_and_serves_its_web_files(comfy):
    log = comfy.log()
    assert "IMPORT FAILED" not in "\n".join(l for l in log.splitlines() if comfy.pack_name in l), log[-3000:]
    exts = comfy.get("/extensions")
    want = f"/extensions/{comfy.pack_name}/kinema_editors.js"
    assert want in exts, exts
    status, body = comfy.request(want)
    assert status == 200 and b"registerExtension" in body


def _inputs(spec_inputs: dict) -> dict:
    out = {}
    for section in ("required", "optional"):
        for name, entry in (spec_inputs.get(section) or {}).items():
            out[name] = (section, entry[0])
    return out


def test_every_node_is_registered_with_its_inputs(object_info):
    nodes = {k: v for k, v in pack_nodes().items() if k.startswith("Kinema")}
    if not nodes:
        pytest.skip("the pack registers no nodes yet")
    missing = sorted(set(nodes) - set(object_info))
    assert not missing, f"not in /object_info: {missing}"
    for name, cls in nodes.items():
        info = object_info[name]
        declared = _inputs(cls.INPUT_TYPES())
        served = _inputs(info["input"])
        assert set(served) == set(declared), (name, sorted(served), sorted(declared))
        for inp, (section, typ) in declared.items():
            s_section, s_typ = served[inp]
            assert s_section == section, (name, inp)
            if isinstance(typ, (list, tuple)):       # a combo: choices may depend on the server's folders
                assert isinstance(s_typ, list) or s_typ == "COMBO", (name, inp, s_typ)
            else:
                assert s_typ == typ, (name, inp, s_typ, typ)
        assert list(info["output"]) == list(cls.RETURN_TYPES), name
        assert info["category"].startswith("Kinema"), name




def _output_nodes(api: dict, object_info: dict) -> list[str]:
    return [nid for nid, n in api.items() if object_info[n["class_type"]].get("output_node")]


# Example workflows whose models cannot be made small (see server_files): only their Kinema part
# runs here, up to these output nodes' inputs; ComfyUI validates the whole graph.
PARTIAL = {"wan_track_to_video_drags": "Wan 2.1's 14B video model and 4.7B text encoder"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_runs_through_prompt_api(comfy, object_info, path):
    """Every example workflow, as shipped, through ComfyUI's /prompt, with tiny files under the
    model names it uses and smaller sizes / fewer steps (server_files.SMALL) for the CPU."""
    wf = json.loads(Path(path).read_text())
    api = harness.ui_to_api(wf, object_info) if "nodes" in wf else wf
    outs = _output_nodes(api, object_info)
    assert outs, f"{path.name} has no output node"
    if path.stem in PARTIAL:
        _run_kinema_part(comfy, object_info, api, path)
        return
    missing = harness.missing_choices(api, object_info)
    assert not missing, f"{path.name} names files the test's model folder lacks: {missing}"
    api = server_files.make_small(api, object_info)
    pid = comfy.queue(api)
    entry = comfy.wait(pid, timeout=900)
    status = entry["status"]
    assert status["status_str"] == "success", json.dumps(status.get("messages", []))[-3000:]
    produced = entry.get("outputs", {})
    for nid in outs:
        assert nid in produced and produced[nid], f"{path.name}: output node {nid} ({api[nid]['class_type']}) gave nothing"
        for item in produced[nid].get("images", []):
            st, body = comfy.request("/view?" + harness.view_url(comfy, item).split("?", 1)[1])
            assert st == 200 and len(body) > 100, item


def _run_kinema_part(comfy, object_info, api, path):
    """The Kinema nodes of a workflow whose other models cannot be had here: ComfyUI reports the
    missing model files (and nothing else) when the whole graph is queued, and the Kinema nodes
    run to completion when their outputs are wired to preview nodes."""
    status, body = comfy.request("/prompt", {"prompt": api, "client_id": "kinema-test"})
    errors = body.get("node_errors", {}) if isinstance(body, dict) else {}
    bad = {nid: e for nid, e in errors.items() if api[nid]["class_type"].startswith("Kinema")}
    assert not bad, f"{path.name}: Kinema nodes refused by ComfyUI: {json.dumps(bad)[:2000]}"
    missing = harness.missing_choices(api, object_info)
    assert missing, f"{path.name} is in PARTIAL but this server has all its files: run it whole"
    kinema = {nid: n for nid, n in api.items() if n["class_type"].startswith("Kinema")}
    part = {}
    for nid, node in kinema.items():  # the Kinema nodes and what feeds them
        stack = [nid]
        while stack:
            cur = stack.pop()
            if cur in part:
                continue
            part[cur] = api[cur]
            stack += [v[0] for v in api[cur]["inputs"].values() if isinstance(v, list)]
    n_out = 0
    for nid in kinema:
        for slot, kind in enumerate(object_info[api[nid]["class_type"]]["output"]):
            if kind == "IMAGE":
                part[f"preview{n_out}"] = {"class_type": "PreviewImage", "inputs": {"images": [nid, slot]}}
                n_out += 1
            elif kind == "STRING":
                part[f"preview{n_out}"] = {"class_type": "PreviewAny", "inputs": {"source": [nid, slot]}}
                n_out += 1
    assert n_out, f"{path.name}: its Kinema nodes have no picture or text output to check"
    entry = comfy.wait(comfy.queue(part), timeout=600)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"].get("messages", []))[-3000:]
    assert all(entry["outputs"].get(f"preview{i}") for i in range(n_out))


def _mask_route(comfy, payload):
    return comfy.request("/kinema/mask_preview", payload, timeout=120)


def test_mask_preview_route(comfy):
    points = json.dumps({"positive": [[220, 140]], "negative": [[30, 30]], "box": None})
    ok = {"image": {"filename": "chelsea.jpg", "subfolder": "", "type": "input"}, "points": points,
          "sam": "", "multimask": True}
    status, body = _mask_route(comfy, ok)
    if status in (404, 405):  # no such route: the static files handler answers
        pytest.skip("the pack has no /kinema/mask_preview route yet")
    assert status == 200, body
    assert (body["width"], body["height"]) == (451, 300)
    from PIL import Image
    import numpy as np
    m = np.array(Image.open(io.BytesIO(base64.b64decode(body["mask"]))).convert("L"))
    assert m.shape == (300, 451)
    assert m[140, 220] > 127, "the clicked pixel is not in the mask"
    assert 0 < (m > 127).mean() < 1
    assert isinstance(body["score"], float)

    # bad requests answer 400 with an error, and never read outside the input folder
    for bad in (
        dict(ok, image={"filename": "../../../etc/passwd", "subfolder": "", "type": "input"}),
        dict(ok, image={"filename": "passwd", "subfolder": "../../../../etc", "type": "input"}),
        dict(ok, image={"filename": "/etc/passwd", "subfolder": "", "type": "input"}),
        dict(ok, image={"filename": "chelsea.jpg", "subfolder": "", "type": "bogus"}),
        dict(ok, image={"filename": "does-not-exist.png", "subfolder": "", "type": "input"}),
        dict(ok, points="not json"),
        dict(ok, points=json.dumps({"positive": [[9999, 5]], "negative": [], "box": None})),
        {"points": points},
    ):
        status, body = _mask_route(comfy, bad)
        assert status == 400, (bad, status, body)
        assert isinstance(body, dict) and body.get("error"), (bad, body)
        assert "root:" not in json.dumps(body)
