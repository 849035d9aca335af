"""DynamiCrafter nodes: load a released checkpoint, animate an image from a prompt (optionally
only inside a mask), interpolate between two keyframes; and the native route, where ComfyUI's
own samplers sample the model (to MODEL, Conditioning, the released DDIM as a SAMPLER and its
timesteps as SIGMAS)."""
from __future__ import annotations


from .. import runtime
from ._inputs import precision_input, seed_input

MODEL_TYPE = "KINEMA_DYNAMICRAFTER"
FOLDERS = ("kinema/dynamicrafter", "checkpoints")
VARIANTS = ("auto", "256", "512", "1024", "512_interp")


def _model_files() -> list[str]:
    names: list[str] = []
    for folder in FOLDERS:
        for n in runtime.list_models(folder):
            if n not in names:
                names.append(n)
    return names


def _resolve(name: str):
    for folder in FOLDERS:
        try:
            return runtime.model_path(folder, name)
        except runtime.KinemaError:
            continue
    raise runtime.KinemaError(f"DynamiCrafter checkpoint '{name}' not found in models/kinema/dynamicrafter/ "
                              f"or models/checkpoints/")


def _check_model(model):
    from ..pipelines.dynamicrafter.model import DynamiCrafter
    if not isinstance(model, DynamiCrafter):
        raise ValueError("model: expected a DynamiCrafter model from 'Load DynamiCrafter Model'")


_COMMON_HELP = {
    "prompt": "What should happen in the video (motion, camera, action).",
    "negative_prompt": "What to avoid; empty uses the unconditional text the models were trained with.",
    "frames": "Number of frames. The models are trained on 16; more frames run in overlapping 16-frame windows.",
    "fs": "Motion control: frames per second for the 512/1024 models (lower = more motion; 512: 15-30, "
          "1024: 5-15), frame stride for the 256 model (1-6, higher = more motion). 0 uses the model's default. "
          "To use a measured motion strength, connect 'Motion strength to backends' (docs/motion_strength.md).",
    "steps": "DDIM steps (50 in the official scripts).",
    "cfg": "Classifier-free guidance scale (7.5 in the official scripts; 1.0 turns guidance off and halves the time).",
    "eta": "DDIM eta: 1.0 as in the official scripts (stochastic), 0.0 deterministic DDIM.",
    "seed": "Seed of the noise (the same seed gives the same video).",
    "width": "Output width in pixels (a multiple of 64); 0 uses the model's training size.",
    "height": "Output height in pixels (a multiple of 64); 0 uses the model's training size.",
    "window_overlap": "Frames shared by neighbouring windows when frames exceed the model's 16.",
}


def _common_inputs(frames_default=16) -> dict:
    h = _COMMON_HELP
    return {
        "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": h["prompt"]}),
        "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": h["negative_prompt"]}),
        "frames": ("INT", {"default": frames_default, "min": 1, "max": 256, "tooltip": h["frames"]}),
        "fs": ("INT", {"default": 0, "min": 0, "max": 100, "tooltip": h["fs"]}),
        "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": h["steps"]}),
        "cfg": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 30.0, "step": 0.1, "tooltip": h["cfg"]}),
        "eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": h["eta"]}),
        "seed": seed_input(h["seed"]),
    }


def _optional_inputs() -> dict:
    h = _COMMON_HELP
    return {
        "width": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 64, "tooltip": h["width"]}),
        "height": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 64, "tooltip": h["height"]}),
        "window_overlap": ("INT", {"default": 4, "min": 0, "max": 15, "tooltip": h["window_overlap"]}),
    }


def _options(prompt, negative_prompt, frames, fs, steps, cfg, eta, seed, width, height, window_overlap):
    from ..pipelines.dynamicrafter.pipeline import AnimateOptions
    for name, value in (("frames", frames), ("steps", steps), ("seed", seed), ("fs", fs),
                        ("width", width), ("height", height), ("window_overlap", window_overlap)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}: {value!r} must be a non-negative whole number")
    if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
        raise ValueError("prompt: the prompt and negative prompt must be text")
    return AnimateOptions(prompt=prompt, negative=negative_prompt, frames=frames, fs=fs or None, steps=steps,
                          cfg=float(cfg), eta=float(eta), seed=seed, height=height, width=width,
                          window_overlap=window_overlap)


