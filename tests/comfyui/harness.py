"""Start a real ComfyUI with this pack installed, talk to it over HTTP.

Nothing in the ComfyUI checkout is changed: the server runs with ``--base-directory`` in a
temporary folder whose ``custom_nodes/`` holds a link to this repository, and with an
in-memory database.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")  # inputs the front end shows as widgets


def comfyui_dir() -> Path | None:
    d = os.environ.get("COMFYUI_DIR")
    return Path(d) if d else None


def comfyui_python(cdir: Path) -> Path:
    """The interpreter that runs ComfyUI: $COMFYUI_PYTHON, $COMFYUI_VENV/bin/python, the
    environment tests/comfyui/setup_comfyui.sh creates ($COMFYUI_DIR/.venv-kinema), else this
    test process's own (it imported ComfyUI, so it has ComfyUI's requirements)."""
    cands = []
    if os.environ.get("COMFYUI_PYTHON"):
        cands.append(Path(os.environ["COMFYUI_PYTHON"]))
    if os.environ.get("COMFYUI_VENV"):
        cands.append(Path(os.environ["COMFYUI_VENV"]) / "bin" / "python")
    cands.append(cdir / ".venv-kinema" / "bin" / "python")
    for c in cands:
        if c.exists():
            return c
    return Path(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI server process on 127.0.0.1 (started by start(), ended by stop())."""

    def __init__(self, cdir: Path, python: Path, base: Path, pack_name: str = "kinema",
                 front_end_root: Path | None = None):
        self.cdir, self.python, self.base = cdir, python, base
        self.front_end_root = front_end_root  # another frontend build (--front-end-root), else the bundled one
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = base / "comfyui.log"
        self.pack_name = pack_name

    # ---- lifecycle -----------------------------------------------------------------------
    def prepare(self) -> None:
        (self.base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / self.pack_name
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
        # other node packs to install next to this one (os.pathsep-separated folders)
        for extra in filter(None, os.environ.get("COMFYUI_EXTRA_NODES", "").split(os.pathsep)):
            src = Path(extra).resolve()
            dst = self.base / "custom_nodes" / src.name
            if not dst.exists():
                dst.symlink_to(src, target_is_directory=True)
        inp = self.base / "input"
        inp.mkdir(exist_ok=True)
        for p in (ROOT / "assets").glob("*.jpg"):
            shutil.copy(p, inp / p.name)
        # a first start would otherwise open the template browser over the graph
        user = self.base / "user" / "default"
        user.mkdir(parents=True, exist_ok=True)
        (user / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))

    def start(self, timeout: float = 240.0) -> None:
        self.prepare()
        env = dict(os.environ, HF_HUB_OFFLINE="1", KINEMA_PROGRESS="0", PYTHONUNBUFFERED="1")
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(self.python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:",
             "--disable-auto-launch"]
            + (["--front-end-root", str(self.front_end_root)] if self.front_end_root else []),
            cwd=self.cdir, stdout=log, stderr=subprocess.STDOUT, env=env)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/object_info/LoadImage", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # ---- HTTP ------------------------------------------------------------------------------
    def request(self, path: str, data=None, timeout: float = 30.0):
        """(status, parsed JSON or raw bytes)."""
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return status, raw

    def post_raw(self, path: str, body: bytes, content_type: str = "application/json", timeout: float = 60.0):
        """POST ``body`` as it is (not JSON-encoded): (status, parsed JSON or raw bytes)."""
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except (ConnectionError, urllib.error.URLError) as e:  # the server closed a body it refused
            return 0, str(e).encode()
        try:
            return status, json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return status, raw

    def alive(self) -> bool:
        """The process runs and answers a plain request."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            self.get("/object_info/LoadImage", timeout=30)
            return True
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def limit_memory(self, headroom: int) -> int:
        """Cap the server's address space (``RLIMIT_AS``) at what it maps now plus ``headroom``
        bytes: a stand-in for a machine with that much memory left, where an allocation over
        it fails in the process (as it would under a container's limit, without the kernel
        killing the server). Returns the limit."""
        import resource
        vm = 0
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                vm = int(line.split()[1]) * 1024
        limit = vm + int(headroom)
        resource.prlimit(self.proc.pid, resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        return limit

    def rss(self) -> int:
        """Resident memory of the server process, in bytes (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def run_and_interrupt(self, api: dict, node_id: str, after_progress: int = 1, delay: float = 0.0,
                          timeout: float = 600.0) -> dict:
        """Queue ``api``, and once node ``node_id`` runs (and has reported ``after_progress``
        steps, if > 0; then ``delay`` seconds more) POST /interrupt. Returns the times, read from
        the server's messages (websocket): ``latency`` (s from the interrupt request to the
        server's execution_interrupted), ``step`` (the longest gap between the node's progress
        reports before it), ``steps_seen``, ``end`` (the last event: execution_interrupted, or
        what ended the prompt instead) and its ``data``."""
        return asyncio.run(self._run_and_interrupt(api, node_id, after_progress, delay, timeout))

    async def _run_and_interrupt(self, api, node_id, after_progress, delay, timeout) -> dict:
        import aiohttp

        cid = uuid.uuid4().hex
        out = {"steps_seen": 0, "step": 0.0, "latency": None, "end": None, "data": None}
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{self.url}/ws?clientId={cid}", max_msg_size=0) as ws:
                async with session.post(f"{self.url}/prompt", json={"prompt": api, "client_id": cid}) as r:
                    body = await r.json()
                    if r.status != 200:
                        raise AssertionError(f"/prompt refused the workflow ({r.status}): {body}")
                    pid = body["prompt_id"]
                t_sent, last_step = None, None
                t_end = time.monotonic() + timeout
                while time.monotonic() < t_end:
                    msg = await ws.receive(timeout=max(t_end - time.monotonic(), 0.1))
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            break
                        continue  # preview images
                    m = json.loads(msg.data)
                    kind, data = m.get("type"), m.get("data", {})
                    if data.get("prompt_id") not in (None, pid):
                        continue
                    now = time.time()
                    started = kind == "executing" and data.get("node") == node_id and after_progress <= 0
                    if kind == "progress" and data.get("node") == node_id and t_sent is None:
                        out["steps_seen"] = int(data.get("value", 0))
                        if last_step is not None:
                            out["step"] = max(out["step"], now - last_step)
                        last_step = now
                        started = out["steps_seen"] >= after_progress
                    if started and t_sent is None:
                        await asyncio.sleep(delay)
                        t_sent = time.time()
                        async with session.post(f"{self.url}/interrupt", json={}) as r:
                            assert r.status == 200
                    if kind in ("execution_interrupted", "execution_error", "execution_success"):
                        out["end"], out["data"] = kind, data
                        if t_sent is not None and "timestamp" in data:
                            out["latency"] = data["timestamp"] / 1000.0 - t_sent
                        out["interrupt_sent"] = t_sent is not None
                        return out
        raise TimeoutError(f"prompt {pid} did not end within {timeout:.0f} s: {out}")

    def get(self, path: str, timeout: float = 30.0):
        status, body = self.request(path, timeout=timeout)
        if status != 200:
            raise urllib.error.URLError(f"GET {path} -> {status}")
        return body

    def queue(self, api: dict) -> str:
        status, body = self.request("/prompt", {"prompt": api, "client_id": uuid.uuid4().hex})
        if status != 200:
            raise AssertionError(f"/prompt refused the workflow ({status}): {json.dumps(body)[:3000]}")
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0, poll: float = 1.0) -> dict:
        """History entry of a finished prompt (raises on timeout); /history is asked every
        ``poll`` seconds."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(poll)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """A UI-format workflow (what "Save" writes) -> the API prompt ComfyUI queues, with the
    widget order of the server's /object_info (the pack's own converter, fed by the server)."""
    from kinema import runner
    return runner.ui_to_api(workflow, input_types={k: v["input"] for k, v in object_info.items()})


def view_url(server: ComfyServer, item: dict) -> str:
    q = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                "type": item.get("type", "output")})
    return f"{server.url}/view?{q}"

def frontend_build(version: str, cache: Path) -> Path:
    """The static folder of comfyui-frontend-package ``version`` (installed once into
    ``cache`` with pip --target; the registry package, not ComfyUI's pinned one)."""
    target = cache / f"comfyui-frontend-package-{version}"
    static = target / "comfyui_frontend_package" / "static"
    if not (static / "index.html").is_file():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target",
                        str(target), f"comfyui-frontend-package=={version}"], check=True, timeout=900)
    return static


def missing_choices(api: dict, object_info: dict) -> list[str]:
    """Combo values (model files, mostly) the server does not offer, as 'Node.input=value'."""
    out = []
    for node in api.values():
        spec = object_info[node["class_type"]]["input"]
        for name, value in node["inputs"].items():
            decl = spec.get("required", {}).get(name) or spec.get("optional", {}).get(name)
            if not decl or isinstance(value, list):
                continue
            choices = decl[0] if isinstance(decl[0], list) else (decl[1] or {}).get("options") if decl[0] == "COMBO" else None
            if choices is not None and value not in choices:
                out.append(f"{node['class_type']}.{name}={value}")
    return out


def png_header_only(width: int, height: int) -> bytes:
    """A PNG file that declares ``width`` x ``height`` pixels but holds one tiny, broken image
    stream: what a picture bomb looks like to a reader that trusts the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))
