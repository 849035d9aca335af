// Shared canvas for Kinema's in-node editors (points, drags, motion brush).
//
// Coordinates are kept in image pixels (x right, y down, origin at the top-left pixel).
// The picture is fitted into the canvas (letterboxed); every mouse position goes through
// the current fit, so stored values do not change when the node is resized or the graph is
// zoomed (a CSS transform on an ancestor is measured through getBoundingClientRect).
//
// This module and the editors built on it import nothing from ComfyUI: a plain page can
// load them (tests/web/index.html does).

export const round1 = (v) => Math.round(v * 10) / 10;
export const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));

/** A stored point, {x, y} or [x, y], -> [x, y] rounded to 0.1 px; `what` names it in errors. */
export function readPoint(p, what) {
  let x, y;
  if (Array.isArray(p) && p.length >= 2) [x, y] = p;
  else if (p && typeof p === "object" && "x" in p && "y" in p) ({ x, y } = p);
  else throw new Error(`${what}: ${JSON.stringify(p)} is not a point`);
  x = Number(x); y = Number(y);
  if (!Number.isFinite(x) || !Number.isFinite(y)) throw new Error(`${what}: ${JSON.stringify(p)} is not a number pair`);
  return [round1(x), round1(y)];
}

// Colours for tracks / points, chosen to stay readable on photographs.
export const PALETTE = ["#ff4d4d", "#4da6ff", "#ffd11a", "#4dff88", "#ff66e0", "#ff9933",
                        "#33ffff", "#b380ff", "#c8ff4d", "#ffffff"];

const STYLE_ID = "kinema-editor-style";
const CSS = `
.kinema-editor { position:relative; display:flex; flex-direction:column; width:100%; height:100%; box-sizing:border-box;
  gap:3px; font:11px/1.3 system-ui, sans-serif; color:#ddd; user-select:none; min-height:0; }
.kinema-toolbar { display:flex; flex-wrap:wrap; gap:3px; align-items:center; flex:0 0 auto; }
.kinema-toolbar button { font:inherit; color:#ddd; background:#333; border:1px solid #555;
  border-radius:4px; padding:1px 7px; cursor:pointer; }
.kinema-toolbar button:hover { background:#444; }
.kinema-toolbar button.kinema-on { background:#2d5b8a; border-color:#6aa9e9; color:#fff; }
.kinema-toolbar button:disabled { opacity:.45; cursor:default; }
.kinema-toolbar label { display:flex; gap:3px; align-items:center; }
.kinema-toolbar input[type=range] { width:64px; }
.kinema-canvas { flex:1 1 auto; width:100%; min-height:40px; display:block; background:#1b1b1b;
  border-radius:4px; outline:none; touch-action:none; cursor:crosshair; }
.kinema-editor:focus-within .kinema-canvas { box-shadow:0 0 0 1px #6aa9e9; }
.kinema-keys { position:absolute; left:0; top:0; width:1px; height:1px; opacity:0; padding:0; border:0;
  pointer-events:none; }
.kinema-status { flex:0 0 auto; min-height:14px; max-height:2.6em; overflow:hidden; color:#aaa;
  display:-webkit-box; -webkit-box-orient:vertical; -webkit-line-clamp:2; }
.kinema-status .kinema-error { color:#ff8080; }
`;

function injectStyle(doc) {
  if (doc.getElementById(STYLE_ID)) return;
  const s = doc.createElement("style");
  s.id = STYLE_ID;
  s.textContent = CSS;
  doc.head.appendChild(s);
}

/** Distance from point p to segment a-b (all [x, y]). */
export function distToSegment(p, a, b) {
  const dx = b[0] - a[0], dy = b[1] - a[1];
  const len2 = dx * dx + dy * dy;
  let t = len2 > 0 ? ((p[0] - a[0]) * dx + (p[1] - a[1]) * dy) / len2 : 0;
  t = clamp(t, 0, 1);
  return Math.hypot(p[0] - (a[0] + t * dx), p[1] - (a[1] + t * dy));
}

