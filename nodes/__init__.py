"""ComfyUI nodes, one module per capability. Each module exposes NODE_CLASS_MAPPINGS and
NODE_DISPLAY_NAME_MAPPINGS; this package merges them."""
from importlib import import_module

_MODULES = ("segment", "motion", "motion_i2v", "story", "puppet_master", "dynamicrafter", "story_video", "follow_your_click")

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

for _name in _MODULES:
    _mod = import_module(f".{_name}", __name__)
    NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)
