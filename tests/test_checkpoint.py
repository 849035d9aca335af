"""The one model-file reader (pipelines/checkpoint.py) and every loader that goes through it:
unreadable files give a message in the pack's words (the file, its folder, what is wrong, what
was expected, what to do), never torch's own text, and no code from a file ever runs."""
import pytest
import torch
from safetensors.torch import save_file

from kinema.pipelines import checkpoint as ck
from kinema.pipelines import puppet_master as pm
from kinema.pipelines import segment as segmentation
from kinema.pipelines.dynamicrafter import convert as dc
from kinema.pipelines.motion_i2v import loading as mi2v
from kinema.pipelines.story_video import predictor as sv
from kinema.runtime import KinemaError

import bad_files

# torch's own phrases, which must never reach a user
TORCH_TEXT = ("weights_only", "file an issue", "Re-running", "torch.load", "PytorchStreamReader", "miniz",
              "inline_container", "Unsupported operand", "WeightsUnpickler", "UnpicklingError", "Traceback")


UNREADABLE = [k for k, says in bad_files.KINDS.items() if says and k != "list_pickle"]


# every reader a loader uses, with what its message must say the file should be
READERS = {
    "shared": (ck.read_state_dict, "a model file"),
    "sam": (segmentation.load_sam, "segment-anything ViT-B/L/H"),
    "dynamicrafter": (dc.load_dynamicrafter, "a DynamiCrafter checkpoint"),
    "motion_i2v_vae": (mi2v.load_flow_vae, "Motion-I2V's flow VAE"),
    "motion_i2v_unet": (lambda p: mi2v.load_flow_unet(p, None), "Motion-I2V's stage-1 flow UNet"),
    "puppet_master": (pm.load_unet, "the Puppet-Master UNet"),
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("kind", UNREADABLE)
def test_unreadable_files_are_named_and_explained(tmp_path, reader, kind):
    marker = tmp_path / "payload-ran"
    path = bad_files.write(kind, tmp_path / "models" / "sams", marker)
    read, expected = READERS[reader]
    with pytest.raises(KinemaError) as e:
        read(path)
    msg = str(e.value)
    assert f"'{path.name}'" in msg and str(path.parent) in msg, msg      # the file and its folder
    assert bad_files.KINDS[kind] in msg and expected in msg, msg         # what is wrong, what was expected
    assert "download it again" in msg or "remove this one" in msg, msg   # what to do
    assert not any(t in msg for t in TORCH_TEXT), msg
    assert "\n" not in msg and len(msg) < 600, msg
    assert not marker.exists(), "code from a model file ran"


def test_no_torch_warning_escapes(tmp_path, recwarn):
    marker = tmp_path / "payload-ran"
    for kind in ("raw_pickle_exec", "raw_pickle_system", "zip_payload_exec"):
        with pytest.raises(KinemaError):
            ck.read_state_dict(bad_files.write(kind, tmp_path, marker))
    assert not [w for w in recwarn if "file an issue" in str(w.message) or "weights_only" in str(w.message)]
    assert not marker.exists()


def test_predictor_and_missing_files(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    with pytest.raises(KinemaError, match=r"'junk.safetensors' .* in .*not a valid safetensors file.*semantic motion "
                                          r"predictor.*download it again"):
        sv.load_predictor(p)
    with pytest.raises(KinemaError, match=r"'none.pth' in .*: file not found. Expected a model file"):
        ck.read_state_dict(tmp_path / "none.pth")


def test_layouts_are_unwrapped(tmp_path):
    w = torch.arange(6.0).reshape(2, 3)
    cases = {
        "flat": {"a.w": w},
        "lightning": {"state_dict": {"a.w": w}, "epoch": 3, "global_step": 100},
        "sam_copy": {"model": {"a.w": w}, "optimizer": {"lr": 1e-4}},
        "data_parallel": {"module.a.w": w},
        "nested": {"model": {"state_dict": {"a.w": w}}},
    }
    for name, obj in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path)
        sd = ck.read_state_dict(path)
        assert list(sd) == ["a.w"] and torch.equal(sd["a.w"], w), name
    # a flat dict that also holds a tensor named "model" keeps its own keys
    torch.save({"model": {"x": w}, "b": w}, tmp_path / "mixed.pth")
    assert list(ck.read_state_dict(tmp_path / "mixed.pth")) == ["b"]
    torch.save({"unet": {"lr": 1}, "vae": {"lr": 2}}, tmp_path / "no_tensors.pth")
    with pytest.raises(KinemaError, match=r"'no_tensors.pth' in .* holds no tensors \(keys: unet, vae\)"):
        ck.read_state_dict(tmp_path / "no_tensors.pth")
    torch.save([w], tmp_path / "list.pth")
    with pytest.raises(KinemaError, match=r"'list.pth' in .* holds a list, not a mapping"):
        ck.read_state_dict(tmp_path / "list.pth")


def test_prefixes_and_memory_map(tmp_path):
    sd = {"keep.a": torch.ones(3), "keep.b": torch.zeros(2), "drop.c": torch.full((2,), 7.0)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    torch.save(sd, tmp_path / "m.pth")
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)  # cannot be mapped
    for name in ("m.safetensors", "m.pth", "legacy.pth"):
        got = ck.read_state_dict(tmp_path / name, prefixes=("keep.",), mmap=True)
        assert sorted(got) == ["keep.a", "keep.b"] and torch.equal(got["keep.a"], sd["keep.a"]), name
    assert ck.read_state_dict(tmp_path / "m.safetensors", prefixes=("other.",)) == {}
    save_file({}, str(tmp_path / "none.safetensors"))
    with pytest.raises(KinemaError, match="'none.safetensors' in .* holds no tensors"):
        ck.read_state_dict(tmp_path / "none.safetensors")
