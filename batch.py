"""Batch rendering: one workflow, many jobs, in one process or on a Ray cluster.

    python run_workflow.py WORKFLOW --batch jobs.jsonl [--output-dir out] [--ray [ADDRESS]]

**Jobs.** A batch file holds one job per line, each a set of input overrides in the
``NODE_ID.INPUT`` form of ``--set`` (``--set`` values apply to every job, a job's own win):

- JSON Lines (``.jsonl``): one object per line, ``{"id": "shot_01", "3.tracks": {...}, "3.frames": 24}``;
  blank lines and lines starting with ``#`` are skipped;
- CSV (``.csv``): a header row of ``NODE_ID.INPUT`` columns (and optionally ``id``), then one
  row per job; a cell is read as ``--set`` reads a value (JSON when it parses, else text) and
  an empty cell leaves the input as the workflow has it.

``id`` names the job's output folder (letters, digits, ``.``, ``_``, ``-``). Without one a job is
``job-<hash>``, the hash of the workflow and the job's inputs: an edited line or workflow makes
a new job, an unchanged one keeps its name.

**Outputs.** Every output node that names its files by ``filename_prefix`` (SaveImage,
SaveAnimatedWEBP, ...) saves under the job's folder: ``<output-dir>/<job id>/<prefix>_00001_.<ext>``;
text results go to ``<job id>/<workflow>_text.txt`` and the job's inputs to ``<job id>/job.json``.
A job runs in a staging folder and its folder appears, whole, only when it succeeded, so
jobs never share a file and a folder is never half written. A re-run skips every job whose
folder exists (and says so when that folder holds another job's outputs); a failed job leaves
no folder, so a re-run tries it again.

**Models.** Loader nodes (node types whose name holds ``Loader``: ComfyUI's checkpoint, VAE,
CLIP, UNet, LoRA, ControlNet loaders and this pack's) are cached across jobs, keyed by the
node type and its inputs (an input from another cached loader counts as that loader's key):
each model is loaded once per process (once per worker on Ray) and reused while the later
jobs ask for the same file. At most ``--model-cache`` results are kept (the least recently
used goes first); all are released when the batch ends.

**Report.** A progress line per job, a summary, and a manifest
``<output-dir>/<batch file name>_manifest.json`` (rewritten after every job): per job its
status (done / skipped / failed / not run), outputs (relative to the output folder),
seconds, error, and on Ray the worker and the attempts. A failing job is reported and the
others go on. Exit status: 0 when no job failed, 1 when some did, 2 when the batch could
not start, 130 when interrupted.

The Ray side is ``ray_batch.py``.
"""
from __future__ import annotations

import csv
import gc
import hashlib
import inspect
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from . import runner, runtime
from .runner import WorkflowError

JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
JOB_FILE = "job.json"
TEMP = ".temp"  # the nodes' temporary files, in the staging folder (no job id starts with ".")


@dataclass
class Job:
    """One line of a batch file: ``overrides`` = {node id: {input: value}} (the ``--set``
    values with the line's own on top); ``line`` = its line number in the file."""
    id: str
    line: int
    overrides: dict
    source: str = ""  # "jobs.csv line 3": where errors say the job's values are
    auto_id: bool = False

    def to_dict(self) -> dict:
        return {"id": self.id, "line": self.line, "overrides": self.overrides, "source": self.source}


# ---------------------------------------------------------------------------- batch files

