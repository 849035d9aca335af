#!/usr/bin/env python3
"""Make and train Follow-Your-Click models from the command line:

    python follow_your_click.py build --sd15 v1-5-pruned-emaonly.safetensors \
        --motion-module mm_sd_v15_v2.ckpt --out models/kinema/follow_your_click/fyc_init.safetensors
    python follow_your_click.py train --model fyc_init.safetensors --sd15 v1-5-pruned-emaonly.safetensors \
        --clips my_clips/ --out runs/fyc1 --precision bf16

See docs/follow_your_click.md. Works from any folder name (the pack is loaded by path)."""
import os
import sys

from run_workflow import load_pack

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_pack()
    from kinema.pipelines.follow_your_click.cli import main
    sys.exit(main())