class KinemaDynamiCrafterLoader:
    DESCRIPTION = ("Loads a released DynamiCrafter checkpoint (256, 512, 1024 or 512-interp; model.ckpt or a pruned "
                   "fp16/bf16 .safetensors) from models/kinema/dynamicrafter or models/checkpoints. The file holds "
                   "everything (UNet, OpenCLIP text and image encoders, resampler, VAE); the variant is read from "
                   "its keys. The 512-interp model has the same keys as 512: pick 512_interp to use its defaults.")
    CATEGORY = "Kinema/DynamiCrafter"
    FUNCTION = "load"
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The DynamiCrafter model; connect it to DynamiCrafter Animate or Interpolate, or to "
                       "DynamiCrafter to MODEL and DynamiCrafter Conditioning for ComfyUI's samplers.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ckpt_name": (_model_files(), {"tooltip": "A DynamiCrafter checkpoint file."}),
                "precision": precision_input("The VAE stays fp32 when fp16 is chosen."),
            },
            "optional": {
                "variant": (list(VARIANTS), {
                    "default": "auto",
                    "tooltip": "auto reads it from the file. Choose 1024 for a pruned 1024 copy without schedule "
                               "buffers, 512_interp for the interpolation model."}),
            },
        }

    def load(self, ckpt_name, precision="auto", variant="auto"):
        from ..pipelines.dynamicrafter.convert import load_dynamicrafter
        if variant not in VARIANTS:
            raise ValueError(f"variant: {variant!r} is not one of {', '.join(VARIANTS)}")
        dtype = runtime.dtype_named(precision, params=1_400_000_000)
        path = _resolve(ckpt_name)
        model = load_dynamicrafter(path, dtype=dtype, variant=variant)
        model.managed()  # under ComfyUI's model management from now on
        return (model,)


class KinemaDynamiCrafterAnimate:
    DESCRIPTION = ("Animates a picture from a text prompt with DynamiCrafter (dual-stream image injection). "
                   "With a mask, only the masked region moves and the rest stays as in the picture.")
    CATEGORY = "Kinema/DynamiCrafter"
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("The video frames (T, H, W, 3), the first close to the input picture.",)

    @classmethod
    def INPUT_TYPES(cls):
        req = {"model": (MODEL_TYPE, {"tooltip": "From Load DynamiCrafter Model."}),
               "image": ("IMAGE", {"tooltip": "The picture to animate (the first of a batch); it is scaled "
                                              "and centre-cropped to the output size."})}
        req.update(_common_inputs())
        opt = {"mask": ("MASK", {"tooltip": "Optional: 1 where the picture may move (e.g. from Click to Mask); outside "
                                            "it every frame is the input (latent blending at every step and a "
                                            "feathered paste inside the mask's edge)."})}
        opt.update(_optional_inputs())
        return {"required": req, "optional": opt}

    def run(self, model, image, prompt, negative_prompt, frames, fs, steps, cfg, eta, seed, mask=None,
            width=0, height=0, window_overlap=4):
        from ..pipelines.dynamicrafter.pipeline import animate
        _check_model(model)
        opts = _options(prompt, negative_prompt, frames, fs, steps, cfg, eta, seed, width, height, window_overlap)
        return (animate(model, image, opts, mask=mask),)


class KinemaDynamiCrafterInterpolate:
    DESCRIPTION = ("Generates the frames between two keyframes with the DynamiCrafter 512-interp model: the first "
                   "frame is the start image, the last the end image.")
    CATEGORY = "Kinema/DynamiCrafter"
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("The video frames (T, H, W, 3) from the start to the end keyframe.",)

    @classmethod
    def INPUT_TYPES(cls):
        req = {"model": (MODEL_TYPE, {"tooltip": "From Load DynamiCrafter Model (the 512-interp checkpoint)."}),
               "start_image": ("IMAGE", {"tooltip": "The first keyframe (also the image the motion is read from)."}),
               "end_image": ("IMAGE", {"tooltip": "The last keyframe; scaled and cropped like the first."})}
        req.update(_common_inputs())
        req["fs"] = ("INT", {"default": 0, "min": 0, "max": 100,
                             "tooltip": "Frames per second condition; 0 uses 5 as the official interpolation "
                                        "script does."})
        return {"required": req, "optional": _optional_inputs()}

    def run(self, model, start_image, end_image, prompt, negative_prompt, frames, fs, steps, cfg, eta, seed,
            width=0, height=0, window_overlap=4):
        from ..pipelines.dynamicrafter.pipeline import interpolate
        _check_model(model)
        opts = _options(prompt, negative_prompt, frames, fs, steps, cfg, eta, seed, width, height, window_overlap)
        return (interpolate(model, start_image, end_image, opts),)


# ----------------------------------------------------------------------------- native route

