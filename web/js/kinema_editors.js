// ComfyUI glue for Kinema's in-node editors. Kept thin: the editors themselves
// (kinema_points.js, kinema_drags.js, kinema_brush.js) know nothing about ComfyUI.
//
// For each editor node the JSON text widget stays the value store (so a saved workflow and
// the API prompt carry ordinary widget values) but is hidden; the editor writes it on every
// edit and redraws when it changes from elsewhere (typed in, pasted, a loaded workflow).

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { PointsEditor } from "./kinema_points.js";
import { DragsEditor } from "./kinema_drags.js";
import { BrushEditor } from "./kinema_brush.js";

const BG = "kinema_bg";            // node.properties: {filename, subfolder, type} of the picture shown
const BG_SIZE = "kinema_bg_size";  // node.properties: [width, height] of that picture
const EDITOR_WIDGET = "kinema_editor";
const MIN_EDITOR_HEIGHT = 260;
const UPSTREAM_POLL_MS = 500;  // how often the upstream Load Image is checked

const SPECS = {
  KinemaClickToMask: {
    widget: "points",
    make: (node) => new PointsEditor({ maskFetcher: (value) => fetchMask(node, value) }),
  },
  KinemaMotionFromDrags: {
    widget: "tracks",
    frames: "frames",
    overlay: true,
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
};

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

/** The picture feeding the node's `image` input before any run: a Load Image node
 *  upstream (directly or through Reroute nodes). */
function upstreamImage(node) {
  let cur = node;
  let slot = cur.inputs ? cur.inputs.findIndex((i) => i.name === "image") : -1;
  for (let hops = 0; hops < 16 && slot >= 0; hops++) {
    const src = cur.getInputNode ? cur.getInputNode(slot) : null;
    if (!src) return null;
    const cls = src.comfyClass || src.type || "";
    if (cls === "Reroute") { cur = src; slot = 0; continue; }
    const w = src.widgets && src.widgets.find((x) => x.name === "image");
    if (/^LoadImage/.test(cls) && w && typeof w.value === "string" && w.value) return parseImageValue(w.value);
    return null;
  }
  return null;
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

function hideWidget(node, w) {
  w.hidden = true;                       // frontend >= 1.16
  w.computeSize = () => [0, -4];         // older frontends
  if (w.element) w.element.style.display = "none";
}

function showWidget(node, w, show) {
  w.hidden = !show;
  if (show) delete w.computeSize; else w.computeSize = () => [0, -4];
  if (w.element) w.element.style.display = show ? "" : "none";
  const min = node.computeSize();
  node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
  node.setDirtyCanvas(true, true);
}

function setBackground(node, ref, { remember = true, bust = false } = {}) {
  const st = node.__kinema;
  if (!st || !ref || !ref.filename) return Promise.resolve(false);
  const clean = { filename: ref.filename, subfolder: ref.subfolder || "", type: ref.type || "input" };
  if (remember) node.properties[BG] = clean;
  st.bgKey = refKey(clean);
  return st.editor.setImage(viewUrl(clean, bust)).then((ok) => {
    if (ok) node.properties[BG_SIZE] = [st.editor.imageW, st.editor.imageH];
    return ok;
  });
}

/** Called on every draw of the node: keeps the editor and the widgets in step. */
function sync(node) {
  const st = node.__kinema;
  if (!st) return;
  const v = st.jsonWidget.value;
  if (v !== st.lastValue) {
    // typed into the JSON widget (undoable), or a loaded workflow (the first value)
    st.editor.setValue(v, { keepUndo: true, undoable: st.lastValue !== undefined });
    st.lastValue = v;
  }
  if (st.framesWidget) st.editor.setFrames(st.framesWidget.value);
  else if (st.spec.fixedFrames) st.editor.setFrames(st.spec.fixedFrames);
  const up = upstreamImage(node);
  const upKey = refKey(up);
  if (!st.started) {
    st.started = true;
    st.upKey = upKey;
    const size = node.properties[BG_SIZE];
    if (Array.isArray(size) && size.length === 2) st.editor.setImageSize(size[0], size[1]);
    const saved = node.properties[BG];
    if (saved && saved.filename) {
      // a temp picture from an earlier session may be gone: fall back to Load Image
      setBackground(node, saved).then((ok) => { if (!ok && up) setBackground(node, up); });
    } else if (up) setBackground(node, up);
  } else if (upKey !== st.upKey) {
    st.upKey = upKey;
    if (up) setBackground(node, up);
  }
}

function attach(node, spec) {
  if (node.__kinema) return;
  const jsonWidget = node.widgets && node.widgets.find((w) => w.name === spec.widget);
  if (!jsonWidget) return;
  node.properties = node.properties || {};
  const editor = spec.make(node);
  const st = { spec, editor, jsonWidget, lastValue: undefined, started: false, upKey: "", bgKey: "" };
  st.framesWidget = spec.frames ? node.widgets.find((w) => w.name === spec.frames) : null;
  node.__kinema = st;

  editor.onChange = (value) => {
    st.lastValue = value;
    jsonWidget.value = value;
    node.setDirtyCanvas(true, false);
  };
  editor.addButton("JSON", "Show or hide the stored value as text", (b) => {
    const show = !!jsonWidget.hidden;
    showWidget(node, jsonWidget, show);
    b.classList.toggle("kinema-on", show);
  });
  hideWidget(node, jsonWidget);

  const dom = node.addDOMWidget(EDITOR_WIDGET, EDITOR_WIDGET, editor.root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => MIN_EDITOR_HEIGHT,
    onDraw: () => sync(node),
  });
  dom.serialize = false;
  dom.serializeValue = () => undefined;

  const min = node.computeSize();
  node.setSize([Math.max(node.size[0], 420, min[0]), Math.max(node.size[1], 460, min[1])]);
  // first look after the current task: a workflow being loaded configures the node (widget
  // values, properties with the remembered picture, links) right after creating it
  setTimeout(() => sync(node), 0);
  // the picture upstream can change without this node being drawn (a new Load Image choice)
  st.timer = setInterval(() => sync(node), UPSTREAM_POLL_MS);
}

app.registerExtension({
  name: "kinema.editors",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const spec = SPECS[nodeData.name];
    if (!spec) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created ? created.apply(this, arguments) : undefined;
      attach(this, spec);
      return r;
    };
    // The editor is the node's picture: no default image preview drawn over it.
    nodeType.prototype.onDrawBackground = function () {};
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = executed ? executed.apply(this, arguments) : undefined;
      const st = this.__kinema;
      if (st && message) {
        const bg = message[BG] && message[BG][0];
        if (bg) setBackground(this, bg, { bust: true });
        if (spec.overlay && st.editor.setOverlay && message.images && message.images[0]) {
          st.editor.setOverlay(viewUrl(message.images[0], true)).then((ok) => {
            if (ok) { st.editor.showOverlay = true; st.editor._updateButtons(); st.editor.redraw(); }
          });
        }
      }
      return r;
    };
    const removed = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      const st = this.__kinema;
      if (st) { clearInterval(st.timer); clearTimeout(st.editor._maskTimer); st.editor.destroy(); this.__kinema = null; }
      return removed ? removed.apply(this, arguments) : undefined;
    };
  },
});
