"""Batches (batch.py): job files, job names, loaders kept across jobs, one folder per job,
re-runs, failures, and the weights-free demo as a batch in this process."""
import csv
import gc
import json
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

import demo_jobs
from demo_jobs import DEMO, ROOT, SMALL_POINTS, demo_job, drag, frames_of, write_jsonl
from test_runner import main  # noqa: F401  (the fixture: runner.main in this process)
from kinema import batch, runner
from kinema.nodes.core_io import CORE_NODES


@pytest.fixture(scope="session")
def small_photo(tmp_path_factory):
    return demo_jobs.small_photo(tmp_path_factory.mktemp("photo") / "astronaut_256.png")


# ----------------------------------------------------------------------------- batch files

def test_jsonl_and_csv_files_give_the_same_jobs(tmp_path):
    tracks = {"tracks": [[{"x": 1, "y": 2}, {"x": 3, "y": 4}]], "anchors": []}
    (tmp_path / "jobs.jsonl").write_text(
        "# a comment, then a blank line\n\n"
        + json.dumps({"id": "shot_1", "3.tracks": tracks, "3.frames": 8}) + "\n"
        + json.dumps({"3.easing": "linear", "5.filename_prefix": "x/y"}) + "\n")
    with (tmp_path / "jobs.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "3.tracks", "3.frames", "3.easing", "5.filename_prefix"])
        w.writerow(["shot_1", json.dumps(tracks), "8", "", ""])
        w.writerow(["", "", "", "linear", "x/y"])
        w.writerow(["", "", "", "", ""])  # an empty row is no job
    base = {"3": {"frames": 16, "strength": 0.5}}
    want = [("shot_1", {"3": {"frames": 8, "strength": 0.5, "tracks": tracks}}),
            ("", {"3": {"frames": 16, "strength": 0.5, "easing": "linear"}, "5": {"filename_prefix": "x/y"}})]
    for name, lines in (("jobs.jsonl", [3, 4]), ("jobs.csv", [2, 3])):
        jobs = batch.read_jobs(tmp_path / name, base)
        assert [(j.id, j.overrides) for j in jobs] == want, name
        assert [j.line for j in jobs] == lines and [j.auto_id for j in jobs] == [False, True]
    assert base == {"3": {"frames": 16, "strength": 0.5}}  # the --set values are not changed


@pytest.mark.parametrize("name, text, said", [
    ("a.jsonl", '{"3.frames": 8}\n{"3.frames": 8\n', "a.jsonl line 2: not valid JSON"),
    ("a.jsonl", '[1, 2]\n', "a.jsonl line 1: a job is a JSON object"),
    ("a.jsonl", '{"frames": 8}\n', "a.jsonl line 1: 'frames' must look like NODE_ID.INPUT"),
    ("a.jsonl", '{"id": "../up", "3.frames": 8}\n', "a.jsonl line 1: id '../up' names the job's output folder"),
    ("a.jsonl", '{"id": "a"}\n{"id": "b"}\n{"id": "a"}\n', "a.jsonl line 3: id 'a' is already the id of line 1"),
    ("a.jsonl", '# nothing\n\n', "holds no job"),
    ("a.csv", 'id,frames\nx,3\n', "a.csv line 1: column 'frames' is neither 'id' nor NODE_ID.INPUT"),
    ("a.csv", '3.frames\n8,9\n', "a.csv line 2: 2 cells for 1 columns"),
    ("a.txt", '{}\n', "neither .jsonl"),
])
def test_bad_batch_files_name_the_line(tmp_path, name, text, said):
    (tmp_path / name).write_text(text)
    with pytest.raises(runner.WorkflowError) as e:
        batch.read_jobs(tmp_path / name)
    assert said in str(e.value)


def test_job_names_follow_the_inputs_and_the_workflow(tmp_path):
    api = runner.to_api(runner.load_workflow(DEMO))
    write_jsonl(tmp_path / "j.jsonl", [{"3.frames": 8}, {"3.frames": 9}, {"id": "mine", "3.frames": 8}])
    jobs = batch.read_jobs(tmp_path / "j.jsonl")
    batch.name_jobs(jobs, api)
    a, b, mine = (j.id for j in jobs)
    assert mine == "mine" and a != b and a.startswith("job-") and len(a) == 16
    again = batch.read_jobs(tmp_path / "j.jsonl")
    batch.name_jobs(again, api)
    assert [j.id for j in again] == [a, b, "mine"]  # the same inputs: the same names
    other = json.loads(json.dumps(api))
    other["4"]["inputs"]["fill"] = "stretch"
    again = batch.read_jobs(tmp_path / "j.jsonl")
    batch.name_jobs(again, other)
    assert again[0].id not in (a, b) and again[2].id == "mine"  # another workflow: other names
    write_jsonl(tmp_path / "twice.jsonl", [{"3.frames": 8}, {"3.frames": 8}])
    twice = batch.read_jobs(tmp_path / "twice.jsonl")
    with pytest.raises(runner.WorkflowError, match="line 2: the same job as line 1"):
        batch.name_jobs(twice, api)


def test_every_saver_writes_under_the_job_folder():
    classes = runner.node_classes(runner.workflow_types(runner.load_workflow(DEMO)))
    api = runner.to_api(runner.load_workflow(DEMO), classes)
    job = batch.Job("shot_1", 1, {"5": {"filename_prefix": "anim/x"}, "3": {"frames": 8}})
    assert batch.job_overrides(job, api, classes) == {
        "5": {"filename_prefix": "shot_1/anim/x"}, "6": {"filename_prefix": "shot_1/kinema_demo/motion"},
        "3": {"frames": 8}}
    assert job.overrides["5"] == {"filename_prefix": "anim/x"}
    for bad in ("../shot_2/x", "a/../../x"):
        with pytest.raises(runner.WorkflowError, match="leaves the job's output folder"):
            batch.job_overrides(batch.Job("shot_1", 1, {"5": {"filename_prefix": bad}}), api, classes)


# ----------------------------------------------------------------------------- loaders kept across jobs

class Model:
    def __init__(self, name):
        self.name = name


class FakeLoader:
    FUNCTION = "load"
    RETURN_TYPES = ("TEST_MODEL",)
    calls: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": (["a", "b", "c"],)}}

    def load(self, name):
        self.calls.append(name)
        return (Model(name),)


class FakePatchLoader:
    """A loader on top of another one's model (as LoraLoader on a checkpoint's MODEL)."""
    FUNCTION = "patch"
    RETURN_TYPES = ("TEST_MODEL",)
    calls: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("TEST_MODEL",), "strength": ("FLOAT", {"default": 1.0})}}

    def patch(self, model, strength):
        self.calls.append((model.name, strength))
        return (Model(f"{model.name}*{strength}"),)


