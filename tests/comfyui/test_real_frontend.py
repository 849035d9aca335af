"""The editors inside the real ComfyUI frontend, in headless Chromium.

For each editor node the server knows: build Load Image -> editor node -> preview, check the
picture appears before any run, click/drag on the editor with real mouse events (also under
graph zoom), check the hidden JSON widget and the queued prompt carry exactly the editor's
value, queue, check the picture of the run replaces it without a default image preview on
top, then save and reopen the workflow and check everything comes back. Screenshots go to
test-artifacts/comfyui/.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import harness

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
ART = harness.ROOT / "test-artifacts" / "comfyui"
EDITORS = {"KinemaClickToMask": "points", "KinemaMotionFromDrags": "tracks", "KinemaMotionBrush": "strokes"}
WORKFLOWS = sorted((harness.ROOT / "workflows").glob("*.json"))
NEWEST_FRONTEND = "1.58.1"  # the newest comfyui-frontend-package on the registry when this was written

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} not found", allow_module_level=True)

# JS run in the page. `app` and `api` are the frontend's own objects.
BUILD = """async ([type, consumers]) => {
  const app = window.app, LG = window.LiteGraph;
  app.graph.clear();
  const li = LG.createNode("LoadImage"); li.pos = [20, 60]; app.graph.add(li);
  li.widgets.find((w) => w.name === "image").value = "chelsea.jpg";
  const ed = LG.createNode(type); ed.pos = [380, 40]; app.graph.add(ed);
  ed.setSize([520, 560]);
  li.connect(0, ed, ed.inputs.findIndex((i) => i.name === "image"));
  let x = 940;
  for (const [slot, chain] of consumers) {
    let prev = ed, prevSlot = slot;
    for (const t of chain) {
      const n = LG.createNode(t); n.pos = [x, 60 + 260 * slot]; app.graph.add(n);
      const input = n.inputs.findIndex((i) => i.type === prev.outputs[prevSlot].type || i.type === "*");
      prev.connect(prevSlot, n, input);
      prev = n; prevSlot = 0; x += 220;
    }
  }
  app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0];
  app.graph.setDirtyCanvas(true, true);
  return ed.id;
}"""

JSON_BOX = """([id, n]) => {
  const w = window.app.graph.getNodeById(id).widgets.find((x) => x.name === n);
  if (!w.element) return null;
  const r = w.element.getBoundingClientRect();
  return [r.left + r.width / 2, r.top + r.height / 2, r.width, r.height];
}"""

GEOM = """(id) => {
  const ed = window.app.graph.getNodeById(id).__kinema.editor;
  const r = ed.canvas.getBoundingClientRect();
  return {left: r.left, top: r.top, rw: r.width, rh: r.height, w: ed.canvas.clientWidth,
          h: ed.canvas.clientHeight, W: ed.imageW, H: ed.imageH, image: !!ed.image, url: ed.imageUrl};
}"""


def consumers_for(type_, object_info):
    """How to use each output so the node runs: IMAGE -> PreviewImage, MASK -> MaskToImage ->
    PreviewImage; other types -> an output node taking them (if any)."""
    out = []
    for slot, t in enumerate(object_info[type_]["output"]):
        if t == "IMAGE":
            out.append([slot, ["PreviewImage"]])
        elif t == "MASK":
            out.append([slot, ["MaskToImage", "PreviewImage"]])
        else:
            for name, info in object_info.items():
                req = info["input"].get("required") or {}
                links = [k for k, v in req.items() if not (isinstance(v[0], list) or v[0] in harness.WIDGET_TYPES)]
                if info.get("output_node") and len(links) == 1 and req[links[0]][0] == t:
                    out.append([slot, [name]])
                    break
    return out


class Front:
    def __init__(self, page, server):
        self.page, self.server = page, server
        self.errors = []
        page.on("pageerror", lambda e: self.errors.append(f"{e} {getattr(e, 'stack', '')}"))
        page.goto(server.url + "/")
        page.wait_for_function("window.app && window.app.graph && window.LiteGraph && window.comfyAPI", timeout=120000)
        page.wait_for_function("window.app.extensions.some((e) => e.name === 'kinema.editors')", timeout=60000)
        page.evaluate("""() => {
          window.__kinemaRuns = [];
          window.__kinemaExecuted = {};
          const api = window.comfyAPI.api.api;
          api.addEventListener("executed", (e) => { window.__kinemaExecuted[String(e.detail.node)] = e.detail.output; });
          for (const ev of ["execution_success", "execution_error", "execution_interrupted"])
            api.addEventListener(ev, (e) => window.__kinemaRuns.push([ev, e.detail]));
        }""")

    def our_errors(self):
        return [e for e in self.errors if "kinema" in e.lower()]

    def geom(self, nid):
        return self.page.evaluate(GEOM, nid)

    def screen(self, nid, x, y):
        g = self.geom(nid)
        s = max(1e-6, min((g["w"] - 12) / g["W"], (g["h"] - 12) / g["H"]))
        ox, oy = (g["w"] - g["W"] * s) / 2, (g["h"] - g["H"] * s) / 2
        kx, ky = g["rw"] / g["w"], g["rh"] / g["h"]
        return g["left"] + (ox + x * s) * kx, g["top"] + (oy + y * s) * ky

    def click(self, nid, x, y, **kw):
        self.page.mouse.click(*self.screen(nid, x, y), **kw)

    def drag(self, nid, path, button="left"):
        m = self.page.mouse
        m.move(*self.screen(nid, *path[0]))
        m.down(button=button)
        for p in path[1:]:
            m.move(*self.screen(nid, *p), steps=3)
        m.up(button=button)

    def editor_value(self, nid):
        return json.loads(self.page.evaluate("(id) => window.app.graph.getNodeById(id).__kinema.editor.value", nid))

    def widget_value(self, nid, name):
        return self.page.evaluate("([id, n]) => window.app.graph.getNodeById(id).widgets.find((w) => w.name === n).value",
                                  [nid, name])

    def shot(self, name):
        ART.mkdir(parents=True, exist_ok=True)
        self.page.wait_for_timeout(300)
        tag = "bundled" if self.server.front_end_root is None else Path(self.server.front_end_root).parts[-3].split("-")[-1]
        self.page.screenshot(path=str(ART / f"{tag}_{name}"))


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


# The frontend ComfyUI pins (bundled) and the newest one on the registry, served by the same
# ComfyUI through --front-end-root: every test below runs on both.
FRONTENDS = ["bundled", NEWEST_FRONTEND]


@pytest.fixture(scope="module", params=FRONTENDS)
def server(request, comfy, tmp_path_factory):
    if request.param == "bundled":
        yield comfy
        return
    static = harness.frontend_build(request.param, harness.ROOT / "test-artifacts" / "frontends")
    srv = harness.ComfyServer(comfy.cdir, comfy.python, tmp_path_factory.mktemp(f"comfyui-fe-{request.param}"),
                              front_end_root=static)
    srv.start()
    yield srv
    srv.stop()
    ART.mkdir(parents=True, exist_ok=True)
    (ART / f"comfyui-{request.param}.log").write_text(srv.log())


@pytest.fixture
def front(browser, server):
    ctx = browser.new_context(viewport={"width": 1500, "height": 900})
    page = ctx.new_page()
    f = Front(page, server)
    yield f
    ctx.close()


def near(a, b, tol):
    return all(abs(p - q) <= tol for p, q in zip(a, b))


def interact(f, nid, type_):
    """Edit with the mouse; returns what the value must hold (checked loosely: the exact JSON
    of each gesture is covered by tests/test_editors_browser.py)."""
    if type_ == "KinemaClickToMask":
        f.click(nid, 220, 140)
        f.click(nid, 40, 40, button="right")
        f.drag(nid, [(150, 60), (300, 230)])
        v = f.editor_value(nid)
        assert len(v["positive"]) == 1 and near(v["positive"][0], (220, 140), 1.5), v
        assert len(v["negative"]) == 1 and near(v["negative"][0], (40, 40), 1.5), v
        assert v["box"] and near(v["box"], (150, 60, 300, 230), 1.5), v
        # keys go to the editor, not to the graph: Delete removes the selected point (not the
        # node), Ctrl+Z undoes the editor's last edit (not the graph's)
        f.click(nid, 220, 140)
        f.page.keyboard.press("Delete")
        assert f.editor_value(nid)["positive"] == []
        f.page.keyboard.press("Control+z")
        assert f.editor_value(nid) == v
        assert f.page.evaluate("(id) => !!window.app.graph.getNodeById(id)", nid)
    elif type_ == "KinemaMotionFromDrags":
        f.drag(nid, [(120, 200), (160, 180), (200, 160)])
        for p in [(260, 60), (310, 100), (370, 80)]:
            f.click(nid, *p)
        f.click(nid, 370, 80)
        f.page.keyboard.down("Shift")
        f.click(nid, 60, 60)
        f.page.keyboard.up("Shift")
        v = f.editor_value(nid)
        assert len(v["tracks"]) == 2 and [len(t) for t in v["tracks"]] == [2, 3], v
        assert near((v["tracks"][0][1]["x"], v["tracks"][0][1]["y"]), (200, 160), 1.5), v
        assert len(v["anchors"]) == 1, v
    elif type_ == "KinemaMotionBrush":
        f.drag(nid, [(100, 150), (150, 140), (200, 130), (250, 120)])
        f.drag(nid, [(180, 100), (180, 180)], button="right")
        v = f.editor_value(nid)
        assert [s["mode"] for s in v["strokes"]] == ["paint", "erase"], v
        assert near(v["strokes"][0]["points"][0], (100, 150), 1.5), v
    return f.editor_value(nid)


@pytest.mark.parametrize("type_", list(EDITORS))
def test_editor_in_real_frontend(front, object_info, type_):
    if type_ not in object_info:
        pytest.skip(f"{type_} is not registered by the pack yet")
    f, page = front, front.page
    widget = EDITORS[type_]
    nid = page.evaluate(BUILD, [type_, consumers_for(type_, object_info)])
    # the picture from Load Image shows before any run
    page.wait_for_function("(id) => { const e = window.app.graph.getNodeById(id).__kinema.editor; return !!e.image; }",
                           arg=nid, timeout=30000)
    g = f.geom(nid)
    assert (g["W"], g["H"]) == (451, 300) and "type=input" in g["url"]
    assert page.evaluate("([id, n]) => window.app.graph.getNodeById(id).widgets.find((w) => w.name === n).hidden",
                         [nid, widget]) is True
    value = interact(f, nid, type_)
    assert json.loads(f.widget_value(nid, widget)) == value
    f.shot(f"{type_}_edited.png")

    # the JSON button shows the text widget; text typed there redraws the editor
    page.locator(".kinema-editor button[data-kinema='json']").first.click()
    page.wait_for_timeout(300)
    box = page.evaluate(JSON_BOX, [nid, widget])
    if box is not None:
        assert box[2] > 20 and box[3] > 10, box
        typed = {"KinemaClickToMask": {"positive": [[10, 20]], "negative": [], "box": None},
                 "KinemaMotionFromDrags": {"tracks": [[{"x": 10, "y": 20}, {"x": 30, "y": 40}]], "anchors": []},
                 "KinemaMotionBrush": {"strokes": [{"mode": "paint", "radius": 5, "points": [[10, 20]]}]}}[type_]
        for v in (typed, value):
            page.mouse.click(box[0], box[1])
            page.keyboard.press("Control+a")
            page.keyboard.type(json.dumps(v))
            page.wait_for_function("([id, v]) => window.app.graph.getNodeById(id).__kinema.editor.value === v",
                                   arg=[nid, json.dumps(v, separators=(",", ":"))], timeout=10000)
            if v is typed:
                f.shot(f"{type_}_json_typed.png")
    page.locator(".kinema-editor button[data-kinema='json']").first.click()
    assert page.evaluate("([id, n]) => window.app.graph.getNodeById(id).widgets.find((w) => w.name === n).hidden",
                         [nid, widget]) is True

    # graph zoom: the editor is scaled by the canvas; coordinates stay in image pixels
    page.evaluate("() => { const c = window.app.canvas; c.ds.scale = 1.4; c.ds.offset = [-120, -20]; c.setDirty(true, true); }")
    page.wait_for_timeout(400)
    g = f.geom(nid)
    assert g["rw"] == pytest.approx(1.4 * g["w"], rel=0.02)
    before = f.editor_value(nid)
    if type_ == "KinemaClickToMask":
        f.click(nid, 260, 200)                      # inside the box drawn above
        after = f.editor_value(nid)
        assert near(after["positive"][-1], (260, 200), 1.5), after
    elif type_ == "KinemaMotionFromDrags":
        f.drag(nid, [(400, 250), (430, 270)])
        after = f.editor_value(nid)
        assert near((after["tracks"][-1][0]["x"], after["tracks"][-1][0]["y"]), (400, 250), 1.5), after
    else:
        f.drag(nid, [(400, 250), (420, 260)])
        after = f.editor_value(nid)
        assert near(after["strokes"][-1]["points"][0], (400, 250), 1.5), after
    assert after != before
    f.shot(f"{type_}_zoomed.png")
    page.evaluate("() => { const c = window.app.canvas; c.ds.scale = 1; c.ds.offset = [0, 0]; c.setDirty(true, true); }")

    # the queued prompt carries the editor's value as the widget input, and nothing else of ours
    prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    inputs = prompt[str(nid)]["inputs"]
    assert json.loads(inputs[widget]) == f.editor_value(nid)
    assert "kinema_editor" not in inputs

    # points: the live mask preview (when the route exists) answers without queuing
    if type_ == "KinemaClickToMask":
        status, _ = f.server.request("/kinema/mask_preview", {})
        if status not in (404, 405):
            page.wait_for_function("""(id) => { const e = window.app.graph.getNodeById(id).__kinema.editor;
                return e.maskImage || e.error; }""", arg=nid, timeout=120000)
            err = page.evaluate("(id) => window.app.graph.getNodeById(id).__kinema.editor.error", nid)
            assert not err, err
            # no SAM is connected: without a box the status line says what a box would do
            hint = page.evaluate("(id) => window.app.graph.getNodeById(id).__kinema.editor.statusEl.textContent", nid)
            assert ("drag a box close around the object" in hint) == (f.editor_value(nid).get("box") is None), hint
            f.shot(f"{type_}_mask_preview.png")

    # run it
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    page.wait_for_function("() => window.__kinemaRuns.length > 0", timeout=900000)
    runs = page.evaluate("() => window.__kinemaRuns")
    assert runs[0][0] == "execution_success", runs
    page.wait_for_function("(id) => { const n = window.app.graph.getNodeById(id);"
                           " return n.properties.kinema_bg && n.properties.kinema_bg.type === 'temp' && n.__kinema.editor.image"
                           " && n.__kinema.editor.imageUrl.includes('type=temp'); }", arg=nid, timeout=60000)
    page.evaluate("() => window.app.graph.setDirtyCanvas(true, true)")
    page.wait_for_timeout(500)
    # no default image preview over the editor
    state = page.evaluate("""(id) => { const n = window.app.graph.getNodeById(id);
        return {imgs: (n.imgs || []).length, widgets: n.widgets.map((w) => w.name),
                overlay: !!(n.__kinema.editor.overlay)}; }""", nid)
    assert state["imgs"] == 0 and not [w for w in state["widgets"] if w.startswith("$$")], state
    sent = page.evaluate("(id) => window.__kinemaExecuted[String(id)] || null", nid) or {}
    assert sent.get("kinema_bg"), sent
    if type_ == "KinemaMotionFromDrags":
        # the flow colour preview is shown inside the editor (Flow button), not on top of it
        assert sent.get("kinema_flow") and not sent.get("images"), sent
        page.wait_for_function("(id) => !!window.app.graph.getNodeById(id).__kinema.editor.overlay", arg=nid, timeout=30000)
    f.shot(f"{type_}_after_run.png")

    # save and reopen: the value and the picture come back
    saved = page.evaluate("() => JSON.stringify(window.app.graph.serialize())")
    value = f.editor_value(nid)
    # the saved file holds the value as an ordinary widget value (what the headless runner
    # reads) and the picture reference in the node's properties
    wf = json.loads(saved)
    node = next(n for n in wf["nodes"] if str(n["id"]) == str(nid))
    api = harness.ui_to_api(wf, object_info)
    assert json.loads(api[str(nid)]["inputs"][widget]) == value
    spec = {**object_info[type_]["input"]["required"], **(object_info[type_]["input"].get("optional") or {})}
    assert len(node["widgets_values"]) == len([k for k, v in spec.items()
                                               if (isinstance(v[0], list) or v[0] in harness.WIDGET_TYPES)
                                               and not (len(v) > 1 and (v[1] or {}).get("forceInput"))])
    assert node["properties"]["kinema_bg"]["type"] == "temp"
    page.evaluate("async (wf) => { window.app.graph.clear(); await window.app.loadGraphData(JSON.parse(wf)); }", saved)
    page.wait_for_function("(id) => { const n = window.app.graph.getNodeById(id); return n && n.__kinema && n.__kinema.editor.image; }",
                           arg=nid, timeout=30000)
    assert f.editor_value(nid) == value
    assert json.loads(f.widget_value(nid, widget)) == value
    # the picture of the run (remembered in the workflow), not only the Load Image file
    assert "type=temp" in f.geom(nid)["url"]
    f.shot(f"{type_}_reopened.png")
    assert not f.our_errors(), f.our_errors()


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_in_real_frontend(front, object_info, path):
    """Every example loads in the real frontend with its editors showing their pictures; the
    weights-free ones are also queued from the page. (Workflows with models run through /prompt
    with tiny model files and CPU-sized settings in test_real_comfyui.py: queued from the page,
    as shipped, they would run at their full sizes.)"""
    f, page = front, front.page
    wf = json.loads(Path(path).read_text())
    assert "nodes" in wf, f"{path.name} is in API form; example workflows are saved from the UI"
    unknown = [n["type"] for n in wf["nodes"] if n["type"] not in object_info and n["type"] not in ("Note", "Reroute",
                                                                                                     "PrimitiveNode")]
    assert not unknown, f"{path.name} uses node types this server lacks: {unknown}"
    needs_models = any("Loader" in n["type"] for n in wf["nodes"])
    page.evaluate("async (wf) => { window.app.graph.clear(); await window.app.loadGraphData(wf); }", wf)
    page.wait_for_timeout(1500)
    ids = page.evaluate("() => window.app.graph._nodes.filter((n) => n.__kinema).map((n) => [n.id, n.type])")
    for nid, t in ids:
        page.wait_for_function("(id) => !!window.app.graph.getNodeById(id).__kinema.editor.image", arg=nid, timeout=30000)
    f.shot(f"workflow_{path.stem}_loaded.png")
    assert not f.our_errors(), f.our_errors()
    if needs_models:
        return
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    page.wait_for_function("() => window.__kinemaRuns.length > 0", timeout=900000)
    runs = page.evaluate("() => window.__kinemaRuns")
    assert runs[0][0] == "execution_success", json.dumps(runs)[:3000]
    page.wait_for_timeout(1500)
    # animated results show as an animated preview in their node
    anim = page.evaluate("""() => window.app.graph._nodes.filter((n) => n.animatedImages)
        .map((n) => [n.type, (n.imgs || []).map((i) => i.src)])""")
    for t, srcs in anim:
        assert srcs and all(".webp" in s or "webp" in s for s in srcs), (t, srcs)
    f.shot(f"workflow_{path.stem}_after_run.png")
    assert not f.our_errors(), f.our_errors()


# ----------------------------------------------------------------------------- issue-17 checks

def _open(f, url_path="/"):
    """(Re)load the page and wait for the app, as Front does."""
    f.page.goto(f.server.url + url_path)
    f.page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=120000)
    f.page.wait_for_function("window.app.extensions.some((e) => e.name === 'kinema.editors')", timeout=60000)


def _build(f, type_, object_info):
    nid = f.page.evaluate(BUILD, [type_, consumers_for(type_, object_info)])
    f.page.wait_for_function("(id) => !!window.app.graph.getNodeById(id).__kinema.editor.image", arg=nid, timeout=30000)
    return nid


def _status(f, nid):
    return f.page.evaluate("(id) => window.app.graph.getNodeById(id).__kinema.editor.statusEl.textContent", nid)


def _choose_image(f, name):
    """What picking a file in Load Image's list does: set the widget and call its callback."""
    f.page.evaluate("""(name) => { const n = window.app.graph._nodes.find((n) => n.type === 'LoadImage');
        const w = n.widgets.find((w) => w.name === 'image'); w.value = name; if (w.callback) w.callback(name);
        window.app.graph.setDirtyCanvas(true, true); }""", name)