_NATIVE_NOTE = ("With core KSampler use sampler 'ddim' (or 'euler') and scheduler 'simple' for the 512 / 1024 / "
                "interp models (their trailing timesteps when steps divide 1000), 'ddim_uniform' for 256: everything "
                "of the released sampler applies except its dynamic rescale of x0 and its eta, which need the "
                "'DynamiCrafter DDIM' sampler (SamplerCustomAdvanced with 'DynamiCrafter Sigmas').")


class KinemaDynamiCrafterToModel:
    DESCRIPTION = ("DynamiCrafter as a ComfyUI MODEL and VAE, so core KSampler / SamplerCustomAdvanced sample it with "
                   "the conditioning of 'DynamiCrafter Conditioning': ComfyUI's samplers, schedulers, progress, "
                   "previews and interrupt; model patches that work on the denoised output (CFG functions, "
                   "VideoLinearCFGGuidance) apply. The MODEL has the model's noise schedule (v-prediction with "
                   "zero-terminal SNR for 512 / 1024 / interp, eps for 256) and its guidance rescale. " + _NATIVE_NOTE)
    CATEGORY = "Kinema/DynamiCrafter"
    FUNCTION = "convert"
    RETURN_TYPES = ("MODEL", "VAE")
    RETURN_NAMES = ("model", "vae")
    OUTPUT_TOOLTIPS = ("The video UNet as a MODEL; the same weights as the DynamiCrafter model (nothing is copied).",
                       "The checkpoint's VAE for VAE Decode (the frames come out as an IMAGE batch).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From Load DynamiCrafter Model."}),
                "guidance_rescale": ("FLOAT", {
                    "default": -1.0, "min": -1.0, "max": 1.0, "step": 0.05,
                    "tooltip": "Guidance rescale toward the conditional output's spread (std over the whole "
                               "video). -1 uses the model's own: 0.7 for 512 / 1024 / interp, off for 256; 0 "
                               "turns it off."}),
            },
        }

    def convert(self, model, guidance_rescale=-1.0):
        from ..pipelines.dynamicrafter import native
        _check_model(model)
        if not isinstance(guidance_rescale, (int, float)) or not -1.0 <= float(guidance_rescale) <= 1.0:
            raise ValueError(f"guidance_rescale: {guidance_rescale!r} must be -1 (the model's own) or 0 to 1")
        phi = None if float(guidance_rescale) < 0 else float(guidance_rescale)
        return native.comfy_model(model, phi), native.comfy_vae(model)


class KinemaDynamiCrafterConditioning:
    DESCRIPTION = ("Positive and negative CONDITIONING and an empty video LATENT (one latent per frame) for the MODEL "
                   "of 'DynamiCrafter to MODEL', like core SVD_img2vid_Conditioning: the prompt and the picture's "
                   "image context, the picture's latent in every frame (or the two keyframes for interpolation), "
                   "fs. With a mask the LATENT holds the picture and the mask as its noise mask: ComfyUI's samplers "
                   "keep the latent outside the mask equal to the picture's (the pack's own Animate node also "
                   "pastes the input pixels back after decoding).")
    CATEGORY = "Kinema/DynamiCrafter"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT", "IMAGE", "MASK")
    RETURN_NAMES = ("positive", "negative", "latent", "picture", "keep")
    OUTPUT_TOOLTIPS = ("The prompt with the picture's image context and latent.",
                       "The negative prompt with the image context of a blank picture (as the released models' "
                       "unconditional input) and the same latent.",
                       "frames x 4 x height/8 x width/8 latents to sample (with a noise mask when a mask is given).",
                       "The picture at the output size (scaled to cover, centre-cropped).",
                       "1 where the frames should be the picture (outside the mask, feathered at its edge); all 0 "
                       "without a mask. Core ImageCompositeMasked (destination: the decoded frames, source: "
                       "picture, mask: keep) pastes it back exactly, as the Animate node does.")

    @classmethod
    def INPUT_TYPES(cls):
        h = _COMMON_HELP
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From Load DynamiCrafter Model."}),
                "image": ("IMAGE", {"tooltip": "The picture to animate, or the first keyframe (the first of a batch); "
                                               "scaled and centre-cropped to the output size."}),
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": h["prompt"]}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": h["negative_prompt"]}),
                "frames": ("INT", {"default": 16, "min": 1, "max": 256, "tooltip": h["frames"]}),
                "fs": ("INT", {"default": 0, "min": 0, "max": 100,
                               "tooltip": h["fs"] + " With an end image 0 uses 5, as the official interpolation "
                                                    "script."}),
            },
            "optional": {
                "end_image": ("IMAGE", {"tooltip": "Optional: the last keyframe; the video then goes from image to "
                                                   "end_image (the 512-interp model)."}),
                "mask": ("MASK", {"tooltip": "Optional: 1 where the picture may move; outside it the latent stays the "
                                             "picture's (e.g. from Click to Mask). Not with end_image."}),
                **_optional_inputs(),
            },
        }

    def encode(self, model, image, prompt, negative_prompt, frames, fs, end_image=None, mask=None, width=0,
               height=0, window_overlap=4):
        from ..pipelines.dynamicrafter import native
        _check_model(model)
        for name, value in (("frames", frames), ("fs", fs), ("width", width), ("height", height),
                            ("window_overlap", window_overlap)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: {value!r} must be a non-negative whole number")
        if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
            raise ValueError("prompt: the prompt and negative prompt must be text")
        positive, negative, latent = native.conditioning(model, image, prompt, negative_prompt, frames, fs, width,
                                                         height, end_image=end_image, mask=mask,
                                                         window_overlap=window_overlap)
        return (positive, negative, latent) + native.paste_inputs(model, image, width, height, mask)


class KinemaDynamiCrafterDDIM:
    DESCRIPTION = ("The released DynamiCrafter DDIM as a SAMPLER for SamplerCustomAdvanced / SamplerCustom: eta and "
                   "the dynamic rescale of the predicted x0 (512: 0.7, 1024: 0.3, none for 256), which only a "
                   "sampler can do exactly. Use it with 'DynamiCrafter Sigmas' for the released timesteps. On other "
                   "models it is DDIM with eta.")
    CATEGORY = "Kinema/DynamiCrafter"
    FUNCTION = "get_sampler"
    RETURN_TYPES = ("SAMPLER",)
    RETURN_NAMES = ("sampler",)
    OUTPUT_TOOLTIPS = ("A SAMPLER for SamplerCustomAdvanced.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                  "tooltip": _COMMON_HELP["eta"]}),
                "dynamic_rescale": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Scale the predicted x0 as the released sampler does over the last 400 timesteps "
                               "(512 / 1024 / interp models)."}),
            },
        }

    def get_sampler(self, eta, dynamic_rescale=True):
        from ..pipelines.dynamicrafter import native
        return (native.ddim_sampler(eta, dynamic_rescale),)


