"""The in-node editors (web/js) in a real headless Chromium, driven by real mouse events.

The page tests/web/index.html loads the three editors without ComfyUI. Each test clicks and
drags with page.mouse and checks the stored JSON exactly. Expected image coordinates are
computed here from the measured canvas geometry (the picture is fitted with a 6 px margin and
centred), independently of the editor's own transform code. Screenshots go to test-artifacts/.
"""
from __future__ import annotations

import functools
import http.server
import json
import math
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "editors"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} not found (Debian package 'chromium')", allow_module_level=True)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    handler = functools.partial(_Quiet, directory=str(ROOT))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Page:
    """The test page plus helpers that map image pixels to screen positions."""

    def __init__(self, page):
        self.page = page
        self.errors: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    def geom(self, name):
        return self.page.evaluate("""(name) => {
            const ed = window.editors[name]; const r = ed.canvas.getBoundingClientRect();
            return {left: r.left, top: r.top, rw: r.width, rh: r.height,
                    w: ed.canvas.clientWidth, h: ed.canvas.clientHeight, W: ed.imageW, H: ed.imageH};
        }""", name)

    @staticmethod
    def _fit(g):
        s = max(1e-6, min((g["w"] - 12) / g["W"], (g["h"] - 12) / g["H"]))
        return s, (g["w"] - g["W"] * s) / 2, (g["h"] - g["H"] * s) / 2, g["rw"] / g["w"], g["rh"] / g["h"]

    def screen(self, name, x, y):
        """Nearest whole screen pixel showing image pixel (x, y)."""
        g = self.geom(name)
        s, ox, oy, kx, ky = self._fit(g)
        return round(g["left"] + (ox + x * s) * kx), round(g["top"] + (oy + y * s) * ky)

    def image(self, name, sx, sy, clamp=True):
        """Image pixel (rounded to 0.1 like the editor) under screen pixel (sx, sy)."""
        g = self.geom(name)
        s, ox, oy, kx, ky = self._fit(g)
        x = ((sx - g["left"]) / kx - ox) / s
        y = ((sy - g["top"]) / ky - oy) / s
        if clamp:
            x, y = min(max(x, 0), g["W"] - 1), min(max(y, 0), g["H"] - 1)
        r1 = lambda v: math.floor(v * 10 + 0.5) / 10  # noqa: E731  (JS Math.round)
        return [r1(x), r1(y)]

    def value(self, name):
        return json.loads(self.page.evaluate("(n) => window.editors[n].value", name))

    def changes(self, name):
        return [json.loads(v) for v in self.page.evaluate("(n) => window.changes[n]", name)]

    def click(self, name, x, y, **kw):
        sx, sy = self.screen(name, x, y)
        self.page.mouse.click(sx, sy, **kw)
        return self.image(name, sx, sy)

    def drag(self, name, path, button="left"):
        """Press at path[0], move through the rest (image pixels), release; returns the image
        positions of the screen pixels actually used."""
        pts = [self.screen(name, x, y) for x, y in path]
        m = self.page.mouse
        m.move(*pts[0])
        m.down(button=button)
        for p in pts[1:]:
            m.move(*p)
        m.up(button=button)
        return [self.image(name, *p) for p in pts]

    def button(self, name, label):
        self.page.locator(f"#{name}-host button[data-kinema='{label}']").click()

    def key(self, name, key):
        self.page.evaluate("(n) => window.editors[n].focus()", name)
        self.page.keyboard.press(key)

    def frame(self):
        self.page.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")

    def shot(self, name, file):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.frame()
        self.page.locator(f"#{name}-host").screenshot(path=str(ARTIFACTS / file))

    def pixel(self, name, x, y):
        """RGBA of the editor canvas (device pixels) at image pixel (x, y)."""
        return self.page.evaluate("""([n, x, y]) => {
            const ed = window.editors[n]; ed.draw();
            const [cx, cy] = ed.toCanvas(x, y); const d = ed.canvas.width / ed.canvas.clientWidth;
            return Array.from(ed.ctx.getImageData(Math.round(cx * d), Math.round(cy * d), 1, 1).data);
        }""", [name, x, y])


