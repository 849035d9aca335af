// Motion brush: paint and erase the region that may move, in image pixels.
//
// Stored value: {"strokes": [{"mode": "paint"|"erase", "radius": r, "points": [[x, y], ...]}, ...]}
// Strokes are replayed in order: a paint stroke adds round-capped lines of width 2r through
// its points, an erase stroke removes them. The node turns this into the MASK.
//
// Mouse: left drag paints (or erases with the Erase tool), right drag always erases, a click
// leaves one dab; [ and ] change the brush size; Ctrl+Z / Ctrl+Shift+Z undo / redo.

import { KinemaCanvas, round1, clamp } from "./kinema_canvas.js";

const TINT = "rgba(255, 70, 200, 1)";

export class BrushEditor extends KinemaCanvas {
  constructor(opts = {}) {
    super(opts);
    this.strokes = [];
    this.mode = "paint";
    this.radius = opts.radius || 24;
    this.maxRadius = 256;
    this.maskAlpha = 0.5;

    this.addStandardButtons();
    this._paintBtn = this.addButton("Paint", "Paint the region that moves", () => { this.mode = "paint"; }, { toggle: true });
    this._eraseBtn = this.addButton("Erase", "Erase (right drag erases too)", () => { this.mode = "erase"; }, { toggle: true });
    const label = this.doc.createElement("label");
    label.title = "Brush radius in image pixels ([ and ] change it)";
    this.radiusInput = this.doc.createElement("input");
    this.radiusInput.type = "range";
    this.radiusInput.min = "1";
    this.radiusInput.max = String(this.maxRadius);
    this.radiusInput.step = "1";
    this.radiusInput.value = String(this.radius);
    this.radiusInput.dataset.kinema = "radius";
    this.radiusText = this.doc.createElement("span");
    this.radiusInput.addEventListener("pointerdown", (e) => e.stopPropagation());
    this.radiusInput.addEventListener("input", () => this.setRadius(Number(this.radiusInput.value)));
    label.append("size", this.radiusInput, this.radiusText);
    this.toolbar.appendChild(label);
    this.setRadius(this.radius);
    this._updateButtons();
    this._renderStatus();
  }

  // ---- state -------------------------------------------------------------------------
  getState() {
    return { strokes: this.strokes.map((s) => ({ mode: s.mode, radius: s.radius, points: s.points.map((p) => [p[0], p[1]]) })) };
  }

  setState(s) {
    this.strokes = s.strokes.map((k) => ({ mode: k.mode, radius: k.radius, points: k.points.map((p) => p.slice()) }));
  }

  parse(text) {
    if (text == null || !String(text).trim()) return { strokes: [] };
    let d = JSON.parse(text);
    if (Array.isArray(d)) d = { strokes: d };
    if (!d || typeof d !== "object" || !Array.isArray(d.strokes)) throw new Error("expected {\"strokes\": [...]}");
    return {
      strokes: d.strokes.map((s, i) => {
        if (!s || typeof s !== "object") throw new Error(`stroke ${i} is not an object`);
        const mode = s.mode == null ? "paint" : s.mode;
        if (mode !== "paint" && mode !== "erase") throw new Error(`stroke ${i}: mode must be "paint" or "erase"`);
        const radius = Number(s.radius);
        if (!Number.isFinite(radius) || radius <= 0) throw new Error(`stroke ${i}: radius must be a positive number`);
        if (!Array.isArray(s.points) || !s.points.length) throw new Error(`stroke ${i} has no points`);
        const points = s.points.map((p) => {
          const xy = Array.isArray(p) ? p : [p && p.x, p && p.y];
          const x = Number(xy[0]), y = Number(xy[1]);
          if (!Number.isFinite(x) || !Number.isFinite(y)) throw new Error(`stroke ${i}: ${JSON.stringify(p)} is not a point`);
          return [round1(x), round1(y)];
        });
        return { mode, radius: round1(radius), points };
      }),
    };
  }

  setRadius(r) {
    this.radius = clamp(Math.round(r), 1, this.maxRadius);
    this.radiusInput.value = String(this.radius);
    this.radiusText.textContent = `${this.radius}px`;
    this._renderStatus();
    this.redraw();
  }

  scaledState(s, sx, sy) {
    const k = (sx + sy) / 2;
    return { strokes: s.strokes.map((t) => ({ mode: t.mode, radius: round1(t.radius * k),
                                               points: t.points.map(([x, y]) => [round1(x * sx), round1(y * sy)]) })) };
  }

  pointsOf(s) { return s.strokes.flatMap((t) => t.points); }

  onImage() {
    this.maxRadius = Math.max(8, Math.round(Math.max(this.imageW, this.imageH) / 4));
    this.radiusInput.max = String(this.maxRadius);
    this.setRadius(Math.min(this.radius, this.maxRadius));
  }

  _resized(before) {
    // the same picture at another resolution: the brush keeps its size on it, like the strokes
    const sx = this.imageW / before[0], sy = this.imageH / before[1];
    if (Math.abs(sx / sy - 1) <= 0.01) {
      this.onImage();
      this.setRadius(this.radius * sx);
    }
    super._resized(before);
  }