@pytest.mark.parametrize("type_", list(EDITORS))
def test_edits_survive_a_page_reload(front, object_info, type_):
    """Edits made with the mouse mark the workflow modified, so the frontend keeps them over
    a reload (its change tracking listens for the mouse events the editor lets through)."""
    f, page = front, front.page
    nid = _build(f, type_, object_info)
    value = interact(f, nid, type_)
    assert page.evaluate("() => window.app.extensionManager.workflow.activeWorkflow.isModified") is True
    page.wait_for_timeout(1500)  # the frontend stores the workflow shortly after a change
    _open(f)
    page.wait_for_function("(id) => { const n = window.app.graph.getNodeById(id); return n && n.__kinema && n.__kinema.editor.image; }",
                           arg=nid, timeout=30000)
    assert f.editor_value(nid) == value
    assert json.loads(f.widget_value(nid, EDITORS[type_])) == value
    f.shot(f"{type_}_after_reload.png")
    assert not f.our_errors(), f.our_errors()


def _scaled(value, k):
    if "positive" in value:
        p = lambda q: [round(q[0] * k, 1), round(q[1] * k, 1)]
        return {"positive": [p(q) for q in value["positive"]], "negative": [p(q) for q in value["negative"]],
                "box": [round(v * k, 1) for v in value["box"]] if value["box"] else None}
    if "tracks" in value:
        p = lambda q: {"x": round(q["x"] * k, 1), "y": round(q["y"] * k, 1)}
        return {"tracks": [[p(q) for q in t] for t in value["tracks"]], "anchors": [p(q) for q in value["anchors"]]}
    return {"strokes": [{"mode": s["mode"], "radius": round(s["radius"] * k, 1),
                         "points": [[round(x * k, 1), round(y * k, 1)] for x, y in s["points"]]} for s in value["strokes"]]}


