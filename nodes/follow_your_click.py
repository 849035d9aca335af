"""Follow-Your-Click nodes: load a model, animate the clicked region of a picture with a motion
strength; and one motion strength for every backend (FYC's bucket, DynamiCrafter's fs, a warp
motion field's scale). Thin: validate, call ``pipelines.follow_your_click`` / ``kernels.strength``."""
from __future__ import annotations


from .. import runtime
from ..kernels.field import MotionField
from ..kernels.strength import BUCKETS, DYNAMICRAFTER_VARIANTS, bucket_speed, dynamicrafter_fs, warp_strength
from ._ui import save_temp_webp
from ._inputs import precision_input, seed_input
from .motion_i2v import _conditioning  # CONDITIONING -> (1, tokens, D); one reader for both

MODEL_TYPE = "KINEMA_FYC"
MOTION = "KINEMA_MOTION"
FOLDER = "kinema/follow_your_click"
CATEGORY = "Kinema/Follow-Your-Click"

_STRENGTH_TIP = ("Motion strength 0-10 (4 = the official default): how far the region moves. Connect the "
                 "'bucket' of Motion strength to copy the motion of a drag or a reference video (see "
                 "docs/motion_strength.md).")


class KinemaFYCLoader:
    DESCRIPTION = ("Loads a Follow-Your-Click UNet (an FYC-format .safetensors or .ckpt) from "
                   "models/kinema/follow_your_click. No weights are released: make one from an SD1.5 checkpoint and "
                   "an AnimateDiff motion module with 'python follow_your_click.py build', and train it with "
                   "'python follow_your_click.py train' (docs/follow_your_click.md). The VAE and the text encoder "
                   "come from the SD1.5 checkpoint through ComfyUI's own loader.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("fyc_model",)
    OUTPUT_TOOLTIPS = ("The Follow-Your-Click UNet, for Follow-Your-Click Animate.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (runtime.model_choices(FOLDER), {"tooltip": "An FYC-format checkpoint in "
                                                                    "models/kinema/follow_your_click."}),
            "precision": precision_input(),
        }}

    def load(self, unet_name, precision="auto"):
        from ..pipelines.follow_your_click.convert import load_unet
        from ..pipelines.follow_your_click.pipeline import FYCModel
        dtype = runtime.dtype_named(precision, params=1_300_000_000)
        unet = load_unet(runtime.model_path(FOLDER, unet_name), dtype)
        return (FYCModel(unet, f"Follow-Your-Click UNet ({unet_name})"),)


class KinemaFYCAnimate:
    DESCRIPTION = ("Follow-Your-Click: animate the region of a picture given by a mask (e.g. from Click to Mask) "
                   "following a short motion prompt, with a motion strength. Outside the mask every frame is the "
                   "picture. Without a mask the whole picture may move.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    OUTPUT_NODE = False
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("The video frames (F, H, W, 3).",)

    @classmethod
    def INPUT_TYPES(cls):
        from ..pipelines.follow_your_click.pipeline import MAX_STEPS
        return {"required": {
            "fyc_model": (MODEL_TYPE, {"tooltip": "From Load Follow-Your-Click Model."}),
            "vae": ("VAE", {"tooltip": "The VAE of the SD1.5 checkpoint the model was built from (Load Checkpoint)."}),
            "positive": ("CONDITIONING", {"tooltip": "A short motion prompt ('the cat turns its head') from CLIP Text "
                                                     "Encode with the SD1.5 checkpoint's CLIP."}),
            "negative": ("CONDITIONING", {"tooltip": "What to avoid, from CLIP Text Encode (an empty text is fine)."}),
            "image": ("IMAGE", {"tooltip": "The picture to animate (the first of a batch); scaled to cover width x "
                                           "height and centre-cropped."}),
            "motion_strength": ("INT", {"default": 4, "min": 0, "max": BUCKETS - 1, "tooltip": _STRENGTH_TIP}),
            "fps": ("INT", {"default": 2, "min": 1, "max": 30, "tooltip": "Frame-stride condition: the model was "
                                                                          "trained on clips taking every fps-th "
                                                                          "frame (official default 2)."}),
            "frames": ("INT", {"default": 16, "min": 2, "max": 24, "tooltip": "Number of frames (the motion modules "
                                                                             "reach 24; trained on 16)."}),
            "width": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip": "Output width in pixels."}),
            "height": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip": "Output height in pixels."}),
            "steps": ("INT", {"default": 25, "min": 1, "max": MAX_STEPS, "tooltip": "DDIM steps (the official configs "
                                                                             "use 25-100)."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 30.0, "step": 0.1,
                              "tooltip": "Classifier-free guidance (official 7.5-8; 1.0 turns it off and halves the time)."}),
            "seed": seed_input("Seed of the noise."),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "The region that moves (1), e.g. from Click to Mask. Without it the whole "
                                         "picture may move."}),
            "keep_outside": ("BOOLEAN", {"default": True, "tooltip": "With a mask: keep everything outside it exactly "
                                                                     "the picture (latent blending each step and a "
                                                                     "feathered paste). Off: only the model's mask "
                                                                     "condition limits the motion."}),
            "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05,
                              "tooltip": "DDIM eta: 0 deterministic (official), 1 stochastic."}),
            "shared_noise": ("BOOLEAN", {"default": False, "tooltip": "Start every frame from the same noise (an "
                                                                      "official option: steadier, less motion)."}),
            "image_init": ("BOOLEAN", {"default": False, "tooltip": "Start frame i from the picture's latent mixed "
                                                                    "in by (F - i) / F / 64 (an official option)."}),
            "preview_fps": ("FLOAT", {"default": 8.0, "min": 1.0, "max": 60.0, "step": 1.0,
                                      "tooltip": "Frame rate of the animated preview shown in the node."}),
        }}

    def run(self, fyc_model, vae, positive, negative, image, motion_strength, fps, frames, width, height, steps, cfg,
            seed, mask=None, keep_outside=True, eta=0.0, shared_noise=False, image_init=False, preview_fps=8.0):
        from ..pipelines.follow_your_click.pipeline import FYCOptions, animate
        _check_model(fyc_model)
        _check_vae(vae)
        opts = FYCOptions(frames=frames, width=width, height=height, steps=steps, cfg=float(cfg), eta=float(eta),
                          fps=fps, strength=motion_strength, seed=seed, shared_noise=bool(shared_noise),
                          image_init=bool(image_init), keep_outside=bool(keep_outside))
        out = animate(fyc_model, vae, image, _conditioning(positive, "positive"), _conditioning(negative, "negative"),
                      opts, mask=mask)
        return {"ui": {"images": [save_temp_webp(out, fps=float(preview_fps), prefix="kinema_fyc")],
                       "animated": (True,)},
                "result": (out,)}


