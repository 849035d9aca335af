"""Batch throughput: jobs per minute of the weights-free demo (workflows/click_drag_animate.json
on the bundled photo, 512x512, each job its own drag of the shuttle), run as a user runs it:
``run_workflow.py --batch`` in one process (with torch's default threads, and with one
thread, as each Ray worker has), then the same jobs with ``--ray`` on a private local cluster
of N workers. Times are wall clock of the whole command (Python start-up, imports,
Ray's start and stop included) and of the batch alone (from the manifest). The machine's load
is printed next to the numbers: on a shared machine they move with it. The outputs of both runs
are compared byte for byte.

    .venv/bin/python bench/bench_batch.py [--jobs 8] [--workers 2] [--frames 8]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "workflows" / "click_drag_animate.json"
# the demo drags the shuttle's middle (405, 150) up to (405, 70); these go elsewhere
TARGETS = [(405, 70), (345, 115), (440, 100), (405, 200), (370, 60), (460, 150), (390, 30), (430, 130)]


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f} (1 min) / {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def run(jobs: Path, out: Path, extra: list, threads: int | None = None) -> tuple[float, dict, str]:
    env = {**os.environ, "KINEMA_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's threads (a Ray worker runs on --cpus-per-worker = 1)
    before = load()
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "run_workflow.py"), str(DEMO), "--batch", str(jobs),
                        "--output-dir", str(out), *extra], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"the batch failed ({' '.join(extra) or 'local'}):\n{r.stderr[-3000:]}")
    return wall, json.loads((out / f"{jobs.stem}_manifest.json").read_text()), before


def files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith("_manifest.json")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--frames", type=int, default=8)
    args = ap.parse_args()
    import importlib.util
    if importlib.util.find_spec("ray") is None:
        sys.exit(f"the Ray half needs ray: {sys.executable} -m pip install -r {ROOT / 'requirements-ray.txt'}")
    tmp = Path(tempfile.mkdtemp(prefix="kbench"))
    jobs = tmp / "shots.jsonl"
    with jobs.open("w") as f:
        for i in range(args.jobs):
            x, y = TARGETS[i % len(TARGETS)]
            track = [{"x": 405, "y": 150}, {"x": x, "y": y + 4 * (i // len(TARGETS))}]
            f.write(json.dumps({"id": f"shot_{i + 1}", "3.tracks": {"tracks": [track], "anchors": []},
                                "3.frames": args.frames}) + "\n")
    print(f"{args.jobs} jobs of {DEMO.name} (512x512, {args.frames} frames each)")
    rows = []
    for name, extra, threads in (("local (one process)", [], None), ("local, 1 torch thread", [], 1),
                                 (f"ray, {args.workers} workers", ["--ray", "--workers", str(args.workers)], None)):
        out = tmp / name.replace(" ", "_").replace(",", "")
        wall, manifest, before = run(jobs, out, extra, threads)
        per_job = [e["seconds"] for e in manifest["jobs"]]
        rows.append((name, wall, manifest["summary"]["seconds"], statistics.median(per_job), before, load(), out))
    print(f"{'':22s} {'jobs/min':>9s} {'wall s':>8s} {'batch s':>8s} {'job s (median)':>15s}   machine load before -> after")
    for name, wall, batch_s, job_s, before, after, _ in rows:
        print(f"{name:22s} {60 * args.jobs / wall:9.2f} {wall:8.1f} {batch_s:8.1f} {job_s:15.2f}   {before} -> {after}")
    same = all(files(rows[0][-1]) == files(row[-1]) for row in rows[1:])
    print(f"outputs byte-identical: {same}")
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