/**
 * Base class: a toolbar, a canvas showing the picture, a status line, an undo stack and
 * pointer handling. Subclasses implement:
 *   getState() -> plain object (what is stored), setState(obj), parse(text) -> obj (throws),
 *   drawOverlay(ctx), onPointerDown(p) -> gesture {move(p), up(p)} | null,
 *   optional onKey(e) -> bool, onHover(p), defaultHint().
 * `p` (a pointer sample) = {cx, cy (canvas CSS px), x, y (image px), button, shift, alt, ctrl,
 *   moved (left the click radius since pressing), dist (CSS px from the press)}.
 */
export class KinemaCanvas {
  constructor(opts = {}) {
    this.doc = opts.document || document;
    injectStyle(this.doc);
    this.onChange = opts.onChange || null;   // (jsonString) => void, after every edit
    this.imageW = opts.width || 512;          // picture size in pixels (default before one is known)
    this.imageH = opts.height || 512;
    this.image = null;                        // HTMLImageElement when loaded
    this.imageUrl = null;
    this.imageError = null;
    this.undoStack = [];
    this.redoStack = [];
    this.maxUndo = opts.maxUndo || 200;
    this.clickRadius = 4;                     // CSS px a press may move and still count as a click
    this.hitRadius = 9;                       // CSS px around handles
    this.gesture = null;
    this.hover = null;
    this.message = "";
    this.error = "";
    this.sizeKnown = false;                   // imageW/H came from a picture or a stored size

    const d = this.doc;
    this.root = d.createElement("div");
    this.root.className = "kinema-editor";
    this.toolbar = d.createElement("div");
    this.toolbar.className = "kinema-toolbar";
    this.canvas = d.createElement("canvas");
    this.canvas.className = "kinema-canvas";
    // Keys go to a hidden read-only text field focused on press: hosts (ComfyUI's graph
    // canvas, its undo tracker) leave keys typed into a text field alone, so Delete and
    // Ctrl+Z act on the editor and not on the graph.
    this.keySink = d.createElement("input");
    this.keySink.className = "kinema-keys";
    this.keySink.readOnly = true;
    this.keySink.tabIndex = 0;
    this.keySink.setAttribute("aria-label", "editor keyboard");
    this.statusEl = d.createElement("div");
    this.statusEl.className = "kinema-status";
    this.root.append(this.toolbar, this.canvas, this.statusEl, this.keySink);
    this.ctx = this.canvas.getContext("2d");

    this._bindEvents();
    if (typeof ResizeObserver !== "undefined") {
      this._ro = new ResizeObserver(() => this.redraw());
      this._ro.observe(this.canvas);
    }
  }

  // ---- value -------------------------------------------------------------------------
  get value() { return JSON.stringify(this.getState()); }

  /** Replace the state from a JSON string (e.g. typed into the widget). Does not call
   *  onChange; returns false (and shows the error) when the text cannot be read.
   *  keepUndo: keep the undo history; undoable: the replacement itself can be undone. */
  setValue(text, { keepUndo = false, undoable = false } = {}) {
    let obj;
    try {
      obj = this.parse(text);
    } catch (e) {
      this.setError(`cannot read value: ${e.message || e}`);
      return false;
    }
    if (undoable && JSON.stringify(obj) !== this.value) this.checkpoint();
    this.setState(obj);
    if (!keepUndo) { this.undoStack = []; this.redoStack = []; }
    this.setError("");
    this.redraw();
    this._updateButtons();
    return true;
  }

  /** Call before a change, so it can be undone. A note about the last picture change goes. */
  checkpoint() {
    if (this.message) this.setMessage("");
    this.undoStack.push(this.value);
    if (this.undoStack.length > this.maxUndo) this.undoStack.shift();
    this.redoStack = [];
  }

