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


# ----------------------------------------------------------------------------- strict key checks

def test_key_check_names_the_file_each_kind_of_mismatch_and_what_to_do():
    expected = {"a.weight": torch.Size([2, 3]), "b.weight": (4,), "c.bias": torch.zeros(5)}
    ck.check_keys(expected, {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4), "c.bias": torch.zeros(5)},
                  "'f.ckpt' (UNet)")  # an exact match passes (tensors, sizes and tuples alike)
    found = {"a.weight": torch.zeros(3, 2), "x.weight": torch.zeros(1)}
    with pytest.raises(KinemaError) as e:
        ck.check_keys(expected, found, "'f.ckpt' (UNet)", advice="Use the UNet file")
    assert str(e.value) == ("'f.ckpt' (UNet): does not match the expected layout: 2 missing (e.g. b.weight, c.bias); "
                            "1 unexpected (e.g. x.weight); 1 with other shapes (e.g. a.weight: found (3, 2), "
                            "expected (2, 3)). Use the UNet file.")
    # keys under allow_missing may be absent, nothing else
    ck.check_keys(expected, {"a.weight": torch.zeros(2, 3)}, "f", allow_missing=("b.", "c."))
    # examples: at most three, in the expected order, with the total counted
    many = {f"k{i}": (1,) for i in range(7)}
    with pytest.raises(KinemaError, match=r"^g: does not match the expected layout: 7 missing \(e.g. k0, k1, k2\)\. "):
        ck.check_keys(many, {}, "g")


def test_strict_load_assigns_rebuilds_position_ids_and_refuses_unset_tensors():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 3)
            self.register_buffer("position_ids", torch.arange(4).expand(1, -1), persistent=False)
            self.register_buffer("scale", torch.ones(2), persistent=False)

    with torch.device("meta"):
        net = Net()
    w, b = torch.randn(3, 2), torch.randn(3)
    net.scale = torch.full((2,), 2.0)
    ck.load_strict(net, {"lin.weight": w, "lin.bias": b}, "n.pt")
    assert net.lin.weight.data_ptr() == w.data_ptr()  # the file's tensor is taken over, not copied
    assert torch.equal(net.position_ids, torch.arange(4)[None])
    with torch.device("meta"):
        net = Net()
    with pytest.raises(KinemaError, match=r"^n.pt: left 1 tensors unset \(e.g. scale\)"):
        ck.load_strict(net, {"lin.weight": w, "lin.bias": b}, "n.pt")
    with torch.device("meta"):
        net = Net()
    with pytest.raises(KinemaError, match=r"^n.pt: does not match the expected layout: 1 missing \(e.g. lin.bias\)"):
        ck.load_strict(net, {"lin.weight": w}, "n.pt")


def test_header_shapes_without_reading_tensors(tmp_path):
    p = tmp_path / "h.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(0)}, str(p), metadata={"format": "x"})
    assert ck.read_header(p) == ({"format": "x"}, {"a": (2, 3), "b": (0,)})
    (tmp_path / "cut.safetensors").write_bytes(p.read_bytes()[:20])
    with pytest.raises(KinemaError, match="'cut.safetensors' .* is not a valid safetensors file"):
        ck.read_header(tmp_path / "cut.safetensors", "a thing")
    with pytest.raises(KinemaError, match="'none.safetensors' in .*: file not found. Expected a thing"):
        ck.read_header(tmp_path / "none.safetensors", "a thing")