class FakeMake:
    """Not a loader: its result is made again for every job."""
    FUNCTION = "make"
    RETURN_TYPES = ("TEST_MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": "made"})}}

    def make(self, name):
        return (Model(name),)


class FakeRender:
    FUNCTION = "render"
    RETURN_TYPES = ("IMAGE",)
    seen: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("TEST_MODEL",), "seed": ("INT", {"default": 0})}}

    def render(self, model, seed):
        self.seen.append((id(model), model.name, seed))
        return (torch.full((1, 4, 4, 3), (seed % 200) / 255.0),)


def fresh_classes():
    """The test nodes, their call records emptied, with the runner's I/O nodes."""
    FakeLoader.calls, FakePatchLoader.calls, FakeRender.seen = [], [], []
    return {**CORE_NODES, "FakeLoader": FakeLoader, "FakePatchLoader": FakePatchLoader, "FakeMake": FakeMake,
            "FakeRender": FakeRender}


GRAPH = {
    "1": {"class_type": "FakeLoader", "inputs": {"name": "a"}},
    "2": {"class_type": "FakePatchLoader", "inputs": {"model": ["1", 0], "strength": 0.5}},
    "3": {"class_type": "FakeRender", "inputs": {"model": ["2", 0], "seed": 1}},
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "img"}},
}


