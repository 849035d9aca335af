"""HTTP routes for the in-node editors (registered only inside ComfyUI).

``POST /kinema/mask_preview`` - live mask while clicking in the points editor.

Request JSON::

    {"image": {"filename": "cat.png", "subfolder": "", "type": "input" | "temp"},
     "points": "<points JSON, see formats.parse_points>",
     "sam": "<file name in models/sams, or empty for the classical segmentation>",
     "multimask": true}

Answer JSON: ``{"mask": "<base64 PNG, white = object>", "score": float, "width": W,
"height": H, "backend": "sam" | "classical", "empty": bool}``, or status 400 with
``{"error": "..."}`` for anything wrong in the request (500 for an unexpected failure). A body
over the server's size limit gets the server's own 413.

The work runs in a small pool of its own threads (:class:`PreviewPool`: ``WORKERS`` at once,
``WAITING`` more in line; beyond that the answer is 503 at once), never in the server's event
loop, and each request has ``TIME_LIMIT`` seconds from its arrival: past it the answer is 503
with ``{"error"}``, and the work stops at its next step (:func:`runtime.time_limit`), so a
picture that is slow to segment cannot tie up the server's threads.

The picture is read only from ComfyUI's input or temp folder: names with ``..``, absolute
paths and links that lead out of the folder are refused. SAMs come from the pack's one
:class:`~..pipelines.segment.SamStore` (``nodes.segment.SAM_MODELS``), shared with the SAM
loader node, and run under ComfyUI's model management. The model management is not made for
two threads at once, so a SAM preview is only run while no prompt executes: during a run the
answer is 503 with ``{"error"}`` and the editor asks again later (the classical backend, which
holds no model, always answers).
"""
from __future__ import annotations

import asyncio
import base64
import io
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path, PurePosixPath

import numpy as np

from .. import runtime
from ..formats import parse_points
from ..pipelines.segment import SamStore
from ..runtime import KinemaError
from .segment import SAM_MODELS

ROUTE = "/kinema/mask_preview"
IMAGE_TYPES = ("input", "temp")
MAX_PIXELS = 40_000_000  # larger pictures are refused (decompression bombs)
MAX_CLICKS = 256
TIME_LIMIT = 20.0  # seconds a preview may take from its arrival (503 after)
WORKERS = 2        # previews computed at once
WAITING = 4        # previews waiting for a worker; more are answered 503 at once


class PreviewBusy(Exception):
    """The live mask cannot run now (answered 503)."""