def _close(a, b, tol=0.11):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= tol
    return a == b


@pytest.mark.parametrize("type_", list(EDITORS))
def test_edits_follow_the_picture_when_it_changes_size(front, object_info, server, type_):
    """A larger copy of the photo: every coordinate is scaled (one undoable edit) and the
    status line says so; a picture of another shape: the edits stay and a warning says so."""
    from PIL import Image
    src = Image.open(harness.ROOT / "assets" / "chelsea.jpg")
    src.resize((902, 600), Image.LANCZOS).save(server.base / "input" / "chelsea_2x.png")
    f, page = front, front.page
    nid = _build(f, type_, object_info)
    value = interact(f, nid, type_)
    if type_ == "KinemaMotionBrush":
        assert "radius 24px" in _status(f, nid)
    _choose_image(f, "chelsea_2x.png")
    page.wait_for_function("(id) => window.app.graph.getNodeById(id).__kinema.editor.imageW === 902", arg=nid, timeout=30000)
    got = f.editor_value(nid)
    assert _close(got, _scaled(value, 2.0)), (got, value)
    assert json.loads(f.widget_value(nid, EDITORS[type_])) == got
    status = _status(f, nid)
    assert "picture 451×300 → 902×600: edits scaled ×2.00" in status, status
    if type_ == "KinemaMotionBrush":
        assert "radius 48px" in status, status
    f.shot(f"{type_}_picture_2x.png")
    page.locator(".kinema-editor button[data-kinema='undo']").first.click()
    assert f.editor_value(nid) == value
    page.locator(".kinema-editor button[data-kinema='redo']").first.click()
    # another shape (512x512): nothing moves, the warning says what happened
    before = f.editor_value(nid)
    _choose_image(f, "astronaut.jpg")
    page.wait_for_function("(id) => window.app.graph.getNodeById(id).__kinema.editor.imageW === 512", arg=nid, timeout=30000)
    assert f.editor_value(nid) == before
    status = _status(f, nid)
    assert "picture 902×600 → 512×512, another shape: edits kept at their pixel positions" in status, status
    points = [v for v in re.findall(r"-?\d+(?:\.\d+)?", json.dumps(before))]
    if any(float(v) > 511 for v in points):
        assert "outside the picture" in status, status
    f.shot(f"{type_}_picture_other_shape.png")
    assert not f.our_errors(), f.our_errors()


