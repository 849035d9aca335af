"""Headless runner: execute a workflow file without a ComfyUI server.

This pack's nodes and the core I/O nodes (LoadImage, SaveImage, PreviewImage,
SaveAnimatedWEBP; stand-ins in ``nodes/core_io.py``) run on their own. A workflow that uses
other ComfyUI core nodes (checkpoint loaders, KSampler, ...) runs when ComfyUI is importable
(``$COMFYUI_DIR`` or on ``sys.path``): its nodes are loaded into this process and ComfyUI's
own executor runs the graph; without ComfyUI the runner says which core nodes are missing.

Accepts both ComfyUI formats: the UI format (``{"nodes": [...], "links": [...]}``, what
"Save" writes and what ``workflows/`` holds) and the API format
(``{"<id>": {"class_type": ..., "inputs": {...}}}``, what "Export (API)" writes).

Command line (see ``run_workflow.py``)::

    python run_workflow.py workflows/click_drag_animate.json --inputs    # node ids and inputs
    python run_workflow.py workflows/click_drag_animate.json --output-dir out \
        --set 1.image=assets/chelsea.jpg --set 3.frames=24
    python run_workflow.py workflows/click_drag_animate.json --batch jobs.jsonl [--ray [ADDRESS]]

Batches (many jobs of one workflow, in this process or on a Ray cluster) are in ``batch.py``.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from pathlib import Path

from . import runtime

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SKIP_UI_TYPES = ("Note", "MarkdownNote", "PrimitiveNode", "Reroute")


class WorkflowError(ValueError):
    """A workflow file that cannot be run: names the node and what is wrong."""


class NodeFailed(WorkflowError):
    """A node raised a clear error (ValueError or KinemaError); the message names the node."""

    def __init__(self, node_id: str, label: str, message: str, hint: str = ""):
        self.node_id, self.label, self.reason, self.hint = node_id, label, message, hint
        super().__init__(f"node {node_id} ({label}): {message}" + (f"\n  {hint}" if hint else ""))


def standalone_classes() -> dict:
    """This pack's nodes plus the runner's stand-ins for the core I/O nodes."""
    from .nodes import NODE_CLASS_MAPPINGS
    from .nodes.core_io import CORE_NODES
    return {**CORE_NODES, **NODE_CLASS_MAPPINGS}


def node_classes(types=(), device: str | None = None, log=None) -> dict:
    """The node classes a workflow using ``types`` needs: :func:`standalone_classes`, and
    ComfyUI's own core nodes when some type is not among them (this pack's nodes and the
    I/O stand-ins keep precedence). Raises WorkflowError naming the core nodes when
    ComfyUI cannot be imported."""
    classes = standalone_classes()
    missing = sorted(set(types) - set(classes))
    if not missing:
        return classes
    if runtime.comfyui_root() is None:
        raise WorkflowError(
            f"workflow: needs ComfyUI for its core nodes {', '.join(missing)}. Open it in ComfyUI, or run it "
            f"here with COMFYUI_DIR=/path/to/ComfyUI (a ComfyUI checkout whose requirements are installed in "
            f"this Python: {sys.executable})")
    try:
        core = runtime.load_comfyui_nodes(device, log)
    except runtime.KinemaError as e:
        raise WorkflowError(f"workflow: needs ComfyUI for its core nodes {', '.join(missing)}, but {e}") from None
    unknown = sorted(set(missing) - set(core))
    if unknown:
        raise WorkflowError(f"workflow: unknown node type(s) {', '.join(unknown)}: neither this pack nor "
                            f"ComfyUI core has them (a node pack that is not installed?)")
    return {**core, **classes}


def workflow_types(workflow: dict) -> set:
    """Node types a workflow (UI or API format) runs."""
    if isinstance(workflow.get("nodes"), list):
        return {n.get("type") for n in workflow["nodes"]
                if n.get("type") not in SKIP_UI_TYPES and n.get("mode", 0) != 2}
    return {v.get("class_type") for v in workflow.values() if isinstance(v, dict)}


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
        used = workflow_types(workflow)
        classes = classes if classes is not None else node_classes(used)
        input_types = {name: classes[name].INPUT_TYPES() for name in used if name in classes}
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
        elif _choices(typ, opts):
            out[name] = _choices(typ, opts)[0]
    return out


def _label(node: dict) -> str:
    """How a person knows a node: its title, else the display name, else its type."""
    from .nodes import NODE_DISPLAY_NAME_MAPPINGS
    ctype = node["class_type"]
    title = (node.get("_meta") or {}).get("title")
    if title and title != ctype:
        return title
    return NODE_DISPLAY_NAME_MAPPINGS.get(ctype, ctype)


def _input_spec(cls) -> dict:
    """{input name: (type, options)} of a node class, required and optional."""
    return {name: (typ, opts) for name, typ, opts in _ordered_inputs(cls)}


def _check_value(where: str, name: str, value, typ, opts) -> None:
    """A value given for a widget input must fit its type, range and choices."""
    def fail(what):
        raise WorkflowError(f"{where}: {value!r} {what}")

    choices = _choices(typ, opts)
    if choices is not None:
        if opts.get("image_upload") or not choices or value in choices:
            return  # an image may also be a path; an empty list is the node's own error
        shown = ", ".join(map(str, choices[:12])) + (", ..." if len(choices) > 12 else "")
        fail(f"is not one of its choices: {shown}")
    if typ == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            fail(f"is not a whole number (input '{name}' is INT)")
    elif typ == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(f"is not a number (input '{name}' is FLOAT)")
    elif typ == "BOOLEAN":
        if not isinstance(value, bool):
            fail(f"is not true or false (input '{name}' is BOOLEAN)")
    elif typ == "STRING":
        if not isinstance(value, str):
            fail(f"is not text (input '{name}' is STRING)")
    else:
        fail(f"cannot be set on the command line: input '{name}' takes a {typ} from a link")
    lo, hi = opts.get("min"), opts.get("max")
    if typ in ("INT", "FLOAT") and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        fail(f"is outside {lo}..{hi}")


def _apply_overrides(api: dict, classes: dict, overrides: dict, source: str = "--set") -> None:
    """Put ``--set`` values into the prompt; unknown nodes, inputs and bad values are refused
    with the node's real inputs named. ``source`` says where the values came from."""
    for nid, values in (overrides or {}).items():
        nid = str(nid)
        if nid not in api:
            listing = ", ".join(f"{k} ({_label(v)})" for k, v in sorted(api.items(), key=lambda kv: _id_key(kv[0])))
            raise WorkflowError(f"{source}: no node with id {nid} in the workflow (nodes: {listing})")
        node = api[nid]
        cls = classes.get(node["class_type"])
        spec = _input_spec(cls) if cls is not None else {}
        for name, value in values.items():
            where = f"--set {nid}.{name}" if source == "--set" else f"{source}, {nid}.{name}"
            if cls is not None and name not in spec:
                close = difflib.get_close_matches(name, list(spec), n=1)
                raise WorkflowError(f"{where}: node {nid} ({_label(node)}, {node['class_type']}) has no input "
                                    f"'{name}'" + (f"; did you mean '{close[0]}'?" if close else "")
                                    + f" Its inputs: {', '.join(spec)}")
            if cls is not None:
                typ, opts = spec[name]
                if typ == "STRING" and not isinstance(value, str):  # JSON given for a text input: keep it as text
                    value = json.dumps(value)
                _check_value(where, name, value, typ, opts)
            node["inputs"][name] = value


