"""Headless runner: execute a workflow file made of this pack's nodes (plus the core I/O
nodes LoadImage, SaveImage, PreviewImage, SaveAnimatedWEBP) without a ComfyUI server.

Accepts both ComfyUI formats: the UI format (``{"nodes": [...], "links": [...]}``, what
"Save" writes and what ``workflows/`` holds) and the API format
(``{"<id>": {"class_type": ..., "inputs": {...}}}``, what "Export (API)" writes).

Command line (see ``run_workflow.py``)::

    python run_workflow.py workflows/click_drag_animate.json --output-dir out \
        --set 1.image=assets/chelsea.jpg --set 4.frames=24
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import runtime

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SKIP_UI_TYPES = ("Note", "MarkdownNote", "PrimitiveNode", "Reroute")


class WorkflowError(ValueError):
    """A workflow file that cannot be run: names the node and what is wrong."""


def node_classes() -> dict:
    """This pack's nodes plus the core I/O nodes (ComfyUI's own when importable)."""
    from .nodes import NODE_CLASS_MAPPINGS
    from .nodes.core_io import CORE_NODES
    classes = dict(CORE_NODES)
    if runtime.IN_COMFYUI:
        try:
            import nodes as comfy_nodes  # type: ignore  # ComfyUI's top-level nodes module
            classes.update({k: v for k, v in comfy_nodes.NODE_CLASS_MAPPINGS.items() if k in CORE_NODES})
        except Exception:
            pass
    classes.update(NODE_CLASS_MAPPINGS)
    return classes


def _ordered_inputs(cls) -> list[tuple[str, object, dict]]:
    return _ordered_spec(cls.INPUT_TYPES())


def _ordered_spec(spec: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) of an INPUT_TYPES dict (or a server's /object_info "input"), in order."""
    out = []
    for section in ("required", "optional"):
        for name, value in (spec.get(section) or {}).items():
            typ = value[0]
            opts = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
            out.append((name, typ, opts))
    return out


def _is_widget(typ, opts) -> bool:
    if opts.get("forceInput"):
        return False
    return isinstance(typ, (list, tuple)) or typ in WIDGET_TYPES


def _extra_widget_values(name: str, typ, opts) -> int:
    """Widgets the front end adds after an input's own value (saved in widgets_values)."""
    extra = 0
    if typ == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
        extra += 1
    if opts.get("image_upload") or opts.get("video_upload") or opts.get("audio_upload"):
        extra += 1
    return extra


def ui_to_api(workflow: dict, classes: dict | None = None, input_types: dict | None = None) -> dict:
    """Convert a UI-format workflow to the API format.

    Each node's widget order comes from ``input_types`` ({node type: INPUT_TYPES dict}, e.g. a
    ComfyUI server's /object_info "input" entries) when given, else from ``classes``."""
    if input_types is None:
        classes = classes if classes is not None else node_classes()
        input_types = {name: cls.INPUT_TYPES() for name, cls in classes.items()}
    known = input_types
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            links[link[0]] = (link[1], link[2])

    def source(link_id):
        """Follow reroutes back: ("link", [node id, slot]), ("value", v) for a primitive node, or None."""
        seen = set()
        while True:
            if link_id not in links:
                return None
            nid, slot = links[link_id]
            node = nodes.get(nid)
            if node is None or nid in seen:
                return None
            seen.add(nid)
            if node.get("type") == "Reroute":
                ins = node.get("inputs") or []
                link_id = ins[0].get("link") if ins else None
                continue
            if node.get("type") == "PrimitiveNode":  # its value is the target widget's value
                vals = node.get("widgets_values") or [None]
                return ("value", vals[0])
            return ("link", [str(nid), slot])

    api = {}
    for nid, node in nodes.items():
        ctype = node.get("type")
        if ctype in SKIP_UI_TYPES or node.get("mode", 0) == 2:  # notes, helpers, muted nodes
            continue
        if node.get("mode", 0) == 4:
            raise WorkflowError(f"node {nid} ({ctype}) is bypassed; the headless runner does not run bypassed nodes")
        if ctype not in known:
            raise WorkflowError(f"node {nid}: unknown node type '{ctype}' (known: this pack's nodes and "
                                f"{', '.join(sorted(k for k in known if not k.startswith('Kinema'))[:12])}...)")
        values = node.get("widgets_values", [])
        linked = {}
        for inp in node.get("inputs") or []:
            if inp.get("link") is not None:
                src = source(inp["link"])
                if src is not None:
                    linked[inp["name"]] = src[1]
        inputs = {}
        pos = 0
        for name, typ, opts in _ordered_spec(known[ctype]):
            if _is_widget(typ, opts):
                if isinstance(values, dict):
                    if name in values:
                        inputs[name] = values[name]
                elif pos < len(values):
                    inputs[name] = values[pos]
                pos += 1 + _extra_widget_values(name, typ, opts)
            if name in linked:
                inputs[name] = linked[name]
        api[str(nid)] = {"class_type": ctype, "inputs": inputs, "_meta": {"title": node.get("title", ctype)}}
    return api


