"""Shared by the benchmark scripts: load the repository as the package ``kinema`` (by path,
as ComfyUI loads a custom-node folder), read the peak resident memory and the machine's load."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from run_workflow import load_pack  # noqa: E402,F401  (import the repository root as ``kinema`` once)

def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (VmHWM), MiB; ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_weights(module, seed: int = 0):
    """Fill every parameter of ``module`` (e.g. materialised with ``to_empty``) from a seeded
    generator: norm-like vectors ~ 1 + N(0, 0.02^2) for weights, N(0, 0.02^2) otherwise,
    matrices ~ N(0, 1 / fan_in). Returns the module in eval mode."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() <= 1:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.02, generator=g)
            else:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
    return module.eval()


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, for the line a benchmark prints with its figures."""
    import os
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
