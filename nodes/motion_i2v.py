"""Motion-I2V nodes: load the released weights, predict a motion field from text,
trajectories and the motion brush (stage 1), render the video with motion-augmented temporal
attention (stage 2). Thin: validate, call ``pipelines.motion_i2v``, return ComfyUI types."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import formats, runtime
from ..kernels.field import MotionField
from ..kernels.motion_attention import MAX_FRAMES, brush_to_static, rasterise_tracks_motion_i2v, tracks_to_grid

FLOW_MODEL = "KINEMA_MI2V_FLOW_MODEL"
RENDER_MODEL = "KINEMA_MI2V_RENDER_MODEL"
MOTION = "KINEMA_MOTION"
CATEGORY = "Kinema/Motion-I2V"
FOLDER = "kinema/motion_i2v"
DTYPE_CHOICES = ["fp16", "bf16", "fp32"]
ARCH_CHOICES = ["sd15", "tiny"]
NEGATIVE = ("(blur, haze, deformed iris, deformed pupils, semi-realistic, cgi, 3d, render, sketch, cartoon, drawing, "
            "anime, mutated hands and fingers:1.4), (deformed, distorted, disfigured:1.3), poorly drawn, bad anatomy, "
            "wrong anatomy, extra limb, missing limb, floating limbs, disconnected limbs, mutation, mutated, ugly, "
            "disgusting, amputation")

_ARCH_TIP = "Network sizes: 'sd15' for the released Motion-I2V files; 'tiny' only for small test networks."
_DTYPE_TIP = "Precision on the device: fp16 for NVIDIA GPUs, bf16 for recent CPUs/GPUs, fp32 everywhere (slowest)."


def _files(folder: str) -> list[str]:
    return runtime.list_models(folder) or [""]


def _first_image(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"{name}: expected an IMAGE batch (B, H, W, 3), got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    return image[0, ..., :3].float()


def _conditioning(c, name: str) -> torch.Tensor | None:
    """ComfyUI CONDITIONING ([[tensor (1, L, D), {...}], ...]) -> (1, L, D)."""
    if c is None:
        return None
    try:
        t = c[0][0]
    except Exception:
        raise ValueError(f"{name}: expected CONDITIONING from a CLIP Text Encode node") from None
    if not isinstance(t, torch.Tensor) or t.ndim != 3:
        raise ValueError(f"{name}: expected CONDITIONING holding a (1, tokens, 768) tensor")
    return t[:1].float()


def _brush(mask, image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> torch.Tensor | None:
    """MASK (B, H, W), 1 = brushed (may move) -> static (h, w) at the grid size, or None if unpainted."""
    if mask is None:
        return None
    m = mask[0] if mask.ndim == 3 else mask
    if m.ndim != 2:
        raise ValueError(f"brush: expected a MASK (B, H, W), got {tuple(mask.shape)}")
    if float(m.max()) <= 0:
        return None  # nothing painted: everything may move
    if tuple(m.shape) not in (tuple(image_hw), tuple(grid_hw)):
        raise ValueError(f"brush: the mask is {m.shape[1]}x{m.shape[0]} but the image is {image_hw[1]}x{image_hw[0]} "
                         f"and the motion is {grid_hw[1]}x{grid_hw[0]}; paint the brush on the same image")
    if tuple(m.shape) != tuple(grid_hw):
        m = F.interpolate(m[None, None].float(), size=grid_hw, mode="bilinear", align_corners=False)[0, 0]
    return brush_to_static(m.float())


def _check_size(width: int, height: int) -> None:
    if width % 8 or height % 8:
        raise ValueError(f"width/height: {width}x{height} must be multiples of 8 (the latent grid is 1/8 of it)")


class KinemaMotionI2VFlowLoader:
    DESCRIPTION = ("Load Motion-I2V stage 1 (the motion-field predictor): the flow UNet, its trajectory / "
                   "motion-brush ControlNet and the flow VAE from models/kinema/motion_i2v, plus the image VAE and "
                   "text encoder of an SD1.5 checkpoint from models/checkpoints.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (FLOW_MODEL,)
    RETURN_NAMES = ("flow_model",)
    OUTPUT_TOOLTIPS = ("Motion-I2V stage 1, for 'Motion-I2V predict motion'.",)

    @classmethod
    def INPUT_TYPES(cls):
        files = _files(FOLDER)
        return {"required": {
            "flow_unet": (files, {"tooltip": "stage1 unet/diffusion_pytorch_model.bin (or .safetensors) of the release."}),
            "controlnet": (files, {"tooltip": "stage1 controlnet/controlnet.bin of the release."}),
            "flow_vae": (files, {"tooltip": "stage1 vae_flow/diffusion_pytorch_model.bin (2-channel flow VAE)."}),
            "checkpoint": (_files("checkpoints"), {"tooltip": "An SD1.5 single-file checkpoint: its VAE encodes the "
                                                              "image and its CLIP encodes prompts."}),
            "dtype": (DTYPE_CHOICES, {"default": "fp16", "tooltip": _DTYPE_TIP}),
        }, "optional": {"architecture": (ARCH_CHOICES, {"default": "sd15", "tooltip": _ARCH_TIP})}}

    def load(self, flow_unet, controlnet, flow_vae, checkpoint, dtype, architecture="sd15"):
        from ..pipelines.motion_i2v.build import load_flow_model
        return (load_flow_model(runtime.model_path(FOLDER, flow_unet), runtime.model_path(FOLDER, controlnet),
                                runtime.model_path(FOLDER, flow_vae), runtime.model_path("checkpoints", checkpoint),
                                dtype, architecture),)


class KinemaMotionI2VRenderLoader:
    DESCRIPTION = ("Load Motion-I2V stage 2 (the video renderer): an SD1.5 checkpoint, optionally the AnimateDiff v2 "
                   "motion module, and the Motion-I2V motion block, whose temporal attention follows a motion field.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (RENDER_MODEL,)
    RETURN_NAMES = ("render_model",)
    OUTPUT_TOOLTIPS = ("Motion-I2V stage 2, for 'Motion-I2V render video'.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoint": (_files("checkpoints"), {"tooltip": "An SD1.5 single-file checkpoint (UNet, VAE, CLIP)."}),
            "motion_block": (_files(FOLDER), {"tooltip": "stage2 Motion_Module/motion_block.bin of the release."}),
            "animatediff_motion_module": (["none"] + runtime.list_models("animatediff_models"),
                                          {"default": "none", "tooltip": "Optional AnimateDiff v2 module "
                                           "(mm_sd_v15_v2) loaded first; the motion block overrides what it holds."}),
            "dtype": (DTYPE_CHOICES, {"default": "fp16", "tooltip": _DTYPE_TIP}),
        }, "optional": {"architecture": (ARCH_CHOICES, {"default": "sd15", "tooltip": _ARCH_TIP})}}

    def load(self, checkpoint, motion_block, animatediff_motion_module, dtype, architecture="sd15"):
        from ..pipelines.motion_i2v.build import load_render_model
        files = [] if animatediff_motion_module in ("none", "", None) else \
            [runtime.model_path("animatediff_models", animatediff_motion_module)]
        files.append(runtime.model_path(FOLDER, motion_block))
        return (load_render_model(runtime.model_path("checkpoints", checkpoint), files, dtype, architecture),)


_TEXT_INPUTS = {
    "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What happens (encoded with the "
                          "checkpoint's CLIP unless 'positive' is connected)."}),
    "negative_prompt": ("STRING", {"multiline": True, "default": NEGATIVE, "tooltip": "What to avoid (unless "
                                   "'negative' is connected)."}),
}
_COND_INPUTS = {
    "positive": ("CONDITIONING", {"tooltip": "Optional: conditioning from an SD1.5 CLIP Text Encode; replaces 'prompt'."}),
    "negative": ("CONDITIONING", {"tooltip": "Optional: negative conditioning; replaces 'negative_prompt'."}),
}


class KinemaMotionI2VPredictMotion:
    DESCRIPTION = ("Motion-I2V stage 1: predict how every pixel moves over 16 frames, guided by the prompt, by "
                   "trajectories (drags) and by the motion brush (only brushed areas move).")
    CATEGORY = CATEGORY
    FUNCTION = "predict"
    RETURN_TYPES = (MOTION,)
    RETURN_NAMES = ("motion",)
    OUTPUT_TOOLTIPS = ("Per-frame displacement from frame 0 (16 frames, the first zero), in pixels of the chosen "
                       "width x height; feed 'Motion-I2V render video' or the warp renderer.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "flow_model": (FLOW_MODEL, {"tooltip": "From 'Motion-I2V stage-1 loader'."}),
            "image": ("IMAGE", {"tooltip": "The picture to animate (the first frame of a batch is used)."}),
            "tracks": ("STRING", {"multiline": True, "default": '{"tracks": [], "anchors": []}',
                                  "tooltip": "Trajectories in image pixels (Kinema drag editor, KJNodes SplineEditor "
                                             "or WanTrackToVideo JSON). Anchors are points that stay still."}),
            "width": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip": "Motion width (model: 512)."}),
            "height": ("INT", {"default": 320, "min": 64, "max": 2048, "step": 8, "tooltip": "Motion height (model: 320)."}),
            "flow_unit": ("INT", {"default": 64, "min": 1, "max": 512, "tooltip": "Half size in pixels of the square "
                                  "around each trajectory start where its motion is imposed."}),
            "steps": ("INT", {"default": 25, "min": 1, "max": 200, "tooltip": "DDIM steps."}),
            "guidance": ("FLOAT", {"default": 7.0, "min": 1.0, "max": 30.0, "step": 0.1,
                                   "tooltip": "Classifier-free guidance scale (1 = off)."}),
            "control_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 3.0, "step": 0.05,
                                        "tooltip": "Strength of the trajectory / brush ControlNet."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1, "tooltip": "Noise seed."}),
            **_TEXT_INPUTS,
        }, "optional": {
            "brush": ("MASK", {"tooltip": "Motion brush: painted (1) areas may move, the rest stays still. Empty = "
                               "everything may move."}),
            **_COND_INPUTS,
        }}

    def predict(self, flow_model, image, tracks, width, height, flow_unit, steps, guidance, control_scale, seed,
                prompt, negative_prompt, brush=None, positive=None, negative=None):
        from ..pipelines.motion_i2v.pipeline import predict_motion
        _check_size(width, height)
        img = _first_image(image)
        ih, iw = img.shape[:2]
        parsed = formats.parse_tracks(tracks, (iw, ih), name="tracks")
        grid = tracks_to_grid(parsed.tracks, (iw, ih), (width, height))
        anchors = tracks_to_grid([parsed.anchors], (iw, ih), (width, height))[0] if len(parsed.anchors) else None
        sparse, mask = rasterise_tracks_motion_i2v(grid, height, width, flow_unit, MAX_FRAMES, anchors)
        static = _brush(brush, (ih, iw), (height, width))
        field = predict_motion(flow_model, img, sparse, mask, static, prompt=prompt, negative=negative_prompt,
                               cond=_conditioning(positive, "positive"), uncond=_conditioning(negative, "negative"),
                               steps=steps, guidance=guidance, seed=seed, control_scale=control_scale)
        return (field,)


class KinemaMotionI2VRender:
    DESCRIPTION = ("Motion-I2V stage 2: render a video from the image and a motion field (from stage 1, or any "
                   "Kinema motion field such as drags). Temporal attention sees frame 0 warped along the motion; "
                   "frame 0 stays the input image and brushed-still areas stay still.")
    CATEGORY = CATEGORY
    FUNCTION = "render"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("The video frames (F, H, W, 3) at the motion field's size.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "render_model": (RENDER_MODEL, {"tooltip": "From 'Motion-I2V stage-2 loader'."}),
            "image": ("IMAGE", {"tooltip": "The picture to animate; resized to the motion field's size."}),
            "motion": (MOTION, {"tooltip": "Motion field (at most 16 frames; size a multiple of 8)."}),
            "steps": ("INT", {"default": 25, "min": 1, "max": 200, "tooltip": "DDIM steps."}),
            "guidance": ("FLOAT", {"default": 7.0, "min": 1.0, "max": 30.0, "step": 0.1,
                                   "tooltip": "Classifier-free guidance scale (1 = off)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1, "tooltip": "Noise seed."}),
            "keep_still_outside_motion_mask": ("BOOLEAN", {"default": True, "tooltip": "If the motion field carries "
                                               "a region (e.g. from the motion brush), keep everything outside it still."}),
            **_TEXT_INPUTS,
        }, "optional": {
            "brush": ("MASK", {"tooltip": "Motion brush: painted (1) areas may move, the rest stays still."}),
            **_COND_INPUTS,
        }}

    def render(self, render_model, image, motion, steps, guidance, seed, keep_still_outside_motion_mask, prompt,
               negative_prompt, brush=None, positive=None, negative=None):
        from ..pipelines.motion_i2v.pipeline import render_video
        if not isinstance(motion, MotionField):
            raise ValueError(f"motion: expected a Kinema motion field, got {type(motion).__name__}")
        img = _first_image(image)
        ih, iw = img.shape[:2]
        fw, fh = motion.size
        if motion.frames > MAX_FRAMES:
            raise ValueError(f"motion: {motion.frames} frames; Motion-I2V renders at most {MAX_FRAMES}. "
                             f"Make a motion field with 16 frames or fewer")
        if abs(iw / ih - fw / fh) > 0.15 * (fw / fh):  # small differences are resized away, as in stage 1
            raise ValueError(f"image: {iw}x{ih} does not have the shape of the motion field {fw}x{fh}; "
                             f"crop the image or make the motion at a matching size")
        static = _brush(brush, (ih, iw), (fh, fw))
        if static is None and keep_still_outside_motion_mask and motion.mask is not None:
            static = (motion.mask < 0.5).float()
            if static.sum() == 0:
                static = None
        result = render_video(render_model, img, motion, static, prompt=prompt, negative=negative_prompt,
                              cond=_conditioning(positive, "positive"), uncond=_conditioning(negative, "negative"),
                              steps=steps, guidance=guidance, seed=seed)
        return (result.frames,)


NODE_CLASS_MAPPINGS = {
    "KinemaMotionI2VFlowLoader": KinemaMotionI2VFlowLoader,
    "KinemaMotionI2VRenderLoader": KinemaMotionI2VRenderLoader,
    "KinemaMotionI2VPredictMotion": KinemaMotionI2VPredictMotion,
    "KinemaMotionI2VRender": KinemaMotionI2VRender,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KinemaMotionI2VFlowLoader": "Motion-I2V stage-1 loader (motion predictor)",
    "KinemaMotionI2VRenderLoader": "Motion-I2V stage-2 loader (video renderer)",
    "KinemaMotionI2VPredictMotion": "Motion-I2V predict motion",
    "KinemaMotionI2VRender": "Motion-I2V render video",
}