def load_workflow(path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WorkflowError(f"workflow: file '{path}' not found") from None
    except json.JSONDecodeError as e:
        raise WorkflowError(f"workflow: '{path}' is not valid JSON ({e.msg}, line {e.lineno})") from None
    return data


def to_api(workflow: dict, classes: dict | None = None) -> dict:
    if "nodes" in workflow and isinstance(workflow["nodes"], list):
        return ui_to_api(workflow, classes)
    if workflow and all(isinstance(v, dict) and "class_type" in v for v in workflow.values()):
        return workflow
    raise WorkflowError("workflow: neither the UI format (nodes/links) nor the API format (class_type per node)")


def _defaults(cls) -> dict:
    out = {}
    for name, typ, opts in _ordered_inputs(cls):
        if "default" in opts:
            out[name] = opts["default"]
        elif isinstance(typ, (list, tuple)) and typ:
            out[name] = typ[0]
    return out


def run(api: dict, classes: dict | None = None, overrides: dict | None = None, log=None) -> dict:
    """Execute an API-format workflow. ``overrides``: {node_id: {input: value}}.

    Returns {node_id: ui dict} for every output node that produced UI data.
    """
    classes = classes if classes is not None else node_classes()
    api = json.loads(json.dumps(api))  # private copy
    for nid, values in (overrides or {}).items():
        if str(nid) not in api:
            raise WorkflowError(f"--set: no node with id {nid} in the workflow (ids: {', '.join(sorted(api))})")
        api[str(nid)]["inputs"].update(values)
    for nid, node in api.items():
        if node["class_type"] not in classes:
            raise WorkflowError(f"node {nid}: unknown node type '{node['class_type']}'")

    results: dict = {}
    ui: dict = {}
    visiting: set = set()
    prompt_copy = {k: {kk: vv for kk, vv in v.items() if kk != "_meta"} for k, v in api.items()}

    def execute(nid: str):
        if nid in results:
            return results[nid]
        if nid in visiting:
            raise WorkflowError(f"node {nid}: the workflow has a cycle")
        if nid not in api:
            raise WorkflowError(f"a link points to node {nid}, which is not in the workflow")
        visiting.add(nid)
        node = api[nid]
        cls = classes[node["class_type"]]
        kwargs = _defaults(cls)
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
                kwargs[name] = execute(value[0])[value[1]]
            else:
                kwargs[name] = value
        hidden = (cls.INPUT_TYPES().get("hidden") or {})
        for name, kind in hidden.items():
            kwargs[name] = {"PROMPT": prompt_copy, "EXTRA_PNGINFO": None, "UNIQUE_ID": nid}.get(kind)
        if log:
            log(f"[{nid}] {node['class_type']}")
        t0 = time.perf_counter()
        out = getattr(cls(), cls.FUNCTION)(**kwargs)
        if isinstance(out, dict):
            if out.get("ui"):
                ui[nid] = out["ui"]
            out = out.get("result", ())
        results[nid] = tuple(out) if out is not None else ()
        visiting.discard(nid)
        if log:
            log(f"[{nid}] done in {time.perf_counter() - t0:.2f}s")
        return results[nid]

    outputs = [nid for nid, node in api.items() if getattr(classes[node["class_type"]], "OUTPUT_NODE", False)]
    if not outputs:
        raise WorkflowError("workflow: no output node (SaveImage, PreviewImage, SaveAnimatedWEBP, ...)")
    for nid in outputs:
        execute(nid)
    return ui


def _parse_set(items: list[str]) -> dict:
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        nid, dot, name = key.partition(".")
        if not sep or not dot:
            raise WorkflowError(f"--set: '{item}' must look like NODE_ID.INPUT=VALUE")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(nid, {})[name] = parsed
    return out


def main(argv=None) -> int:
    import os
    p = argparse.ArgumentParser(prog="run_workflow.py", description=__doc__.split("\n\n")[0])
    p.add_argument("workflow", help="workflow file (UI or API format)")
    p.add_argument("--output-dir", default=None, help="where Save* nodes write (default ./output)")
    p.add_argument("--input-dir", default=None, help="where LoadImage looks (default ./input, then bundled photos)")
    p.add_argument("--models-dir", default=None, help="model folders root (default $KINEMA_MODELS_DIR or ./models)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--set", action="append", default=[], metavar="ID.INPUT=VALUE", help="override an input")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    for flag, env in ((args.output_dir, "KINEMA_OUTPUT_DIR"), (args.input_dir, "KINEMA_INPUT_DIR"),
                      (args.models_dir, "KINEMA_MODELS_DIR"), (args.device, "KINEMA_DEVICE")):
        if flag:
            os.environ[env] = flag
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr))
    t0 = time.perf_counter()
    try:
        api = to_api(load_workflow(args.workflow))
        ui = run(api, overrides=_parse_set(args.set), log=log)
    except (ValueError, runtime.KinemaError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for nid, data in ui.items():
        for item in data.get("images", []):
            if "path" in item:
                print(item["path"])
    if log:
        log(f"finished in {time.perf_counter() - t0:.2f}s")
    return 0
