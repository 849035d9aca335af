"""Shared by the benchmark scripts: load the repository as the package ``kinema`` (by path,
as ComfyUI loads a custom-node folder) and read the peak resident memory."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_pack():
    """Import the repository root as ``kinema`` once; return the module."""
    if "kinema" not in sys.modules:
        spec = importlib.util.spec_from_file_location("kinema", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["kinema"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["kinema"]


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
