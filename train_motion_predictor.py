#!/usr/bin/env python3
"""Train the StoryDiffusion semantic motion predictor: ``python train_motion_predictor.py --help``.
See docs/story_video.md. Works from any folder name (the pack is loaded by path)."""
import sys

from run_workflow import load_pack

if __name__ == "__main__":
    load_pack()
    from kinema.pipelines.story_video.train import main
    sys.exit(main())
