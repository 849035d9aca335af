// Drag / trajectory editor: any number of tracks plus static anchors, in image pixels.
//
// Stored value: {"tracks": [[{"x": .., "y": ..}, ...], ...], "anchors": [{"x": .., "y": ..}, ...]}
// A straight drag is a 2-point track; a curved path holds every clicked point, point i at
// time i/(n-1). Frame ticks along each path show where the point is at each frame.
//
// Mouse: drag on the picture = straight drag; click, click, click ... = curved path, finished
// by clicking its last point again, double click, Enter or right click (Esc drops an
// unfinished single point); Shift+click (or the Anchor tool) = anchor; drag a point to move
// it, drag a line to move the whole track; right click or Alt+click on a point deletes it
// (a 2-point track goes entirely), on a line deletes the track, on an anchor deletes it.

import { KinemaCanvas, round1, distToSegment, PALETTE, readPoint } from "./kinema_canvas.js";


const isPoint = (p) => (p && !Array.isArray(p) && typeof p === "object" && "x" in p) ||
  (Array.isArray(p) && p.length >= 2 && p.length <= 3 && p.every((v) => typeof v === "number"));

/** Position at time t (0..1) on a path whose point i sits at time i/(n-1). */
export function pointAtTime(pts, t) {
  if (pts.length === 1) return pts[0].slice();
  const u = Math.min(Math.max(t, 0), 1) * (pts.length - 1);
  const i = Math.min(Math.floor(u), pts.length - 2);
  const f = u - i;
  return [pts[i][0] + f * (pts[i + 1][0] - pts[i][0]), pts[i][1] + f * (pts[i + 1][1] - pts[i][1])];
}

export class DragsEditor extends KinemaCanvas {
  constructor(opts = {}) {
    super(opts);
    this.tracks = [];        // [[x, y], ...] per track
    this.anchors = [];       // [x, y]
    this.frames = opts.frames || 16;
    this.tool = "track";     // "track" | "anchor"
    this.pending = null;     // open curved path: {track: index in this.tracks | -1, seed: [x, y] | null}
    this.selected = null;    // {kind: "track"|"anchor", i}
    this.overlay = null;     // optional picture drawn over the image (flow preview)
    this.overlayAlpha = 0.85;
    this.showOverlay = false;

    this.addStandardButtons();
    this._trackBtn = this.addButton("Track", "Draw tracks: drag for a straight drag, click several points for a path",
      () => this.setTool("track"), { toggle: true });
    this._anchorBtn = this.addButton("Anchor", "Click to pin points that must stay still (also Shift+click)",
      () => this.setTool("anchor"), { toggle: true });
    this._doneBtn = this.addButton("Finish", "Finish the path being drawn (Enter / double click)",
      () => this.finishPath());
    this._flowBtn = this.addButton("Flow", "Show the motion preview of the last run over the picture",
      () => { this.showOverlay = !this.showOverlay; }, { toggle: true });
    this._updateButtons();
    this._renderStatus();
  }

  // ---- state -------------------------------------------------------------------------
  getState() {
    return {
      tracks: this.tracks.map((t) => t.map(([x, y]) => ({ x, y }))),
      anchors: this.anchors.map(([x, y]) => ({ x, y })),
    };
  }

  setState(s) {
    this.tracks = s.tracks.map((t) => t.map((p) => [p.x, p.y]));
    this.anchors = s.anchors.map((p) => [p.x, p.y]);
    this.selected = null;
    if (this.pending && this.pending.track >= this.tracks.length) this.pending = null;
  }

  parse(text) {
    if (text == null || !String(text).trim()) return { tracks: [], anchors: [] };
    let d = JSON.parse(text);
    let anchors = [];
    if (d && !Array.isArray(d) && typeof d === "object") {
      if (d.anchors != null && !Array.isArray(d.anchors)) throw new Error("anchors must be a list");
      anchors = (d.anchors || []).map((p) => readPoint(p, "anchor"));
      d = d.tracks == null ? [] : d.tracks;
    }
    if (!Array.isArray(d)) throw new Error("tracks must be a list");
    if (d.length && isPoint(d[0])) d = [d];
    const tracks = d.map((t, i) => {
      if (!Array.isArray(t)) throw new Error(`track ${i} must be a list of points`);
      const pts = t.map((p) => readPoint(p, `track ${i}`));
      if (pts.length < 2) throw new Error(`track ${i} needs 2 or more points`);
      return pts;
    });
    const xy = ([x, y]) => ({ x, y });
    return { tracks: tracks.map((t) => t.map(xy)), anchors: anchors.map(xy) };
  }

  setFrames(n) {
    const f = Math.max(1, Math.round(Number(n) || 1));
    if (f === this.frames) return;
    this.frames = f;
    this._renderStatus();
    this.redraw();
  }

