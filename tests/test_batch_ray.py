"""Batches on Ray (ray_batch.py), on a private cluster of 2 workers on this machine, started by
``run_workflow.py --ray`` the way a user starts it:

- 8 jobs of the weights-free demo (each its own drag, frame count, easing, strength) come out
  byte for byte as the same batch run in one process;
- a worker killed (SIGKILL) in the middle of a job: the job runs again on the other worker and
  every job completes, still byte for byte;
- the cluster listens on 127.0.0.1 only, and when the batch ends no process of it is left and
  its temporary folder is gone;
- without ray the pack imports and ``--ray`` says how to install it.

Each run is bounded in time and everything it started is killed if it overstays.
"""
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from demo_jobs import DEMO, ROOT, demo_job, files_under, small_photo, write_jsonl
from kinema import batch

pytest.importorskip("ray", reason="the Ray batch tests need ray: pip install -r requirements-ray.txt")

RUN = [sys.executable, str(ROOT / "run_workflow.py")]
TARGETS = [(202, 35), (170, 60), (230, 50), (202, 110), (150, 40), (240, 90), (190, 20), (215, 70)]
TIMEOUT_S = 420


@pytest.fixture(scope="module")
def jobs_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray_jobs")
    photo = small_photo(folder / "astronaut_256.png")
    jobs = [dict(demo_job(photo, x, y, frames=4 + i % 3, **{"3.easing": ("linear", "ease_in_out")[i % 2],
                                                           "3.strength": (1.0, 0.8)[i // 4]}), id=f"shot_{i + 1}")
            for i, (x, y) in enumerate(TARGETS)]
    return write_jsonl(folder / "shots.jsonl", jobs)


@pytest.fixture(scope="module")
def local_outputs(jobs_file, tmp_path_factory):
    """{path: bytes} of the 8 jobs run as a local batch (in this process)."""
    out = tmp_path_factory.mktemp("local_out")
    manifest = batch.run_batch(DEMO, jobs_file, output_dir=out, quiet=True)
    assert [e["status"] for e in manifest["jobs"]] == ["done"] * 8
    files = files_under(out)
    del files["shots_manifest.json"]
    assert len(files) == 8 * 3  # animation, motion preview, job.json
    return files


class RayRun:
    """``run_workflow.py --ray`` in a process of its own, watched: every process it starts (the
    cluster's and the workers), the ports they listen on, and what is left when it ends."""

    def __init__(self, jobs_file: Path, out: Path, workers: int = 2):
        # Ray keeps its sockets under the temporary folder: a short one (paths are limited to 107 bytes)
        self.tmp = Path(tempfile.mkdtemp(prefix="kb", dir="/tmp"))
        env = {k: v for k, v in os.environ.items()
               if k not in ("COMFYUI_DIR", "PYTHONPATH", "RAY_ADDRESS") and not k.startswith("RAY_")}
        env.update(TMPDIR=str(self.tmp), HF_HUB_OFFLINE="1", KINEMA_PROGRESS="0")
        self.out = out
        self.log = open(self.tmp.parent / f"{self.tmp.name}.log", "w+")
        self.proc = subprocess.Popen(RUN + [str(DEMO), "--batch", str(jobs_file), "--output-dir", str(out), "--ray",
                                            "--workers", str(workers)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=out.parent,
                                     start_new_session=True)
        self.seen: dict = {}           # pid -> psutil.Process, everything the run started
        self.listening: set = set()    # (process, address) of every listening socket seen

    def manifest(self) -> dict | None:
        try:
            return json.loads((self.out / "shots_manifest.json").read_text())
        except (OSError, ValueError):
            return None

    def workers(self, state: str = "") -> list:
        """The worker processes now alive (``state`` 'render': those rendering a job)."""
        found = []
        for p in list(self.seen.values()):
            try:
                title = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if title.startswith("ray::BatchWorker" + (f".{state}" if state else "")):
                found.append(p)
        return found

    def watch(self, step=None) -> int:
        """Poll until the run ends (``step(self)`` each time); kill it all past TIMEOUT_S."""
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while self.proc.poll() is None:
                assert time.monotonic() < deadline, f"the Ray batch ran past {TIMEOUT_S}s:\n{self.output()}"
                try:
                    for child in psutil.Process(self.proc.pid).children(recursive=True):
                        self.seen.setdefault(child.pid, child)
                except psutil.NoSuchProcess:
                    pass
                for p in list(self.seen.values()):
                    try:
                        for c in p.net_connections(kind="inet"):
                            if c.status == psutil.CONN_LISTEN:
                                self.listening.add((p.pid, c.laddr.ip))
                    except psutil.Error:
                        pass
                if step is not None:
                    step(self)
                time.sleep(0.1)
            return self.proc.returncode
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def leftovers(self) -> list:
        """Processes of the run still alive a while after it ended (then killed)."""
        def running(p):
            try:
                return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                return False

        deadline = time.monotonic() + 20
        alive = []
        while time.monotonic() < deadline:
            alive = [p for p in self.seen.values() if running(p)]
            if not alive:
                break
            time.sleep(0.5)
        left = []
        for p in alive:
            try:
                left.append((p.pid, " ".join(p.cmdline())[:80]))
                p.kill()
            except psutil.Error:
                pass
        return left

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def close(self):
        """Whatever the run left in its temporary folder; then the folder and the log go."""
        left = sorted(p.name for p in self.tmp.iterdir()) if self.tmp.exists() else []
        shutil.rmtree(self.tmp, ignore_errors=True)
        if not self.log.closed:
            self.log.close()
            Path(self.log.name).unlink(missing_ok=True)
        return left


@pytest.fixture
def ray_run():
    """Starts RayRuns; whatever a failing test leaves (processes, folders) is removed after it."""
    runs = []

    def start(*args, **kwargs):
        runs.append(RayRun(*args, **kwargs))
        return runs[-1]
    yield start
    for run in runs:
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait()
        run.leftovers()
        run.close()


def loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


def check_clean(run: RayRun) -> None:
    assert run.listening, "no listening socket seen: the watch saw no Ray process"
    assert all(loopback(ip) for _, ip in run.listening), run.listening
    assert not loopback("0.0.0.0") and not loopback("::") and loopback("::ffff:127.0.0.1")
    assert run.leftovers() == []
    assert run.close() == []  # the cluster's temporary folder is gone


def test_ray_batch_is_byte_identical_to_the_local_batch(jobs_file, local_outputs, tmp_path, ray_run):
    out = tmp_path / "out"
    run = ray_run(jobs_file, out)
    rc = run.watch()
    text = run.output()
    assert rc == 0, text
    assert "Ray (private cluster on 127.0.0.1, " in text and "2 worker(s) of 1 CPU(s), 0 GPU(s)" in text
    manifest = run.manifest()
    assert manifest["runner"].startswith("ray (2 workers")
    entries = manifest["jobs"]
    assert [e["id"] for e in entries] == [f"shot_{i}" for i in range(1, 9)]
    assert all(e["status"] == "done" and e["attempts"] == 1 for e in entries), entries
    assert len({e["worker"] for e in entries}) == 2  # both workers rendered
    files = files_under(out)
    del files["shots_manifest.json"]
    assert sorted(files) == sorted(local_outputs)
    differ = [path for path in files if files[path] != local_outputs[path]]
    assert differ == []
    check_clean(run)


def test_a_killed_worker_loses_no_job(jobs_file, local_outputs, tmp_path, ray_run):
    out = tmp_path / "out"
    run = ray_run(jobs_file, out)
    killed = []

    def kill_one_mid_run(run):
        if killed:
            return
        manifest = run.manifest()
        if not manifest or not any(e["status"] == "done" for e in manifest["jobs"]):
            return  # mid-run: once a job is finished
        busy = run.workers("render")
        if busy:
            busy[0].send_signal(signal.SIGKILL)
            killed.append(busy[0].pid)

    rc = run.watch(kill_one_mid_run)
    text = run.output()
    assert rc == 0, text
    assert killed, f"no worker was seen rendering after the first job:\n{text}"
    entries = run.manifest()["jobs"]
    assert all(e["status"] == "done" for e in entries), entries
    retried = [e for e in entries if e["attempts"] == 2]
    assert len(retried) == 1 and all(e["attempts"] == 1 for e in entries if e not in retried), entries
    (job,) = retried
    assert job["lost_workers"] == [f"{job['lost_workers'][0].split(':')[0]}:{killed[0]}"]
    assert job["worker"] != job["lost_workers"][0]  # it ran again on another worker
    assert f"died while running {job['id']}" in text
    files = files_under(out)
    del files["shots_manifest.json"]
    assert sorted(files) == sorted(local_outputs)
    assert [path for path in files if files[path] != local_outputs[path]] == []
    check_clean(run)


NO_RAY = """
import importlib.util, sys
class NoRay:  # this Python without the ray package
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoRay())
spec = importlib.util.spec_from_file_location("kinema", sys.argv[1] + "/__init__.py", submodule_search_locations=[sys.argv[1]])
pack = importlib.util.module_from_spec(spec); sys.modules["kinema"] = pack; spec.loader.exec_module(pack)
import kinema.batch, kinema.ray_batch
print(len(pack.NODE_CLASS_MAPPINGS), "nodes")
from kinema.runner import main
sys.exit(main(sys.argv[2:]))
"""


def test_without_ray_the_pack_imports_and_ray_says_how_to_install(jobs_file, tmp_path):
    r = subprocess.run([sys.executable, "-c", NO_RAY, str(ROOT), str(DEMO), "--batch", str(jobs_file), "--ray",
                        "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "KINEMA_PROGRESS": "0"})
    assert r.returncode == 2, r.stderr
    assert r.stdout.split()[1] == "nodes" and int(r.stdout.split()[0]) > 10
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: --ray needs the 'ray' package, which this Python ({sys.executable}) does not have: "
        f"{sys.executable} -m pip install -r {ROOT / 'requirements-ray.txt'}")
    assert not (tmp_path / "out").exists()  # nothing started