  /** Call after a change: stores the value (onChange) and redraws. */
  changed() {
    this.redraw();
    this._updateButtons();
    if (this.onChange) this.onChange(this.value);
    this.afterChange();
  }

  afterChange() {}

  undo() {
    if (!this.undoStack.length) return false;
    this.redoStack.push(this.value);
    this.setState(JSON.parse(this.undoStack.pop()));
    this.changed();
    return true;
  }

  redo() {
    if (!this.redoStack.length) return false;
    this.undoStack.push(this.value);
    this.setState(JSON.parse(this.redoStack.pop()));
    this.changed();
    return true;
  }

  clear() {
    const empty = this.parse("");
    if (JSON.stringify(empty) === this.value) return;
    this.checkpoint();
    this.setState(empty);
    this.changed();
  }

  // ---- picture -----------------------------------------------------------------------
  /** Show a picture (URL). Resolves to true once drawn, false when it failed to load. */
  setImage(url) {
    if (!url) {
      this.image = null; this.imageUrl = null; this.imageError = null;
      this.redraw();
      return Promise.resolve(false);
    }
    if (url === this.imageUrl && (this.image || this._loading)) return this._loading || Promise.resolve(true);
    this.imageUrl = url;
    const img = new Image();
    this._loading = new Promise((resolve) => {
      img.onload = () => {
        if (this.imageUrl !== url) return resolve(false);
        const before = this.sizeKnown ? [this.imageW, this.imageH] : null;
        this.image = img;
        this.imageError = null;
        this.imageW = img.naturalWidth;
        this.imageH = img.naturalHeight;
        this.sizeKnown = true;
        this._loading = null;
        if (before && (before[0] !== this.imageW || before[1] !== this.imageH)) this._resized(before);
        this.redraw();
        this.onImage();
        resolve(true);
      };
      img.onerror = () => {
        if (this.imageUrl !== url) return resolve(false);
        this.image = null;
        this.imageError = "picture could not be loaded";
        this._loading = null;
        this.redraw();
        resolve(false);
      };
    });
    img.src = url;
    return this._loading;
  }

  /** Picture size when no picture is shown (coordinates are still image pixels), e.g. the
   *  size the stored value was made for. */
  setImageSize(w, h) {
    if (this.image) return;
    this.imageW = Math.max(1, Math.round(w));
    this.imageH = Math.max(1, Math.round(h));
    this.sizeKnown = true;
    this.redraw();
  }

  /** The picture now has another size than the one the edits were made on. The same
   *  picture at another resolution (same shape within 1%): every coordinate is scaled, as
   *  one undoable edit. Another shape: the edits keep their pixel positions and the status
   *  line says so (and how many lie outside). */
  _resized([w0, h0]) {
    const sx = this.imageW / w0, sy = this.imageH / h0;
    const empty = JSON.stringify(this.parse("")) === this.value;
    const change = `picture ${w0}×${h0} → ${this.imageW}×${this.imageH}`;
    if (empty) { this.setMessage(""); return; }
    if (Math.abs(sx / sy - 1) <= 0.01) {
      this.checkpoint();
      this.setState(this.scaledState(JSON.parse(this.value), sx, sy));
      this.setMessage(`${change}: edits scaled ×${sx.toFixed(2)} (Undo keeps the old positions)`);
      this.changed();
      return;
    }
    const outside = this.pointsOf(this.getState()).filter(([x, y]) => x > this.imageW - 1 || y > this.imageH - 1).length;
    this.setMessage(`${change}, another shape: edits kept at their pixel positions` +
                    (outside ? `, ${outside} outside the picture` : "") + " — check them", { warn: true });
  }

  /** The state with every coordinate multiplied by (sx, sy); subclasses override. */
  scaledState(state, _sx, _sy) { return state; }

  /** Every [x, y] of a state (for the checks above); subclasses override. */
  pointsOf(_state) { return []; }

