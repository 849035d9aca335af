// Points editor: positive / negative clicks and an optional box, in image pixels.
//
// Stored value: {"positive": [[x, y], ...], "negative": [[x, y], ...], "box": [x0, y0, x1, y1] | null}
//
// Mouse: left click = positive point; right click or Shift+click = negative point;
// drag on the picture = box; drag a point or a box corner to move it; right click or
// Alt+click on a point deletes it (on a box corner: deletes the box); Delete removes the
// selected point; Ctrl+Z / Ctrl+Shift+Z undo / redo.

import { KinemaCanvas, round1, clamp, readPoint } from "./kinema_canvas.js";

const POS = "#35d06b";
const NEG = "#ff4d4d";
const BOX = "#4da6ff";


export class PointsEditor extends KinemaCanvas {
  constructor(opts = {}) {
    super(opts);
    this.positive = [];
    this.negative = [];
    this.box = null;
    this.selected = null;          // {kind: "positive"|"negative", i}
    this.negativeMode = false;     // toolbar toggle: left click adds negative points
    this.maskFetcher = opts.maskFetcher || null; // async (pointsJSON) => {mask, score, width, height}
    this.maskDelay = opts.maskDelay ?? 250;
    this.maskEnabled = true;
    this.maskImage = null;
    this.maskScore = null;
    this.maskBackend = null;
    this.maskBusy = false;            // a mask request is on its way (shown as "working")
    this._maskSeq = 0;

    this.addStandardButtons();
    this._negBtn = this.addButton("Negative", "Left click adds negative points (same as right click)", () => {
      this.negativeMode = !this.negativeMode;
    }, { toggle: true });
    this._boxBtn = this.addButton("No box", "Remove the box", () => {
      if (!this.box) return;
      this.checkpoint(); this.box = null; this.changed();
    });
    this._maskBtn = this.addButton("Mask", "Show the live mask preview", () => {
      this.maskEnabled = !this.maskEnabled;
      if (this.maskEnabled) this.requestMask(0); else { this.maskImage = null; this.redraw(); }
    }, { toggle: true });
    this._updateButtons();
    this._renderStatus();
  }

  // ---- state -------------------------------------------------------------------------
  getState() {
    return { positive: this.positive.map((p) => [p[0], p[1]]),
             negative: this.negative.map((p) => [p[0], p[1]]),
             box: this.box ? this.box.slice() : null };
  }

  setState(s) {
    this.positive = s.positive.map((p) => p.slice());
    this.negative = s.negative.map((p) => p.slice());
    this.box = s.box ? s.box.slice() : null;
    this.selected = null;
  }

  parse(text) {
    if (text == null || !String(text).trim()) return { positive: [], negative: [], box: null };
    const d = JSON.parse(text);
    if (Array.isArray(d)) return { positive: d.map((p) => readPoint(p, "positive")), negative: [], box: null };
    if (!d || typeof d !== "object") throw new Error("expected {positive, negative, box}");
    const list = (v, what) => {
      if (v == null) return [];
      if (!Array.isArray(v)) throw new Error(`${what} must be a list`);
      return v.map((p) => readPoint(p, what));
    };
    let box = null;
    if (d.box != null) {
      if (!Array.isArray(d.box) || d.box.length !== 4) throw new Error("box must be [x0, y0, x1, y1]");
      const b = d.box.map(Number);
      if (!b.every(Number.isFinite)) throw new Error("box must hold numbers");
      box = [Math.min(b[0], b[2]), Math.min(b[1], b[3]), Math.max(b[0], b[2]), Math.max(b[1], b[3])].map(round1);
    }
    return { positive: list(d.positive, "positive"), negative: list(d.negative, "negative"), box };
  }

  defaultHint() {
    const n = this.positive.length, m = this.negative.length;
    let mask = "";
    if (this.maskBusy) mask = "  ·  mask: working…";
    else if (this.maskScore != null && this.maskImage) {
      mask = `  ·  mask score ${this.maskScore.toFixed(3)}`;
      // without SAM a box lets parts that a click misses join (and keeps the mask inside it)
      if (this.maskBackend === "classical" && !this.box) mask += "  ·  part missing? drag a box close around the object";
    }
    return `${n} positive, ${m} negative${this.box ? ", box" : ""}  ·  click +, right click −, drag = box${mask}`;
  }

