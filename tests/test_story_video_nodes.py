"""Story-to-video nodes with tiny model files, and the story_to_video workflow's wiring (it runs
end to end with ComfyUI's checkpoint loader in tests/comfyui/test_story_video_chain.py)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tiny_dynamicrafter
import tiny_story_video
from kinema import runner, runtime
from kinema.nodes import dynamicrafter as dynamicrafter_nodes
from kinema.nodes import story_video as story_video_nodes
from kinema.pipelines.story_video import predictor as story_predictor
from kinema.pipelines.story_video.transitions import SemanticMotion
from kinema.runtime import KinemaError

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "kinema" / "dynamicrafter").mkdir(parents=True)
    save_file(tiny_dynamicrafter.checkpoint("512"), str(root / "kinema" / "dynamicrafter" / "tiny_interp.safetensors"))
    torch.manual_seed(0)
    pred = story_predictor.SemanticMotionPredictor(tiny_story_video.predictor_config())
    torch.nn.init.normal_(pred.proj_out.weight, std=0.5)
    story_predictor.save_predictor(pred, root / "kinema" / "story_diffusion" / "tiny_predictor.safetensors")
    save_file({"x": torch.zeros(2)}, str(root / "kinema" / "story_diffusion" / "other.safetensors"))
    return root


@pytest.fixture
def env(models_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KINEMA_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("KINEMA_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("KINEMA_TEMP_DIR", str(tmp_path / "temp"))
    monkeypatch.setenv("KINEMA_DEVICE", "cpu")
    return tmp_path


def _panels(n=3, h=64, w=64):
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(7))


def test_node_contract():
    assert set(story_video_nodes.NODE_CLASS_MAPPINGS) == {"KinemaMotionPredictorLoader", "KinemaSemanticMotionPredictor",
                                          "KinemaStoryTransitions"}
    from kinema.nodes import NODE_CLASS_MAPPINGS
    for name, cls in story_video_nodes.NODE_CLASS_MAPPINGS.items():
        assert NODE_CLASS_MAPPINGS[name] is cls and name in story_video_nodes.NODE_DISPLAY_NAME_MAPPINGS
        assert cls.CATEGORY.startswith("Kinema/") and cls.DESCRIPTION
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        for section in ("required", "optional"):
            for inp, value in cls.INPUT_TYPES().get(section, {}).items():
                assert value[1].get("tooltip"), f"{name}.{inp} has no tooltip"


def test_loader(env):
    files = story_video_nodes.KinemaMotionPredictorLoader.INPUT_TYPES()["required"]["predictor_name"][0]
    assert files == ["other.safetensors", "tiny_predictor.safetensors"]
    (pred,) = story_video_nodes.KinemaMotionPredictorLoader().load("tiny_predictor.safetensors")
    assert isinstance(pred, runtime.ManagedModel) and isinstance(pred.module, story_predictor.SemanticMotionPredictor)
    with pytest.raises(KinemaError, match="other.safetensors.*not a semantic motion predictor"):
        story_video_nodes.KinemaMotionPredictorLoader().load("other.safetensors")
    with pytest.raises(KinemaError, match="missing.safetensors"):
        story_video_nodes.KinemaMotionPredictorLoader().load("missing.safetensors")


def test_predictor_and_transitions_nodes(env):
    (dc,) = dynamicrafter_nodes.KinemaDynamiCrafterLoader().load("tiny_interp.safetensors", "fp32", "512_interp")
    (pred,) = story_video_nodes.KinemaMotionPredictorLoader().load("tiny_predictor.safetensors")
    panels = _panels()
    node = story_video_nodes.KinemaSemanticMotionPredictor()
    motion, chart = node.run(dc, panels, 4, width=64, height=64)
    assert isinstance(motion, SemanticMotion) and motion.mode == "interpolation"
    assert motion.tokens.shape == (2, 4, 5, 64)
    assert chart.shape[0] == 1 and chart.shape[1] == 256 and chart.shape[3] == 3
    # the chart draws both curves (blue: to the start, orange: to the end) for each transition
    px = (chart[0] * 255).round()
    blue = ((px - torch.tensor([40.0, 90, 200])).abs().sum(-1) < 3)
    orange = ((px - torch.tensor([230.0, 120, 20])).abs().sum(-1) < 3)
    half = chart.shape[2] // 2
    assert blue[:, :half].any() and blue[:, half:].any() and orange[:, :half].any() and orange[:, half:].any()
    learned, _ = node.run(dc, panels, 4, predictor=pred, width=64, height=64)
    assert learned.mode.startswith("learned") and (learned.tokens - motion.tokens).abs().max() > 1e-3
    assert torch.equal(learned.tokens[:, [0, 3]], motion.tokens[:, [0, 3]])

    (video,) = story_video_nodes.KinemaStoryTransitions().run(dc, panels, learned, "walks\nruns", "", 0, 2, 7.5, 1.0, 3, 1)
    assert video.shape == (3 * 2 + 2 * 2, 64, 64, 3)
    torch.testing.assert_close(video[0], panels[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(video[-1], panels[2], atol=1e-6, rtol=0)

    with pytest.raises(ValueError, match="model"):
        node.run("not a model", panels, 4)
    with pytest.raises(ValueError, match="predictor"):
        node.run(dc, panels, 4, predictor="x")
    with pytest.raises(ValueError, match="motion"):
        story_video_nodes.KinemaStoryTransitions().run(dc, panels, motion.tokens, "", "", 0, 2, 7.5, 1.0, 3, 1)
    with pytest.raises(ValueError, match="width/height"):
        node.run(dc, panels, 4, width=70, height=64)


def test_story_to_video_workflow_wiring():
    """Every link's type matches both ends, and each widget value lands on the input meant."""
    wf = json.loads((ROOT / "workflows" / "story_to_video.json").read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, src, sslot, dst, dslot, typ in wf["links"]:
        assert nodes[src]["outputs"][sslot]["type"] == typ and link_id in nodes[src]["outputs"][sslot]["links"]
        assert nodes[dst]["inputs"][dslot]["type"] == typ and nodes[dst]["inputs"][dslot]["link"] == link_id
    assert wf["last_link_id"] == max(l[0] for l in wf["links"])
    assert wf["last_node_id"] == max(nodes)

    class CheckpointLoaderSimple:   # ComfyUI's, as /object_info describes it
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"ckpt_name": (["v1-5-pruned-emaonly.safetensors"],)}}

    classes = dict(runner.node_classes(), CheckpointLoaderSimple=CheckpointLoaderSimple)
    api = runner.ui_to_api(wf, classes)
    by_type = {n["class_type"]: n["inputs"] for n in api.values()}
    assert set(by_type) == {"CheckpointLoaderSimple", "KinemaStoryBatch", "KinemaComicLayout", "SaveImage",
                            "KinemaDynamiCrafterLoader", "KinemaSemanticMotionPredictor", "PreviewImage",
                            "KinemaStoryTransitions", "SaveAnimatedWEBP"}
    for ctype, inputs in by_type.items():
        required = classes[ctype].INPUT_TYPES()["required"]
        assert not [k for k in required if k not in inputs], ctype
    st = by_type["KinemaStoryTransitions"]
    assert st["hold_frames"] == 4 and st["seed"] == 42 and st["steps"] == 50 and len(st["prompt"].splitlines()) == 2
    assert by_type["KinemaSemanticMotionPredictor"]["frames"] == 16
    assert by_type["KinemaDynamiCrafterLoader"]["variant"] == "512_interp"
    story = by_type["KinemaStoryBatch"]
    assert (story["width"], story["height"]) == (512, 320)          # the interpolation model's aspect
    assert len(story["story"].splitlines()) == 3
    # the panels feed the comic layout, the predictor and the transitions
    panels = [k for k, n in api.items() if n["class_type"] == "KinemaStoryBatch"][0]
    for ctype, inp in (("KinemaComicLayout", "panels"), ("KinemaSemanticMotionPredictor", "keyframes"),
                       ("KinemaStoryTransitions", "panels")):
        assert by_type[ctype][inp] == [panels, 0]