class KinemaDynamiCrafterSigmas:
    DESCRIPTION = ("The released DynamiCrafter sampler's timesteps as SIGMAS: trailing spacing for 512 / 1024 / "
                   "interp, uniform for 256, on the MODEL's noise schedule, ending at 0 (the released sampler stops "
                   "at a noise level of 0.029 instead, leaving that much noise in the latent).")
    CATEGORY = "Kinema/DynamiCrafter"
    FUNCTION = "get_sigmas"
    RETURN_TYPES = ("SIGMAS",)
    RETURN_NAMES = ("sigmas",)
    OUTPUT_TOOLTIPS = ("steps + 1 noise levels, highest first.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "From DynamiCrafter to MODEL."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": _COMMON_HELP["steps"]}),
            },
            "optional": {
                "spacing": (["auto", "uniform_trailing", "uniform"], {
                    "default": "auto",
                    "tooltip": "auto: the model's (uniform_trailing for 512 / 1024 / interp, uniform for 256)."}),
            },
        }

    def get_sigmas(self, model, steps, spacing="auto"):
        from ..pipelines.dynamicrafter import native
        return (native.sigmas_for(model, steps, spacing),)


NODE_CLASS_MAPPINGS = {
    "KinemaDynamiCrafterLoader": KinemaDynamiCrafterLoader,
    "KinemaDynamiCrafterAnimate": KinemaDynamiCrafterAnimate,
    "KinemaDynamiCrafterInterpolate": KinemaDynamiCrafterInterpolate,
    "KinemaDynamiCrafterToModel": KinemaDynamiCrafterToModel,
    "KinemaDynamiCrafterConditioning": KinemaDynamiCrafterConditioning,
    "KinemaDynamiCrafterDDIM": KinemaDynamiCrafterDDIM,
    "KinemaDynamiCrafterSigmas": KinemaDynamiCrafterSigmas,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KinemaDynamiCrafterLoader": "Load DynamiCrafter Model",
    "KinemaDynamiCrafterAnimate": "DynamiCrafter Animate",
    "KinemaDynamiCrafterInterpolate": "DynamiCrafter Interpolate",
    "KinemaDynamiCrafterToModel": "DynamiCrafter to MODEL",
    "KinemaDynamiCrafterConditioning": "DynamiCrafter Conditioning",
    "KinemaDynamiCrafterDDIM": "DynamiCrafter DDIM",
    "KinemaDynamiCrafterSigmas": "DynamiCrafter Sigmas",
}