@pytest.fixture
def page(browser, server, request):
    params = getattr(request, "param", "")
    ctx = browser.new_context(viewport={"width": 1560, "height": 1000}, device_scale_factor=1)
    pg = ctx.new_page()
    pg.goto(f"{server}/tests/web/index.html{params}")
    pg.wait_for_function("document.body.dataset.ready === '1'", timeout=15000)
    p = Page(pg)
    yield p
    assert not p.errors, p.errors
    ctx.close()


def test_page_loads_picture(page):
    for name in ("points", "drags", "brush"):
        g = page.geom(name)
        assert (g["W"], g["H"]) == (451, 300)  # assets/chelsea.jpg
        assert page.value(name) == {"points": {"positive": [], "negative": [], "box": None},
                                    "drags": {"tracks": [], "anchors": []},
                                    "brush": {"strokes": []}}[name]


def test_points_clicks_box_move_delete_undo_clear(page):
    n = "points"
    p1 = page.click(n, 100, 80)                       # left click: positive
    n1 = page.click(n, 300, 200, button="right")      # right click: negative
    page.page.keyboard.down("Shift")
    n2 = page.click(n, 60, 250)                       # Shift+click: negative
    page.page.keyboard.up("Shift")
    b = page.drag(n, [(200, 40), (260, 90), (350, 150)])  # drag on empty picture: box
    want = {"positive": [p1], "negative": [n1, n2], "box": [b[0][0], b[0][1], b[-1][0], b[-1][1]]}
    assert page.value(n) == want
    assert abs(p1[0] - 100) < 1 and abs(p1[1] - 80) < 1

    # drag the positive point somewhere else
    moved = page.drag(n, [(p1[0], p1[1]), (110, 90), (130, 110)])[-1]
    want["positive"] = [moved]
    assert page.value(n) == want

    # drag the box's bottom-right corner; the top-left stays
    corner = page.drag(n, [(350, 150), (380, 180), (400, 210)])[-1]
    want["box"] = [b[0][0], b[0][1], corner[0], corner[1]]
    assert page.value(n) == want

    # right click on a negative point deletes it; undo brings it back
    page.click(n, n1[0], n1[1], button="right")
    assert page.value(n)["negative"] == [n2]
    page.button(n, "undo")
    assert page.value(n) == want
    page.button(n, "redo")
    assert page.value(n)["negative"] == [n2]
    page.button(n, "undo")

    # Alt+click deletes too; a click on a point selects it and Delete removes it
    page.page.keyboard.down("Alt")
    page.click(n, n2[0], n2[1])
    page.page.keyboard.up("Alt")
    assert page.value(n)["negative"] == [n1]
    page.click(n, moved[0], moved[1])                   # select (no new point)
    assert page.value(n)["positive"] == [moved]
    page.page.keyboard.press("Delete")
    assert page.value(n)["positive"] == []
    page.key(n, "Control+z")
    assert page.value(n)["positive"] == [moved]

    # "Negative" tool: left clicks add negative points
    page.button(n, "negative")
    n3 = page.click(n, 420, 40)
    page.button(n, "negative")
    assert page.value(n)["negative"] == [n1, n3]
    page.shot(n, "points_edit.png")

    # every edit was stored, the last stored value is the editor's value
    assert page.changes(n)[-1] == page.value(n)
    page.button(n, "clear")
    assert page.value(n) == {"positive": [], "negative": [], "box": None}
    page.button(n, "undo")
    assert page.value(n)["negative"] == [n1, n3]
    # a right click on a box corner removes the box
    page.click(n, b[0][0], b[0][1], button="right")
    assert page.value(n)["box"] is None


