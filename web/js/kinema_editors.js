// ComfyUI glue for Kinema's in-node editors. Kept thin: the editors themselves
// (kinema_points.js, kinema_drags.js, kinema_brush.js) know nothing about ComfyUI, and this
// file uses only their public methods.
//
// For each editor node the JSON text widget stays the value store (so a saved workflow and
// the API prompt carry ordinary widget values) but is hidden; the editor writes it on every
// edit and redraws when it changes from elsewhere (typed in, pasted, a loaded workflow).
// The glue composes with the frontend and other extensions: every callback it sets on a node
// or widget calls the one that was there before, and it reacts to events (connections,
// Load Image choices, workflow loading, runs) rather than polling.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { PointsEditor } from "./kinema_points.js";
import { DragsEditor } from "./kinema_drags.js";
import { BrushEditor } from "./kinema_brush.js";

const BG = "kinema_bg";            // node.properties: {filename, subfolder, type} of the picture shown
const BG_SIZE = "kinema_bg_size";  // node.properties: [width, height] of that picture
const EDITOR_WIDGET = "kinema_editor";
const RESULT_WIDGET = "kinema_result";
const MIN_EDITOR_HEIGHT = 260;

const SPECS = {
  KinemaClickToMask: {
    widget: "points",
    make: (node) => new PointsEditor({ maskFetcher: (value) => fetchMask(node, value) }),
    maskInputs: ["multimask"],     // widgets whose change asks for a new live mask
  },
  KinemaMotionFromDrags: {
    widget: "tracks",
    frames: "frames",
    make: () => new DragsEditor(),
  },
  KinemaMotionBrush: {
    widget: "strokes",
    make: () => new BrushEditor(),
  },
  // Model nodes with a fixed frame count: the editor shows that count along each path.
  KinemaMotionI2VPredictMotion: {
    widget: "tracks",
    fixedFrames: 16,
    make: () => new DragsEditor(),
  },
  KinemaPuppetMasterAnimate: {
    widget: "tracks",
    fixedFrames: 14,
    make: () => new DragsEditor(),
  },
  KinemaPuppetMasterConditioning: {
    widget: "tracks",
    fixedFrames: 14,
    make: () => new DragsEditor(),
  },
};
// Nodes whose text results (ui.text) are shown in the node.
const TEXT_RESULTS = new Set(["KinemaMotionStrength"]);

/** Set `obj[name]` to a function that runs the previous one (if any) first, then `fn`;
 *  returns what the previous one returned. */
function chain(obj, name, fn) {
  const before = obj[name];
  obj[name] = function () {
    const r = typeof before === "function" ? before.apply(this, arguments) : undefined;
    fn.apply(this, arguments);
    return r;
  };
}

/** Like chain(), for a method that returns a promise: `fn` sees what it resolves to. */
function chainAsync(obj, name, fn) {
  const before = obj[name];
  if (typeof before !== "function") return;
  obj[name] = async function () {
    const r = await before.apply(this, arguments);
    try { fn(r); } catch (e) { console.error(e); }
    return r;
  };
}

function viewUrl(ref, bust = false) {
  const q = new URLSearchParams({ filename: ref.filename, subfolder: ref.subfolder || "", type: ref.type || "input" });
  if (bust) q.set("t", String(Date.now()));
  return api.apiURL(`/view?${q.toString()}`);
}

const refKey = (ref) => (ref ? `${ref.type || "input"}/${ref.subfolder || ""}/${ref.filename}` : "");

/** "dir/name.png [input]" (a Load Image widget value) -> {filename, subfolder, type}. */
export function parseImageValue(value) {
  let s = String(value).trim();
  let type = "input";
  const m = s.match(/^(.*)\s\[(input|output|temp)\]$/);
  if (m) { s = m[1]; type = m[2]; }
  const i = s.lastIndexOf("/");
  return { filename: s.slice(i + 1), subfolder: i >= 0 ? s.slice(0, i) : "", type };
}

const isLoadImage = (node) => /^LoadImage/.test(node.comfyClass || node.type || "");
const isReroute = (node) => (node.comfyClass || node.type) === "Reroute";