def test_live_mask_error_clears_at_once_and_shows_work(front, object_info):
    f, page = front, front.page
    if "KinemaSAMLoader" not in object_info:
        pytest.skip("the pack registers no SAM loader")
    status, _ = f.server.request("/kinema/mask_preview", {})
    if status in (404, 405):
        pytest.skip("the server has no live mask route")
    nid = _build(f, "KinemaClickToMask", object_info)
    # a SAM loader whose file is missing: the live mask answers an error
    page.evaluate("""(id) => { const app = window.app, LG = window.LiteGraph;
        const ld = LG.createNode("KinemaSAMLoader"); ld.pos = [20, 420]; app.graph.add(ld);
        ld.widgets.find((w) => w.name === "sam_name").value = "missing_sam.pth";
        const ed = app.graph.getNodeById(id); ld.connect(0, ed, ed.inputs.findIndex((i) => i.name === "sam")); }""", nid)
    f.click(nid, 262, 240)
    page.wait_for_function("(id) => window.app.graph.getNodeById(id).__kinema.editor.error.startsWith('mask preview:')",
                           arg=nid, timeout=60000)
    f.shot("KinemaClickToMask_mask_error.png")
    # the cause goes (the loader is disconnected): the old error goes at once, a working sign shows
    at_once = page.evaluate("""(id) => { const ed = window.app.graph.getNodeById(id);
        ed.disconnectInput(ed.inputs.findIndex((i) => i.name === "sam"));
        const e = ed.__kinema.editor; return {error: e.error, busy: e.maskBusy, status: e.statusEl.textContent}; }""", nid)
    assert at_once["error"] == "" and at_once["busy"] is True and "mask: working…" in at_once["status"], at_once
    f.shot("KinemaClickToMask_mask_working.png")
    page.wait_for_function("(id) => { const e = window.app.graph.getNodeById(id).__kinema.editor; return e.maskImage && !e.maskBusy; }",
                           arg=nid, timeout=120000)
    assert "mask score" in _status(f, nid)
    # the weights-free segmentation answered and there is no box: the status line suggests one
    assert "drag a box close around the object" in _status(f, nid)
    f.shot("KinemaClickToMask_box_hint.png")
    f.drag(nid, [(200, 190), (330, 290)])
    page.wait_for_function("""(id) => { const e = window.app.graph.getNodeById(id).__kinema.editor;
        return e.box && e.maskImage && !e.maskBusy && e.statusEl.textContent.includes("mask score"); }""",
                           arg=nid, timeout=120000)
    assert "drag a box" not in _status(f, nid), _status(f, nid)
    assert not f.our_errors(), f.our_errors()