def test_points_live_mask_preview_debounced_and_errors_do_not_block(page):
    n = "points"
    # three quick clicks: one request, with the final points (a long pause so that a slow
    # machine still clicks three times within it)
    page.page.evaluate("window.editors.points.maskDelay = 2000")
    where = [page.screen(n, x, y) for x, y in [(100, 100), (200, 150), (330, 120)]]
    for sx, sy in where:
        page.page.mouse.click(sx, sy)
    pts = [page.image(n, sx, sy) for sx, sy in where]
    page.page.wait_for_function("window.editors.points.maskImage !== null")
    calls = page.page.evaluate("window.maskCalls")
    assert [json.loads(c) for c in calls] == [{"positive": pts, "negative": [], "box": None}]
    # the mask (a disc around each positive point) is drawn tinted over the picture
    inside, outside = page.pixel(n, 200, 150), page.pixel(n, 200, 290)
    page.page.evaluate("window.editors.points.maskEnabled = false")
    plain = page.pixel(n, 200 + 15, 150 + 15)
    page.page.evaluate("window.editors.points.maskEnabled = true")
    tinted = page.pixel(n, 200 + 15, 150 + 15)
    assert tinted[2] > plain[2] + 30, (plain, tinted)  # blue tint added
    assert inside != outside
    assert "mask score 0.875" in page.page.locator("#points-host .kinema-status").inner_text()
    page.shot(n, "points_mask.png")

    # a failing preview shows a small error and the editor keeps working
    page.page.evaluate("window.mask.fail = 'no SAM model in models/sams'; window.editors.points.maskDelay = 100")
    q = page.click(n, 50, 250, button="right")
    page.page.wait_for_function(
        "document.querySelector('#points-host .kinema-error')?.textContent.includes('no SAM model')")
    assert page.value(n)["negative"] == [q]
    assert page.page.evaluate("window.editors.points.maskImage") is None  # no stale mask
    page.shot(n, "points_mask_error.png")
    page.page.evaluate("window.mask.fail = null")
    page.click(n, 60, 60)
    page.page.wait_for_function("!document.querySelector('#points-host .kinema-error')")
    page.shot(n, "points_mask_error_cleared.png")


def test_points_without_preview_route_stops_asking(page):
    n = "points"
    page.page.evaluate("window.mask.unavailable = true; window.editors.points.maskDelay = 50")
    page.click(n, 100, 100)
    page.page.wait_for_function("window.editors.points.maskFetcher === null")
    calls = len(page.page.evaluate("window.maskCalls"))
    page.click(n, 200, 100)
    page.page.wait_for_timeout(300)
    assert len(page.page.evaluate("window.maskCalls")) == calls == 1
    assert page.page.locator("#points-host button[data-kinema='mask']").is_disabled()
    assert page.page.locator("#points-host .kinema-error").count() == 0
    assert len(page.value(n)["positive"]) == 2


def test_points_typed_json_redraws_and_bad_json_is_reported(page):
    n = "points"
    ok = page.page.evaluate(
        """() => window.editors.points.setValue('{"positive": [{"x": 10, "y": 20.04}], "negative": [[5, 6]], "box": [50, 60, 10, 20]}')""")
    assert ok is True
    assert page.value(n) == {"positive": [[10, 20]], "negative": [[5, 6]], "box": [10, 20, 50, 60]}
    # the typed point is hit where it is drawn: drag it
    to = page.drag(n, [(10, 20), (40, 50), (60, 70)])[-1]
    assert page.value(n)["positive"] == [to]
    # an undoable replacement (what a typed edit in ComfyUI is) can be undone in the editor
    page.page.evaluate("""() => window.editors.points.setValue('{"positive": [[7, 8]]}', {keepUndo: true, undoable: true})""")
    assert page.value(n) == {"positive": [[7, 8]], "negative": [], "box": None}
    page.button(n, "undo")
    assert page.value(n)["positive"] == [to]
    bad = page.page.evaluate("() => window.editors.points.setValue('{\"positive\": [[1, 2]')")
    assert bad is False
    assert page.value(n)["positive"] == [to]
    assert "cannot read value" in page.page.locator("#points-host .kinema-error").inner_text()


def test_points_resize_and_zoom_keep_coordinates(page):
    n = "points"
    a = page.click(n, 120, 90)
    c = page.click(n, 400, 260, button="right")
    before = page.value(n)
    page.page.evaluate("document.getElementById('points-host').style.cssText = 'width: 300px; height: 520px'")
    page.frame()
    assert page.value(n) == before
    g = page.geom(n)
    assert g["w"] < 300
    # the point is found at its new place on screen
    to = page.drag(n, [(a[0], a[1]), (150, 120), (200, 150)])[-1]
    assert page.value(n) == {"positive": [to], "negative": [c], "box": None}
    page.shot(n, "points_resized.png")
    # graph zoom: a CSS scale on an ancestor
    page.page.evaluate("document.getElementById('points-zoom').style.transform = 'scale(1.6)'")
    page.frame()
    assert page.geom(n)["rw"] == pytest.approx(1.6 * page.geom(n)["w"])
    z = page.click(n, 300, 40)
    assert abs(z[0] - 300) < 1 and abs(z[1] - 40) < 1
    assert page.value(n)["positive"] == [to, z]
    page.click(n, c[0], c[1], button="right")         # delete under zoom
    assert page.value(n)["negative"] == []
    page.shot(n, "points_zoomed.png")