def _id_key(nid: str):
    return (0, int(nid), "") if str(nid).isdigit() else (1, 0, str(nid))


def _check_graph(api: dict, classes: dict) -> None:
    """Before running: every type known, every link to a node that exists, every required
    input given, combo values of core nodes among their choices (model files, mostly)."""
    for nid, node in api.items():
        ctype = node["class_type"]
        if ctype not in classes:
            raise WorkflowError(f"node {nid}: unknown node type '{ctype}'")
        spec = _input_spec(classes[ctype])
        required = classes[ctype].INPUT_TYPES().get("required") or {}
        for name, value in node["inputs"].items():
            if _is_link(value) and value[0] not in api:
                raise WorkflowError(f"node {nid} ({_label(node)}): input '{name}' is linked to node {value[0]}, "
                                    f"which is not in the workflow")
        for name in required:
            typ, opts = spec[name]
            if name not in node["inputs"] and not (_is_widget(typ, opts) and ("default" in opts or _choices(typ, opts))):
                raise WorkflowError(f"node {nid} ({_label(node)}): required input '{name}' ({typ if isinstance(typ, str) else 'COMBO'}) "
                                    f"is not connected")
        if ctype.startswith("Kinema") or ctype in _standalone_types():
            continue  # this pack's nodes say themselves what is wrong with a value
        for name, value in node["inputs"].items():
            if name not in spec or _is_link(value):
                continue
            choices = _choices(*spec[name])
            if choices is not None and value not in choices and not spec[name][1].get("image_upload"):
                shown = ", ".join(map(str, choices[:8])) + (", ..." if len(choices) > 8 else "") or "none"
                raise WorkflowError(f"node {nid} ({_label(node)}): {name} {value!r} is not available here "
                                    f"(choices: {shown}); model files are looked up under {runtime.models_dir()} "
                                    f"(--models-dir), in ComfyUI's folder layout (checkpoints/, vae/, ...)")