def test_motion_strength_result_shows_on_the_node(front, object_info):
    f, page = front, front.page
    nid = _build(f, "KinemaMotionFromDrags", object_info)
    sid = page.evaluate("""(id) => { const app = window.app, LG = window.LiteGraph;
        const ed = app.graph.getNodeById(id);
        const ms = LG.createNode("KinemaMotionStrength"); ms.pos = [960, 620]; app.graph.add(ms);
        ed.connect(0, ms, ms.inputs.findIndex((i) => i.name === "motion")); return ms.id; }""", nid)
    f.drag(nid, [(120, 200), (160, 180), (200, 160)])
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    page.wait_for_function("() => window.__kinemaRuns.length > 0", timeout=600000)
    runs = page.evaluate("() => window.__kinemaRuns")
    assert runs[0][0] == "execution_success", runs
    sent = page.evaluate("(id) => window.__kinemaExecuted[String(id)]", sid)
    assert sent and "bucket" in sent["text"][0], sent
    page.wait_for_function("(id) => (window.app.graph.getNodeById(id).widgets || []).some((w) => w.name === 'kinema_result')",
                           arg=sid, timeout=30000)
    shown = page.evaluate("""(id) => { const w = window.app.graph.getNodeById(id).widgets.find((w) => w.name === 'kinema_result');
        const r = w.element.getBoundingClientRect(); return {text: w.element.textContent, w: r.width, h: r.height,
        visible: w.element.offsetParent !== null}; }""", sid)
    assert shown["text"] == sent["text"][0] and shown["visible"] and shown["w"] > 100 and shown["h"] > 10, shown
    f.shot("KinemaMotionStrength_result.png")
    assert not f.our_errors(), f.our_errors()