def _check_model(fyc_model):
    from ..pipelines.follow_your_click.pipeline import FYCModel
    if not isinstance(fyc_model, FYCModel):
        raise ValueError("fyc_model: expected a model from Load Follow-Your-Click Model")


def _check_vae(vae):
    for name in ("decode", "encode"):
        if not callable(getattr(vae, name, None)):
            raise ValueError("vae: expected a VAE (from Load Checkpoint)")


class KinemaFYCModel:
    DESCRIPTION = ("Follow-Your-Click as a ComfyUI MODEL, for ComfyUI's own samplers: KSampler with the ddim sampler "
                   "and the ddim_uniform scheduler is the released DDIM (exactly so for step counts that divide "
                   "1000, e.g. 25 or 50). Conditioning and latent come from 'Follow-Your-Click conditioning'.")
    CATEGORY = CATEGORY
    FUNCTION = "convert"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The Follow-Your-Click UNet as a MODEL (zero-terminal-SNR v-prediction schedule).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"fyc_model": (MODEL_TYPE, {"tooltip": "From Load Follow-Your-Click Model."})}}

    def convert(self, fyc_model):
        from ..pipelines.follow_your_click.native import comfy_model
        _check_model(fyc_model)
        return (comfy_model(fyc_model),)


class KinemaFYCConditioning:
    DESCRIPTION = ("The picture, the clicked region and the motion strength as conditioning for the "
                   "Follow-Your-Click MODEL and ComfyUI's samplers. With a mask the latent keeps everything outside "
                   "it (a noise mask), and 'keep' pastes the picture back over the decoded frames with core "
                   "ImageCompositeMasked (destination: the frames, source: picture, mask: keep).")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT", "IMAGE", "MASK")
    RETURN_NAMES = ("positive", "negative", "latent", "picture", "keep")
    OUTPUT_TOOLTIPS = ("The motion prompt with the picture, region, fps and motion strength.",
                       "The negative prompt with the same picture and region (as the released sampler guides).",
                       "The video latent: one frame latent per frame (with a mask: the picture's, and a noise mask).",
                       "The picture at width x height (scaled to cover, centre-cropped).",
                       "1 where the frames should be the picture (outside the region, feathered at its edge); "
                       "all 0 without a mask.")

    @classmethod
    def INPUT_TYPES(cls):
        spec = KinemaFYCAnimate.INPUT_TYPES()
        req = {k: spec["required"][k] for k in ("vae", "positive", "negative", "image", "motion_strength", "fps",
                                                "frames", "width", "height")}
        opt = {k: spec["optional"][k] for k in ("mask", "keep_outside")}
        return {"required": req, "optional": opt}

    def encode(self, vae, positive, negative, image, motion_strength, fps, frames, width, height, mask=None,
               keep_outside=True):
        from ..pipelines.follow_your_click.native import comfy_conditioning
        _check_vae(vae)
        return comfy_conditioning(vae, image, positive, negative, frames=frames, width=width, height=height, fps=fps,
                                  strength=motion_strength, mask=mask, keep_outside=bool(keep_outside))