  setTool(tool) {
    this.finishPath();
    this.tool = tool;
    this._updateButtons();
  }

  /** A picture shown over the image (e.g. the flow colour preview of the last run);
   *  `show` also turns it on (the Flow button). */
  setOverlay(url, { show = false } = {}) {
    if (!url) { this.overlay = null; this._updateButtons(); this.redraw(); return Promise.resolve(false); }
    return new Promise((resolve) => {
      const img = new Image();
      img.onload = () => {
        this.overlay = img;
        if (show) this.showOverlay = true;
        this._updateButtons();
        this.redraw();
        resolve(true);
      };
      img.onerror = () => resolve(false);
      img.src = url;
    });
  }

  scaledState(s, sx, sy) {
    const p = (q) => ({ x: round1(q.x * sx), y: round1(q.y * sy) });
    return { tracks: s.tracks.map((t) => t.map(p)), anchors: s.anchors.map(p) };
  }

  pointsOf(s) { return [...s.tracks.flat(), ...s.anchors].map((q) => [q.x, q.y]); }

  defaultHint() {
    const n = this.tracks.length, m = this.anchors.length;
    let how;
    if (this.pending) how = "click to add points · click the last point, Enter or double click to finish";
    else if (this.tool === "anchor") how = "click = anchor · right click deletes";
    else how = "drag = straight drag · clicks = path · Shift+click = anchor";
    return `${n} track${n === 1 ? "" : "s"}, ${m} anchor${m === 1 ? "" : "s"}, ${this.frames} frames  ·  ${how}`;
  }

  updateButtons() {
    if (this._trackBtn) this._trackBtn.classList.toggle("kinema-on", this.tool === "track");
    if (this._anchorBtn) this._anchorBtn.classList.toggle("kinema-on", this.tool === "anchor");
    if (this._doneBtn) this._doneBtn.disabled = !this.pending;
    if (this._flowBtn) {
      this._flowBtn.disabled = !this.overlay;
      this._flowBtn.classList.toggle("kinema-on", this.showOverlay && !!this.overlay);
    }
    this._renderStatus();
  }

  colour(i) { return PALETTE[i % PALETTE.length]; }

  // ---- hit testing -------------------------------------------------------------------
  /** {kind: "point", track, i} | {kind: "line", track} | {kind: "anchor", i} | null */
  hitTest(cx, cy) {
    const r = this.hitRadius;
    let best = null, bestD = r;
    this.anchors.forEach((a, i) => {
      const [px, py] = this.toCanvas(a[0], a[1]);
      const d = Math.hypot(px - cx, py - cy);
      if (d <= bestD) { best = { kind: "anchor", i }; bestD = d; }
    });
    this.tracks.forEach((t, ti) => {
      t.forEach((p, i) => {
        const [px, py] = this.toCanvas(p[0], p[1]);
        const d = Math.hypot(px - cx, py - cy);
        if (d <= bestD) { best = { kind: "point", track: ti, i }; bestD = d; }
      });
    });
    if (best) return best;
    bestD = r * 0.7;
    this.tracks.forEach((t, ti) => {
      for (let i = 0; i + 1 < t.length; i++) {
        const a = this.toCanvas(t[i][0], t[i][1]), b = this.toCanvas(t[i + 1][0], t[i + 1][1]);
        const d = distToSegment([cx, cy], a, b);
        if (d <= bestD) { best = { kind: "line", track: ti }; bestD = d; }
      }
    });
    return best;
  }

  _inside(x, y) { return x >= -0.5 && y >= -0.5 && x <= this.imageW - 0.5 && y <= this.imageH - 0.5; }

  // ---- interaction -------------------------------------------------------------------
  onPointerDown(p) {
    const hit = this.hitTest(p.cx, p.cy);
    if (p.button === 2 || (p.alt && p.button === 0)) {
      return {
        up: (q) => {
          if (q.moved) return;
          if (hit) this.deleteHit(hit);
          else if (this.pending && p.button === 2) this.finishPath();
        },
      };
    }
    if (p.button !== 0) return null;
    const pend = this.pending;
    const pendLast = pend && (pend.track >= 0 ? this.tracks[pend.track][this.tracks[pend.track].length - 1] : pend.seed);
    const onPendLast = pendLast && Math.hypot(...this._sub(this.toCanvas(...pendLast), [p.cx, p.cy])) <= this.hitRadius;

    if (hit && !onPendLast && (hit.kind === "point" || hit.kind === "anchor" || hit.kind === "line")) {
      return this._moveGesture(hit, p);
    }
    const start = this.clampToImage(p.x, p.y);
    let preview = null;
    return {
      move: (q) => {
        if (!q.moved || this.pending || p.shift || this.tool === "anchor") return;
        preview = [start, this.clampToImage(q.x, q.y)];
        this._preview = preview;
      },
      up: (q) => {
        this._preview = null;
        if (preview) {                                     // straight drag
          this.checkpoint();
          this.tracks.push(preview);
          this.selected = { kind: "track", i: this.tracks.length - 1 };
          this.changed();
          return;
        }
        if (onPendLast) { this.finishPath(); return; }
        if (!this._inside(p.x, p.y)) return;
        if (this.pending) { this._extendPath(start); return; }
        if (p.shift || this.tool === "anchor") {
          this.checkpoint();
          this.anchors.push(start);
          this.selected = { kind: "anchor", i: this.anchors.length - 1 };
          this.changed();
          return;
        }
        if (q.moved) return;
        this.pending = { track: -1, seed: start };        // first point of a path
        this._updateButtons();
      },
      cancel: () => { this._preview = null; },
    };
  }

