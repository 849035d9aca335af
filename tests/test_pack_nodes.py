"""What holds for every node of the pack: ids, menus, search words, tooltips."""
import re

from kinema.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS


def test_ids_and_names():
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("Kinema"), node_id           # a bare id could be taken by another pack
        assert NODE_DISPLAY_NAME_MAPPINGS.get(node_id), node_id


def test_menu_areas_are_written_one_way():
    """One menu per system, "Kinema/<Area>", each area spelt one way (no "story" beside "Story")."""
    areas = {cls.CATEGORY for cls in NODE_CLASS_MAPPINGS.values()}
    for cat in areas:
        assert re.fullmatch(r"Kinema/[A-Z][A-Za-z0-9-]*", cat), cat
    lowered = {}
    for cat in areas:
        lowered.setdefault(cat.lower().replace("-", ""), set()).add(cat)
    assert all(len(v) == 1 for v in lowered.values()), lowered


def test_drag_nodes_are_found_by_searching_drag():
    """The frontend searches node names (and, on newer servers, SEARCH_ALIASES): every node that
    takes drags says so in its name."""
    takes_drags = [k for k, cls in NODE_CLASS_MAPPINGS.items()
                   if "tracks" in {**cls.INPUT_TYPES().get("required", {}), **cls.INPUT_TYPES().get("optional", {})}]
    assert len(takes_drags) >= 3
    for node_id in takes_drags:
        assert "drag" in NODE_DISPLAY_NAME_MAPPINGS[node_id].lower(), (node_id, NODE_DISPLAY_NAME_MAPPINGS[node_id])


def test_every_input_and_output_is_explained():
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                assert len(entry) > 1 and entry[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert cls.DESCRIPTION, node_id
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES), node_id


def _inputs(cls) -> dict:
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


def test_every_loader_takes_one_precision_input_and_every_seed_one_range():
    """One knob name, choice list and tooltip for the weights' precision across loaders (no
    dtype / precision / weight_dtype mix), and ComfyUI's seed range (0 .. 2**64 - 1, KSampler's)
    on every seeded node."""
    import torch

    from kinema import runtime

    precision = {k: _inputs(cls)["precision"] for k, cls in NODE_CLASS_MAPPINGS.items() if "precision" in _inputs(cls)}
    assert {"KinemaDynamiCrafterLoader", "KinemaFYCLoader", "KinemaMotionI2VFlowLoader",
            "KinemaPuppetMasterLoader"} <= set(precision)
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert not {"dtype", "weight_dtype"} & set(_inputs(cls)), node_id
    choices = {tuple(spec[0]) for spec in precision.values()}
    assert choices == {("auto", "fp32", "fp16", "bf16")}
    tips = {spec[1]["tooltip"].split(" The VAE")[0] for spec in precision.values()}
    assert len(tips) == 1
    seeds = {k: _inputs(cls)["seed"] for k, cls in NODE_CLASS_MAPPINGS.items() if "seed" in _inputs(cls)}
    assert len(seeds) >= 6
    for node_id, (kind, opts) in seeds.items():
        assert (kind, opts["min"], opts["max"]) == ("INT", 0, 2 ** 64 - 1), node_id
    assert runtime.dtype_named("bf16") is torch.bfloat16 and runtime.dtype_named(torch.float16) is torch.float16
    assert runtime.dtype_named("auto", params=1) in (torch.float32, torch.bfloat16, torch.float16)
    try:
        runtime.dtype_named("fp8", what="precision")
    except ValueError as e:
        assert str(e) == "precision: 'fp8' is not one of auto, fp32, fp16, bf16"
    else:
        raise AssertionError("fp8 was accepted")
