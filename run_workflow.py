#!/usr/bin/env python3
"""Run a Kinema workflow headless: ``python run_workflow.py workflows/<file>.json``.
See ``runner.py`` for the options. Works from any folder name (the pack is loaded by path)."""
import importlib.util
import sys
from pathlib import Path


def load_pack():
    """Import this folder as the package ``kinema`` (by path, whatever the folder is called)."""
    if "kinema" not in sys.modules:
        root = Path(__file__).resolve().parent
        spec = importlib.util.spec_from_file_location("kinema", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules["kinema"] = pack
        spec.loader.exec_module(pack)
    return sys.modules["kinema"]


if __name__ == "__main__":
    load_pack()
    from kinema.runner import main
    sys.exit(main())