  _sub(a, b) { return [a[0] - b[0], a[1] - b[1]]; }

  _extendPath(pt) {
    const pend = this.pending;
    this.checkpoint();
    if (pend.track < 0) {
      this.tracks.push([pend.seed, pt]);
      pend.track = this.tracks.length - 1;
      pend.seed = null;
    } else {
      this.tracks[pend.track].push(pt);
    }
    this.selected = { kind: "track", i: pend.track };
    this.changed();
  }

  /** Close the path being drawn (a lone first point is dropped). */
  finishPath() {
    if (!this.pending) return;
    this.pending = null;
    this._updateButtons();
    this.redraw();
  }

  _moveGesture(hit, p) {
    let started = false;
    const origin = [p.x, p.y];
    const before = hit.kind === "line" ? this.tracks[hit.track].map((q) => q.slice()) : null;
    this.selected = hit.kind === "anchor" ? { kind: "anchor", i: hit.i } : { kind: "track", i: hit.track };
    this._updateButtons();
    return {
      move: (q) => {
        if (!q.moved) return;
        if (!started) { this.checkpoint(); started = true; }
        if (hit.kind === "anchor") this.anchors[hit.i] = this.clampToImage(q.x, q.y);
        else if (hit.kind === "point") this.tracks[hit.track][hit.i] = this.clampToImage(q.x, q.y);
        else {
          // whole track, kept inside the picture
          let dx = q.x - origin[0], dy = q.y - origin[1];
          const xs = before.map((v) => v[0]), ys = before.map((v) => v[1]);
          dx = Math.min(Math.max(dx, -Math.min(...xs)), this.imageW - 1 - Math.max(...xs));
          dy = Math.min(Math.max(dy, -Math.min(...ys)), this.imageH - 1 - Math.max(...ys));
          this.tracks[hit.track] = before.map(([x, y]) => [round1(x + dx), round1(y + dy)]);
        }
      },
      up: () => { if (started) this.changed(); },
      cancel: () => { if (started) this.undo(); },
    };
  }

  deleteHit(hit) {
    this.checkpoint();
    if (hit.kind === "anchor") this.anchors.splice(hit.i, 1);
    else if (hit.kind === "line" || hit.kind === "track") this._removeTrack(hit.track ?? hit.i);
    else if (hit.kind === "point") {
      const t = this.tracks[hit.track];
      if (t.length <= 2) this._removeTrack(hit.track);
      else t.splice(hit.i, 1);
    }
    this.selected = null;
    this.changed();
  }

  _removeTrack(i) {
    this.tracks.splice(i, 1);
    if (this.pending) {
      if (this.pending.track === i) this.pending = null;
      else if (this.pending.track > i) this.pending.track -= 1;
    }
  }

  onDoubleClick() { this.finishPath(); }

  onHover(p) {
    const hit = this.hitTest(p.cx, p.cy);
    this.hover = hit;
    this._hoverPos = [p.cx, p.cy];
    this.canvas.style.cursor = hit ? "move" : "crosshair";
  }

  onLeave() { this._hoverPos = null; }

  onKey(e) {
    if (e.key === "Enter" || (e.key === "Escape" && this.pending)) { this.finishPath(); return true; }
    if ((e.key === "Delete" || e.key === "Backspace") && this.selected) {
      this.deleteHit(this.selected);
      return true;
    }
    return false;
  }