  defaultHint() {
    const n = this.strokes.length;
    return `${n} stroke${n === 1 ? "" : "s"}  ·  ${this.mode}, radius ${this.radius}px  ·  drag to ${this.mode}, right drag erases, [ ] size`;
  }

  updateButtons() {
    if (this._paintBtn) this._paintBtn.classList.toggle("kinema-on", this.mode === "paint");
    if (this._eraseBtn) this._eraseBtn.classList.toggle("kinema-on", this.mode === "erase");
    this._renderStatus();
  }

  // ---- interaction -------------------------------------------------------------------
  onPointerDown(p) {
    if (p.button !== 0 && p.button !== 2) return null;
    const mode = p.button === 2 || p.alt ? "erase" : this.mode;
    const stroke = { mode, radius: this.radius, points: [this.clampToImage(p.x, p.y)] };
    this.checkpoint();
    this.strokes.push(stroke);
    this._active = stroke;
    const minStep = Math.max(0.5, this.radius * 0.15);
    const add = (q, force) => {
      const pt = this.clampToImage(q.x, q.y);
      const last = stroke.points[stroke.points.length - 1];
      const d = Math.hypot(pt[0] - last[0], pt[1] - last[1]);
      if (d >= minStep || (force && d > 0)) stroke.points.push(pt);
    };
    return {
      move: (q) => { this._cursor = [q.cx, q.cy]; add(q, false); },
      up: (q) => { if (q.moved) add(q, true); this._active = null; this.changed(); },
      cancel: () => { this._active = null; this.changed(); },
    };
  }

  onHover(p) { this._cursor = [p.cx, p.cy]; }

  onLeave() { this._cursor = null; }

  onKey(e) {
    if (e.key === "[") { this.setRadius(this.radius - Math.max(1, Math.round(this.radius * 0.15))); return true; }
    if (e.key === "]") { this.setRadius(this.radius + Math.max(1, Math.round(this.radius * 0.15))); return true; }
    if (e.key === "e" || e.key === "E") { this.mode = this.mode === "paint" ? "erase" : "paint"; this._updateButtons(); this.redraw(); return true; }
    return false;
  }

  // ---- drawing -----------------------------------------------------------------------
  /** Replay the strokes onto a canvas of the picture size (or smaller for big pictures). */
  renderMask(maxSide = 1536) {
    const k = Math.min(1, maxSide / Math.max(this.imageW, this.imageH));
    const w = Math.max(1, Math.round(this.imageW * k)), h = Math.max(1, Math.round(this.imageH * k));
    if (!this._mask) this._mask = this.doc.createElement("canvas");
    const m = this._mask;
    if (m.width !== w || m.height !== h) { m.width = w; m.height = h; }
    const g = m.getContext("2d");
    g.setTransform(1, 0, 0, 1, 0, 0);
    g.clearRect(0, 0, w, h);
    g.setTransform(k, 0, 0, k, 0, 0);
    g.lineCap = "round";
    g.lineJoin = "round";
    for (const s of this.strokes) {
      g.globalCompositeOperation = s.mode === "erase" ? "destination-out" : "source-over";
      g.strokeStyle = TINT;
      g.fillStyle = TINT;
      // pixel centres: the point (x, y) is the centre of pixel x, y
      const pts = s.points.map(([x, y]) => [x + 0.5, y + 0.5]);
      if (pts.length === 1) {
        g.beginPath();
        g.arc(pts[0][0], pts[0][1], s.radius, 0, Math.PI * 2);
        g.fill();
      } else {
        g.lineWidth = 2 * s.radius;
        g.beginPath();
        pts.forEach(([x, y], i) => (i ? g.lineTo(x, y) : g.moveTo(x, y)));
        g.stroke();
      }
    }
    g.globalCompositeOperation = "source-over";
    return m;
  }

  /** Fraction of the picture covered by the painted region (0..1), measured on the mask. */
  coverage() {
    const m = this.renderMask();
    const px = m.getContext("2d").getImageData(0, 0, m.width, m.height).data;
    let n = 0;
    for (let i = 3; i < px.length; i += 4) if (px[i] > 127) n++;
    return n / (m.width * m.height);
  }

  drawOverlay(ctx, L) {
    const key = this.value + `|${this.imageW}x${this.imageH}`;
    if (key !== this._maskKey) { this.renderMask(); this._maskKey = key; }
    if (this.strokes.length) {
      ctx.globalAlpha = this.maskAlpha;
      ctx.drawImage(this._mask, L.ox, L.oy, this.imageW * L.s, this.imageH * L.s);
      ctx.globalAlpha = 1;
    }
    if (this._cursor) {
      const [x, y] = this._cursor;
      const r = this.radius * L.s;
      ctx.beginPath();
      ctx.arc(x, y, r, 0, Math.PI * 2);
      ctx.lineWidth = 3;
      ctx.strokeStyle = "rgba(0,0,0,.7)";
      ctx.stroke();
      ctx.lineWidth = 1.5;
      ctx.strokeStyle = this.mode === "erase" && !this._active ? "#9ef" : "#fff";
      if (this._active) ctx.strokeStyle = this._active.mode === "erase" ? "#9ef" : "#fff";
      ctx.stroke();
    }
  }
}