def _choices(typ, opts) -> list | None:
    """The choices of a combo input (a list, or the newer "COMBO" with options), else None."""
    if isinstance(typ, (list, tuple)):
        return list(typ)
    if typ == "COMBO":
        return list(opts.get("options") or [])
    return None


def _standalone_types() -> set:
    from .nodes.core_io import CORE_NODES
    return set(CORE_NODES)


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _hint(nid: str, node: dict, spec: dict, message: str, overridden: set, source: str = "--set") -> str:
    """For an error whose message starts with one of the node's widget inputs ("points: ..."):
    how to give that input another value (with ``--set``, or in ``source``, a batch file's line)."""
    head = message.split(":", 1)[0].split()
    name = head[0] if head else ""
    if name in spec and _is_widget(*spec[name]) and not _is_link(node["inputs"].get(name)):
        if source == "--set":
            given = "the value given with --set" if name in overridden else "the workflow's value"
            change = f"change it with --set {nid}.{name}=VALUE"
        else:
            given = f"the value given in {source}" if name in overridden else "the workflow's value"
            change = f"change {nid}.{name} in {source}"
        return f"input '{name}' of node {nid} is {given}; {change} (--inputs lists every node's inputs)"
    return ""


def prepare(api: dict, classes: dict, overrides: dict | None = None, source: str = "--set") -> dict:
    """A private copy of an API workflow with ``overrides`` ({node_id: {input: value}}) put in,
    checked as :func:`run` checks it before running: unknown nodes and inputs, values of the
    wrong type or out of range, links to missing nodes, required inputs not given. Errors
    about an override name ``source`` (``--set``, ``jobs.csv line 3``)."""
    api = json.loads(json.dumps(api))
    _apply_overrides(api, classes, overrides, source)
    _check_graph(api, classes)
    return api


def output_prefixes(api: dict, classes: dict) -> dict:
    """{node id: its filename_prefix} of the output nodes that name their files by a prefix
    (SaveImage, SaveAnimatedWEBP, ...): the workflow's value, else the input's default. A
    prefix that comes from another node is given as the link ``[node id, slot]``."""
    out = {}
    for nid, node in api.items():
        cls = classes.get(node["class_type"])
        if cls is None or not getattr(cls, "OUTPUT_NODE", False):
            continue
        spec = _input_spec(cls)
        if "filename_prefix" in spec:
            out[nid] = node["inputs"].get("filename_prefix", spec["filename_prefix"][1].get("default", ""))
    return out


def run(api: dict, classes: dict | None = None, overrides: dict | None = None, log=None,
        source: str = "--set") -> dict:
    """Execute an API-format workflow. ``overrides``: {node_id: {input: value}}, given by
    ``source`` (``--set``, or a batch file's line: errors say where to change a value).

    Returns {node_id: ui dict} for every output node that produced UI data. Nodes whose
    errors are clear (ValueError, KinemaError) raise :class:`NodeFailed`, naming the node."""
    if classes is None:
        classes = node_classes(workflow_types(api), log=log)
    api = prepare(api, classes, overrides, source)
    overridden = {(str(k), n) for k, v in (overrides or {}).items() for n in v}
    outputs = [nid for nid, node in api.items() if getattr(classes[node["class_type"]], "OUTPUT_NODE", False)]
    if not outputs:
        raise WorkflowError("workflow: no output node (SaveImage, PreviewImage, SaveAnimatedWEBP, ...)")
    if any(runtime.is_comfyui_node(classes[n["class_type"]]) for n in api.values()):
        prompt = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
        ui, error = runtime.execute_in_comfyui(prompt, classes, outputs, log=log)
        if error is not None:
            nid = error["node_id"]
            node = api.get(nid, {"class_type": error.get("node_type") or "?", "inputs": {}})
            cls = classes.get(node["class_type"])
            hint = _hint(nid, node, _input_spec(cls) if cls else {}, error["message"],
                         {n for k, n in overridden if k == nid}, source)
            raise NodeFailed(nid, _label(node), error["message"], hint)
        return ui

    results: dict = {}
    ui: dict = {}
    visiting: set = set()
    prompt_copy = {k: {kk: vv for kk, vv in v.items() if kk != "_meta"} for k, v in api.items()}

    def execute(nid: str):
        if nid in results:
            return results[nid]
        if nid in visiting:
            raise WorkflowError(f"node {nid}: the workflow has a cycle")
        visiting.add(nid)
        node = api[nid]
        cls = classes[node["class_type"]]
        spec = _input_spec(cls)
        kwargs = _defaults(cls)
        for name, value in node["inputs"].items():
            if name not in spec:
                if log:
                    log(f"[{nid}] ignoring '{name}': {node['class_type']} has no such input")
                continue
            kwargs[name] = execute(value[0])[value[1]] if _is_link(value) else value
        hidden = (cls.INPUT_TYPES().get("hidden") or {})
        for name, kind in hidden.items():
            kwargs[name] = {"PROMPT": prompt_copy, "EXTRA_PNGINFO": None, "UNIQUE_ID": nid}.get(kind)
        if log:
            log(f"[{nid}] {node['class_type']}")
        t0 = time.perf_counter()
        try:
            out = getattr(cls(), cls.FUNCTION)(**kwargs)
        except (ValueError, runtime.KinemaError) as e:
            if isinstance(e, WorkflowError):
                raise
            raise NodeFailed(nid, _label(node), str(e),
                             _hint(nid, node, spec, str(e), {n for k, n in overridden if k == nid}, source)) from e
        if isinstance(out, dict):
            if out.get("ui"):
                ui[nid] = out["ui"]
            out = out.get("result", ())
        results[nid] = tuple(out) if out is not None else ()
        visiting.discard(nid)
        if log:
            log(f"[{nid}] done in {time.perf_counter() - t0:.2f}s")
        return results[nid]

    for nid in outputs:
        execute(nid)
    return ui