  onImage() {}

  // ---- geometry ----------------------------------------------------------------------
  /** Current fit of the picture in the canvas (CSS px). */
  layout() {
    const w = this.canvas.clientWidth || 1, h = this.canvas.clientHeight || 1;
    const pad = 6;
    const s = Math.max(1e-6, Math.min((w - 2 * pad) / this.imageW, (h - 2 * pad) / this.imageH));
    return { w, h, s, ox: (w - this.imageW * s) / 2, oy: (h - this.imageH * s) / 2 };
  }

  toCanvas(x, y) {
    const L = this.layout();
    return [L.ox + x * L.s, L.oy + y * L.s];
  }

  toImage(cx, cy) {
    const L = this.layout();
    return [(cx - L.ox) / L.s, (cy - L.oy) / L.s];
  }

  /** Image pixels per CSS pixel (for hit radii expressed in screen size). */
  get pixelScale() { return 1 / this.layout().s; }

  clampToImage(x, y) {
    return [round1(clamp(x, 0, this.imageW - 1)), round1(clamp(y, 0, this.imageH - 1))];
  }

  /** Mouse event -> canvas CSS px, valid under CSS transforms (graph zoom). */
  eventToCanvas(e) {
    const r = this.canvas.getBoundingClientRect();
    const kx = r.width / (this.canvas.clientWidth || r.width || 1) || 1;
    const ky = r.height / (this.canvas.clientHeight || r.height || 1) || 1;
    return [(e.clientX - r.left) / kx, (e.clientY - r.top) / ky];
  }

  // ---- events ------------------------------------------------------------------------
  _sample(e) {
    const [cx, cy] = this.eventToCanvas(e);
    const [x, y] = this.toImage(cx, cy);
    const p = { cx, cy, x, y, button: e.button, shift: e.shiftKey, alt: e.altKey,
                ctrl: e.ctrlKey || e.metaKey, moved: false, dist: 0 };
    if (this._press) {
      p.dist = Math.hypot(cx - this._press.cx, cy - this._press.cy);
      p.moved = this._press.moved = this._press.moved || p.dist > this.clickRadius;
      p.button = this._press.button;
      p.start = this._press;
    }
    return p;
  }

  _bindEvents() {
    const c = this.canvas;
    const stop = (e) => e.stopPropagation();
    c.addEventListener("contextmenu", (e) => { e.preventDefault(); e.stopPropagation(); });
    // No preventDefault on pointerdown: the mouse events that follow must reach the page (a
    // host's change tracking listens for mouseup). The default of mousedown (focus moving to
    // the page, text selection) is what is stopped, so the keys stay with the editor.
    c.addEventListener("mousedown", (e) => { e.preventDefault(); e.stopPropagation(); });
    c.addEventListener("pointerdown", (e) => {
      e.stopPropagation();
      this.focus();
      if (this._press) return;            // a second button while one is held
      this._press = null;
      const p = this._sample(e);
      this._press = { cx: p.cx, cy: p.cy, x: p.x, y: p.y, button: e.button, moved: false };
      p.start = this._press;
      try { c.setPointerCapture(e.pointerId); } catch (_) { /* synthetic events */ }
      this.gesture = this.onPointerDown(p) || null;
      this.redraw();
    });
    c.addEventListener("pointermove", (e) => {
      const p = this._sample(e);
      if (this._press) {
        e.stopPropagation();
        if (this.gesture && this.gesture.move) this.gesture.move(p);
      } else {
        this.onHover(p);
      }
      this.redraw();
    });
    const finish = (e, cancelled) => {
      if (!this._press) return;
      e.stopPropagation();
      const p = this._sample(e);
      const g = this.gesture;
      this._press = null;
      this.gesture = null;
      try { c.releasePointerCapture(e.pointerId); } catch (_) { /* not captured */ }
      if (g) {
        if (cancelled) { if (g.cancel) g.cancel(p); } else if (g.up) g.up(p);
      }
      this.redraw();
    };
    c.addEventListener("pointerup", (e) => finish(e, false));
    c.addEventListener("pointercancel", (e) => finish(e, true));
    c.addEventListener("pointerleave", () => { if (!this._press) { this.hover = null; this.onLeave(); this.redraw(); } });
    c.addEventListener("dblclick", (e) => { e.stopPropagation(); e.preventDefault(); this.onDoubleClick(this._sample(e)); });
    const k = this.keySink;
    k.addEventListener("keydown", (e) => {
      const key = e.key;
      const ctrl = e.ctrlKey || e.metaKey;
      let done = false;
      if (ctrl && (key === "z" || key === "Z")) done = e.shiftKey ? this.redo() || true : this.undo() || true;
      else if (ctrl && (key === "y" || key === "Y")) done = this.redo() || true;
      else done = this.onKey(e);
      if (done) { e.preventDefault(); e.stopPropagation(); }
      else if (key === "Delete" || key === "Backspace") e.stopPropagation(); // never delete the node
    });
    k.addEventListener("keyup", stop);
    k.addEventListener("keypress", stop);
    c.addEventListener("wheel", (e) => { if (this.onWheel(e)) { e.preventDefault(); e.stopPropagation(); } },
                       { passive: false });
  }

