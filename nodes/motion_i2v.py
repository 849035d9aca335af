"""Motion-I2V nodes: load the released weights, predict a motion field from text,
trajectories and the motion brush (stage 1), render the video with motion-augmented temporal
attention on ComfyUI's own SD1.5 model (stage 2). The SD1.5 parts (UNet, VAE, text encoder)
come from ComfyUI's checkpoint loader and CLIP Text Encode nodes. Thin: validate, call
``pipelines.motion_i2v``, return ComfyUI types."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import formats, runtime
from ..kernels.field import MotionField
from ..kernels.motion_attention import MAX_FRAMES, brush_to_static, rasterise_tracks_motion_i2v, tracks_to_grid
from ..kernels.regional import paste
from ._inputs import first_image, precision_input, seed_input

FLOW_MODEL = "KINEMA_MI2V_FLOW_MODEL"
MOTION = "KINEMA_MOTION"
CATEGORY = "Kinema/Motion-I2V"
FOLDER = "kinema/motion_i2v"


def _conditioning(c, name: str) -> torch.Tensor:
    """ComfyUI CONDITIONING ([[tensor (1, L, D), {...}]]) -> (1, L, D), for the flow predictor,
    which takes one plain text condition: what it cannot use is refused, not dropped."""
    try:
        entries = list(c)
        t, extra = entries[0][0], entries[0][1]
    except Exception:
        raise ValueError(f"{name}: expected CONDITIONING from a CLIP Text Encode node") from None
    if len(entries) != 1:
        raise ValueError(f"{name}: {len(entries)} combined conditionings; the motion predictor takes one "
                         f"text condition (connect a single CLIP Text Encode)")
    unused = sorted(k for k in (extra or {}) if k not in ("pooled_output",))
    if unused:
        raise ValueError(f"{name}: the motion predictor cannot apply {', '.join(unused)} of this conditioning "
                         f"(areas, masks, timestep ranges, ...); connect a plain CLIP Text Encode")
    if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[0] != 1:
        raise ValueError(f"{name}: expected CONDITIONING holding one (1, tokens, 768) tensor")
    return t.float()


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


def _render_inputs(image, motion, brush, keep_still):
    """(picture (H, W, 3), still region (h, w) at the motion's size or None) for stage 2, each
    problem named by its input."""
    if not isinstance(motion, MotionField):
        raise ValueError(f"motion: expected a Kinema motion field, got {type(motion).__name__}")
    img = first_image(image)
    ih, iw = img.shape[:2]
    fw, fh = motion.size
    if motion.frames > MAX_FRAMES:
        raise ValueError(f"motion: {motion.frames} frames; Motion-I2V renders at most {MAX_FRAMES}. "
                         f"Make a motion field with 16 frames or fewer")
    if abs(iw / ih - fw / fh) > 0.15 * (fw / fh):  # small differences are resized away, as in stage 1
        raise ValueError(f"image: {iw}x{ih} does not have the shape of the motion field {fw}x{fh}; "
                         f"crop the image or make the motion at a matching size")
    static = _brush(brush, (ih, iw), (fh, fw))
    if static is None and keep_still and motion.mask is not None:
        static = (motion.mask < 0.5).float()
        if static.sum() == 0:
            static = None
    return img, static


class KinemaMotionI2VFlowLoader:
    DESCRIPTION = ("Load Motion-I2V stage 1 (the motion-field predictor): the flow UNet, its trajectory / "
                   "motion-brush ControlNet and the flow VAE of the release, from models/kinema/motion_i2v.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (FLOW_MODEL,)
    RETURN_NAMES = ("flow_model",)
    OUTPUT_TOOLTIPS = ("Motion-I2V stage 1, for 'Motion-I2V predict motion'.",)

    @classmethod
    def INPUT_TYPES(cls):
        files = runtime.model_choices(FOLDER)
        return {"required": {
            "flow_unet": (files, {"tooltip": "stage1 unet/diffusion_pytorch_model.bin (or .safetensors) of the release, "
                                             "in models/kinema/motion_i2v."}),
            "controlnet": (files, {"tooltip": "stage1 controlnet/controlnet.bin of the release."}),
            "flow_vae": (files, {"tooltip": "stage1 vae_flow/diffusion_pytorch_model.bin (the 2-channel flow VAE)."}),
            "precision": precision_input(),
        }}

    def load(self, flow_unet, controlnet, flow_vae, precision="auto"):
        from ..pipelines.motion_i2v.build import load_flow_model
        model = load_flow_model(runtime.model_path(FOLDER, flow_unet), runtime.model_path(FOLDER, controlnet),
                                runtime.model_path(FOLDER, flow_vae),
                                runtime.dtype_named(precision, params=1_400_000_000))
        model.managed()  # under ComfyUI's model management from now on
        return (model,)


class KinemaMotionI2VRenderLoader:
    DESCRIPTION = ("Motion-I2V stage 2 (the video renderer) on an SD1.5 model from ComfyUI's checkpoint loader: "
                   "adds Motion-I2V's motion block (optionally over AnimateDiff v2's motion module), whose temporal "
                   "attention follows a motion field. LoRAs and other patches on the model apply.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("render_model",)
    OUTPUT_TOOLTIPS = ("The SD1.5 model with Motion-I2V's motion modules, for 'Motion-I2V render video'.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.5 model (Load Checkpoint's MODEL; the release uses Realistic "
                                           "Vision 5.1)."}),
            "motion_block": (runtime.model_choices(FOLDER), {"tooltip": "stage2 Motion_Module/motion_block.bin of "
                                                                        "the release, in models/kinema/motion_i2v."}),
            "animatediff_motion_module": (["none"] + runtime.list_models("animatediff_models"),
                                          {"default": "none", "tooltip": "Optional AnimateDiff v2 module "
                                           "(mm_sd_v15_v2.ckpt in models/animatediff_models) loaded first; the motion "
                                           "block overrides what it holds."}),
        }}

    def load(self, model, motion_block, animatediff_motion_module="none"):
        from ..pipelines.checkpoint import read_state_dict
        from ..pipelines.motion_i2v.native import build_motion_modules, render_model
        files = [] if animatediff_motion_module in ("none", "", None) else \
            [runtime.model_path("animatediff_models", animatediff_motion_module)]
        files.append(runtime.model_path(FOLDER, motion_block))
        unet = model.get_model_object("diffusion_model")
        if not hasattr(unet, "input_blocks"):
            raise ValueError("model: Motion-I2V renders with an SD1.5 model; this MODEL has another architecture")
        expected = "a motion module (Motion-I2V's motion_block.bin, or AnimateDiff v2's mm_sd_v15_v2.ckpt)"
        modules = build_motion_modules(unet, [(p.name, read_state_dict(p, expected=expected)) for p in files],
                                       model.model_dtype())
        return (render_model(model, runtime.ManagedModel(modules, "Motion-I2V motion modules")),)


_COND_INPUTS = {
    "positive": ("CONDITIONING", {"tooltip": "What happens: a CLIP Text Encode of the SD1.5 checkpoint's CLIP."}),
    "negative": ("CONDITIONING", {"tooltip": "What to avoid: a CLIP Text Encode of the same CLIP."}),
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
            "vae": ("VAE", {"tooltip": "The SD1.5 checkpoint's VAE (it encodes the picture for the predictor)."}),
            **_COND_INPUTS,
            "image": ("IMAGE", {"tooltip": "The picture to animate (the first frame of a batch is used)."}),
            "tracks": ("STRING", {"multiline": True, "default": '{"tracks": [], "anchors": []}',
                                  "tooltip": "Trajectories (drags) in image pixels (Kinema drag editor, KJNodes "
                                             "SplineEditor or WanTrackToVideo JSON). Anchors are points that stay "
                                             "still."}),
            "width": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip": "Motion width (model: 512)."}),
            "height": ("INT", {"default": 320, "min": 64, "max": 2048, "step": 8, "tooltip": "Motion height (model: 320)."}),
            "flow_unit": ("INT", {"default": 64, "min": 1, "max": 512, "tooltip": "Half size in pixels of the square "
                                  "around each trajectory start where its motion is imposed."}),
            "steps": ("INT", {"default": 25, "min": 1, "max": 200, "tooltip": "DDIM steps."}),
            "guidance": ("FLOAT", {"default": 7.0, "min": 1.0, "max": 30.0, "step": 0.1,
                                   "tooltip": "Classifier-free guidance scale (1 = off)."}),
            "control_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 3.0, "step": 0.05,
                                        "tooltip": "Strength of the trajectory / brush ControlNet."}),
            "seed": seed_input("Seed of the noise."),
        }, "optional": {
            "brush": ("MASK", {"tooltip": "Motion brush: painted (1) areas may move, the rest stays still. Empty = "
                               "everything may move."}),
        }}

    def predict(self, flow_model, vae, positive, negative, image, tracks, width, height, flow_unit, steps, guidance,
                control_scale, seed, brush=None):
        from ..pipelines.motion_i2v.pipeline import _check_image, predict_motion
        _check_size(width, height)
        img = first_image(image)
        ih, iw = img.shape[:2]
        parsed = formats.parse_tracks(tracks, (iw, ih), name="tracks")
        grid = tracks_to_grid(parsed.tracks, (iw, ih), (width, height))
        anchors = tracks_to_grid([parsed.anchors], (iw, ih), (width, height))[0] if len(parsed.anchors) else None
        sparse, mask = rasterise_tracks_motion_i2v(grid, height, width, flow_unit, MAX_FRAMES, anchors)
        static = _brush(brush, (ih, iw), (height, width))
        cond, uncond = _conditioning(positive, "positive"), _conditioning(negative, "negative")
        # the released stage 1 encodes the picture in [0, 1] (not [-1, 1]); ComfyUI's VAE maps its
        # input x to 2x - 1, so it is given (x + 1) / 2
        x = _check_image(img, width, height).permute(0, 2, 3, 1)
        image_latent = vae.encode((x + 1.0) / 2.0).float()
        field = predict_motion(flow_model, img, sparse, mask, static, cond=cond, uncond=uncond,
                               image_latent=image_latent, steps=steps, guidance=guidance, seed=int(seed),
                               control_scale=control_scale)
        return (field,)


class KinemaMotionI2VRender:
    DESCRIPTION = ("Motion-I2V stage 2: render a video from the image and a motion field (from stage 1, or any "
                   "Kinema motion field such as drags), sampled by ComfyUI's sampler on the SD1.5 model with "
                   "Motion-I2V's motion modules. Temporal attention sees frame 0 warped along the motion; frame 0 "
                   "stays the input image and brushed-still areas stay still.")
    CATEGORY = CATEGORY
    FUNCTION = "render"
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("frames", "latent")
    OUTPUT_TOOLTIPS = ("The video frames (F, H, W, 3) at the motion field's size.",
                       "The frames' latents (a batch of F), e.g. for further sampling or another decoder.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "render_model": ("MODEL", {"tooltip": "From 'Motion-I2V stage-2 loader'."}),
            "vae": ("VAE", {"tooltip": "The SD1.5 checkpoint's VAE."}),
            **_COND_INPUTS,
            "image": ("IMAGE", {"tooltip": "The picture to animate; resized to the motion field's size."}),
            "motion": (MOTION, {"tooltip": "Motion field (at most 16 frames; size a multiple of 8)."}),
            "steps": ("INT", {"default": 25, "min": 1, "max": 200, "tooltip": "DDIM steps."}),
            "guidance": ("FLOAT", {"default": 7.0, "min": 1.0, "max": 30.0, "step": 0.1,
                                   "tooltip": "Classifier-free guidance scale (1 = off)."}),
            "seed": seed_input("Seed of the noise."),
            "keep_still_outside_motion_mask": ("BOOLEAN", {"default": True, "tooltip": "If the motion field carries "
                                               "a region (e.g. from the motion brush), keep everything outside it still."}),
        }, "optional": {
            "brush": ("MASK", {"tooltip": "Motion brush: painted (1) areas may move, the rest stays still."}),
        }}

    def render(self, render_model, vae, positive, negative, image, motion, steps, guidance, seed,
               keep_still_outside_motion_mask, brush=None):
        from ..pipelines.motion_i2v.native import paste_inputs, render_video_comfy
        img, static = _render_inputs(image, motion, brush, keep_still_outside_motion_mask)
        frames, latents = render_video_comfy(render_model, vae, positive, negative, img, motion, static, steps=steps,
                                             guidance=guidance, seed=int(seed))
        if static is not None:  # the still region is the picture itself, not its VAE round trip
            picture, keep = paste_inputs(img, motion, static)
            frames = paste(frames, picture[0], 1.0 - keep[0])
        return (frames, {"samples": latents})


class KinemaMotionI2VMotionConditioning:
    DESCRIPTION = ("Motion-I2V stage 2 for ComfyUI's own samplers: the render model with the motion field put into "
                   "it, and the video latent (the picture's latent in every frame, frame 0 and still regions held "
                   "by its noise mask). Sample with KSampler (euler + ddim_uniform is the released DDIM; 25 steps, "
                   "cfg 7) using CLIP Text Encode conditioning, then VAE Decode.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "LATENT", "IMAGE", "MASK")
    RETURN_NAMES = ("model", "latent", "picture", "keep")
    OUTPUT_TOOLTIPS = ("The render model following this motion field.",
                       "The video latent (one frame latent per frame) with its noise mask.",
                       "The picture at the motion field's size.",
                       "1 where the frames should be the picture (the still region, feathered into the moving "
                       "region); all 0 when nothing is held still. Core ImageCompositeMasked (destination: the "
                       "decoded frames, source: picture, mask: keep) pastes it back exactly, as the render node does.")

    @classmethod
    def INPUT_TYPES(cls):
        spec = KinemaMotionI2VRender.INPUT_TYPES()
        req = {k: spec["required"][k] for k in ("render_model", "vae", "image", "motion",
                                                 "keep_still_outside_motion_mask")}
        return {"required": req, "optional": dict(spec["optional"])}

    def apply(self, render_model, vae, image, motion, keep_still_outside_motion_mask, brush=None):
        from ..pipelines.motion_i2v.native import paste_inputs, prepare_render
        img, static = _render_inputs(image, motion, brush, keep_still_outside_motion_mask)
        model, latent = prepare_render(render_model, vae, img, motion, static)
        return (model, latent, *paste_inputs(img, motion, static))


NODE_CLASS_MAPPINGS = {
    "KinemaMotionI2VFlowLoader": KinemaMotionI2VFlowLoader,
    "KinemaMotionI2VRenderLoader": KinemaMotionI2VRenderLoader,
    "KinemaMotionI2VPredictMotion": KinemaMotionI2VPredictMotion,
    "KinemaMotionI2VRender": KinemaMotionI2VRender,
    "KinemaMotionI2VMotionConditioning": KinemaMotionI2VMotionConditioning,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KinemaMotionI2VFlowLoader": "Motion-I2V stage-1 loader (motion predictor)",
    "KinemaMotionI2VRenderLoader": "Motion-I2V stage-2 loader (video renderer)",
    "KinemaMotionI2VPredictMotion": "Motion-I2V predict motion (drags, brush or text)",
    "KinemaMotionI2VRender": "Motion-I2V render video",
    "KinemaMotionI2VMotionConditioning": "Motion-I2V motion conditioning (for KSampler)",
}