def run_jobs(jobs, tmp_path, monkeypatch, graph=GRAPH, size=4):
    """Jobs ({node: {input: value}} each) through one JobRunner; returns it (closed)."""
    monkeypatch.setenv("KINEMA_OUTPUT_DIR", str(tmp_path))
    runner_ = batch.JobRunner(graph, fresh_classes(), size)
    try:
        for i, overrides in enumerate(jobs):
            result = runner_.run(batch.Job(f"j{i}", i + 1, overrides))
            assert result["error"] is None, result
    finally:
        runner_.close()
    return runner_


def test_loaders_load_once_for_all_jobs(tmp_path, monkeypatch):
    jobs = [{"3": {"seed": s}} for s in (1, 2, 3)]
    run = run_jobs(jobs, tmp_path, monkeypatch)
    assert FakeLoader.calls == ["a"] and FakePatchLoader.calls == [("a", 0.5)]
    assert len({model_id for model_id, _, _ in FakeRender.seen}) == 1  # the same model object each time
    assert [(name, seed) for _, name, seed in FakeRender.seen] == [("a*0.5", 1), ("a*0.5", 2), ("a*0.5", 3)]
    assert (run.cache.loads, run.cache.hits) == (2, 4)
    # each job saved its own picture in its own folder
    for i, s in enumerate((1, 2, 3)):
        assert (np.asarray(Image.open(tmp_path / f"j{i}" / "img_00001_.png")) == s).all()


def test_loader_inputs_key_the_cache(tmp_path, monkeypatch):
    # another strength: the patch loads again, the model under it does not
    run_jobs([{"2": {"strength": 0.5}}, {"2": {"strength": 0.7}}, {"2": {"strength": 0.5}}], tmp_path, monkeypatch)
    assert FakeLoader.calls == ["a"] and FakePatchLoader.calls == [("a", 0.5), ("a", 0.7)]
    # another file: both load again
    run_jobs([{"1": {"name": "a"}}, {"1": {"name": "b"}}], tmp_path / "2", monkeypatch)
    assert FakeLoader.calls == ["a", "b"] and FakePatchLoader.calls == [("a", 0.5), ("b", 0.5)]


def test_cache_keeps_the_most_recently_used(tmp_path, monkeypatch):
    graph = {k: v for k, v in GRAPH.items() if k != "2"}
    graph["3"] = {"class_type": "FakeRender", "inputs": {"model": ["1", 0], "seed": 1}}
    names = ["a", "b", "a", "c", "a", "b"]
    jobs = [{"1": {"name": n}} for n in names]
    run_jobs(jobs, tmp_path / "1", monkeypatch, graph, size=2)
    assert FakeLoader.calls == ["a", "b", "c", "b"]  # c pushed out b (a was used more recently)
    run_jobs(jobs, tmp_path / "2", monkeypatch, graph, size=1)
    assert FakeLoader.calls == names
    run_jobs(jobs, tmp_path / "3", monkeypatch, graph, size=0)
    assert FakeLoader.calls == names


def test_loader_fed_by_another_node_is_not_cached(tmp_path, monkeypatch):
    graph = dict(GRAPH, **{"1": {"class_type": "FakeMake", "inputs": {"name": "m"}}})
    run_jobs([{"3": {"seed": 1}}, {"3": {"seed": 2}}], tmp_path, monkeypatch, graph)
    assert FakePatchLoader.calls == [("m", 0.5), ("m", 0.5)]  # its input is new each job


