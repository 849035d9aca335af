"""StoryDiffusion nodes: consistent-character story batches on ComfyUI's own SD1.5 / SDXL
models, the KSampler patch, and comic pages. Thin: validate inputs, call ``pipelines.story``."""
from __future__ import annotations

import torch

from ..pipelines import story as story_pipeline
from ._inputs import seed_input

CATEGORY = "Kinema/StoryDiffusion"

_STORY_TIP = ("One panel per line: '[Name] what happens', '[Name] [Other] ...' for several characters, "
              "'[NC] ...' for a panel without characters; text after '#' is the panel's caption. "
              "Each character's first id_length panels in which it appears alone are its references.")
_CHAR_TIP = ("Optional '[Name] description' lines (face, hair, clothes). When given, every name in the story "
             "must be described here, and the description is added to the panel prompts.")
_STYLE_TIP = "Style template; '{prompt}' is replaced by the panel prompt (without it, the text is appended)."
_ID_TIP = "Reference panels per character (1-4): they are generated together and the others copy them."
_SA32_TIP = "Share of reference tokens sampled at the coarsest attention level (SDXL's 32x32 at 1024 px)."
_SA64_TIP = "Share of reference tokens sampled at the finer attention levels (SDXL's 64x64 at 1024 px)."
_SCHEDULE_TIP = ("When the consistent branch runs: 'lowvram' (from step 1, gated 70%/90%) or 'app' (references "
                 "plain below step 5 while the others see all reference tokens).")


def _story_inputs():
    return {
        "story": ("STRING", {"multiline": True, "default": "[Lily] a girl with red hair in a garden\n"
                             "[Lily] a girl with red hair reading a book\n[Lily] walking home at sunset",
                             "tooltip": _STORY_TIP}),
        "characters": ("STRING", {"multiline": True, "default": "", "tooltip": _CHAR_TIP}),
        "id_length": ("INT", {"default": 2, "min": 1, "max": 4, "tooltip": _ID_TIP}),
    }


def _parse(story, characters, id_length, style="{prompt}"):
    return story_pipeline.parse_story(story, id_length=int(id_length), characters=characters, style=style)


def _captions(story) -> str:
    return "\n".join(p.caption.replace("\n", " ") for p in story.panels)


class KinemaStoryBatch:
    DESCRIPTION = ("Write a story, one panel per line, and get one image per panel in which the characters keep "
                   "their face, hair and clothes (StoryDiffusion consistent self-attention). Takes the MODEL, CLIP "
                   "and VAE of an SD1.5 or SDXL checkpoint loader (LoRAs and other model patches upstream apply). "
                   "Memory stays bounded however long the story is: each character's reference panels are made "
                   "first, the others then in small batches.")
    CATEGORY = CATEGORY
    FUNCTION = "generate"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("panels", "captions")
    OUTPUT_TOOLTIPS = ("One image per story line, in order.", "The panel captions, one per line.")

    @classmethod
    def INPUT_TYPES(cls):
        req = {
            "model": ("MODEL", {"tooltip": "An SD1.5 or SDXL-family model (Load Checkpoint's MODEL)."}),
            "clip": ("CLIP", {"tooltip": "The checkpoint's text encoder (Load Checkpoint's CLIP)."}),
            "vae": ("VAE", {"tooltip": "The checkpoint's VAE, to decode the panels."}),
        }
        req.update(_story_inputs())
        req.update({
            "style": ("STRING", {"default": "{prompt}", "tooltip": _STYLE_TIP}),
            "negative": ("STRING", {"multiline": True, "default": "bad anatomy, bad hands, missing fingers, "
                                    "extra fingers, blurry, lowres, watermark, text",
                                    "tooltip": "What no panel should show."}),
            "width": ("INT", {"default": 768, "min": 64, "max": 2048, "step": 8, "tooltip": "Panel width in pixels."}),
            "height": ("INT", {"default": 768, "min": 64, "max": 2048, "step": 8, "tooltip": "Panel height in pixels."}),
            "steps": ("INT", {"default": 35, "min": 1, "max": 200, "tooltip": "DDIM steps (StoryDiffusion uses 35)."}),
            "cfg": ("FLOAT", {"default": 5.0, "min": 1.0, "max": 30.0, "step": 0.1, "tooltip": "Classifier-free guidance scale."}),
            "seed": seed_input("Seeds the noise of every panel (panel p uses seed + p) and the token sampling."),
            "sa32": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": _SA32_TIP}),
            "sa64": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": _SA64_TIP}),
            "batch_size": ("INT", {"default": 2, "min": 1, "max": 16,
                                   "tooltip": "Later panels denoised at once; lower it to use less memory."}),
            "freeu": ("BOOLEAN", {"default": True, "tooltip": "FreeU with StoryDiffusion's settings (s1 0.6, s2 0.4, b1 1.1, b2 1.2)."}),
            "schedule": (["lowvram", "app"], {"default": "lowvram", "tooltip": _SCHEDULE_TIP}),
        })
        return {"required": req}

    def generate(self, model, clip, vae, story, characters, id_length, style, negative, width, height, steps, cfg,
                 seed, sa32, sa64, batch_size, freeu, schedule="lowvram"):
        parsed = _parse(story, characters, id_length, style)
        settings = story_pipeline.StorySettings(width=int(width), height=int(height), steps=int(steps), cfg=float(cfg),
                                                seed=int(seed), sa32=float(sa32), sa64=float(sa64),
                                                batch_size=int(batch_size), freeu=bool(freeu), schedule=schedule,
                                                negative=negative)
        images = story_pipeline.generate_story_comfy(model, clip, vae, parsed, settings, story_pipeline.comfy_arch(model))
        return (images, _captions(parsed))