def test_hidpi_canvas_and_mapping(browser, server):
    ctx = browser.new_context(viewport={"width": 1560, "height": 520}, device_scale_factor=2)
    pg = ctx.new_page()
    pg.goto(f"{server}/tests/web/index.html")
    pg.wait_for_function("document.body.dataset.ready === '1'")
    p = Page(pg)
    p.frame()
    dims = pg.evaluate("(() => { const c = window.editors.drags.canvas; return [c.width, c.clientWidth, c.height, c.clientHeight]; })()")
    assert dims[0] == 2 * dims[1] and dims[2] == 2 * dims[3]
    t = p.drag("drags", [(50, 60), (150, 120)])
    assert p.value("drags") == {"tracks": [[{"x": t[0][0], "y": t[0][1]}, {"x": t[1][0], "y": t[1][1]}]], "anchors": []}
    p.shot("drags", "drags_hidpi.png")
    ctx.close()


def xy(p):
    return {"x": p[0], "y": p[1]}


def test_drags_straight_curved_anchors_move_delete_undo(page):
    n = "drags"
    s = page.drag(n, [(60, 220), (120, 200), (200, 180)])      # straight drag
    tracks = [[xy(s[0]), xy(s[-1])]]
    assert page.value(n) == {"tracks": tracks, "anchors": []}

    # curved path: click, click, click, then click the last point again to finish
    c = [page.click(n, x, y) for x, y in [(250, 60), (300, 110), (360, 90), (410, 150)]]
    page.click(n, 410, 150)
    tracks.append([xy(p) for p in c])
    assert page.value(n) == {"tracks": tracks, "anchors": []}
    assert page.page.evaluate("window.editors.drags.pending") is None

    # anchors: Shift+click, and the Anchor tool
    page.page.keyboard.down("Shift")
    a1 = page.click(n, 180, 60)
    page.page.keyboard.up("Shift")
    page.button(n, "anchor")
    a2 = page.click(n, 120, 120)
    page.button(n, "track")
    assert page.value(n) == {"tracks": tracks, "anchors": [xy(a1), xy(a2)]}

    # move one point of the path
    m = page.drag(n, [(c[1][0], c[1][1]), (310, 130), (320, 140)])[-1]
    tracks[1][1] = xy(m)
    assert page.value(n)["tracks"] == tracks
    # move the whole straight track by its line (grab the middle of the segment)
    mid = ((s[0][0] + s[-1][0]) / 2, (s[0][1] + s[-1][1]) / 2)
    grab = page.drag(n, [mid, (mid[0] + 10, mid[1] - 10), (mid[0] + 20, mid[1] - 30)])
    dx, dy = grab[-1][0] - grab[0][0], grab[-1][1] - grab[0][1]
    got = page.value(n)["tracks"][0]
    assert got[0]["x"] == pytest.approx(s[0][0] + dx, abs=0.11) and got[0]["y"] == pytest.approx(s[0][1] + dy, abs=0.11)
    assert got[1]["x"] == pytest.approx(s[-1][0] + dx, abs=0.11) and got[1]["y"] == pytest.approx(s[-1][1] + dy, abs=0.11)
    tracks[0] = got
    # move an anchor
    a2m = page.drag(n, [(a2[0], a2[1]), (130, 140), (140, 150)])[-1]
    assert page.value(n)["anchors"] == [xy(a1), xy(a2m)]
    page.shot(n, "drags_edit.png")

    # right click a middle point of the path: that point goes
    page.click(n, m[0], m[1], button="right")
    del tracks[1][1]
    assert page.value(n)["tracks"] == tracks
    # right click an anchor: it goes; undo brings it back
    page.click(n, a1[0], a1[1], button="right")
    assert page.value(n)["anchors"] == [xy(a2m)]
    page.button(n, "undo")
    assert page.value(n)["anchors"] == [xy(a1), xy(a2m)]
    # right click a point of a 2-point track removes the whole track
    page.click(n, tracks[0][0]["x"], tracks[0][0]["y"], button="right")
    assert page.value(n)["tracks"] == [tracks[1]]
    # Alt+click on the line of the remaining track deletes it
    t = tracks[1]
    page.page.keyboard.down("Alt")
    page.click(n, (t[0]["x"] + t[1]["x"]) / 2, (t[0]["y"] + t[1]["y"]) / 2)
    page.page.keyboard.up("Alt")
    assert page.value(n)["tracks"] == []
    page.key(n, "Control+z")
    page.key(n, "Control+z")
    assert page.value(n)["tracks"] == tracks
    page.button(n, "clear")
    assert page.value(n) == {"tracks": [], "anchors": []}
    assert page.changes(n)[-1] == {"tracks": [], "anchors": []}