def test_models_are_released_at_the_end(tmp_path, monkeypatch):
    monkeypatch.setenv("KINEMA_OUTPUT_DIR", str(tmp_path))
    run = batch.JobRunner(GRAPH, fresh_classes(), 4)
    run.run(batch.Job("j", 1, {}))
    held = [weakref.ref(r[0]) for r in run.cache.entries.values()]
    assert len(held) == 2 and all(h() is not None for h in held)
    run.close()
    gc.collect()
    assert all(h() is None for h in held) and not run.cache.entries


def test_which_nodes_are_loaders():
    classes = fresh_classes()
    assert batch.is_loader("FakeLoader", FakeLoader) and not batch.is_loader("FakeMake", FakeMake)

    class Saver(FakeLoader):
        OUTPUT_NODE = True

    class Schema(FakeLoader):  # ComfyUI's newer node API: left alone
        @classmethod
        def GET_SCHEMA(cls):
            return None

    class Async(FakeLoader):
        async def load(self, name):
            return (Model(name),)

    assert not any(batch.is_loader("XLoader", c) for c in (Saver, Schema, Async))
    from kinema.nodes import NODE_CLASS_MAPPINGS as PACK
    assert {n for n, c in PACK.items() if batch.is_loader(n, c)} == {
        "KinemaSAMLoader", "KinemaDynamiCrafterLoader", "KinemaMotionI2VFlowLoader", "KinemaMotionI2VRenderLoader",
        "KinemaPuppetMasterLoader", "KinemaMotionPredictorLoader"}
    # the cached class is the node as the runner and ComfyUI know it
    wrapped = batch.ModelCache(2).wrap(classes)["FakeLoader"]
    assert wrapped is not FakeLoader and issubclass(wrapped, FakeLoader)
    assert (wrapped.__name__, wrapped.__module__, wrapped.INPUT_TYPES()) == (
        "FakeLoader", FakeLoader.__module__, FakeLoader.INPUT_TYPES())


# ----------------------------------------------------------------------------- the demo as a batch

