"""StoryDiffusion story-to-video nodes: load a trained semantic motion predictor, predict the
per-frame embeddings between consecutive keyframes, and decode the transitions of a story with
DynamiCrafter-interp into one video."""
from __future__ import annotations

import torch

from .. import runtime
from .dynamicrafter import MODEL_TYPE as DC_TYPE
from .dynamicrafter import _check_model, _common_inputs, _options
from ._inputs import seed_input

PREDICTOR_TYPE = "KINEMA_MOTION_PREDICTOR"
MOTION_TYPE = "KINEMA_SEMANTIC_MOTION"
FOLDER = "kinema/story_diffusion"
CATEGORY = "Kinema/StoryDiffusion"


class KinemaMotionPredictorLoader:
    DESCRIPTION = ("Loads a trained semantic motion predictor (.safetensors written by train_motion_predictor.py) "
                   "from models/kinema/story_diffusion. Without one, the Semantic Motion Predictor interpolates "
                   "(training-free).")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (PREDICTOR_TYPE,)
    RETURN_NAMES = ("predictor",)
    OUTPUT_TOOLTIPS = ("The learned predictor; connect it to Semantic Motion Predictor.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"predictor_name": (runtime.list_models(FOLDER), {
            "tooltip": "A predictor file in models/kinema/story_diffusion (see docs/story_video.md to train one)."})}}

    def load(self, predictor_name):
        from ..pipelines.story_video.predictor import load_predictor
        model = load_predictor(runtime.model_path(FOLDER, predictor_name))
        return (runtime.ManagedModel(model, f"semantic motion predictor {predictor_name}"),)


def _chart(motion) -> torch.Tensor:
    """(1, 256, W, 3) chart: for each frame of each transition, how close its embedding is to the
    transition's start (blue) and end (orange) keyframe (cosine of standardised tokens, 0-1)."""
    from PIL import Image, ImageDraw
    import numpy as np
    tok = torch.nn.functional.layer_norm(motion.tokens.float(), motion.tokens.shape[-1:]).flatten(2)
    start, end = tok[:, :1], tok[:, -1:]
    to_start = torch.nn.functional.cosine_similarity(tok, start, dim=-1).clamp(0, 1)   # (pairs, frames)
    to_end = torch.nn.functional.cosine_similarity(tok, end, dim=-1).clamp(0, 1)
    lo = float(torch.minimum(to_start.min(), to_end.min()))
    lo = min(lo, 0.999)
    pairs, frames = to_start.shape
    w_pair, h, pad = max(160, 16 * frames), 256, 16
    img = Image.new("RGB", (pairs * w_pair, h), (250, 250, 250))
    d = ImageDraw.Draw(img)
    for p in range(pairs):
        x0 = p * w_pair
        d.rectangle([x0 + pad, pad, x0 + w_pair - pad, h - pad], outline=(180, 180, 180))
        d.text((x0 + pad + 3, pad + 2), f"{p + 1} -> {p + 2}", fill=(60, 60, 60))
        for series, colour in ((to_start[p], (40, 90, 200)), (to_end[p], (230, 120, 20))):
            pts = [(x0 + pad + (w_pair - 2 * pad) * f / (frames - 1),
                    h - pad - (h - 2 * pad) * (float(series[f]) - lo) / (1.0 - lo)) for f in range(frames)]
            d.line(pts, fill=colour, width=2)
            for x, y in pts:
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    d.text((4, h - pad + 2), f"similarity to start (blue) / end (orange), {lo:.3f}..1", fill=(60, 60, 60))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