def parse_value(text: str):
    """A value given as text (``--set``, a CSV cell): JSON when it parses, else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def add_override(out: dict, key: str, value, where: str) -> None:
    """Put ``value`` for ``key`` (``NODE_ID.INPUT``) into ``out`` ({node_id: {input: value}})."""
    nid, dot, name = str(key).partition(".")
    if not dot or not nid or not name:
        raise WorkflowError(f"{where}: '{key}' must look like NODE_ID.INPUT")
    out.setdefault(nid, {})[name] = value


def _parse_set(items: list[str]) -> dict:
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise WorkflowError(f"--set: '{item}' must look like NODE_ID.INPUT=VALUE")
        add_override(out, key, parse_value(value), "--set")
    return out


def describe_inputs(api: dict, classes: dict) -> str:
    """Every node with its id and its inputs (value, or where a link comes from): what
    ``--set NODE_ID.INPUT=VALUE`` can change."""
    lines = []
    for nid in sorted(api, key=_id_key):
        node = api[nid]
        cls = classes.get(node["class_type"])
        lines.append(f"{nid}  {_label(node)} ({node['class_type']})")
        for name, (typ, opts) in (_input_spec(cls).items() if cls else ()):
            value = node["inputs"].get(name)
            kind = "COMBO" if _choices(typ, opts) is not None else typ
            if _is_link(value):
                shown = f"<- node {value[0]} output {value[1]}"
            elif name in node["inputs"]:
                text = json.dumps(value)
                shown = text if len(text) <= 100 else text[:97] + "..."
            elif _is_widget(typ, opts):
                shown = f"(default {json.dumps(_defaults(cls).get(name))})"
            else:
                shown = "(not connected)"
            lines.append(f"    {nid}.{name} [{kind}] {shown}")
    return "\n".join(lines)


def output_files(ui: dict) -> list[Path]:
    """Files the output nodes wrote, from their UI data (the stand-ins give a path,
    ComfyUI's savers a name in the output folder), in the order of the node ids."""
    out = []
    for data in (ui[nid] for nid in sorted(ui, key=_id_key)):
        for key in ("images", "gifs", "videos", "audio", "3d"):
            for item in data.get(key) or []:
                if not isinstance(item, dict):
                    continue
                if item.get("path"):
                    out.append(Path(item["path"]))
                elif item.get("type", "output") == "output" and item.get("filename"):
                    out.append(runtime.output_dir() / (item.get("subfolder") or "") / item["filename"])
    return out


def text_results(ui: dict, api: dict) -> list[tuple[str, str, str]]:
    """(node id, node label, text) of every text a node sent to the UI (``ui.text``)."""
    out = []
    for nid in sorted(ui, key=_id_key):
        for item in ui[nid].get("text") or []:
            label = _label(api[nid]) if nid in api else nid
            out.append((nid, label, item if isinstance(item, str) else json.dumps(item)))
    return out


def save_texts(texts: list, workflow_path: Path) -> Path:
    """Write text results next to the images: ``<output>/<workflow>_text_00001_.txt``."""
    folder = runtime.output_dir()
    folder.mkdir(parents=True, exist_ok=True)
    n = 1
    while (folder / f"{workflow_path.stem}_text_{n:05d}_.txt").exists():
        n += 1
    path = folder / f"{workflow_path.stem}_text_{n:05d}_.txt"
    path.write_text("".join(f"node {nid} ({label}): {text}\n" for nid, label, text in texts))
    return path


def main(argv=None) -> int:
    import os
    p = argparse.ArgumentParser(prog="run_workflow.py", description=__doc__.split("\n\n")[0])
    p.add_argument("workflow", help="workflow file (UI or API format)")
    p.add_argument("--output-dir", default=None, help="where Save* nodes write (default ./output)")
    p.add_argument("--input-dir", default=None, help="where LoadImage looks (default ./input, then bundled photos)")
    p.add_argument("--models-dir", default=None, help="model folders root (default $KINEMA_MODELS_DIR or ./models)")
    p.add_argument("--device", default=None, help=f"{runtime.DEVICE_HELP} (default: the best available)")
    p.add_argument("--set", action="append", default=[], metavar="ID.INPUT=VALUE",
                   help="override an input (VALUE is read as JSON when it parses, else as text)")
    p.add_argument("--inputs", action="store_true", help="list the nodes and their inputs, then stop")
    p.add_argument("--quiet", action="store_true")
    b = p.add_argument_group("batches", "one workflow, many jobs (see README, 'Batches')")
    b.add_argument("--batch", metavar="JOBS", help="run one job per line of JOBS (.jsonl or .csv): each sets inputs "
                   "in the NODE_ID.INPUT form of --set, on top of the --set values; outputs go to "
                   "<output-dir>/<job id>/, a manifest to <output-dir>/<JOBS name>_manifest.json")
    b.add_argument("--model-cache", type=int, default=4, metavar="N",
                   help="loader results (checkpoints, VAEs, ...) kept across jobs, the least recently used going "
                        "first (default 4; 0 loads them for every job)")
    b.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run the batch on a Ray cluster (pip install -r requirements-ray.txt): without ADDRESS a "
                        "private one on this machine (127.0.0.1 only), 'auto' the one 'ray start' runs here, "
                        "HOST:PORT or ray://HOST:PORT another")
    b.add_argument("--workers", type=int, metavar="N", help="Ray workers (default: as many as the cluster's GPUs or "
                                                            "CPUs hold at --gpus-per-worker / --cpus-per-worker)")
    b.add_argument("--gpus-per-worker", type=float, metavar="G",
                   help="GPUs each Ray worker holds (default 1 on a cluster with GPUs, else 0; 0.5 puts two "
                        "workers on each GPU)")
    b.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C",
                   help="CPUs each Ray worker holds, and its torch threads (default 1)")
    b.add_argument("--retries", type=int, default=2, metavar="N",
                   help="times a job is run again, on another worker, when its Ray worker dies (default 2)")
    args = p.parse_args(argv)
    if not args.batch and args.ray is not None:
        p.error("--ray runs a batch: give the jobs with --batch JOBS")
    if args.ray is None and (args.workers is not None or args.gpus_per_worker is not None):
        p.error("--workers and --gpus-per-worker go with --ray")
    if args.device:
        try:
            runtime.parse_device(args.device, "--device")
        except ValueError as e:
            p.error(str(e))
    for flag, env in ((args.output_dir, "KINEMA_OUTPUT_DIR"), (args.input_dir, "KINEMA_INPUT_DIR"),
                      (args.models_dir, "KINEMA_MODELS_DIR"), (args.device, "KINEMA_DEVICE")):
        if flag:
            os.environ[env] = flag
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr))
    t0 = time.perf_counter()
    if args.batch and not args.inputs:
        from . import batch
        return batch.main(args, log)
    try:
        workflow = load_workflow(args.workflow)
        overrides = _parse_set(args.set)
        classes = node_classes(workflow_types(workflow), device=args.device, log=log)
        api = to_api(workflow, classes)
        if args.inputs:
            _apply_overrides(api, classes, overrides)
            print(describe_inputs(api, classes))
            return 0
        ui = run(api, classes, overrides=overrides, log=log)
    except (ValueError, runtime.KinemaError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in output_files(ui):
        print(path)
    texts = text_results(ui, api)
    for nid, label, text in texts:
        print(f"node {nid} ({label}): {text}")
    if texts:
        saved = save_texts(texts, Path(args.workflow))
        if log:
            log(f"text results saved to {saved}")
    if log:
        log(f"finished in {time.perf_counter() - t0:.2f}s")
    return 0