class KinemaStrengthToBackends:
    DESCRIPTION = ("One motion strength for every backend: the Motion strength bucket (0-10) as Follow-Your-Click's "
                   "motion strength and as DynamiCrafter's fs (docs/motion_strength.md has the table).")
    CATEGORY = "Kinema/Motion"
    FUNCTION = "map"
    RETURN_TYPES = ("INT", "INT", "FLOAT")
    RETURN_NAMES = ("fyc_strength", "dynamicrafter_fs", "speed")
    OUTPUT_TOOLTIPS = ("Follow-Your-Click's motion strength (the bucket itself).",
                       "DynamiCrafter's fs for the chosen model (512: 30-15, 1024: 15-5, lower = more motion; "
                       "256: frame stride 1-6, higher = more motion).",
                       "The bucket's typical speed, pixels per frame at 512 px.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "bucket": ("INT", {"default": 4, "min": 0, "max": BUCKETS - 1,
                               "tooltip": "Motion strength bucket, e.g. from Motion strength (4 = FYC's default)."}),
            "dynamicrafter_model": (list(DYNAMICRAFTER_VARIANTS), {"default": "512",
                                                                  "tooltip": "The DynamiCrafter model the fs is for."}),
        }}

    def map(self, bucket, dynamicrafter_model="512"):
        fs = dynamicrafter_fs(bucket, dynamicrafter_model)
        speed = bucket_speed(bucket)
        return {"ui": {"text": [f"bucket {bucket}: FYC strength {bucket}, DynamiCrafter {dynamicrafter_model} fs {fs}, "
                                f"{speed:.2f} px/frame at 512 px"]},
                "result": (int(bucket), fs, float(speed))}


class KinemaScaleMotionToStrength:
    DESCRIPTION = ("Scale a motion field (e.g. from Motion from drags) so that its region moves at the speed of a "
                   "strength bucket, for Animate by warping: the same strength as the model backends get.")
    CATEGORY = "Kinema/Motion"
    FUNCTION = "scale"
    RETURN_TYPES = (MOTION, "FLOAT")
    RETURN_NAMES = ("motion", "warp_strength")
    OUTPUT_TOOLTIPS = ("The scaled motion field; measuring it with Motion strength gives the bucket.",
                       "The factor applied (the 'strength' Motion from drags would need).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "motion": (MOTION, {"tooltip": "The motion field to scale (its direction and shape are kept)."}),
            "bucket": ("INT", {"default": 4, "min": 0, "max": BUCKETS - 1, "tooltip": "The strength to give it."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Region whose speed is matched; defaults to the motion field's own region, "
                                         "else the whole frame."}),
        }}

    def scale(self, motion, bucket, mask=None):
        if not isinstance(motion, MotionField):
            raise ValueError("motion: expected a Kinema motion field")
        w, h = motion.size
        region = motion.mask
        if mask is not None:
            region = mask[0] if mask.ndim == 3 else mask
            if tuple(region.shape) != (h, w):
                raise ValueError(f"mask: the mask is {region.shape[-1]}x{region.shape[-2]} but the motion is {w}x{h}")
            if not bool((region > 0.5).any()):
                raise ValueError("mask: the mask is empty")
        k = warp_strength(bucket, motion.flow, region)
        return (MotionField(motion.flow * k, motion.mask), float(k))


NODE_CLASS_MAPPINGS = {
    "KinemaFYCLoader": KinemaFYCLoader,
    "KinemaFYCAnimate": KinemaFYCAnimate,
    "KinemaFYCModel": KinemaFYCModel,
    "KinemaFYCConditioning": KinemaFYCConditioning,
    "KinemaStrengthToBackends": KinemaStrengthToBackends,
    "KinemaScaleMotionToStrength": KinemaScaleMotionToStrength,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KinemaFYCLoader": "Load Follow-Your-Click Model",
    "KinemaFYCAnimate": "Follow-Your-Click Animate",
    "KinemaFYCModel": "Follow-Your-Click as MODEL (for KSampler)",
    "KinemaFYCConditioning": "Follow-Your-Click conditioning",
    "KinemaStrengthToBackends": "Motion strength to backends",
    "KinemaScaleMotionToStrength": "Scale motion to strength",
}
