"""The live mask route's own machinery: its bounded pool of workers, the per-request time
limit (503, and the work stops at its next step), the server's 413 passing through, picture
bombs refused with the pack's message. The route against a real ComfyUI is in
tests/comfyui/test_bad_inputs.py."""
import asyncio
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kinema import runtime
from kinema.nodes import routes
from kinema.pipelines import segment as segmentation

sys.path.insert(0, str(Path(__file__).resolve().parent / "comfyui"))
import harness  # noqa: E402  (png_header_only; nothing of ComfyUI)

CLICK = '{"positive": [[16, 12]], "negative": [], "box": null}'


class FakeWeb:
    class HTTPException(Exception):
        status = 413

    @staticmethod
    def json_response(body, status=200):
        return status, body


class FakeRequest:
    def __init__(self, payload=None, error=None):
        self.payload, self.error = payload, error

    async def json(self):
        if self.error is not None:
            raise self.error
        return self.payload


@pytest.fixture()
def dirs(tmp_path):
    for kind in ("input", "temp"):
        (tmp_path / kind).mkdir()
    rgb = np.zeros((24, 32, 3), np.uint8)
    rgb[6:18, 8:24] = (200, 30, 30)  # a red square on black
    Image.fromarray(rgb).save(tmp_path / "input" / "pic.png")
    return tmp_path


@pytest.fixture()
def in_dirs(dirs, monkeypatch):
    monkeypatch.setenv("KINEMA_INPUT_DIR", str(dirs / "input"))
    monkeypatch.setenv("KINEMA_TEMP_DIR", str(dirs / "temp"))
    return dirs


def request(payload=None):
    return FakeRequest(dict({"image": {"filename": "pic.png", "type": "input"}, "points": CLICK},
                            **(payload or {})))


def slow_preview(log, stop_after=None):
    """Stands in for mask_preview: long work that checks for interrupts between steps."""
    def run(*_args):
        t0 = time.monotonic()
        try:
            while stop_after is None or time.monotonic() - t0 < stop_after:
                runtime.check_interrupt()
                time.sleep(0.01)
            return {"done": True}
        finally:
            log.append(time.monotonic())
    return run


async def call_all(route, reqs):
    return await asyncio.gather(*(route(r) for r in reqs))


def test_over_time_answers_503_and_the_work_stops(in_dirs, monkeypatch):
    ended, real = [], routes.mask_preview
    monkeypatch.setattr(routes, "mask_preview", slow_preview(ended))
    route = routes.MaskPreviewRoute(FakeWeb.json_response, store=segmentation.SamStore(), time_limit=0.3)
    t0 = time.monotonic()
    status, body = asyncio.run(route(request()))
    took = time.monotonic() - t0
    assert status == 503 and "longer than 0.3 s" in body["error"] and "was stopped" in body["error"]
    assert 0.25 < took < 2.0
    for _ in range(200):  # the worker gives up at its next check
        if ended:
            break
        time.sleep(0.01)
    assert ended and ended[0] - t0 < 1.0
    monkeypatch.setattr(routes, "mask_preview", real)  # the worker is free: a real preview answers
    route.time_limit = 60.0
    status, body = asyncio.run(route(request()))
    assert status == 200 and (body["width"], body["height"]) == (32, 24)


def test_pool_is_bounded_and_busy_answers_at_once(in_dirs, monkeypatch):
    release = threading.Event()

    def blocked(*_args):
        release.wait(10)
        return {"ok": 1}

    monkeypatch.setattr(routes, "mask_preview", blocked)
    route = routes.MaskPreviewRoute(FakeWeb.json_response, store=segmentation.SamStore(),
                                    pool=routes.PreviewPool(workers=1, waiting=1), time_limit=5)

    async def scenario():
        first = asyncio.ensure_future(route(request()))      # runs
        second = asyncio.ensure_future(route(request()))     # waits
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        third = await route(request())                       # refused at once
        refused_in = time.monotonic() - t0
        release.set()
        return await first, await second, third, refused_in

    first, second, third, refused_in = asyncio.run(scenario())
    assert first == (200, {"ok": 1}) and second == (200, {"ok": 1})
    assert third[0] == 503 and "busy" in third[1]["error"] and refused_in < 0.5
    assert len(route.pool._threads) == 1


def test_waiting_work_past_its_time_is_not_run(in_dirs, monkeypatch):
    ran = []

    def blocked(payload, *_args):
        ran.append(payload["points"])
        time.sleep(0.6)
        return {"ok": 1}

    monkeypatch.setattr(routes, "mask_preview", blocked)
    route = routes.MaskPreviewRoute(FakeWeb.json_response, store=segmentation.SamStore(),
                                    pool=routes.PreviewPool(workers=1, waiting=2), time_limit=0.3)
    out = asyncio.run(call_all(route, [request({"points": "a"}), request({"points": "b"})]))
    assert [s for s, _ in out] == [503, 503]
    assert route.pool._admitted == 1  # "b" left the line when it was given up; "a" still runs
    time.sleep(0.8)
    assert ran == ["a"] and route.pool._admitted == 0  # "b" never started


def test_server_http_errors_pass_through(in_dirs):
    route = routes.MaskPreviewRoute(FakeWeb.json_response, store=segmentation.SamStore(), http_errors=(FakeWeb.HTTPException,))
    with pytest.raises(FakeWeb.HTTPException):  # e.g. aiohttp's 413 for a body over the server's limit
        asyncio.run(route(FakeRequest(error=FakeWeb.HTTPException())))
    status, body = asyncio.run(route(FakeRequest(error=ValueError("Expecting value"))))
    assert status == 400 and "not valid JSON" in body["error"]


def test_registered_route_passes_server_errors():
    class Routes(list):
        def post(self, path):
            return lambda fn: self.append((path, fn)) or fn

    server = type("Server", (), {"routes": Routes()})()
    route = routes.register_routes(server=server, web=FakeWeb)
    assert route._http_errors == (FakeWeb.HTTPException,)


def test_time_limit_leaves_comfyui_interrupt_alone(monkeypatch):
    calls = []

    class MM:
        @staticmethod
        def throw_exception_if_processing_interrupted():
            calls.append(1)

    monkeypatch.setattr(runtime, "_mm", lambda: MM)
    runtime.check_interrupt()
    assert calls == [1]
    with runtime.time_limit(time.monotonic() + 10):
        runtime.check_interrupt()   # the prompt's interrupt flag is neither read nor cleared
        assert calls == [1]
    with runtime.time_limit(time.monotonic() - 1), pytest.raises(runtime.OverTime):
        runtime.check_interrupt()
    runtime.check_interrupt()
    assert calls == [1, 1]


@pytest.mark.parametrize("size", [(8000, 6000), (20000, 10000)], ids=["48MP", "200MP-bomb"])
def test_huge_pictures_get_the_preview_limit_message(dirs, size):
    (dirs / "input" / "huge.png").write_bytes(harness.png_header_only(*size))
    status, body = routes.handle_mask_preview({"image": {"filename": "huge.png", "type": "input"}, "points": CLICK},
                                              dirs / "input", dirs / "temp", segmentation.SamStore())
    assert status == 400 and body["error"].startswith("image: 'huge.png'")
    assert "larger than the 40 MP preview limit" in body["error"]
