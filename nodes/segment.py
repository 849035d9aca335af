"""Click -> object mask nodes: load a segment-anything model, turn clicks into a mask."""
from __future__ import annotations

from .. import runtime
from ..formats import parse_points
from ..pipelines.segment import SamStore, overlay, refine_mask, segment
from ._inputs import first_image
from ._ui import save_temp_png

SAM_TYPE = "KINEMA_SAM"
MAX_CLICKS = 256  # as many as the live preview route takes
DEFAULT_POINTS = '{"positive": [], "negative": [], "box": null}'

# The pack's one bounded set of loaded SAMs, shared by the loader node and the live-mask route
# (nodes/routes.py); ComfyUI's model management unloads them and the set then lets go.
SAM_MODELS = SamStore(max_files=2)


class KinemaSAMLoader:
    DESCRIPTION = ("Loads a segment-anything model (ViT-B, ViT-L or ViT-H; .pth or .safetensors) from "
                   "models/sams. The kind is read from the file. Image encodings are cached, so more clicks "
                   "on the same picture are fast. The live mask in Click to Mask's editor uses the same loaded model.")
    CATEGORY = "Kinema/Segment"
    FUNCTION = "load"
    RETURN_TYPES = (SAM_TYPE,)
    RETURN_NAMES = ("sam",)
    OUTPUT_TOOLTIPS = ("The loaded SAM with its image-embedding cache; connect it to Click to Mask.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "sam_name": (runtime.list_models("sams"), {
                    "tooltip": "A segment-anything checkpoint in models/sams (e.g. sam_vit_b_01ec64.pth)."}),
            },
            "optional": {
                "device": (["auto", "cpu"], {
                    "default": "auto",
                    "tooltip": "auto: ComfyUI's main device (GPU when there is one); cpu: always the CPU."}),
            },
        }

    def load(self, sam_name, device="auto"):
        if device not in ("auto", "cpu"):
            raise ValueError(f"device: {device!r} is not one of auto, cpu")
        return (SAM_MODELS.get(runtime.model_path("sams", sam_name), None if device == "auto" else "cpu"),)


class KinemaClickToMask:
    DESCRIPTION = ("Clicks -> object mask. With a SAM connected, segment-anything predicts the mask; without "
                   "one a classical segmentation does (superpixels grouped into whole objects, the one under the "
                   "click chosen by how object-like it is: a closed outline, colours unlike its surroundings; "
                   "then its edge and the pixels next to it settled by colour). "
                   "Positive clicks mark the object, negative clicks what is not the object, an optional box "
                   "bounds it. For a batch of images the first frame is segmented.")
    CATEGORY = "Kinema/Segment"
    FUNCTION = "run"
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("mask", "preview")
    OUTPUT_TOOLTIPS = ("The object mask (1, H, W), 1 = object, after grow and feather.",
                       "The picture with the mask tinted and the clicks drawn (green positive, red negative).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The picture to click on; for a batch, the first frame is used."}),
                "points": ("STRING", {
                    "multiline": True, "default": DEFAULT_POINTS,
                    "tooltip": 'Clicks in pixels: {"positive": [[x, y], ...], "negative": [[x, y], ...], '
                               '"box": [x0, y0, x1, y1] or null}, or a plain list of positive points '
                               '([{"x": .., "y": ..}] as KJNodes\' Points Editor writes). A box drawn '
                               'around the object keeps the mask inside it; without SAM it also lets parts '
                               'the clicks miss join by colour (when the box holds at most half the picture).'}),
                "multimask": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "SAM only: ask for three candidate masks and keep the best-scoring one (best for "
                               "a single click); off returns one mask (often better with several clicks)."}),
                "grow": ("INT", {
                    "default": 0, "min": -256, "max": 256, "step": 1,
                    "tooltip": "Pixels to grow the mask by (negative shrinks it)."}),
                "feather": ("INT", {
                    "default": 0, "min": 0, "max": 256, "step": 1,
                    "tooltip": "Soften the mask edge over about this many pixels (0 = hard edge)."}),
            },
            "optional": {
                "sam": (SAM_TYPE, {"tooltip": "A loaded segment-anything model; leave empty for the classical "
                                              "segmentation that needs no weights."}),
                "negative_points": ("STRING", {
                    "forceInput": True,
                    "tooltip": "Negative clicks as a separate list (KJNodes Points Editor's negative output)."}),
            },
        }

    def run(self, image, points, multimask=True, grow=0, feather=0, sam=None, negative_points=None):
        frame = first_image(image).detach().cpu()
        h, w = frame.shape[:2]
        if h < 8 or w < 8:
            raise ValueError(f"image: {w}x{h} is too small to segment (need at least 8x8)")
        for name, value, lo, hi in (("grow", grow, -256, 256), ("feather", feather, 0, 256)):
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise ValueError(f"{name}: {value!r} must be a whole number of pixels in {lo}..{hi}")
        pts = parse_points(points, (w, h), negative_points if negative_points else None)
        if pts.count > MAX_CLICKS:
            raise ValueError(f"points: {pts.count} clicks is more than the {MAX_CLICKS} this node takes; "
                             f"a few positive clicks (and a box) are enough for one object")
        if sam is None:  # the classical path: many small operations, fastest on one thread
            with runtime.one_thread():
                mask, _score = segment(frame, pts, None)
        else:
            mask, _score = segment(frame, pts, sam, multimask=bool(multimask))
        if float(mask.sum()) == 0:
            raise ValueError("points: nothing was selected (the mask is empty). Click inside the object, add "
                             "more positive clicks or a box around it, remove negative clicks that sit on it"
                             + (", or switch multimask" if sam is not None else "") + ".")
        mask = refine_mask(mask, grow=grow, feather=feather)
        if float(mask.max()) == 0:
            raise ValueError(f"grow: shrinking by {-grow} px removed the whole mask; use a smaller value")
        preview = overlay(frame, mask, pts)
        bg = save_temp_png(frame, "kinema_bg")
        return {"ui": {"kinema_bg": [bg]}, "result": (mask[None], preview[None])}


NODE_CLASS_MAPPINGS = {
    "KinemaSAMLoader": KinemaSAMLoader,
    "KinemaClickToMask": KinemaClickToMask,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KinemaSAMLoader": "Load SAM Model",
    "KinemaClickToMask": "Click to Mask",
}
