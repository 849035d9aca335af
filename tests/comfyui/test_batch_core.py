"""Batches with ComfyUI's own loaders: inside ComfyUI's executor, a checkpoint read by
CheckpointLoaderSimple is loaded once for all jobs of a batch, and the jobs come out byte for
byte as with no cache at all."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kinema import batch, runner, runtime

GRAPH = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": None}},
    "2": {"class_type": "LoadImage", "inputs": {"image": None}},
    "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
    "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
    "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "vae/roundtrip"}},
}


@pytest.fixture
def pictures(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = tmp_path / f"p{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _run(graph, pictures, size, monkeypatch, tag):
    import nodes
    calls = []
    original = nodes.CheckpointLoaderSimple.load_checkpoint

    def counting(self, ckpt_name):
        calls.append(ckpt_name)
        return original(self, ckpt_name)

    monkeypatch.setattr(nodes.CheckpointLoaderSimple, "load_checkpoint", counting)
    classes = {**nodes.NODE_CLASS_MAPPINGS, **runner.node_classes()}  # ComfyUI's, the pack's on top
    assert runtime.is_comfyui_node(classes["VAEEncode"])  # ComfyUI's executor runs these jobs
    jobs = batch.JobRunner(graph, classes, size)
    out = {}
    try:
        for i, picture in enumerate(pictures):
            job = batch.Job(f"{tag}{i}", i + 1, {"2": {"image": picture}})
            result = jobs.run(job)
            assert result["error"] is None, result
            out[i] = (jobs.folder(job) / "vae" / "roundtrip_00001_.png").read_bytes()
    finally:
        jobs.close()
    return calls, out


def test_checkpoint_loads_once_for_the_batch(tiny_sd15, pictures, monkeypatch):
    graph = json.loads(json.dumps(GRAPH))
    graph["1"]["inputs"]["ckpt_name"] = tiny_sd15
    graph["2"]["inputs"]["image"] = pictures[0]
    calls, cached = _run(graph, pictures, 4, monkeypatch, "cached")
    assert calls == [tiny_sd15]
    plain_calls, plain = _run(graph, pictures, 0, monkeypatch, "plain")
    assert plain_calls == [tiny_sd15] * 3
    assert cached == plain                               # the cache changes nothing in the results
    assert len(set(cached.values())) == 3                # and each job had its own picture


def test_batch_refuses_a_process_where_comfyui_holds_the_output_folder(tmp_path):
    (tmp_path / "j.jsonl").write_text('{"3.frames": 4}\n')
    with pytest.raises(runner.WorkflowError, match="ComfyUI already runs in this process"):
        batch.run_batch(Path(batch.__file__).parent / "workflows" / "click_drag_animate.json", tmp_path / "j.jsonl",
                        output_dir=tmp_path / "out")