/** The picture feeding the node's `image` input before any run: a Load Image node
 *  upstream (directly or through Reroute nodes). */
function upstreamImage(node) {
  let cur = node;
  let slot = cur.inputs ? cur.inputs.findIndex((i) => i.name === "image") : -1;
  for (let hops = 0; hops < 16 && slot >= 0; hops++) {
    const src = cur.getInputNode ? cur.getInputNode(slot) : null;
    if (!src) return null;
    if (isReroute(src)) { cur = src; slot = 0; continue; }
    const w = src.widgets && src.widgets.find((x) => x.name === "image");
    if (isLoadImage(src) && w && typeof w.value === "string" && w.value) return parseImageValue(w.value);
    return null;
  }
  return null;
}

/** Editor nodes fed by `node` (through Reroute nodes). */
function editorsDownstream(node, seen = new Set()) {
  const out = [];
  if (!node || seen.has(node.id)) return out;
  seen.add(node.id);
  for (const o of node.outputs || []) {
    for (const id of o.links || []) {
      const link = node.graph && (node.graph.links.get ? node.graph.links.get(id) : node.graph.links[id]);
      const dst = link && node.graph.getNodeById(link.target_id);
      if (!dst) continue;
      if (dst.__kinema) out.push(dst);
      else if (isReroute(dst)) out.push(...editorsDownstream(dst, seen));
    }
  }
  return out;
}

/** The SAM file the node will use: the `sam` input followed to a SAM loader's model widget
 *  ("" = the weights-free segmentation). */
function samName(node) {
  const slot = node.inputs ? node.inputs.findIndex((i) => i.name === "sam") : -1;
  const src = slot >= 0 && node.getInputNode ? node.getInputNode(slot) : null;
  if (!src || !src.widgets) return "";
  const w = src.widgets.find((x) => x.name === "sam_name") || src.widgets.find((x) => /sam|model/.test(x.name));
  return w && typeof w.value === "string" ? w.value : "";
}

async function fetchMask(node, pointsJSON) {
  const ref = node.properties && node.properties[BG];
  if (!ref || !ref.filename) return null;
  const mm = node.widgets && node.widgets.find((w) => w.name === "multimask");
  const res = await api.fetchApi("/kinema/mask_preview", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ image: { filename: ref.filename, subfolder: ref.subfolder || "", type: ref.type || "input" },
                           points: pointsJSON, sam: samName(node),
                           multimask: mm ? !!mm.value : true }),
  });
  let body = {};
  try { body = await res.json(); } catch (_) { /* not JSON */ }
  if (res.status === 404 || res.status === 405) {
    const e = new Error("not available on this server");
    e.unavailable = true;
    throw e;
  }
  if (!res.ok) throw new Error(body.error || `server answered ${res.status}`);
  return body;
}

/** A hidden DOM widget takes no room: its layout options (the DOM-widget API) answer 0
 *  while it is hidden, and what they answered before while it is shown. */
function collapseWhenHidden(w) {
  const o = w.options || (w.options = {});
  for (const key of ["getMinHeight", "getMaxHeight", "getHeight"]) {
    const before = o[key];
    o[key] = () => (w.hidden ? 0 : typeof before === "function" ? before() : undefined);
  }
}

/** Show or hide a widget (frontends >= 1.16 lay out only visible widgets). */
function showWidget(node, w, show) {
  w.hidden = !show;
  if (w.element) w.element.style.display = show ? "" : "none";
  const min = node.computeSize();
  node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
  node.setDirtyCanvas(true, true);
}

/** Tell the frontend's change tracking that the workflow changed (an edit in the editor is
 *  not a graph-canvas gesture it sees by itself, e.g. keys typed to the editor). */
function markChanged(node) {
  const canvas = app.canvas;
  if (canvas && canvas.emitBeforeChange && canvas.emitAfterChange) {
    canvas.emitBeforeChange();
    canvas.emitAfterChange();
  }
  node.setDirtyCanvas(true, false);
}