  /** Give the editor the keyboard (Delete, Ctrl+Z, ...). */
  focus() { this.keySink.focus({ preventScroll: true }); }

  onPointerDown(_p) { return null; }
  onHover(_p) {}
  onLeave() {}
  onDoubleClick(_p) {}
  onKey(_e) { return false; }
  onWheel(_e) { return false; }

  // ---- toolbar and status ------------------------------------------------------------
  addButton(label, title, onClick, { toggle = false } = {}) {
    const b = this.doc.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.title = title;
    b.dataset.kinema = label.toLowerCase().replace(/[^a-z0-9]+/g, "-");
    b.addEventListener("pointerdown", (e) => e.stopPropagation());
    b.addEventListener("click", (e) => {
      e.preventDefault();
      e.stopPropagation();
      onClick(b);
      this._updateButtons();
      this.redraw();
    });
    if (toggle) b.classList.add("kinema-toggle");
    this.toolbar.appendChild(b);
    return b;
  }

  addStandardButtons() {
    this._undoBtn = this.addButton("Undo", "Undo the last edit (Ctrl+Z)", () => this.undo());
    this._redoBtn = this.addButton("Redo", "Redo (Ctrl+Shift+Z)", () => this.redo());
    this._clearBtn = this.addButton("Clear", "Remove everything (can be undone)", () => this.clear());
  }

  _updateButtons() {
    if (this._undoBtn) this._undoBtn.disabled = !this.undoStack.length;
    if (this._redoBtn) this._redoBtn.disabled = !this.redoStack.length;
    this.updateButtons();
  }

  updateButtons() {}

  /** A note shown before the usual hint until the next edit (`warn`: in the error colour). */
  setMessage(text, { warn = false } = {}) { this.message = text || ""; this.messageWarn = warn; this._renderStatus(); }
  setError(text) { this.error = text || ""; this._renderStatus(); }

  defaultHint() { return ""; }

  _renderStatus() {
    const el = this.statusEl;
    el.textContent = "";
    const parts = [];
    const add = (text, cls) => {
      if (!text) return;
      if (parts.length) el.append(this.doc.createTextNode("  ·  "));
      const span = this.doc.createElement("span");
      if (cls) span.className = cls;
      span.textContent = text;
      el.append(span);
      parts.push(text);
    };
    add(this.error, "kinema-error");      // the error first: it is what needs reading
    add(this.message, this.messageWarn ? "kinema-error" : "");
    add(this.defaultHint(), "");
    el.title = el.textContent;
  }

