"""Jobs of the weights-free demo (workflows/click_drag_animate.json) for the batch tests: the
bundled photo at half size (256x256, so that a job takes a second or two), the demo's clicks
on the shuttle scaled to it, and a drag of the shuttle to a point of each job's choosing."""
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "workflows" / "click_drag_animate.json"
SMALL_POINTS = {"positive": [[202, 20], [200, 75], [220, 60], [218, 30]], "negative": [[165, 50]],
                "box": [175, 0, 235, 142]}


def small_photo(path: Path) -> Path:
    Image.open(ROOT / "assets" / "astronaut.jpg").convert("RGB").resize((256, 256), Image.LANCZOS).save(path)
    return path


def drag(x, y):
    """The demo's drag of the shuttle (from its middle, 202, 75 on the small photo) to x, y."""
    return {"tracks": [[{"x": 202, "y": 75}, {"x": x, "y": y}]], "anchors": []}


def demo_job(photo, x, y, frames=4, **more):
    return {"1.image": str(photo), "2.points": SMALL_POINTS, "3.tracks": drag(x, y), "3.frames": frames, **more}


def write_jsonl(path: Path, jobs: list) -> Path:
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


def frames_of(path: Path) -> np.ndarray:
    return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(Image.open(path))])


def files_under(folder: Path) -> dict:
    """{relative path: bytes} of every file under a folder."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