function setBackground(node, ref, { remember = true, bust = false } = {}) {
  const st = node.__kinema;
  if (!st || !ref || !ref.filename) return Promise.resolve(false);
  const clean = { filename: ref.filename, subfolder: ref.subfolder || "", type: ref.type || "input" };
  if (remember) node.properties[BG] = clean;
  return st.editor.setImage(viewUrl(clean, bust)).then((ok) => {
    if (ok) node.properties[BG_SIZE] = [st.editor.imageW, st.editor.imageH];
    return ok;
  });
}

/** The JSON widget changed from elsewhere (typed in, a loaded workflow): the editor follows. */
function syncValue(node) {
  const st = node.__kinema;
  if (!st) return;
  const v = st.jsonWidget.value;
  if (v !== st.lastValue) {
    st.editor.setValue(v, { keepUndo: true, undoable: st.lastValue !== undefined });
    st.lastValue = v;
  }
  if (st.framesWidget) st.editor.setFrames(st.framesWidget.value);
  else if (st.spec.fixedFrames) st.editor.setFrames(st.spec.fixedFrames);
}

/** The picture upstream may have changed (a connection, a Load Image choice): show it. */
function syncPicture(node) {
  const st = node.__kinema;
  if (!st || !st.started) return;
  const up = upstreamImage(node);
  const key = refKey(up);
  if (key === st.upKey) return;
  st.upKey = key;
  if (up) setBackground(node, up);
}

/** First look, once the node is configured (a loaded workflow sets values, properties with
 *  the remembered picture and links right after creating the node). */
function start(node) {
  const st = node.__kinema;
  if (!st || st.started) return;
  st.started = true;
  syncValue(node);
  const up = upstreamImage(node);
  st.upKey = refKey(up);
  const size = node.properties[BG_SIZE];
  if (Array.isArray(size) && size.length === 2) st.editor.setImageSize(size[0], size[1]);
  const saved = node.properties[BG];
  if (saved && saved.filename) {
    // a temp picture from an earlier session may be gone: fall back to Load Image
    setBackground(node, saved).then((ok) => { if (!ok && up) setBackground(node, up); });
  } else if (up) setBackground(node, up);
}

function attach(node, spec) {
  if (node.__kinema) return;
  const jsonWidget = node.widgets && node.widgets.find((w) => w.name === spec.widget);
  if (!jsonWidget) return;
  node.properties = node.properties || {};
  const editor = spec.make(node);
  const st = { spec, editor, jsonWidget, lastValue: undefined, started: false, upKey: "" };
  st.framesWidget = spec.frames ? node.widgets.find((w) => w.name === spec.frames) : null;
  node.__kinema = st;

  editor.onChange = (value) => {
    st.lastValue = value;
    jsonWidget.value = value;
    markChanged(node);
  };
  editor.addButton("JSON", "Show or hide the stored value as text", (b) => {
    const show = !!jsonWidget.hidden;
    showWidget(node, jsonWidget, show);
    b.classList.toggle("kinema-on", show);
  });
  jsonWidget.hidden = true;
  collapseWhenHidden(jsonWidget);
  if (jsonWidget.element) jsonWidget.element.style.display = "none";
  chain(jsonWidget, "callback", () => syncValue(node));
  if (st.framesWidget) chain(st.framesWidget, "callback", () => syncValue(node));
  for (const name of spec.maskInputs || []) {
    const w = node.widgets.find((x) => x.name === name);
    if (w && editor.requestMask) chain(w, "callback", () => editor.requestMask());
  }

  const dom = node.addDOMWidget(EDITOR_WIDGET, EDITOR_WIDGET, editor.root, {
    serialize: false,
    hideOnZoom: false,
    hideInPanel: true,            // the properties panel (frontend >= 1.4x) cannot host the editor
    getMinHeight: () => MIN_EDITOR_HEIGHT,
    onDraw: () => syncValue(node),
  });
  dom.serialize = false;          // not in widgets_values (older frontends read the property)

  const min = node.computeSize();
  node.setSize([Math.max(node.size[0], 420, min[0]), Math.max(node.size[1], 460, min[1])]);
  // nodes added by hand have no configure step: start after the current task
  setTimeout(() => start(node), 0);
}