def test_demo_batch_outputs_manifest_and_rerun(tmp_path, small_photo, monkeypatch):
    jobs = [dict(demo_job(small_photo, 202, 35), id="up"),
            demo_job(small_photo, 170, 60, frames=5, **{"3.easing": "linear"}),
            dict(demo_job(small_photo, 202, 35), id="outside", **{"2.points": {"positive": [[900, 20]]}}),
            dict(demo_job(small_photo, 202, 35), id="bad_frames", **{"3.frames": 1})]
    jobs_file = write_jsonl(tmp_path / "shots.jsonl", jobs)
    out = tmp_path / "out"
    manifest = batch.run_batch(DEMO, jobs_file, output_dir=out, overrides={"4": {"fill": "inpaint"}})
    entries = {e["id"]: e for e in manifest["jobs"]}
    auto = next(i for i in entries if i.startswith("job-"))
    assert [e["line"] for e in manifest["jobs"]] == [1, 2, 3, 4]
    assert {i: e["status"] for i, e in entries.items()} == {"up": "done", auto: "done", "outside": "failed",
                                                            "bad_frames": "failed"}
    assert manifest["summary"] | {"seconds": 0, "jobs_per_minute": 0} == {
        "jobs": 4, "done": 2, "skipped": 0, "failed": 2, "not run": 0, "seconds": 0, "jobs_per_minute": 0}
    assert entries["bad_frames"]["error"] == "shots.jsonl line 4, 3.frames: 1 is outside 2..256"
    assert entries["outside"]["error"].startswith("node 2 (Click to Mask): points:")
    assert "outside the 256x256 image" in entries["outside"]["error"]
    for jid in ("up", auto):
        assert entries[jid]["outputs"] == [f"{jid}/kinema_demo/animation_00001_.webp",
                                           f"{jid}/kinema_demo/motion_00001_.png"]
        assert entries[jid]["seconds"] > 0 and entries[jid]["error"] is None
        record = json.loads((out / jid / "job.json").read_text())
        assert record["workflow"] == DEMO.name and record["overrides"]["4"] == {"fill": "inpaint"}
    assert json.loads((out / "shots_manifest.json").read_text()) == manifest
    # nothing of the failed jobs, no staging folder left
    assert sorted(p.name for p in out.iterdir()) == sorted(["up", auto, "shots_manifest.json"])

    # each job is what a single run with the same inputs makes, and the jobs differ
    api = runner.to_api(runner.load_workflow(DEMO))
    for jid, job in (("up", jobs[0]), (auto, jobs[1])):
        overrides = {}
        for key, value in job.items():
            if key != "id":
                runner.add_override(overrides, key, value, "test")
        single = tmp_path / f"single_{jid}"
        monkeypatch.setenv("KINEMA_OUTPUT_DIR", str(single))
        runner.run(api, overrides=overrides)
        want = frames_of(single / "kinema_demo" / "animation_00001_.webp")
        got = frames_of(out / jid / "kinema_demo" / "animation_00001_.webp")
        assert got.shape == want.shape and np.array_equal(got, want), jid
        assert (single / "kinema_demo" / "motion_00001_.png").read_bytes() == \
            (out / jid / "kinema_demo" / "motion_00001_.png").read_bytes()
    assert frames_of(out / "up" / "kinema_demo" / "animation_00001_.webp").shape[0] == 4
    assert frames_of(out / auto / "kinema_demo" / "animation_00001_.webp").shape[0] == 5

    # a re-run skips the finished jobs (their files untouched) and tries the failed ones again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix != ".json"}
    again = batch.run_batch(DEMO, jobs_file, output_dir=out, overrides={"4": {"fill": "inpaint"}})
    assert [e["status"] for e in again["jobs"]] == ["skipped", "skipped", "failed", "failed"]
    assert again["jobs"][0]["outputs"] == entries["up"]["outputs"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # an edited job under the same id is not confused with the finished one
    jobs[0]["3.frames"] = 6
    write_jsonl(jobs_file, jobs[:1])
    third = batch.run_batch(DEMO, jobs_file, output_dir=out, overrides={"4": {"fill": "inpaint"}})
    assert third["jobs"][0]["status"] == "failed" and "holds other outputs" in third["jobs"][0]["error"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_csv_batch_and_text_results(tmp_path, small_photo):
    wf = ROOT / "workflows" / "measure_motion_strength.json"
    with (tmp_path / "m.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "1.image", "2.points", "3.tracks", "3.frames"])
        w.writerow(["m1", str(small_photo), json.dumps(SMALL_POINTS), json.dumps(drag(202, 35)), "4"])
    manifest = batch.run_batch(wf, tmp_path / "m.csv", output_dir=tmp_path / "out")
    (entry,) = manifest["jobs"]
    assert entry["status"] == "done" and entry["outputs"] == ["m1/measure_motion_strength_text.txt"]
    lines = (tmp_path / "out" / "m1" / "measure_motion_strength_text.txt").read_text().splitlines()
    assert lines == entry["texts"] and len(lines) == 2
    # the drawn motion: the shuttle's middle moves 40 px up over 3 frame steps
    assert lines[0].startswith("node 5 (Strength of the drawn motion): mean ")


def test_command_line(main, tmp_path, small_photo):
    r = main([DEMO, "--ray"])
    assert r.returncode == 2 and "--ray runs a batch: give the jobs with --batch JOBS" in r.stderr
    r = main([DEMO, "--batch", "x.jsonl", "--workers", "2"])
    assert r.returncode == 2 and "--workers and --gpus-per-worker go with --ray" in r.stderr
    r = main([DEMO, "--batch", "missing.jsonl"])
    assert r.returncode == 2 and "error: --batch: file 'missing.jsonl' not found" in r.stderr
    write_jsonl(tmp_path / "j.jsonl", [dict(demo_job(small_photo, 202, 35), id="a"), {"id": "b", "3.frames": 0}])
    r = main([DEMO, "--batch", "j.jsonl", "--output-dir", "o", "--set", "3.strength=0.5"])
    assert r.returncode == 1, r.stderr
    assert "[1/2] b: FAILED: j.jsonl line 2, 3.frames: 0 is outside 2..256" in r.stderr
    assert "[2/2] a: done in" in r.stderr and "2 file(s)" in r.stderr
    assert "2 jobs: 1 done, 0 skipped (outputs exist), 1 failed in" in r.stderr
    assert f"manifest: {tmp_path / 'o' / 'j_manifest.json'}" in r.stderr and "Traceback" not in r.stderr
    assert json.loads((tmp_path / "o" / "a" / "job.json").read_text())["overrides"]["3"]["strength"] == 0.5
    # the nodes' previews went with the staging folder: nothing in ./temp, nothing else in the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.jsonl", "o"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a", "j_manifest.json"]


def test_batch_with_comfyui_core_nodes(tmp_path):
    """Through the command line with COMFYUI_DIR: ComfyUI's executor runs the jobs in the
    batch's process and its nodes save into each job's folder under --output-dir."""
    import os
    import subprocess
    import sys
    comfyui = os.environ.get("COMFYUI_DIR")
    if not comfyui:
        pytest.skip("COMFYUI_DIR is not set (a ComfyUI checkout; see docs/testing.md)")
    wf = tmp_path / "invert.json"
    wf.write_text(json.dumps({
        "1": {"class_type": "LoadImage", "inputs": {"image": "chelsea.jpg"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},                       # ComfyUI's
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv/x"}}}))
    write_jsonl(tmp_path / "j.jsonl", [{"id": "cat"}, {"id": "astronaut", "1.image": "astronaut.jpg"}])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KINEMA_OUTPUT_DIR")}
    r = subprocess.run([sys.executable, str(ROOT / "run_workflow.py"), str(wf), "--batch", "j.jsonl",
                        "--output-dir", "out"], cwd=tmp_path, env={**env, "KINEMA_PROGRESS": "0"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")) == [
        "astronaut/inv/x_00001_.png", "cat/inv/x_00001_.png"]
    for jid, photo in (("cat", "chelsea.jpg"), ("astronaut", "astronaut.jpg")):
        src = np.asarray(Image.open(ROOT / "assets" / photo).convert("RGB"), dtype=np.int16)
        got = np.asarray(Image.open(tmp_path / "out" / jid / "inv" / "x_00001_.png").convert("RGB"), dtype=np.int16)
        assert np.abs(got - (255 - src)).max() <= 1, jid


def test_readme_batch_command(tmp_path):
    """The README's batch command, as a user runs it: the example batch file's three drags."""
    from test_runner import _as_test_argv, _cli, _readme_command
    r = _cli(_as_test_argv(_readme_command("## Batches", 0)), tmp_path)
    assert r.returncode == 0, r.stderr
    assert "3 jobs: 3 done, 0 skipped (outputs exist), 0 failed" in r.stderr
    anims = {jid: frames_of(tmp_path / "out" / jid / "kinema_demo" / "animation_00001_.webp")
             for jid in ("up", "left", "arc")}
    assert all(a.shape == (8, 512, 512, 3) for a in anims.values())
    # the same first frame (the photo), three different last frames (three drags)
    assert all(np.array_equal(a[0], anims["up"][0]) for a in anims.values())
    ends = [a[-1].astype(int) for a in anims.values()]
    assert min(np.abs(x - y).mean() for i, x in enumerate(ends) for y in ends[i + 1:]) > 0.5
    # the example's drags end where its file says: "up" and "arc" both end at (405, 70)
    assert np.abs(ends[0] - ends[2]).mean() < np.abs(ends[0] - ends[1]).mean()
