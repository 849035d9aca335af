"""Kinema: controllable image animation for ComfyUI."""
from .runtime import register_model_folders
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.routes import register_routes

register_model_folders()
register_routes()  # the editors' live mask preview; does nothing outside a ComfyUI server

WEB_DIRECTORY = "./web/js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