  // ---- drawing -----------------------------------------------------------------------
  redraw() {
    if (this._raf) return;
    const run = () => { this._raf = 0; this.draw(); };
    if (typeof requestAnimationFrame === "undefined") return run();
    this._raf = requestAnimationFrame(run);
  }

  /** Draw now (tests call this through redraw + a frame; ComfyUI through the DOM widget). */
  draw() {
    const c = this.canvas, ctx = this.ctx;
    const dpr = (this.doc.defaultView && this.doc.defaultView.devicePixelRatio) || 1;
    const cw = c.clientWidth, ch = c.clientHeight;
    if (!cw || !ch) return;
    const bw = Math.round(cw * dpr), bh = Math.round(ch * dpr);
    if (c.width !== bw || c.height !== bh) { c.width = bw; c.height = bh; }
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cw, ch);
    const L = this.layout();
    const iw = this.imageW * L.s, ih = this.imageH * L.s;
    if (this.image) {
      ctx.imageSmoothingEnabled = true;
      ctx.drawImage(this.image, L.ox, L.oy, iw, ih);
    } else {
      ctx.fillStyle = "#2a2a2a";
      ctx.fillRect(L.ox, L.oy, iw, ih);
      ctx.strokeStyle = "#555";
      ctx.setLineDash([4, 4]);
      ctx.strokeRect(L.ox + 0.5, L.oy + 0.5, iw - 1, ih - 1);
      ctx.setLineDash([]);
      ctx.fillStyle = "#888";
      ctx.font = "12px system-ui, sans-serif";
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      const lines = [this.imageError || "no picture yet",
                     "connect Load Image or run once", `${this.imageW}×${this.imageH} px`];
      lines.forEach((t, i) => ctx.fillText(t, L.ox + iw / 2, L.oy + ih / 2 + (i - 1) * 16));
    }
    ctx.save();
    ctx.beginPath();
    ctx.rect(0, 0, cw, ch);
    ctx.clip();
    this.drawOverlay(ctx, L);
    ctx.restore();
  }

  drawOverlay(_ctx, _L) {}

  // Small drawing helpers shared by the editors.
  drawHandle(ctx, cx, cy, { fill = "#fff", stroke = "#000", r = 5.5, shape = "circle", selected = false } = {}) {
    ctx.beginPath();
    if (shape === "square") ctx.rect(cx - r, cy - r, 2 * r, 2 * r);
    else if (shape === "diamond") {
      ctx.moveTo(cx, cy - r - 1); ctx.lineTo(cx + r + 1, cy); ctx.lineTo(cx, cy + r + 1); ctx.lineTo(cx - r - 1, cy);
      ctx.closePath();
    } else ctx.arc(cx, cy, r, 0, Math.PI * 2);
    ctx.fillStyle = fill;
    ctx.fill();
    ctx.lineWidth = selected ? 3 : 1.5;
    ctx.strokeStyle = selected ? "#fff" : stroke;
    ctx.stroke();
    if (selected) {
      ctx.beginPath();
      ctx.arc(cx, cy, r + 4, 0, Math.PI * 2);
      ctx.lineWidth = 1.5;
      ctx.strokeStyle = "#000";
      ctx.stroke();
    }
  }

  drawLabel(ctx, text, x, y, { color = "#fff", align = "left", size = 11 } = {}) {
    ctx.font = `bold ${size}px system-ui, sans-serif`;
    ctx.textAlign = align;
    ctx.textBaseline = "middle";
    ctx.lineWidth = 3;
    ctx.strokeStyle = "rgba(0,0,0,.85)";
    ctx.strokeText(text, x, y);
    ctx.fillStyle = color;
    ctx.fillText(text, x, y);
  }

  destroy() {
    if (this._ro) this._ro.disconnect();
    if (this._raf && typeof cancelAnimationFrame !== "undefined") cancelAnimationFrame(this._raf);
    this.root.remove();
  }
}