def read_jobs(path, base: dict | None = None) -> list[Job]:
    """The jobs of a ``.jsonl`` or ``.csv`` file, each with ``base`` ({node id: {input: value}},
    the ``--set`` values) under its own overrides. Jobs without an ``id`` get theirs from
    :func:`name_jobs`. Raises WorkflowError naming the file, the line and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise WorkflowError(f"--batch: file '{path}' not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(path)
    elif suffix == ".csv":
        rows = _csv_rows(path)
    else:
        raise WorkflowError(f"--batch: '{path.name}' is neither .jsonl (one JSON object per line) nor .csv")
    jobs, seen = [], {}
    for line, values in rows:
        where = f"{path.name} line {line}"
        given = values.pop("id", None)
        jid = None
        if given is not None:
            jid = str(given) if isinstance(given, (str, int)) and not isinstance(given, bool) else ""
            if not JOB_ID.fullmatch(jid):
                raise WorkflowError(f"{where}: id {given!r} names the job's output folder: use up to 100 letters, "
                                    f"digits, '.', '_' and '-', starting with a letter or digit")
        overrides = {nid: dict(inputs) for nid, inputs in (base or {}).items()}
        for key, value in values.items():
            runner.add_override(overrides, key, value, where)
        jobs.append(Job(jid or "", line, overrides, where, auto_id=jid is None))
        if jid is not None:
            if jid in seen:
                raise WorkflowError(f"{where}: id '{jid}' is already the id of line {seen[jid]}")
            seen[jid] = line
    if not jobs:
        raise WorkflowError(f"--batch: '{path.name}' holds no job")
    return jobs


def _jsonl_rows(path: Path):
    with path.open(encoding="utf-8") as f:
        for line, text in enumerate(f, 1):
            text = text.strip()
            if not text or text.startswith("#"):
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise WorkflowError(f"{path.name} line {line}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(obj, dict):
                raise WorkflowError(f"{path.name} line {line}: a job is a JSON object of \"NODE_ID.INPUT\": value "
                                    f"pairs (and an optional \"id\"), not {type(obj).__name__}")
            yield line, obj


def _csv_rows(path: Path):
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            return
        header = [h.strip() for h in header]
        for name in header:
            if name != "id" and not re.fullmatch(r"[^.\s]+\.[^.\s]+", name):
                raise WorkflowError(f"{path.name} line 1: column '{name}' is neither 'id' nor NODE_ID.INPUT")
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) > len(header):
                raise WorkflowError(f"{path.name} line {reader.line_num}: {len(row)} cells for {len(header)} columns "
                                    f"(a value with commas needs double quotes around it)")
            yield reader.line_num, {name: (cell if name == "id" else runner.parse_value(cell))
                                    for name, cell in zip(header, row) if cell != ""}


def workflow_digest(api: dict) -> str:
    """sha256 of an API workflow's graph (node types, inputs, links; titles left out)."""
    graph = {nid: {"class_type": n["class_type"], "inputs": n["inputs"]} for nid, n in api.items()}
    return hashlib.sha256(json.dumps(graph, sort_keys=True).encode()).hexdigest()


def name_jobs(jobs: list[Job], api: dict) -> None:
    """Give every job without an id ``job-<hash of the workflow and its overrides>``."""
    digest = workflow_digest(api)
    seen = {j.id: j.line for j in jobs if not j.auto_id}
    for job in jobs:
        if not job.auto_id:
            continue
        key = json.dumps({"workflow": digest, "overrides": job.overrides}, sort_keys=True)
        job.id = "job-" + hashlib.sha256(key.encode()).hexdigest()[:12]
        if job.id in seen:
            raise WorkflowError(f"line {job.line}: the same job as line {seen[job.id]} (same inputs); give one of "
                                f"them an id if both are wanted")
        seen[job.id] = job.line


def job_overrides(job: Job, api: dict, classes: dict) -> dict:
    """The job's overrides with every saver's ``filename_prefix`` put under the job's folder."""
    out = {nid: dict(inputs) for nid, inputs in job.overrides.items()}
    for nid, prefix in runner.output_prefixes(api, classes).items():
        prefix = out.get(nid, {}).get("filename_prefix", prefix)
        if not isinstance(prefix, str):
            raise WorkflowError(f"node {nid}: filename_prefix comes from node {prefix[0]}; a batch names each job's "
                                f"files by putting the prefix under the job's folder, so give it as a value")
        inside = os.path.normpath(os.path.join(job.id, prefix))
        if not inside.startswith(job.id + os.sep):
            raise WorkflowError(f"{job.source or '--set'}, {nid}.filename_prefix: '{prefix}' leaves the job's "
                                f"output folder")
        out.setdefault(nid, {})["filename_prefix"] = f"{job.id}/{prefix}"
    return out


# ---------------------------------------------------------------------------- loaders cached across jobs

