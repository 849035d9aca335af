#!/usr/bin/env python3
"""Make and train Follow-Your-Click models from the command line:

    python follow_your_click.py build --sd15 v1-5-pruned-emaonly.safetensors \
        --motion-module mm_sd_v15_v2.ckpt --out models/kinema/follow_your_click/fyc_init.safetensors
    python follow_your_click.py train --model fyc_init.safetensors --sd15 v1-5-pruned-emaonly.safetensors \
        --clips my_clips/ --out runs/fyc1 --precision bf16

See docs/follow_your_click.md. Works from any folder name (the pack is loaded by path)."""
import importlib.util
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location("kinema", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["kinema"] = pack
    spec.loader.exec_module(pack)
    from kinema.pipelines.follow_your_click.cli import main
    sys.exit(main())