def test_drags_finish_with_enter_double_click_and_escape(page):
    n = "drags"
    a = [page.click(n, x, y) for x, y in [(60, 60), (120, 80)]]
    page.key(n, "Enter")
    assert page.value(n)["tracks"] == [[xy(a[0]), xy(a[1])]]
    # a lone first point is dropped by Escape: nothing stored
    page.click(n, 300, 250)
    page.key(n, "Escape")
    assert page.page.evaluate("window.editors.drags.pending") is None
    assert len(page.value(n)["tracks"]) == 1
    # double click on the last point ends a path; the next click starts a new one
    b = [page.click(n, x, y) for x, y in [(200, 200), (250, 230)]]
    sx, sy = page.screen(n, 300, 260)
    page.page.mouse.dblclick(sx, sy)
    b.append(page.image(n, sx, sy))
    assert page.page.evaluate("window.editors.drags.pending") is None
    assert page.value(n)["tracks"][1] == [xy(p) for p in b]
    # the frame count drives the ticks: more frames, more ticks drawn (checked on the page)
    page.page.evaluate("window.editors.drags.setFrames(32)")
    page.shot(n, "drags_32_frames.png")
    page.page.evaluate("window.editors.drags.setFrames(8)")
    page.shot(n, "drags_8_frames.png")
    assert page.value(n)["tracks"][1] == [xy(p) for p in b]


def test_drags_time_along_path(page):
    # point i of an n-point path sits at time i/(n-1): frame ticks are placed by that rule
    res = page.page.evaluate("""async () => {
        const m = await import('/web/js/kinema_drags.js');
        const pts = [[0, 0], [10, 0], [10, 20]];
        return [0, 0.25, 0.5, 0.75, 1].map((t) => m.pointAtTime(pts, t));
    }""")
    assert res == [[0, 0], [5, 0], [10, 0], [10, 10], [10, 20]]


def test_brush_paint_erase_radius_undo_clear(page):
    n = "brush"
    stroke = page.drag(n, [(80, 150), (110, 140), (140, 130), (170, 120), (200, 110)])
    want = [{"mode": "paint", "radius": 20, "points": stroke}]
    assert page.value(n) == {"strokes": want}
    cover1 = page.page.evaluate("window.editors.brush.coverage()")
    assert 0.02 < cover1 < 0.2

    # right drag erases through the middle of the stroke
    er = page.drag(n, [(140, 60), (140, 100), (140, 150), (140, 200)], button="right")
    want.append({"mode": "erase", "radius": 20, "points": er})
    assert page.value(n) == {"strokes": want}
    cover2 = page.page.evaluate("window.editors.brush.coverage()")
    assert cover2 < cover1 - 0.005

    # a bigger brush ( ] key ), a single dab
    page.key(n, "]")
    r = page.page.evaluate("window.editors.brush.radius")
    assert r == 23
    dab = page.click(n, 350, 200)
    want.append({"mode": "paint", "radius": r, "points": [dab]})
    assert page.value(n) == {"strokes": want}

    # the Erase tool makes left drags erase; the radius slider sets the size
    page.button(n, "erase")
    page.page.locator("#brush-host input[data-kinema='radius']").fill("8")
    e2 = page.drag(n, [(340, 200), (360, 200)])
    want.append({"mode": "erase", "radius": 8, "points": e2})
    assert page.value(n) == {"strokes": want}
    page.button(n, "paint")
    page.shot(n, "brush_edit.png")

    # painted / erased pixels in the rasterised mask
    px = page.page.evaluate("""([x, y]) => { const m = window.editors.brush.renderMask();
        const k = m.width / window.editors.brush.imageW;
        return [[80, 150], [140, 130], [350, 215]].map(([x, y]) =>
            m.getContext('2d').getImageData(Math.floor((x + .5) * k), Math.floor((y + .5) * k), 1, 1).data[3]); }""",
                            [0, 0])
    assert px[0] == 255 and px[1] == 0 and px[2] == 255

    page.button(n, "undo")
    assert page.value(n) == {"strokes": want[:3]}
    page.button(n, "clear")
    assert page.value(n) == {"strokes": []}
    assert page.changes(n)[-1] == {"strokes": []}
    page.button(n, "undo")
    assert page.value(n) == {"strokes": want[:3]}


