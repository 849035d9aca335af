#!/usr/bin/env python3
"""Train the StoryDiffusion semantic motion predictor: ``python train_motion_predictor.py --help``.
See docs/story_video.md. Works from any folder name (the pack is loaded by path)."""
import importlib.util
import sys
from pathlib import Path

if __name__ == "__main__":
    root = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location("kinema", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["kinema"] = pack
    spec.loader.exec_module(pack)
    from kinema.pipelines.story_video.train import main
    sys.exit(main())
