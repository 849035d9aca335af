"""The weights-free demo end to end, in-process (Python start-up and imports excluded):
LoadImage -> Click to mask -> Motion from drags -> Animate by warping -> save WEBP + PNG,
at 512x512 with 16 frames. Prints per-node times (median of N runs) and peak memory.

    .venv/bin/python bench/bench_demo.py [--runs 5] [--threads N]
"""
import argparse
import statistics
import tempfile
import time
from _pack import ROOT, load_pack, peak_rss_mib



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    import os
    os.environ.setdefault("KINEMA_PROGRESS", "0")
    tmp = tempfile.mkdtemp()
    os.environ["KINEMA_OUTPUT_DIR"] = tmp + "/out"
    os.environ["KINEMA_TEMP_DIR"] = tmp + "/temp"
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    load_pack()
    from kinema import runner
    api = runner.to_api(runner.load_workflow(ROOT / "workflows" / "click_drag_animate.json"))
    per_node: dict = {}
    totals = []
    for i in range(args.runs + 1):  # the first run warms up (lazy imports, allocator)
        lines = []
        t0 = time.perf_counter()
        runner.run(api, log=lines.append)
        total = time.perf_counter() - t0
        if i == 0:
            continue
        totals.append(total)
        names = {}
        for line in lines:  # "[id] Type" then "[id] done in 1.23s"
            nid, rest = line.split("] ", 1)
            if rest.startswith("done in "):
                per_node.setdefault(f"{nid}] {names[nid]}", []).append(float(rest[8:-1]))
            else:
                names[nid] = rest
    print(f"torch threads: {torch.get_num_threads()}, runs: {args.runs}")
    print(f"{'node':40s} {'median s':>9s}")
    for k, v in per_node.items():
        print(f"{k:40s} {statistics.median(v):9.3f}")
    print(f"{'total (end to end)':40s} {statistics.median(totals):9.3f}  (min {min(totals):.3f})")
    print(f"peak RSS: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
