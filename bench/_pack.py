"""Shared by the benchmark scripts: load the repository as the package ``kinema`` (by path,
as ComfyUI loads a custom-node folder) and read the peak resident memory."""
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
