"""The weights-free demo end to end: LoadImage -> Click to mask -> Motion from drags -> Animate
by warping -> save WEBP + PNG, at 512x512 with 16 frames (workflows/click_drag_animate.json).

    .venv/bin/python bench/bench_demo.py [--runs 5] [--cold 3] [--threads N]

Two measurements, each interleaved between torch's default thread count and one thread (so a
change in the machine's load hits both alike), with the load average before and after:

- in process (imports and Python start-up excluded; one warm-up run first): per-node wall
  times and the whole run's wall and CPU time (CPU of every thread of the process);
- ``--cold N``: ``run_workflow.py`` as a fresh process, as ``scripts/demo`` runs it (start-up,
  imports, the workflow, writing the files): wall time and the child's CPU time. One thread
  there is ``OMP_NUM_THREADS=1``.

Medians and minima of the runs are printed; on a shared machine the minimum is the figure least
disturbed by other work, and the CPU time is disturbed much less than the wall time.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _pack import ROOT, load_average, load_pack, peak_rss_mib


def _in_process(api, runner, torch, threads: int) -> tuple[float, float, dict]:
    torch.set_num_threads(threads)
    lines = []
    t0, c0 = time.perf_counter(), time.process_time()
    runner.run(api, log=lines.append)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    names, nodes = {}, {}
    for line in lines:  # "[id] Type" then "[id] done in 1.23s"
        nid, rest = line.split("] ", 1)
        if rest.startswith("done in "):
            nodes[f"{nid}] {names[nid]}"] = float(rest[8:-1])
        else:
            names[nid] = rest
    return wall, cpu, nodes


def _cold(out_dir: str, one_thread: bool) -> tuple[float, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", KINEMA_PROGRESS="0")
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    else:
        env.pop("OMP_NUM_THREADS", None)
    cmd = [sys.executable, str(ROOT / "run_workflow.py"), str(ROOT / "workflows" / "click_drag_animate.json"),
           "--output-dir", out_dir]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode:
        raise SystemExit(f"run_workflow.py failed ({proc.returncode}):\n{err}")
    return wall, usage.ru_utime + usage.ru_stime


def _row(label: str, walls: list, cpus: list) -> str:
    return (f"{label:34s} wall median {statistics.median(walls):6.3f} s (min {min(walls):.3f})   "
            f"CPU median {statistics.median(cpus):6.3f} s (min {min(cpus):.3f})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="in-process runs per thread count")
    ap.add_argument("--cold", type=int, default=0, help="fresh-process runs per thread count")
    ap.add_argument("--threads", type=int, default=0, help="the 'default' thread count (0: torch's)")
    args = ap.parse_args()
    os.environ.setdefault("KINEMA_PROGRESS", "0")
    tmp = tempfile.mkdtemp()
    os.environ["KINEMA_OUTPUT_DIR"] = tmp + "/out"
    os.environ["KINEMA_TEMP_DIR"] = tmp + "/temp"
    import torch
    default = args.threads or torch.get_num_threads()
    settings = [default, 1] if default != 1 else [1]
    print(f"load average before: {load_average()}")
    print(f"cores: {os.cpu_count()}, torch threads by default: {default}")

    if args.cold:
        cold = {t: ([], []) for t in settings}
        for i in range(args.cold):
            for t in settings:
                wall, cpu = _cold(f"{tmp}/cold_{i}_{t}", one_thread=t == 1)
                cold[t][0].append(wall)
                cold[t][1].append(cpu)
        for t in settings:
            print(_row(f"fresh process, {t} thread(s)", *cold[t]))
        print(f"load average after fresh runs: {load_average()}")

    load_pack()
    from kinema import runner
    api = runner.to_api(runner.load_workflow(ROOT / "workflows" / "click_drag_animate.json"))
    for t in settings:  # warm-up (lazy imports, allocator) at each thread count
        _in_process(api, runner, torch, t)
    res = {t: ([], [], {}) for t in settings}
    for _ in range(args.runs):
        for t in settings:
            wall, cpu, nodes = _in_process(api, runner, torch, t)
            res[t][0].append(wall)
            res[t][1].append(cpu)
            for k, v in nodes.items():
                res[t][2].setdefault(k, []).append(v)
    torch.set_num_threads(default)
    print(f"in process, {args.runs} runs per thread count, interleaved")
    print(f"{'node (median wall s)':40s} " + " ".join(f"{str(t) + ' thr':>9s}" for t in settings))
    for k in res[settings[0]][2]:
        print(f"{k:40s} " + " ".join(f"{statistics.median(res[t][2][k]):9.3f}" for t in settings))
    for t in settings:
        print(_row(f"in process, {t} thread(s)", res[t][0], res[t][1]))
    print(f"peak RSS: {peak_rss_mib():.0f} MiB")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