  // ---- drawing -----------------------------------------------------------------------
  drawOverlay(ctx, L) {
    if (this.overlay && this.showOverlay) {
      // multiply: still parts (white in the flow colours) keep the picture, motion tints it
      ctx.globalCompositeOperation = "multiply";
      ctx.globalAlpha = this.overlayAlpha;
      ctx.drawImage(this.overlay, L.ox, L.oy, this.imageW * L.s, this.imageH * L.s);
      ctx.globalAlpha = 1;
      ctx.globalCompositeOperation = "source-over";
    }
    this.tracks.forEach((t, i) => this._drawTrack(ctx, t, this.colour(i),
      this.selected && this.selected.kind === "track" && this.selected.i === i));
    if (this._preview) this._drawTrack(ctx, this._preview, this.colour(this.tracks.length), true);
    const pend = this.pending;
    if (pend) {
      const last = pend.track >= 0 ? this.tracks[pend.track][this.tracks[pend.track].length - 1] : pend.seed;
      const [lx, ly] = this.toCanvas(last[0], last[1]);
      if (this._hoverPos) {
        ctx.setLineDash([5, 4]);
        ctx.lineWidth = 1.5;
        ctx.strokeStyle = "rgba(255,255,255,.8)";
        ctx.beginPath(); ctx.moveTo(lx, ly); ctx.lineTo(this._hoverPos[0], this._hoverPos[1]); ctx.stroke();
        ctx.setLineDash([]);
      }
      if (pend.seed) this.drawHandle(ctx, lx, ly, { fill: this.colour(this.tracks.length), r: 6 });
    }
    this.anchors.forEach((a, i) => {
      const [x, y] = this.toCanvas(a[0], a[1]);
      const sel = this.selected && this.selected.kind === "anchor" && this.selected.i === i;
      this.drawHandle(ctx, x, y, { fill: "#fff", stroke: "#000", shape: "diamond", r: 6, selected: sel });
      ctx.fillStyle = "#000";
      ctx.beginPath(); ctx.arc(x, y, 2, 0, Math.PI * 2); ctx.fill();
    });
  }

  _drawTrack(ctx, t, colour, selected) {
    const pts = t.map((p) => this.toCanvas(p[0], p[1]));
    // outline then colour
    for (const [w, c] of [[selected ? 6 : 5, "rgba(0,0,0,.7)"], [selected ? 3.5 : 2.5, colour]]) {
      ctx.lineWidth = w;
      ctx.strokeStyle = c;
      ctx.lineJoin = "round";
      ctx.lineCap = "round";
      ctx.beginPath();
      pts.forEach(([x, y], k) => (k ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      ctx.stroke();
    }
    const n = pts.length;
    const [ex, ey] = pts[n - 1], [bx, by] = pts[n - 2];
    const ang = Math.atan2(ey - by, ex - bx);
    // frame ticks: where the point is at each frame (labels count from 1 at the start)
    const F = this.frames;
    if (F >= 2) {
      let lastLabel = -Infinity;
      let pathLen = 0;
      for (let k = 1; k < n; k++) pathLen += Math.hypot(pts[k][0] - pts[k - 1][0], pts[k][1] - pts[k - 1][1]);
      const labelEvery = Math.max(1, Math.ceil(F / Math.max(1, pathLen / 22)));
      const tickR = Math.min(2.2, Math.max(1, 0.3 * pathLen / (F - 1)));
      for (let f = 1; f < F - 1; f++) {
        const [x, y] = pointAtTime(pts, f / (F - 1));
        ctx.beginPath();
        ctx.arc(x, y, tickR, 0, Math.PI * 2);
        ctx.fillStyle = "#fff";
        ctx.fill();
        ctx.lineWidth = 1;
        ctx.strokeStyle = "#000";
        ctx.stroke();
        if (f % labelEvery === 0 && f - lastLabel >= labelEvery && f < F - 1 - labelEvery / 2) {
          const seg = Math.min(Math.floor((f / (F - 1)) * (n - 1)), n - 2);
          const a = Math.atan2(pts[seg + 1][1] - pts[seg][1], pts[seg + 1][0] - pts[seg][0]);
          const nx = -Math.sin(a), ny = Math.cos(a);
          this.drawLabel(ctx, String(f + 1), x + nx * 9, y + ny * 9, { color: colour, align: "center", size: 9 });
          lastLabel = f;
        }
      }
      this.drawLabel(ctx, `${F}`, ex + 9 * Math.cos(ang), ey + 9 * Math.sin(ang) - 9, { color: colour, size: 10 });
    }
    // arrow head on the last segment
    const len = 13, spread = 0.45;
    ctx.beginPath();
    ctx.moveTo(ex, ey);
    ctx.lineTo(ex - len * Math.cos(ang - spread), ey - len * Math.sin(ang - spread));
    ctx.lineTo(ex - len * Math.cos(ang + spread), ey - len * Math.sin(ang + spread));
    ctx.closePath();
    ctx.fillStyle = colour;
    ctx.fill();
    ctx.lineWidth = 1.5;
    ctx.strokeStyle = "rgba(0,0,0,.8)";
    ctx.stroke();
    // handles: start ring, middle points small
    pts.forEach(([x, y], k) => {
      if (k === n - 1) return;
      this.drawHandle(ctx, x, y, { fill: k === 0 ? colour : "#fff", stroke: "#000", r: k === 0 ? 5.5 : 4 });
    });
  }
}