def test_properties_panel_leaves_the_editor_working(front, object_info):
    """Newer frontends show the selected node's widgets in a side panel: the editor is not
    drawn there (it keeps its size in the node) and still takes clicks."""
    f, page = front, front.page
    has_panel = page.evaluate("() => !!(window.app.extensionManager.setting && "
                              "window.app.extensionManager.setting.get('Comfy.RightSidePanel.IsOpen') !== undefined)")
    nid = _build(f, "KinemaClickToMask", object_info)
    before = f.geom(nid)
    page.evaluate("(id) => window.app.canvas.selectNode(window.app.graph.getNodeById(id))", nid)
    if has_panel:
        page.evaluate("async () => { await window.app.extensionManager.setting.set('Comfy.RightSidePanel.IsOpen', true); }")
        page.wait_for_timeout(1500)
    after = f.geom(nid)
    assert abs(after["rw"] - before["rw"]) < 2 and abs(after["rh"] - before["rh"]) < 2, (before, after)
    f.click(nid, 262, 240)
    assert f.editor_value(nid)["positive"] == [[262, 240]]
    f.shot("KinemaClickToMask_properties_panel.png")
    if has_panel:
        page.evaluate("async () => { await window.app.extensionManager.setting.set('Comfy.RightSidePanel.IsOpen', false); }")
    assert not f.our_errors(), f.our_errors()