def test_brush_resize_keeps_strokes(page):
    n = "brush"
    stroke = page.drag(n, [(100, 100), (150, 120), (200, 140)])
    before = page.value(n)
    page.page.evaluate("document.getElementById('brush-host').style.cssText = 'width: 700px; height: 300px'")
    page.frame()
    assert page.value(n) == before == {"strokes": [{"mode": "paint", "radius": 20, "points": stroke}]}
    s2 = page.drag(n, [(300, 50), (340, 60)])
    assert page.value(n)["strokes"][1]["points"] == s2
    assert abs(s2[0][0] - 300) < 1 and abs(s2[0][1] - 50) < 1
    page.shot(n, "brush_resized.png")


def test_editors_have_no_comfyui_import():
    # the editor modules must load on a plain page: only the glue module talks to ComfyUI
    for f in ("kinema_canvas.js", "kinema_points.js", "kinema_drags.js", "kinema_brush.js"):
        text = (ROOT / "web" / "js" / f).read_text()
        assert "scripts/app.js" not in text and "scripts/api.js" not in text, f
    glue = (ROOT / "web" / "js" / "kinema_editors.js").read_text()
    assert 'from "../../scripts/app.js"' in glue


def test_no_network_requests_outside_the_page(browser, server):
    ctx = browser.new_context()
    pg = ctx.new_page()
    seen = []
    pg.on("request", lambda r: seen.append(r.url))
    pg.goto(f"{server}/tests/web/index.html")
    pg.wait_for_function("document.body.dataset.ready === '1'")
    assert seen and all(u.startswith(server) or u.startswith("data:") for u in seen), seen
    ctx.close()



def test_drags_flow_overlay_tints_moving_parts_only(page):
    n = "drags"
    assert page.page.locator("#drags-host button[data-kinema='flow']").is_disabled()
    plain_in, plain_out = page.pixel(n, 100, 100), page.pixel(n, 350, 250)
    ok = page.page.evaluate("""async () => {
        const ed = window.editors.drags; const c = document.createElement('canvas');
        c.width = ed.imageW; c.height = ed.imageH; const g = c.getContext('2d');
        g.fillStyle = '#fff'; g.fillRect(0, 0, c.width, c.height);
        g.fillStyle = '#8000ff'; g.fillRect(50, 50, 100, 100);   // a moving region in flow colours
        const shown = await ed.setOverlay(c.toDataURL()); ed.showOverlay = true; ed._updateButtons();
        return shown; }""")
    assert ok is True
    assert not page.page.locator("#drags-host button[data-kinema='flow']").is_disabled()
    tinted_in, tinted_out = page.pixel(n, 100, 100), page.pixel(n, 350, 250)
    assert tinted_in[1] < plain_in[1] - 40, (plain_in, tinted_in)      # green removed by the violet
    assert all(abs(a - b) <= 2 for a, b in zip(tinted_out[:3], plain_out[:3])), (plain_out, tinted_out)
    page.shot(n, "drags_flow_overlay.png")
    page.button(n, "flow")                                              # off again
    assert page.pixel(n, 100, 100) == plain_in
