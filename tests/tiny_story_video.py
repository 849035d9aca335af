"""The tiny semantic motion predictor config of the tests (tests/configs/story_diffusion/tiny.json)."""
from pathlib import Path

from kinema.pipelines.story_video.predictor import PredictorConfig

CONFIG = Path(__file__).resolve().parent / "configs" / "story_diffusion" / "tiny.json"


def predictor_config() -> PredictorConfig:
    return PredictorConfig.from_file(CONFIG)