/** A read-only text area under the node's widgets for its text results (ui.text). */
function showText(node, lines) {
  let w = node.widgets && node.widgets.find((x) => x.name === RESULT_WIDGET);
  if (!w) {
    const el = document.createElement("div");
    el.className = "kinema-result";
    el.style.cssText = "font:12px/1.4 monospace;color:#ddd;background:#1b1b1b;border-radius:4px;" +
                       "padding:4px 6px;white-space:pre-wrap;overflow:auto;box-sizing:border-box;user-select:text;";
    w = node.addDOMWidget(RESULT_WIDGET, "kinema_text", el, { serialize: false, hideOnZoom: false,
                                                              getMinHeight: () => 44 });
    w.serialize = false;
  }
  w.element.textContent = lines.join("\n");
  const min = node.computeSize();
  node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
  node.setDirtyCanvas(true, true);
}

/** The server ran part of a queued workflow and left out the outputs whose nodes failed
 *  validation (most often a model file that is not installed): say which and why, instead
 *  of a run that quietly does less. */
function reportSkipped(res) {
  const errors = res && res.node_errors;
  if (!errors || typeof errors !== "object" || !Object.keys(errors).length) return;
  const lines = Object.entries(errors).map(([id, e]) => {
    const node = app.graph && app.graph.getNodeById(id);
    const name = (node && node.title) || (e && e.class_type) || `node ${id}`;
    const why = ((e && e.errors) || []).map((x) => x.details || x.message).filter(Boolean).join("; ");
    return `${name} (#${id}): ${why || "not valid"}`;
  });
  const detail = `${lines.join("\n")}\nThe rest of the workflow ran. A missing model file goes in ComfyUI's models ` +
                 "folder (the node's tooltip names the sub-folder); then press Refresh (R) and pick it.";
  const toast = app.extensionManager && app.extensionManager.toast;
  if (toast && toast.add) toast.add({ severity: "warn", summary: "Part of the workflow did not run", detail, life: 20000 });
  else console.warn(`Part of the workflow did not run:\n${detail}`);
}

app.registerExtension({
  name: "kinema.editors",
  setup() {
    chainAsync(api, "queuePrompt", reportSkipped);
  },
  nodeCreated(node) {
    // a new Load Image choice or a re-wired Reroute changes the picture of the editors below
    if (isLoadImage(node)) {
      const w = node.widgets && node.widgets.find((x) => x.name === "image");
      if (w) chain(w, "callback", () => editorsDownstream(node).forEach(syncPicture));
    }
    if (isReroute(node)) {
      chain(node, "onConnectionsChange", () => editorsDownstream(node).forEach(syncPicture));
    }
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (TEXT_RESULTS.has(nodeData.name)) {
      chain(nodeType.prototype, "onExecuted", function (message) {
        if (message && Array.isArray(message.text)) showText(this, message.text.map(String));
      });
    }
    const spec = SPECS[nodeData.name];
    if (!spec) return;
    chain(nodeType.prototype, "onNodeCreated", function () { attach(this, spec); });
    chain(nodeType.prototype, "onConfigure", function () {
      // values, properties and links are all in once the whole graph is configured
      const st = this.__kinema;
      if (st) setTimeout(() => { st.started = false; start(this); }, 0);
    });
    chain(nodeType.prototype, "onConnectionsChange", function () {
      const st = this.__kinema;
      if (!st) return;
      syncPicture(this);
      if (st.editor.requestMask) st.editor.requestMask();   // the SAM input may have changed
    });
    chain(nodeType.prototype, "onExecuted", function (message) {
      const st = this.__kinema;
      if (!st || !message) return;
      const bg = message[BG] && message[BG][0];
      if (bg) setBackground(this, bg, { bust: true });
      const flow = message.kinema_flow && message.kinema_flow[0];
      if (flow && st.editor.setOverlay) st.editor.setOverlay(viewUrl(flow, true), { show: true });
    });
    chain(nodeType.prototype, "onRemoved", function () {
      const st = this.__kinema;
      if (st) { st.editor.destroy(); this.__kinema = null; }
    });
  },
});