class KinemaSemanticMotionPredictor:
    DESCRIPTION = ("StoryDiffusion's semantic motion predictor: encodes each keyframe with DynamiCrafter's CLIP "
                   "image encoder and predicts the embeddings of every frame of the transition to the next "
                   "keyframe. Without a predictor the embeddings are interpolated linearly (training-free); a "
                   "trained predictor refines them. Feed the result to Story Transitions.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = (MOTION_TYPE, "IMAGE")
    RETURN_NAMES = ("motion", "chart")
    OUTPUT_TOOLTIPS = ("Per-frame embeddings of every transition (between keyframes 1-2, 2-3, ...).",
                       "How close each frame's embedding is to the start and end keyframe of its transition.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (DC_TYPE, {"tooltip": "From Load DynamiCrafter Model (its CLIP image encoder is used; "
                                               "the 512-interp checkpoint for Story Transitions)."}),
                "keyframes": ("IMAGE", {"tooltip": "Two or more keyframes (e.g. the story panels); a transition "
                                                   "joins each to the next."}),
                "frames": ("INT", {"default": 16, "min": 3, "max": 256,
                                   "tooltip": "Frames per transition, both keyframes included (the interpolation "
                                              "model is trained on 16)."}),
            },
            "optional": {
                "predictor": (PREDICTOR_TYPE, {"tooltip": "A trained predictor (Load Semantic Motion Predictor); "
                                                          "unconnected = linear interpolation."}),
                "width": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 64,
                                  "tooltip": "Video width; keyframes are scaled and centre-cropped to it. 0 uses the "
                                             "model's training size."}),
                "height": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 64,
                                   "tooltip": "Video height (0: the model's training size)."}),
            },
        }

    def run(self, model, keyframes, frames, predictor=None, width=0, height=0):
        from ..pipelines.story_video.transitions import predict_motion
        _check_model(model)
        if predictor is not None and not isinstance(predictor, runtime.ManagedModel):
            raise ValueError("predictor: expected a predictor from 'Load Semantic Motion Predictor'")
        for name, v in (("width", width), ("height", height)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name}: {v!r} must be a non-negative whole number")
        motion = predict_motion(model, keyframes, frames, predictor=predictor, height=height, width=width)
        return (motion, _chart(motion))


class KinemaStoryTransitions:
    DESCRIPTION = ("Turns story panels into one video: DynamiCrafter-interp makes the frames between each panel "
                   "and the next, conditioned frame by frame on the Semantic Motion Predictor's embeddings. Each "
                   "panel shows exactly for 1 + hold frames.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("The video (T, H, W, 3): panel, transition, panel, ...",)

    @classmethod
    def INPUT_TYPES(cls):
        req = {"model": (DC_TYPE, {"tooltip": "From Load DynamiCrafter Model: the 512-interp checkpoint."}),
               "panels": ("IMAGE", {"tooltip": "The panels in story order (the same images as the predictor's "
                                               "keyframes)."}),
               "motion": (MOTION_TYPE, {"tooltip": "From Semantic Motion Predictor; it sets the frames per "
                                                   "transition and the video size."})}
        common = _common_inputs()
        common["prompt"] = ("STRING", {"multiline": True, "default": "",
                                       "tooltip": "What happens in each transition: line 1 for panels 1 -> 2, line 2 "
                                                  "for 2 -> 3, ...; the last line repeats (one line for all)."})
        common["fs"] = ("INT", {"default": 0, "min": 0, "max": 100,
                                "tooltip": "Frames per second condition; 0 uses 5 as the official interpolation "
                                           "script does."})
        common["seed"] = seed_input("Seed of the noise; transition i uses seed + i.")
        del common["frames"]
        req.update(common)
        req["hold_frames"] = ("INT", {"default": 4, "min": 0, "max": 120,
                                      "tooltip": "Extra frames each panel stays still (0: it shows for one frame)."})
        return {"required": req,
                "optional": {"window_overlap": ("INT", {"default": 4, "min": 0, "max": 15,
                                                        "tooltip": "Frames shared by neighbouring windows when a "
                                                                   "transition has more frames than the model's 16."})}}

    def run(self, model, panels, motion, prompt, negative_prompt, fs, steps, cfg, eta, seed, hold_frames,
            window_overlap=4):
        from ..pipelines.story_video.transitions import SemanticMotion, story_transitions
        _check_model(model)
        if not isinstance(motion, SemanticMotion):
            raise ValueError("motion: expected the output of the Semantic Motion Predictor node")
        opts = _options(prompt, negative_prompt, motion.frames, fs, steps, cfg, eta, seed, motion.width,
                        motion.height, window_overlap)
        return (story_transitions(model, panels, motion, opts, hold=hold_frames),)


NODE_CLASS_MAPPINGS = {
    "KinemaMotionPredictorLoader": KinemaMotionPredictorLoader,
    "KinemaSemanticMotionPredictor": KinemaSemanticMotionPredictor,
    "KinemaStoryTransitions": KinemaStoryTransitions,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KinemaMotionPredictorLoader": "Load Semantic Motion Predictor",
    "KinemaSemanticMotionPredictor": "Semantic Motion Predictor",
    "KinemaStoryTransitions": "Story Transitions",
}