def is_loader(node_type: str, cls) -> bool:
    """A node whose result is kept across jobs: a model loader of ComfyUI's classic node API or
    of this pack (its type name holds 'Loader'), with a plain (not async) function."""
    if "Loader" not in node_type or getattr(cls, "OUTPUT_NODE", False) or hasattr(cls, "GET_SCHEMA"):
        return False
    fn = getattr(cls, getattr(cls, "FUNCTION", "") or "", None)
    return callable(fn) and not inspect.iscoroutinefunction(fn)


class ModelCache:
    """Results of loader nodes, keyed by the node type and its inputs, the ``size`` most
    recently used kept. ``wrap(classes)`` gives the node classes with every loader reading
    through the cache; :meth:`clear` lets go of everything."""

    def __init__(self, size: int = 4):
        self.size = max(int(size), 0)
        self.entries: OrderedDict = OrderedDict()  # key -> results tuple
        self.loads = 0
        self.hits = 0

    def wrap(self, classes: dict) -> dict:
        if self.size == 0:
            return dict(classes)
        return {name: self._cached_class(name, cls) if is_loader(name, cls) else cls for name, cls in classes.items()}

    def _cached_class(self, node_type: str, cls):
        method = cls.FUNCTION
        load = getattr(cls, method)
        cache = self

        def cached(node, *args, **kwargs):
            key = None if args else cache.key(node_type, kwargs)
            if key is None:
                return load(node, *args, **kwargs)
            return cache.get(key, lambda: load(node, **kwargs))

        # same name and module: ComfyUI's executor and the runner see the node they know
        return type(cls.__name__, (cls,), {method: cached, "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})

    def key(self, node_type: str, kwargs: dict) -> str | None:
        """The cache key of a loader call, or None when an input is neither a plain value nor
        a result of another cached loader (then the call is not cached)."""
        parts = {}
        for name, value in kwargs.items():
            if _plain(value):
                parts[name] = value
                continue
            source = self._source(value)
            if source is None:
                return None
            parts[name] = {"from": source[0], "output": source[1]}
        return json.dumps([node_type, parts], sort_keys=True)

    def _source(self, value):
        for key, result in self.entries.items():
            outputs = result.get("result", ()) if isinstance(result, dict) else result
            for i, item in enumerate(outputs or ()):
                if item is value:
                    return key, i
        return None

    def get(self, key: str, load):
        if key in self.entries:
            self.entries.move_to_end(key)
            self.hits += 1
            return self.entries[key]
        result = load()
        self.loads += 1
        self.entries[key] = result
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return result

    def clear(self) -> None:
        self.entries.clear()
        gc.collect()
        runtime.free_memory()


def _plain(value) -> bool:
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


# ---------------------------------------------------------------------------- running jobs in a process

class JobRunner:
    """Runs jobs of one workflow in this process, loaders cached across them (:class:`ModelCache`).
    Files land in ``runtime.output_dir() / job id``. Used by the local batch and by each Ray worker."""

    def __init__(self, api: dict, classes: dict, cache_size: int = 4, name: str = "workflow"):
        self.api = api
        self.name = name  # text results go to <job id>/<name>_text.txt
        self.cache = ModelCache(cache_size)
        self.classes = self.cache.wrap(classes)
        self.plain_classes = classes

    def folder(self, job: Job) -> Path:
        return runtime.output_dir() / job.id

    def run(self, job: Job) -> dict:
        """Run one job: {"error": None or the message, "traceback": for unexpected errors,
        "seconds", "texts": ["node N (label): text", ...]}. Only KeyboardInterrupt and
        runtime.Interrupted get out; any other error is the job's."""
        folder = self.folder(job)
        t0 = time.perf_counter()
        result = {"error": None, "traceback": None, "texts": []}
        try:
            overrides = job_overrides(job, self.api, self.plain_classes)
            ui = runner.run(self.api, self.classes, overrides=overrides, source=job.source or "--set")
            texts = runner.text_results(ui, self.api)
            result["texts"] = [f"node {nid} ({label}): {text}" for nid, label, text in texts]
            if texts:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{self.name}_text.txt").write_text("".join(t + "\n" for t in result["texts"]))
        except runtime.Interrupted:
            raise
        except (ValueError, runtime.KinemaError) as e:
            result["error"] = str(e)
        except Exception as e:  # a bug or the machine (out of memory, ...): this job's, not the batch's
            result["error"] = f"{type(e).__name__}: {e}"
            result["traceback"] = traceback.format_exc()
        result["seconds"] = round(time.perf_counter() - t0, 3)
        return result

    def run_collected(self, job: dict) -> dict:
        """:meth:`run` for a job given as a dict, with the files it wrote as {relative path:
        bytes} under "files" (removed here): what a Ray worker sends back."""
        job = Job(job["id"], job["line"], job["overrides"], job.get("source", ""))
        result = self.run(job)
        folder = self.folder(job)
        files = {}
        if result["error"] is None and folder.is_dir():
            for p in sorted(folder.rglob("*")):
                if p.is_file():
                    files[p.relative_to(folder).as_posix()] = p.read_bytes()
        shutil.rmtree(folder, ignore_errors=True)
        result["files"] = files
        result["worker"] = worker_name()
        return result

    def close(self) -> None:
        self.cache.clear()


def job_runner(api: dict, name: str, model_cache: int = 4, device: str | None = None) -> JobRunner:
    """A :class:`JobRunner` for an API workflow in this process (a Ray worker), with the node
    classes it needs (ComfyUI's loaded into the process when it uses core nodes)."""
    classes = runner.node_classes(runner.workflow_types(api), device=device)
    return JobRunner(api, classes, model_cache, name)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------------------- the batch (driver side)

@dataclass
class Batch:
    """A planned batch: the workflow, its jobs, where outputs go, and the manifest."""
    workflow: Path
    jobs_file: Path
    api: dict
    classes: dict
    jobs: list
    output: Path
    staging: Path
    runner_name: str = "local"
    entries: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    log: object = None

    @property
    def manifest_path(self) -> Path:
        return self.output / f"{self.jobs_file.stem}_manifest.json"

    def job_record(self, job: Job) -> dict:
        return {"id": job.id, "workflow": self.workflow.name, "workflow_sha256": workflow_digest(self.api),
                "overrides": job.overrides}

    def plan(self) -> list[Job]:
        """Mark jobs whose folder exists as skipped (or failed, when the folder holds another
        job's outputs) and jobs whose inputs are wrong as failed; return the jobs to run."""
        todo = []
        for job in self.jobs:
            entry = {"id": job.id, "line": job.line, "status": "not run", "outputs": [], "seconds": None,
                     "error": None, "attempts": 0, "worker": None}
            self.entries[job.id] = entry
            folder = self.output / job.id
            if folder.exists():
                try:  # the same job: the same graph and inputs (the workflow file may have been renamed)
                    record, want = json.loads((folder / JOB_FILE).read_text()), self.job_record(job)
                    same = all(record.get(k) == want[k] for k in ("id", "workflow_sha256", "overrides"))
                except (OSError, ValueError, AttributeError):
                    same = False
                if same:
                    entry.update(status="skipped", outputs=self._outputs(folder))
                else:
                    entry.update(status="failed", error=f"{folder} holds other outputs (another workflow or other "
                                                        f"inputs, see its {JOB_FILE}): remove it, or give this job "
                                                        f"another id or --output-dir")
                continue
            try:
                runner.prepare(self.api, self.classes, job_overrides(job, self.api, self.classes),
                               source=job.source or "--set")
            except WorkflowError as e:
                entry.update(status="failed", error=str(e))
                continue
            todo.append(job)
        return todo

    def _outputs(self, folder: Path) -> list[str]:
        return sorted(p.relative_to(self.output).as_posix() for p in folder.rglob("*")
                      if p.is_file() and p.name != JOB_FILE)

    def finish_job(self, job: Job, result: dict) -> dict:
        """Record a job's result; on success move its staged folder (or write its files, from a
        Ray worker) to ``<output>/<job id>`` in one rename."""
        entry = self.entries[job.id]
        entry.update(seconds=result.get("seconds"), attempts=result.get("attempts", 1),
                     worker=result.get("worker"))
        for key in ("texts", "lost_workers"):  # text results; Ray workers that died running the job
            if result.get(key):
                entry[key] = result[key]
        staged = self.staging / job.id
        try:
            if result.get("error") is None:
                if "files" in result:
                    _write_files(staged, result["files"])
                staged.mkdir(parents=True, exist_ok=True)
                (staged / JOB_FILE).write_text(json.dumps(self.job_record(job), indent=1))
                os.rename(staged, self.output / job.id)
                entry.update(status="done", outputs=self._outputs(self.output / job.id))
            else:
                entry.update(status="failed", error=result["error"])
                if result.get("traceback"):
                    entry["traceback"] = result["traceback"]
                    if self.log:
                        self.log(f"{job.id}: {result['traceback'].rstrip()}")
        except OSError as e:
            entry.update(status="failed", error=f"could not save the outputs in {self.output / job.id}: {e}")
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        self.save()
        return entry

    def summary(self) -> dict:
        counts = {s: 0 for s in ("done", "skipped", "failed", "not run")}
        for e in self.entries.values():
            counts[e["status"]] += 1
        seconds = time.time() - self.started
        return {"jobs": len(self.jobs), **counts, "seconds": round(seconds, 2),
                "jobs_per_minute": round(60 * counts["done"] / seconds, 2) if seconds > 0 else None}

    def save(self) -> None:
        data = {"workflow": str(self.workflow), "batch": str(self.jobs_file), "output_dir": str(self.output),
                "runner": self.runner_name, "started": _iso(self.started), "updated": _iso(time.time()),
                "summary": self.summary(), "jobs": [self.entries[j.id] for j in self.jobs if j.id in self.entries]}
        tmp = self.manifest_path.with_name(self.manifest_path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.manifest_path)


def _write_files(folder: Path, files: dict) -> None:
    for rel, data in files.items():
        target = (folder / rel).resolve()
        if folder.resolve() not in target.parents:
            raise OSError(f"a worker sent a file outside the job's folder: {rel!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


class Progress:
    """One line per finished job on stderr, and on a terminal a bar under them."""

    def __init__(self, total: int, quiet: bool = False, workers: bool = False):
        self.total, self.n, self.quiet, self.workers = total, 0, quiet, workers
        self.t0 = time.perf_counter()
        self.bar = not quiet and os.environ.get("KINEMA_PROGRESS", "1") != "0" and sys.stderr.isatty()

    def job(self, entry: dict) -> None:
        self.n += 1
        if self.quiet:
            return
        status = entry["status"]
        what = {"done": lambda: f"done in {entry['seconds']:.1f}s, {len(entry['outputs'])} file(s)",
                "skipped": lambda: f"skipped, its {len(entry['outputs'])} file(s) exist",
                "failed": lambda: f"FAILED: {entry['error']}"}[status]()
        if entry.get("attempts", 1) > 1:
            what += f" (attempt {entry['attempts']})"
        if self.workers and entry.get("worker") and status == "done":
            what += f" on {entry['worker']}"
        sys.stderr.write(("\r\033[K" if self.bar else "") + f"[{self.n}/{self.total}] {entry['id']}: {what}\n")
        if self.bar:
            runtime.draw_terminal_bar("batch", self.n, self.total, self.t0)
        sys.stderr.flush()


def run_batch(workflow, jobs_file, *, overrides: dict | None = None, output_dir=None, device: str | None = None,
              ray: str | None = None, workers: int | None = None, gpus_per_worker: float | None = None,
              cpus_per_worker: float = 1.0, model_cache: int = 4, retries: int = 2, quiet: bool = False,
              log=None) -> dict:
    """Run every job of ``jobs_file`` with ``workflow``; return the manifest (also written to
    ``<output>/<jobs file name>_manifest.json``). ``ray``: None runs here, in this process;
    ``"local"`` on a private Ray cluster on this machine; ``"auto"`` / an address on that
    cluster (see :func:`ray_batch.run`). Raises WorkflowError (or KinemaError) when the batch
    cannot start; a failing job does not raise."""
    if ray is not None:  # before anything else: without ray installed, say so at once
        from . import ray_batch
        ray_batch.import_ray(ray == "local")
    workflow = Path(workflow).resolve()
    data = runner.load_workflow(workflow)
    jobs = read_jobs(jobs_file, overrides)
    output = Path(output_dir).resolve() if output_dir else runtime.output_dir()
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".kinema-batch-", dir=output))
    saved_env = {k: os.environ.get(k) for k in ("KINEMA_OUTPUT_DIR", "KINEMA_TEMP_DIR")}
    os.environ["KINEMA_OUTPUT_DIR"] = str(staging)  # savers (also ComfyUI's, loaded below) write there
    os.environ["KINEMA_TEMP_DIR"] = str(staging / TEMP)  # the nodes' UI previews: nobody sees them here
    batch = None
    try:
        classes = runner.node_classes(runner.workflow_types(data), device=device, log=log)
        if runtime.output_dir().resolve() != staging.resolve():
            raise WorkflowError(f"--batch: ComfyUI already runs in this process with its own output folder "
                                f"({runtime.output_dir()}), which a batch cannot move aside: run batches with "
                                f"run_workflow.py, in a process of their own")
        api = runner.to_api(data, classes)
        name_jobs(jobs, api)
        batch = Batch(workflow, Path(jobs_file).resolve(), api, classes, jobs, output, staging, log=log)
        todo = batch.plan()
        progress = Progress(len(jobs), quiet, workers=ray is not None)
        for entry in batch.entries.values():
            if entry["status"] != "not run":
                progress.job(entry)
        batch.save()

        def finished(job, result):
            progress.job(batch.finish_job(job, result))

        if not todo:
            batch.runner_name = "nothing to run" if ray is None else "ray (nothing to run)"
        elif ray is None:
            _run_here(batch, todo, finished, model_cache)
        else:
            from . import ray_batch
            batch.runner_name = ray_batch.run(batch, todo, finished, address=ray, workers=workers,
                                              gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                                              model_cache=model_cache, retries=retries, device=device, log=log)
    finally:
        if batch is not None:
            batch.save()  # also when stopped: jobs not reached stay "not run"
        shutil.rmtree(staging, ignore_errors=True)
        if batch is None and created and not any(output.iterdir()):
            output.rmdir()  # the batch did not start: leave no empty folder behind
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return json.loads(batch.manifest_path.read_text())


def _run_here(batch: Batch, todo: list, finished, model_cache: int) -> None:
    jobs = JobRunner(batch.api, batch.classes, model_cache, batch.workflow.stem)
    try:
        for job in todo:
            result = jobs.run(job)
            result["worker"] = worker_name()
            finished(job, result)
    finally:
        jobs.close()


def main(args, log) -> int:
    """``run_workflow.py WORKFLOW --batch JOBS ...`` (called by runner.main with its parsed args)."""
    try:
        overrides = runner._parse_set(args.set)
        manifest = run_batch(args.workflow, args.batch, overrides=overrides, device=args.device, ray=args.ray,
                             workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                             cpus_per_worker=args.cpus_per_worker, model_cache=args.model_cache,
                             retries=args.retries, quiet=args.quiet, log=log)
    except KeyboardInterrupt:
        print("interrupted: the manifest lists the jobs that finished; run the same command again to go on",
              file=sys.stderr)
        return 130
    except (ValueError, runtime.KinemaError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = manifest["summary"]
    print(f"{s['jobs']} jobs: {s['done']} done, {s['skipped']} skipped (outputs exist), {s['failed']} failed"
          + (f", {s['not run']} not run" if s["not run"] else "")
          + f" in {s['seconds']:.1f}s ({s['jobs_per_minute']} jobs/min) on {manifest['runner']}", file=sys.stderr)
    for e in manifest["jobs"]:
        if e["status"] == "failed":
            line = "" if f"line {e['line']}" in e["error"] else f" (line {e['line']})"
            print(f"  failed: {e['id']}{line}: {e['error']}", file=sys.stderr)
    print(f"manifest: {Path(manifest['output_dir']) / (Path(manifest['batch']).stem + '_manifest.json')}",
          file=sys.stderr)
    return 1 if s["failed"] else 0