class KinemaStoryConditioning:
    DESCRIPTION = ("Encode a story, one panel per line, into a conditioning batch (one prompt per panel) for "
                   "ComfyUI's own KSampler; use with Kinema Consistent Attention Patch and a latent batch of "
                   "the same size.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "INT", "STRING")
    RETURN_NAMES = ("positive", "negative", "panels", "captions")
    OUTPUT_TOOLTIPS = ("One prompt per panel, batched in story order.", "The negative prompt for every panel.",
                       "Number of panels: the latent batch size to use.", "Panel captions, one per line.")

    @classmethod
    def INPUT_TYPES(cls):
        req = {"clip": ("CLIP", {"tooltip": "The checkpoint's text encoder."})}
        req.update(_story_inputs())
        req.update({
            "style": ("STRING", {"default": "{prompt}", "tooltip": _STYLE_TIP}),
            "negative": ("STRING", {"multiline": True, "default": "bad anatomy, blurry, lowres, watermark",
                                    "tooltip": "What no panel should show."}),
        })
        return {"required": req}

    def encode(self, clip, story, characters, id_length, style, negative):
        parsed = _parse(story, characters, id_length, style)
        positive, neg = story_pipeline.encode_story_prompts(clip, [p.prompt for p in parsed.panels], negative)
        return (positive, neg, len(parsed.panels), _captions(parsed))


class KinemaConsistentAttentionPatch:
    DESCRIPTION = ("Patch a MODEL so its UNet up-block self-attention becomes StoryDiffusion consistent "
                   "self-attention: every image of the latent batch is a story panel, and panels of a character "
                   "copy its reference panels. Works with ComfyUI's KSampler, any SD1.5/SDXL checkpoint and LoRA.")
    CATEGORY = CATEGORY
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The patched model (a clone; the input model is unchanged).",)

    @classmethod
    def INPUT_TYPES(cls):
        req = {"model": ("MODEL", {"tooltip": "An SD1.5 or SDXL-family model."})}
        req.update(_story_inputs())
        req.update({
            "sa32": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": _SA32_TIP}),
            "sa64": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": _SA64_TIP}),
            "seed": seed_input("Seeds the token sampling and the step gate."),
            "schedule": (["lowvram", "app"], {"default": "lowvram", "tooltip": _SCHEDULE_TIP}),
        })
        return {"required": req}

    def patch(self, model, story, characters, id_length, sa32, sa64, seed, schedule):
        parsed = _parse(story, characters, id_length)
        patch = story_pipeline.NativeConsistentAttention(parsed.layout, sa32=float(sa32), sa64=float(sa64),
                                             seed=int(seed), schedule=schedule)
        return (story_pipeline.patch_comfy_model(model, patch),)


class KinemaComicLayout:
    DESCRIPTION = "Arrange panels on comic pages in a grid, each caption under its panel."
    CATEGORY = CATEGORY
    FUNCTION = "layout"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("pages",)
    OUTPUT_TOOLTIPS = ("One image per page.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "panels": ("IMAGE", {"tooltip": "The panels, in reading order."}),
            "captions": ("STRING", {"multiline": True, "default": "", "tooltip": "One caption per line, in panel order; empty = no captions."}),
            "columns": ("INT", {"default": 2, "min": 1, "max": 8, "tooltip": "Panels per row."}),
            "rows": ("INT", {"default": 2, "min": 1, "max": 8, "tooltip": "Rows per page."}),
            "gap": ("INT", {"default": 16, "min": 0, "max": 256, "tooltip": "Space between panels in pixels."}),
            "caption_height": ("INT", {"default": 56, "min": 0, "max": 512, "tooltip": "Height of the caption strip under each panel."}),
            "font_size": ("INT", {"default": 20, "min": 6, "max": 128, "tooltip": "Caption font size in pixels."}),
            "background": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "Page grey level (1 = white)."}),
        }}

    def layout(self, panels, captions, columns, rows, gap, caption_height, font_size, background):
        if not isinstance(panels, torch.Tensor) or panels.dim() != 4 or panels.shape[-1] != 3 or panels.shape[0] == 0:
            raise ValueError(f"panels: expected an IMAGE batch (B, H, W, 3), got "
                             f"{tuple(panels.shape) if isinstance(panels, torch.Tensor) else type(panels).__name__}")
        lines = (captions or "").splitlines()
        if len(lines) > panels.shape[0]:
            raise ValueError(f"captions: {len(lines)} lines for {panels.shape[0]} panels; give one caption per panel")
        return (story_pipeline.comic_pages(panels, lines, columns=int(columns), rows=int(rows), gap=int(gap),
                               caption_height=int(caption_height), font_size=int(font_size),
                               background=float(background)),)


NODE_CLASS_MAPPINGS = {
    "KinemaStoryBatch": KinemaStoryBatch,
    "KinemaStoryConditioning": KinemaStoryConditioning,
    "KinemaConsistentAttentionPatch": KinemaConsistentAttentionPatch,
    "KinemaComicLayout": KinemaComicLayout,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KinemaStoryBatch": "Story Batch (consistent characters)",
    "KinemaStoryConditioning": "Story Prompts to Conditioning",
    "KinemaConsistentAttentionPatch": "Consistent Attention Patch",
    "KinemaComicLayout": "Comic Layout",
}