@pytest.mark.parametrize("path", WORKFLOWS or [None], ids=[p.stem for p in WORKFLOWS] or ["none"])
def test_example_workflow_layout_in_real_frontend(front, path):
    """Loaded in the frontend (its own node sizes, editors attached), no node covers another:
    notes stay off editors and previews. Checked for every workflow, model files or not."""
    if path is None:
        pytest.skip("no example workflows in workflows/")
    f, page = front, front.page
    wf = json.loads(Path(path).read_text())
    page.evaluate("async (wf) => { window.app.graph.clear(); await window.app.loadGraphData(wf); }", wf)
    page.wait_for_timeout(1000)
    boxes = page.evaluate("""() => window.app.graph._nodes.map((n) => [String(n.id), n.type, Array.from(n.getBounding())])""")
    hits = []
    for i, (ia, ta, A) in enumerate(boxes):
        for ib, tb, B in boxes[i + 1:]:
            if A[0] < B[0] + B[2] and B[0] < A[0] + A[2] and A[1] < B[1] + B[3] and B[1] < A[1] + A[3]:
                hits.append(f"{ia} {ta} / {ib} {tb}")
    assert not hits, hits
    f.shot(f"workflow_{path.stem}_layout.png")


def test_workflow_without_its_model_file_says_what_did_not_run(front, object_info):
    """dynamicrafter_animate_clicked_object.json without the DynamiCrafter file: the server runs
    the mask branch only; the page says which node was left out and why."""
    f, page = front, front.page
    wf = json.loads((harness.ROOT / "workflows" / "dynamicrafter_animate_clicked_object.json").read_text())
    loader = next(n for n in wf["nodes"] if n["type"] == "KinemaDynamiCrafterLoader")
    loader["widgets_values"][0] = "not_installed_dynamicrafter.ckpt"  # a file the server does not have
    missing = harness.missing_choices(harness.ui_to_api(wf, object_info), object_info)
    assert missing
    page.evaluate("async (wf) => { window.app.graph.clear(); await window.app.loadGraphData(wf); }", wf)
    page.wait_for_timeout(1500)
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    toast = page.get_by_text("Part of the workflow did not run").first
    toast.wait_for(state="visible", timeout=30000)
    text = page.evaluate("() => document.body.innerText")
    loader = next(n for n in wf["nodes"] if n["type"] == "KinemaDynamiCrafterLoader")
    assert f"(#{loader['id']})" in text and "not in" in text and "models folder" in text, text[-2000:]
    f.shot("workflow_dynamicrafter_missing_model_message.png")
    page.wait_for_function("() => window.__kinemaRuns.length > 0", timeout=600000)  # the mask branch ran
    assert page.evaluate("() => window.__kinemaRuns")[0][0] == "execution_success"