  scaledState(s, sx, sy) {
    const p = ([x, y]) => [round1(x * sx), round1(y * sy)];
    return { positive: s.positive.map(p), negative: s.negative.map(p),
             box: s.box ? [...p(s.box.slice(0, 2)), ...p(s.box.slice(2))] : null };
  }

  pointsOf(s) {
    return [...s.positive, ...s.negative, ...(s.box ? [s.box.slice(0, 2), s.box.slice(2)] : [])];
  }

  updateButtons() {
    if (this._negBtn) this._negBtn.classList.toggle("kinema-on", this.negativeMode);
    if (this._boxBtn) this._boxBtn.disabled = !this.box;
    if (this._maskBtn) {
      this._maskBtn.classList.toggle("kinema-on", this.maskEnabled && !!this.maskFetcher);
      this._maskBtn.disabled = !this.maskFetcher;
    }
    this._renderStatus();
  }

  // ---- hit testing -------------------------------------------------------------------
  /** What is under canvas position (cx, cy): {kind: "positive"|"negative", i} |
   *  {kind: "corner", i (0 top-left, 1 top-right, 2 bottom-right, 3 bottom-left)} | null. */
  hitTest(cx, cy) {
    let best = null, bestD = this.hitRadius;
    for (const kind of ["negative", "positive"]) {
      this[kind].forEach((p, i) => {
        const [px, py] = this.toCanvas(p[0], p[1]);
        const d = Math.hypot(px - cx, py - cy);
        if (d <= bestD) { best = { kind, i }; bestD = d; }
      });
    }
    if (best) return best;
    if (this.box) {
      const [x0, y0, x1, y1] = this.box;
      const corners = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]];
      corners.forEach((c, i) => {
        const [px, py] = this.toCanvas(c[0], c[1]);
        const d = Math.hypot(px - cx, py - cy);
        if (d <= bestD) { best = { kind: "corner", i }; bestD = d; }
      });
    }
    return best;
  }

  // ---- interaction -------------------------------------------------------------------
  onPointerDown(p) {
    const hit = this.hitTest(p.cx, p.cy);
    const erase = p.button === 2 || p.alt;
    if (hit && erase) {
      return { up: (q) => { if (!q.moved) this.deleteHit(hit); } };
    }
    if (hit && p.button === 0 && (hit.kind === "positive" || hit.kind === "negative")) {
      this.selected = hit;
      let started = false;
      return {
        move: (q) => {
          if (!q.moved) return;
          if (!started) { this.checkpoint(); started = true; }
          this[hit.kind][hit.i] = this.clampToImage(q.x, q.y);
          this.redraw();
        },
        up: () => { if (started) this.changed(); else { this._updateButtons(); } },
        cancel: () => { if (started) this.undo(); },
      };
    }
    if (hit && p.button === 0 && hit.kind === "corner") {
      const b0 = this.box.slice();
      // the opposite corner stays fixed
      const fixed = [[b0[2], b0[3]], [b0[0], b0[3]], [b0[0], b0[1]], [b0[2], b0[1]]][hit.i];
      let started = false;
      return {
        move: (q) => {
          if (!q.moved) return;
          if (!started) { this.checkpoint(); started = true; }
          const [x, y] = this.clampToImage(q.x, q.y);
          this.box = this._normBox(fixed[0], fixed[1], x, y);
          this.redraw();
        },
        up: () => { if (started) this.changed(); },
        cancel: () => { if (started) this.undo(); },
      };
    }
    if (!this._inside(p.x, p.y) && p.button !== 2) return null;
    // empty place: click = point, drag = box (left button only)
    const start = this.clampToImage(p.x, p.y);
    let drawing = null;
    return {
      move: (q) => {
        if (p.button !== 0 || !q.moved) return;
        const [x, y] = this.clampToImage(q.x, q.y);
        drawing = this._normBox(start[0], start[1], x, y);
        this._drawingBox = drawing;
        this.redraw();
      },
      up: (q) => {
        this._drawingBox = null;
        if (drawing) {
          const minSide = 2;
          if (drawing[2] - drawing[0] >= minSide && drawing[3] - drawing[1] >= minSide) {
            this.checkpoint();
            this.box = drawing;
            this.changed();
          }
          return;
        }
        if (q.moved || !this._inside(p.x, p.y)) return;
        const negative = p.button === 2 || p.shift || (p.button === 0 && this.negativeMode);
        if (p.button !== 0 && p.button !== 2) return;
        this.checkpoint();
        const kind = negative ? "negative" : "positive";
        this[kind].push(start);
        this.selected = { kind, i: this[kind].length - 1 };
        this.changed();
      },
      cancel: () => { this._drawingBox = null; },
    };
  }

  _inside(x, y) { return x >= -0.5 && y >= -0.5 && x <= this.imageW - 0.5 && y <= this.imageH - 0.5; }

  _normBox(ax, ay, bx, by) {
    return [Math.min(ax, bx), Math.min(ay, by), Math.max(ax, bx), Math.max(ay, by)].map(round1);
  }

  deleteHit(hit) {
    this.checkpoint();
    if (hit.kind === "corner") this.box = null;
    else this[hit.kind].splice(hit.i, 1);
    this.selected = null;
    this.changed();
  }

  onHover(p) {
    const hit = this.hitTest(p.cx, p.cy);
    this.canvas.style.cursor = hit ? (hit.kind === "corner" ? "nwse-resize" : "move") : "crosshair";
  }

  onKey(e) {
    if ((e.key === "Delete" || e.key === "Backspace") && this.selected) {
      this.deleteHit(this.selected);
      return true;
    }
    if (e.key === "Escape" && this.selected) { this.selected = null; this.redraw(); return true; }
    return false;
  }

  // ---- live mask preview -------------------------------------------------------------
  afterChange() { this.requestMask(); }

  onImage() { this.requestMask(0); }

  /** Ask maskFetcher for the mask of the current points after a short pause; stale answers
   *  are dropped. Errors are shown in the status line only. */
  requestMask(delay = this.maskDelay) {
    clearTimeout(this._maskTimer);
    const seq = ++this._maskSeq;
    if (!this.maskFetcher || !this.maskEnabled) { this._setMaskBusy(false); return; }
    if (!this.positive.length && !this.box) {
      this.maskImage = null; this.maskScore = null;
      this._setMaskBusy(false);
      this.setError("");
      this.redraw();
      return;
    }
    // an earlier answer (mask or error) no longer says anything about these clicks
    if (this.error.startsWith("mask preview:")) this.setError("");
    this._setMaskBusy(true);
    const value = this.value;
    this._maskTimer = setTimeout(async () => {
      let res;
      try {
        res = await this.maskFetcher(value);
      } catch (e) {
        if (seq !== this._maskSeq) return;
        this._setMaskBusy(false);
        if (e && e.unavailable) {            // the server has no preview route: stop asking
          this.maskFetcher = null;
          this.maskImage = null;
          this._updateButtons();
          this.setError("");
          this.setMessage("");
          return;
        }
        this.maskImage = null;                // the old mask no longer matches the clicks
        this.maskScore = null;
        this.setError(`mask preview: ${e && e.message ? e.message : e}`);
        this.redraw();
        return;
      }
      if (seq !== this._maskSeq) return;
      if (!res) { this._setMaskBusy(false); this.setError(""); return; }
      if (!res.mask) { this._setMaskBusy(false); this.setError("mask preview: no mask in the answer"); return; }
      const img = new Image();
      img.onload = () => {
        if (seq !== this._maskSeq) return;
        this._setMaskBusy(false);
        this.maskImage = img;
        this.maskScore = typeof res.score === "number" ? res.score : null;
        this.maskBackend = typeof res.backend === "string" ? res.backend : null;
        this.setError("");
        this.redraw();
        if (this.onMask) this.onMask(res);
      };
      img.onerror = () => {
        if (seq === this._maskSeq) { this._setMaskBusy(false); this.setError("mask preview: unreadable mask"); }
      };
      img.src = res.mask.startsWith("data:") ? res.mask : `data:image/png;base64,${res.mask}`;
    }, delay);
  }

  _setMaskBusy(busy) {
    if (this.maskBusy === busy) return;
    this.maskBusy = busy;
    this.root.classList.toggle("kinema-busy", busy);
    this._renderStatus();
    this.redraw();
  }

  destroy() {
    clearTimeout(this._maskTimer);
    this._maskSeq++;
    super.destroy();
  }

  _tintedMask(w, h) {
    // white = object in the mask; draw it as a translucent colour layer
    const off = this.doc.createElement("canvas");
    off.width = Math.max(1, Math.round(w));
    off.height = Math.max(1, Math.round(h));
    const o = off.getContext("2d");
    o.drawImage(this.maskImage, 0, 0, off.width, off.height);
    const data = o.getImageData(0, 0, off.width, off.height);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      const a = px[i]; // red channel of a grey mask
      px[i] = 40; px[i + 1] = 160; px[i + 2] = 255; px[i + 3] = a > 127 ? 120 : 0;
    }
    o.putImageData(data, 0, 0);
    return off;
  }

  // ---- drawing -----------------------------------------------------------------------
  drawOverlay(ctx, L) {
    if (this.maskImage && this.maskEnabled) {
      const w = this.imageW * L.s, h = this.imageH * L.s;
      const key = `${Math.round(w)}x${Math.round(h)}`;
      if (this._maskCacheKey !== key || this._maskCacheSrc !== this.maskImage) {
        this._maskCache = this._tintedMask(w, h);
        this._maskCacheKey = key;
        this._maskCacheSrc = this.maskImage;
      }
      ctx.drawImage(this._maskCache, L.ox, L.oy, w, h);
    }
    if (this.maskBusy) {
      const t = (typeof performance !== "undefined" ? performance.now() : Date.now()) / 1000;
      const cx = L.ox + this.imageW * L.s - 14, cy = L.oy + 14;
      ctx.save();
      ctx.lineWidth = 3;
      ctx.strokeStyle = "rgba(0,0,0,.6)";
      ctx.beginPath(); ctx.arc(cx, cy, 8, 0, Math.PI * 2); ctx.stroke();
      ctx.strokeStyle = "#fff";
      ctx.beginPath(); ctx.arc(cx, cy, 8, t * 6, t * 6 + Math.PI * 1.3); ctx.stroke();
      ctx.restore();
      this.redraw();  // keep turning while the mask is computed
    }
    const box = this._drawingBox || this.box;
    if (box) {
      const [ax, ay] = this.toCanvas(box[0], box[1]);
      const [bx, by] = this.toCanvas(box[2], box[3]);
      ctx.lineWidth = 2;
      ctx.strokeStyle = "#000";
      ctx.strokeRect(ax, ay, bx - ax, by - ay);
      ctx.setLineDash(this._drawingBox ? [6, 4] : []);
      ctx.lineWidth = 1.5;
      ctx.strokeStyle = BOX;
      ctx.strokeRect(ax, ay, bx - ax, by - ay);
      ctx.setLineDash([]);
      if (!this._drawingBox) {
        for (const [x, y] of [[ax, ay], [bx, ay], [bx, by], [ax, by]]) {
          this.drawHandle(ctx, x, y, { fill: BOX, shape: "square", r: 4 });
        }
      }
    }
    const sel = this.selected;
    this.negative.forEach((p, i) => {
      const [x, y] = this.toCanvas(p[0], p[1]);
      this.drawHandle(ctx, x, y, { fill: NEG, selected: sel && sel.kind === "negative" && sel.i === i });
      ctx.strokeStyle = "#fff"; ctx.lineWidth = 2;
      ctx.beginPath(); ctx.moveTo(x - 3, y); ctx.lineTo(x + 3, y); ctx.stroke();
    });
    this.positive.forEach((p, i) => {
      const [x, y] = this.toCanvas(p[0], p[1]);
      this.drawHandle(ctx, x, y, { fill: POS, selected: sel && sel.kind === "positive" && sel.i === i });
      ctx.strokeStyle = "#fff"; ctx.lineWidth = 2;
      ctx.beginPath(); ctx.moveTo(x - 3, y); ctx.lineTo(x + 3, y); ctx.moveTo(x, y - 3); ctx.lineTo(x, y + 3); ctx.stroke();
    });
  }
}

export { clamp };