class PreviewPool:
    """A bounded pool of daemon threads: ``workers`` jobs run at once and ``waiting`` more wait
    in line; :meth:`submit` refuses further ones with :class:`PreviewBusy`. A job given up while
    it waits leaves the line at once. Daemon threads, so that work still running never holds up
    the server's exit."""

    def __init__(self, workers: int = WORKERS, waiting: int = WAITING):
        self.workers, self.waiting = int(workers), int(waiting)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._admitted = 0  # jobs running or waiting, not yet done or given up
        self._lock = threading.Lock()

    def _done(self, _fut) -> None:
        with self._lock:
            self._admitted -= 1

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._admitted >= self.workers + self.waiting:
                raise PreviewBusy(f"the live mask is busy with {self._admitted} earlier requests; it answers again "
                                  "in a moment")
            self._admitted += 1
            if len(self._threads) < min(self.workers, self._admitted):
                t = threading.Thread(target=self._work, name=f"kinema-preview-{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
        fut.add_done_callback(self._done)
        self._jobs.put((fut, fn, args))
        return fut

    def _work(self) -> None:
        while True:
            fut, fn, args = self._jobs.get()
            if not fut.set_running_or_notify_cancel():  # given up while it waited
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                fut.set_exception(e)


def _safe_relative(value, field: str) -> PurePosixPath:
    if not isinstance(value, str):
        raise ValueError(f"{field}: expected a string, got {type(value).__name__}")
    if "\x00" in value:
        raise ValueError(f"{field}: contains a NUL character")
    text = value.replace("\\", "/")
    rel = PurePosixPath(text)
    if text.startswith("/") or (len(text) > 1 and text[1] == ":") or rel.is_absolute():
        raise ValueError(f"{field}: {value!r} is an absolute path; give a name relative to the folder")
    if any(part == ".." for part in rel.parts):
        raise ValueError(f"{field}: {value!r} contains '..'; only files inside the folder can be read")
    return rel


def resolve_image(ref, input_dir, temp_dir) -> Path:
    """The file a ``{"filename", "subfolder", "type"}`` reference names, checked to lie
    inside the input or temp folder (after following links)."""
    if not isinstance(ref, dict):
        raise ValueError('image: expected {"filename": ..., "subfolder": ..., "type": "input" or "temp"}, '
                         f"got {type(ref).__name__}")
    kind = ref.get("type", "input") or "input"
    if kind not in IMAGE_TYPES:
        raise ValueError(f"image: type {kind!r} is not allowed; use one of {', '.join(IMAGE_TYPES)}")
    filename = ref.get("filename")
    if not filename:
        raise ValueError("image: filename is missing or empty")
    name = _safe_relative(filename, "image filename")
    sub = _safe_relative(ref.get("subfolder", "") or "", "image subfolder")
    root = Path(input_dir if kind == "input" else temp_dir).resolve()
    shown = str(PurePosixPath(*sub.parts, *name.parts))
    shown = shown if len(shown) <= 120 else shown[:100] + "..."
    try:
        full = (root / Path(*sub.parts) / Path(*name.parts)).resolve()
        if root not in full.parents:
            raise ValueError(f"image: {shown!r} lies outside the {kind} folder")
        found = full.is_file()
    except OSError as e:  # a name too long for the file system, a loop of links, ...
        raise ValueError(f"image: {shown!r} cannot be opened in the {kind} folder ({e.strerror or e})") from None
    if not found:
        raise ValueError(f"image: {shown!r} not found in the {kind} folder")
    return full


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) float32 0-1 RGB, EXIF orientation applied (as ComfyUI's Load Image does)."""
    from PIL import Image, ImageOps

    limit = f"the {MAX_PIXELS // 1_000_000} MP preview limit"
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ValueError(f"image: {path.name!r} ({w}x{h}) is larger than {limit}")
            im = ImageOps.exif_transpose(im)
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except Image.DecompressionBombError:  # PIL refuses before the size can be read
        raise ValueError(f"image: {path.name!r} is larger than {limit} (over "
                         f"{2 * Image.MAX_IMAGE_PIXELS // 1_000_000} MP)") from None
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad picture
        raise ValueError(f"image: {path.name!r} could not be read as a picture ({type(e).__name__})") from None
    return rgb


def _encode_mask_png(mask) -> str:
    from PIL import Image

    m = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
    buf = io.BytesIO()
    Image.fromarray((np.asarray(m) > 0.5).astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def mask_preview(payload, input_dir, temp_dir, store: SamStore) -> dict:
    """Handle one preview request (see the module docstring). Raises ``ValueError`` or
    :class:`KinemaError` for a bad request."""
    from ..pipelines.segment import segment

    if not isinstance(payload, dict):
        raise ValueError(f"request: expected a JSON object, got {type(payload).__name__}")
    unknown = set(payload) - {"image", "points", "sam", "multimask", "negative_points"}
    if unknown:
        raise ValueError(f"request: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    path = resolve_image(payload.get("image"), input_dir, temp_dir)
    points = payload.get("points", "")
    if not isinstance(points, (str, list, dict)):
        raise ValueError(f"points: expected the points JSON as a string, got {type(points).__name__}")
    negative = payload.get("negative_points")
    if negative is not None and not isinstance(negative, (str, list)):
        raise ValueError(f"negative_points: expected a string, got {type(negative).__name__}")
    multimask = payload.get("multimask", True)
    if not isinstance(multimask, bool):
        raise ValueError(f"multimask: expected true or false, got {multimask!r}")
    sam_name = payload.get("sam") or ""
    if not isinstance(sam_name, str):
        raise ValueError(f"sam: expected a file name in models/sams, got {type(sam_name).__name__}")
    if sam_name:
        _safe_relative(sam_name, "sam")

    image = read_image(path)
    h, w = image.shape[:2]
    pts = parse_points(points, (w, h), negative)
    if pts.count > MAX_CLICKS:
        raise ValueError(f"points: {pts.count} clicks is more than the {MAX_CLICKS} a preview takes")
    segmenter = None
    if sam_name:
        if runtime.queue_busy():
            raise PreviewBusy("the live mask with SAM waits while ComfyUI runs a prompt; it updates when the "
                              "queue is idle")
        segmenter = store.get(runtime.model_path("sams", sam_name))
    mask, score = segment(image, pts, segmenter, multimask=multimask)
    return {"mask": _encode_mask_png(mask), "score": float(score), "width": int(w), "height": int(h),
            "backend": "sam" if segmenter is not None else "classical", "empty": bool(float(mask.sum()) == 0)}


def over_time(limit: float = TIME_LIMIT) -> str:
    return (f"the live mask took longer than {limit:g} s and was stopped; the node still computes the mask when "
            "the workflow runs (a smaller picture or a box around the object makes the live mask faster)")


def handle_mask_preview(payload, input_dir, temp_dir, store: SamStore,
                        time_limit: float = TIME_LIMIT) -> tuple[int, dict]:
    """``(status, body)`` for a request: 200 with the answer, 400 with ``{"error"}`` for a bad
    request or model file, 503 while a prompt runs (SAM only) or when the work ran out of time,
    500 for anything unexpected."""
    try:
        return 200, mask_preview(payload, input_dir, temp_dir, store)
    except PreviewBusy as e:
        return 503, {"error": str(e)}
    except runtime.OverTime:
        return 503, {"error": over_time(time_limit)}
    except (ValueError, KinemaError) as e:
        return 400, {"error": str(e)}
    except Exception as e:  # noqa: BLE001 - the server must answer, not crash
        return 500, {"error": f"mask preview failed: {type(e).__name__}: {e}"}


class MaskPreviewRoute:
    """The registered route; SAMs come from ``store`` (the pack's shared one by default).
    ``http_errors``: the server's own HTTP exceptions (aiohttp's ``HTTPException``), which pass
    through as the server's answers (413 for a body over its limit)."""

    def __init__(self, json_response, store: SamStore | None = None, http_errors: tuple = (),
                 pool: PreviewPool | None = None, time_limit: float = TIME_LIMIT):
        self.store = store if store is not None else SAM_MODELS
        self.pool = pool if pool is not None else PreviewPool()
        self.time_limit = float(time_limit)
        self._json_response = json_response
        self._http_errors = tuple(http_errors)

    def _work(self, payload, input_dir, temp_dir, deadline: float) -> tuple[int, dict]:
        if time.monotonic() > deadline:  # waited for a worker until its time was up
            return 503, {"error": over_time(self.time_limit)}
        with runtime.time_limit(deadline):
            return handle_mask_preview(payload, input_dir, temp_dir, self.store, self.time_limit)

    async def __call__(self, request):
        try:
            payload = await request.json()
        except self._http_errors:
            raise
        except Exception:  # noqa: BLE001
            return self._json_response({"error": "request: the body is not valid JSON"}, status=400)
        deadline = time.monotonic() + self.time_limit
        try:
            job = self.pool.submit(self._work, payload, runtime.input_dir(), runtime.temp_dir(), deadline)
        except PreviewBusy as e:
            return self._json_response({"error": str(e)}, status=503)
        try:
            status, body = await asyncio.wait_for(asyncio.wrap_future(job), timeout=self.time_limit)
        except asyncio.TimeoutError:
            job.cancel()  # dropped if it still waits; if it runs, it stops at its next step
            status, body = 503, {"error": over_time(self.time_limit)}
        return self._json_response(body, status=status)


def register_routes(server=None, web=None) -> MaskPreviewRoute | None:
    """Add the routes to ComfyUI's server; returns the route object, or None outside ComfyUI.

    Call once from the pack's ``__init__``. ``server``/``web`` default to ComfyUI's
    ``PromptServer.instance`` and ``aiohttp.web``.
    """
    if server is None or web is None:
        found = runtime.prompt_server()
        if found is None:
            return None
        server, web = found
    for route in getattr(server, "routes", ()):
        existing = getattr(getattr(route, "handler", None), "kinema_route", None)
        if getattr(route, "path", None) == ROUTE and isinstance(existing, MaskPreviewRoute):
            return existing
    route_obj = MaskPreviewRoute(web.json_response,
                                 http_errors=(web.HTTPException,) if hasattr(web, "HTTPException") else ())

    async def kinema_mask_preview(request):
        return await route_obj(request)

    kinema_mask_preview.kinema_route = route_obj
    server.routes.post(ROUTE)(kinema_mask_preview)
    return route_obj
