"""Motion-I2V nodes: declarations and the input checks that come before any model is used
(the nodes run on ComfyUI's models: tests/comfyui/test_motion_i2v_core.py; the example
workflows run through a real ComfyUI in tests/comfyui)."""
import pytest
import torch

from kinema.kernels.field import MotionField
from kinema.nodes import motion_i2v as nodes
from kinema.runtime import KinemaError


def _predict_args(**kw):
    args = dict(flow_model=None, vae=None, positive=None, negative=None, image=torch.rand(1, 32, 48, 3),
                tracks="[]", width=48, height=32, flow_unit=4, steps=1, guidance=1.0, control_scale=1.0, seed=0)
    args.update(kw)
    return args


def test_predict_node_checks_inputs_first():
    node = nodes.KinemaMotionI2VPredictMotion()
    with pytest.raises(ValueError, match="tracks"):
        node.predict(**_predict_args(tracks='[[[300, 10], [40, 20]]]'))
    with pytest.raises(ValueError, match="brush: the mask is 10x10"):
        node.predict(brush=torch.ones(1, 10, 10), **_predict_args())
    with pytest.raises(ValueError, match="multiples of 8"):
        node.predict(**_predict_args(width=50))
    with pytest.raises(ValueError, match="image: expected an IMAGE"):
        node.predict(**_predict_args(image=torch.rand(32, 48)))
    cond = [[torch.zeros(1, 77, 768), {}]]
    with pytest.raises(ValueError, match="positive: 2 combined conditionings"):
        nodes._conditioning(cond + cond, "positive")
    with pytest.raises(ValueError, match="negative: the motion predictor cannot apply area, strength"):
        nodes._conditioning([[torch.zeros(1, 77, 768), {"area": (8, 8, 0, 0), "strength": 1.0}]], "negative")


def test_render_node_checks_inputs_first():
    node = nodes.KinemaMotionI2VRender()
    args = dict(render_model=None, vae=None, positive=None, negative=None, steps=1, guidance=1.0, seed=0,
                keep_still_outside_motion_mask=True)
    with pytest.raises(ValueError, match="at most 16"):
        node.render(image=torch.rand(1, 32, 48, 3), motion=MotionField(torch.zeros(20, 32, 48, 2)), **args)
    with pytest.raises(ValueError, match="shape of the motion field"):
        node.render(image=torch.rand(1, 48, 32, 3), motion=MotionField(torch.zeros(16, 32, 48, 2)), **args)
    with pytest.raises(ValueError, match="Kinema motion field"):
        node.render(image=torch.rand(1, 32, 48, 3), motion=torch.zeros(16, 32, 48, 2), **args)


def test_loader_errors_name_the_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("KINEMA_MODELS_DIR", str(tmp_path))
    choices = nodes.KinemaMotionI2VFlowLoader.INPUT_TYPES()["required"]["flow_unet"][0]
    assert choices == ["(no files in models/kinema/motion_i2v/)"]
    with pytest.raises(KinemaError, match=r"put one in models/kinema/motion_i2v/"):
        nodes.KinemaMotionI2VFlowLoader().load(choices[0], choices[0], choices[0])
    with pytest.raises(KinemaError, match="missing.bin' not found"):
        nodes.KinemaMotionI2VFlowLoader().load("missing.bin", "missing.bin", "missing.bin")


def test_node_metadata():
    for cls in nodes.NODE_CLASS_MAPPINGS.values():
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, v in spec.get(section, {}).items():
                assert "tooltip" in v[1], (cls.__name__, name)
        assert cls.CATEGORY.startswith("Kinema/") and cls.DESCRIPTION and len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
