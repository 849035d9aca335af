"""Batches on a Ray cluster (``run_workflow.py WORKFLOW --batch JOBS --ray [ADDRESS]``).

Each GPU or CPU slot of the cluster holds one long-lived worker, a Ray actor
(:class:`BatchWorker`): it loads the pack and the workflow's node classes once, keeps its
loaders' models across jobs (``batch.JobRunner``) and renders one job at a time. The driver
(this process) hands each idle worker the next job, writes what comes back (the job's files,
as bytes) into the output folder exactly as a local batch does, and keeps the manifest. A job
whose worker dies is run again on another worker (``--retries``); Ray restarts the dead worker,
which loads its models again and takes further jobs.

Ray is optional (``pip install -r requirements-ray.txt``): nothing imports it until a batch
asks for ``--ray``. Without an address the batch starts a private cluster on this machine,
bound to 127.0.0.1, with its own authentication token and temporary folder, no dashboard and
no usage reporting, and removes all of it at the end. With ``auto`` or an address it joins an
existing cluster (``ray start --head`` ...); then every machine needs the same Python
environment, this pack at the same path, and the models, input files and ComfyUI checkout
(``COMFYUI_DIR``) at the paths the driver uses; outputs come back to the driver.
"""
from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from .runner import WorkflowError

ROOT = Path(__file__).resolve().parent
MAX_RESTARTS = 3            # times Ray restarts a worker that died (a new process, models loaded again)
READY_TIMEOUT_S = 600       # workers start (import torch, the pack, ComfyUI) within this
LOCAL_OBJECT_STORE = 512 * 2**20
PASSED_ENV = ("KINEMA_INPUT_DIR", "KINEMA_MODELS_DIR", "KINEMA_DEVICE", "COMFYUI_DIR", "HF_HUB_OFFLINE")


def import_ray(local: bool):
    """Import ray, set up so that it never reaches the network: no usage reporting; for a
    private local cluster, 127.0.0.1 as the node's address (its servers bind there) and a
    token of its own (nothing written to ~/.ray)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if local:
        # Ray's single-machine mode (its default on macOS and Windows): the node is 127.0.0.1
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    try:
        import ray
    except ImportError:
        raise WorkflowError(f"--ray needs the 'ray' package, which this Python ({sys.executable}) does not have: "
                            f"{sys.executable} -m pip install -r {ROOT / 'requirements-ray.txt'}") from None
    return ray


class BatchWorker:
    """One worker of a batch, as a Ray actor. It is sent to the workers by value (the pack is
    not an installed package there), so until it has loaded the pack from ``root`` it uses
    only the standard library; everything else lives in ``batch.JobRunner``."""

    def __init__(self, root: str, env: dict, cwd: str, api: dict, name: str, model_cache: int, threads: int,
                 scratch: str | None = None):
        import importlib
        import importlib.util
        import os
        import sys
        import tempfile
        # where jobs save before their files go back: the private cluster's folder (removed with it,
        # also after a worker was killed), else this machine's temporary folder
        self.staging = tempfile.mkdtemp(prefix="kinema-worker-", dir=scratch)
        os.environ.update(env)
        os.environ["KINEMA_OUTPUT_DIR"] = self.staging  # jobs save here; their files go back to the driver
        os.environ["KINEMA_TEMP_DIR"] = os.path.join(self.staging, ".temp")  # the nodes' previews
        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)  # relative paths in jobs mean what they mean to the driver
        if "kinema" not in sys.modules:
            spec = importlib.util.spec_from_file_location("kinema_run_workflow", os.path.join(root, "run_workflow.py"))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            module.load_pack()
        import torch
        torch.set_num_threads(threads)
        batch = importlib.import_module("kinema.batch")
        self.jobs = batch.job_runner(api, name, model_cache, env.get("KINEMA_DEVICE"))

    def where(self) -> str:
        import importlib
        return importlib.import_module("kinema.batch").worker_name()

    def render(self, job: dict) -> dict:
        return self.jobs.run_collected(job)

    def close(self) -> None:
        import shutil
        self.jobs.close()
        shutil.rmtree(self.staging, ignore_errors=True)


def _worker_lost_errors(ray) -> tuple:
    ex = ray.exceptions
    return tuple(getattr(ex, n) for n in ("RayActorError", "WorkerCrashedError", "ObjectLostError", "NodeDiedError")
                 if hasattr(ex, n))


def _sizes(ray, workers, gpus_per_worker, cpus_per_worker) -> tuple[int, float, float]:
    """(workers, GPUs, CPUs per worker): one worker per slot of the cluster's free resources
    unless ``workers`` says how many; refuses more than fit."""
    free = ray.available_resources()
    gpus, cpus = float(free.get("GPU", 0)), float(free.get("CPU", 0))
    gpw = (1.0 if gpus >= 1 else 0.0) if gpus_per_worker is None else float(gpus_per_worker)
    cpw = float(cpus_per_worker)
    if gpw < 0 or cpw < 0 or (gpw == 0 and cpw == 0):
        raise WorkflowError("--gpus-per-worker / --cpus-per-worker: each worker needs some CPU or GPU (both >= 0, "
                            "not both 0)")
    fit = [int(have // need + 1e-9) for have, need in ((gpus, gpw), (cpus, cpw)) if need > 0]
    room = min(fit)
    if workers is None:
        workers = room
    if workers < 1 or workers > room:
        raise WorkflowError(f"--workers: the cluster has room for {room} worker(s) of {cpw:g} CPU(s) and {gpw:g} "
                            f"GPU(s) (free: {cpus:g} CPUs, {gpus:g} GPUs); ask for 1 to {room}, or for smaller "
                            f"workers with --cpus-per-worker / --gpus-per-worker" if room else
                            f"--workers: the cluster has no room for a worker of {cpw:g} CPU(s) and {gpw:g} GPU(s) "
                            f"(free: {cpus:g} CPUs, {gpus:g} GPUs)")
    return workers, gpw, cpw


def run(batch, todo: list, finished, *, address: str = "local", workers=None, gpus_per_worker=None,
        cpus_per_worker: float = 1.0, model_cache: int = 4, retries: int = 2, device=None, log=None) -> str:
    """Run ``todo`` (batch.Job) on Ray workers, calling ``finished(job, result)`` in the driver
    as each job ends. Returns how the batch ran (for the manifest)."""
    if retries < 0:
        raise WorkflowError("--retries: 0 or more")
    local = address in (None, "local")
    ray = import_ray(local)
    say = log or (lambda s: None)
    temp = tempfile.mkdtemp(prefix="kray") if local else None
    actors = []
    try:
        if local:
            cpus = os.cpu_count() or 1
            if workers:
                cpus = max(cpus, int(workers * cpus_per_worker + 0.999))
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, _temp_dir=temp,
                     object_store_memory=LOCAL_OBJECT_STORE, log_to_driver=False, logging_level="WARNING",
                     namespace="kinema")
            node = ray.util.get_node_ip_address()
            if node != "127.0.0.1":
                raise WorkflowError(f"--ray: the local cluster took {node} as this machine's address instead of "
                                    f"127.0.0.1; not running it")
            where = f"private cluster on 127.0.0.1, {cpus} CPUs"
        else:
            ray.init(address=address, log_to_driver=False, logging_level="WARNING", namespace="kinema")
            where = f"cluster at {address}"
        n, gpw, cpw = _sizes(ray, workers, gpus_per_worker, cpus_per_worker)
        say(f"Ray ({where}): {n} worker(s) of {cpw:g} CPU(s), {gpw:g} GPU(s)")
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env.update(KINEMA_PROGRESS="0", HF_HUB_OFFLINE="1")
        if device:
            env["KINEMA_DEVICE"] = device
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        remote = ray.remote(BatchWorker).options(num_cpus=cpw, num_gpus=gpw, max_restarts=MAX_RESTARTS,
                                                 max_concurrency=1)
        args = (str(ROOT), env, os.getcwd(), batch.api, batch.workflow.stem, model_cache, max(1, int(cpw)), temp)
        actors = [remote.remote(*args) for _ in range(n)]
        try:
            names = ray.get([a.where.remote() for a in actors], timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise WorkflowError(f"--ray: the workers did not start within {READY_TIMEOUT_S}s") from None
        except _worker_lost_errors(ray) as e:
            raise WorkflowError(f"--ray: a worker could not start: {e}") from None
        say(f"workers ready: {', '.join(names)}")
        _schedule(ray, actors, names, todo, finished, retries, say)
        return f"ray ({n} workers, {where})"
    finally:
        if actors:
            try:
                ray.get([a.close.remote() for a in actors], timeout=30)
            except Exception:  # a worker that is gone or stuck is killed below all the same
                pass
            for a in actors:
                ray.kill(a, no_restart=True)
        if ray.is_initialized():
            ray.shutdown()
        if temp:
            for _ in range(10):  # the cluster's processes may still be closing their logs
                shutil.rmtree(temp, ignore_errors=True)
                if not os.path.exists(temp):
                    break
                time.sleep(0.5)


def _schedule(ray, actors: list, names: list, todo: list, finished, retries: int, say) -> None:
    """Keep every worker busy with one job. A job whose worker died goes back to the queue, for
    another worker when there is one, at most ``retries`` more times; the dead worker, which
    Ray restarts, takes jobs again once it answers (it may die at most MAX_RESTARTS times)."""
    lost_errors = _worker_lost_errors(ray)
    pending = deque((job, 1, ()) for job in todo)  # (job, attempt, (worker index, name) it died on)
    idle = list(range(len(actors)))
    deaths = [0] * len(actors)
    died_at = [0.0] * len(actors)
    running = {}   # object ref -> (worker index, job, attempt, died on)
    probing = {}   # object ref of a restarted worker's where() -> worker index
    probe_at = {}  # worker index -> when to ask it again whether it is back
    while pending or running:
        now = time.monotonic()
        for i, when in list(probe_at.items()):
            if now >= when:
                del probe_at[i]
                probing[actors[i].where.remote()] = i
        for i in list(idle):
            if not pending:
                break
            pick = next((k for k, item in enumerate(pending) if i not in {d[0] for d in item[2]}), 0)
            job, attempt, died_on = pending[pick]
            del pending[pick]
            idle.remove(i)
            running[actors[i].render.remote(job.to_dict())] = (i, job, attempt, died_on)
        if pending and not (idle or running or probing or probe_at):
            for job, attempt, died_on in pending:
                finished(job, {"error": "no Ray worker left to run it (the workers died more often than Ray "
                                        "restarts them)", "seconds": None, "attempts": attempt - 1,
                               "lost_workers": [d[1] for d in died_on]})
            return
        refs = list(running) + list(probing)
        if not refs:
            time.sleep(0.2)
            continue
        ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
        for ref in ready:
            if ref in probing:
                i = probing.pop(ref)
                try:
                    names[i] = ray.get(ref)
                    idle.append(i)
                    say(f"worker {names[i]} is back")
                except lost_errors as e:
                    if getattr(e, "actor_init_failed", False) or now - died_at[i] > READY_TIMEOUT_S:
                        say(f"worker {names[i]} did not come back: {_first_line(e)}")
                    else:
                        probe_at[i] = time.monotonic() + 1.0  # still restarting
                continue
            i, job, attempt, died_on = running.pop(ref)
            try:
                result = ray.get(ref)
            except lost_errors as e:
                deaths[i] += 1
                died_at[i] = time.monotonic()
                if deaths[i] <= MAX_RESTARTS:
                    probe_at[i] = died_at[i]  # Ray restarts it: ask when it is back
                died_on = died_on + ((i, names[i]),)
                if attempt > retries:
                    finished(job, {"error": f"its worker died {attempt} time(s) (last: {names[i]}: {_first_line(e)})",
                                   "seconds": None, "attempts": attempt, "worker": names[i],
                                   "lost_workers": [d[1] for d in died_on]})
                else:
                    say(f"worker {names[i]} died while running {job.id} ({_first_line(e)}); {job.id} runs again on "
                        f"{'another worker' if len(actors) > 1 else 'the restarted worker'}")
                    pending.appendleft((job, attempt + 1, died_on))
                continue
            except ray.exceptions.RayTaskError as e:  # the worker's own code failed, not the job
                result = {"error": f"the worker failed: {e}", "seconds": None}
            idle.append(i)
            names[i] = result.get("worker") or names[i]
            result["attempts"] = attempt
            if died_on:
                result["lost_workers"] = [d[1] for d in died_on]
            finished(job, result)


def _first_line(error) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
