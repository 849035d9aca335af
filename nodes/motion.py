"""Weights-free motion nodes: drags -> motion field, motion brush, animate by warping,
motion strength. Thin: validate, call ``kernels`` / ``pipelines``, return ComfyUI types."""
from __future__ import annotations


import torch

from .. import formats, runtime
from ..kernels.field import MotionField
from ..kernels.flow import flow_magnitude_stats, flow_to_color, pair_motion, strength_bucket
from ..kernels.masks import rasterize_strokes
from ..kernels.motion import EASINGS, MAX_FRAMES, dense_motion, motion_bytes, resample_track
from ..pipelines.optical_flow import flow_from_first
from ..pipelines.segment import overlay
from ..pipelines.warp_animator import FILL_MODES, animate, animate_bytes
from ._ui import save_temp_png, save_temp_webp

MOTION = "KINEMA_MOTION"
STROKES_EXAMPLE = '{"strokes": [{"mode": "paint", "radius": 20, "points": [[100, 80], [140, 90]]}]}'
CATEGORY = "Kinema/Motion"


def first_image(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """IMAGE (B, H, W, 3) -> (H, W, 3) float32: the first frame."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"{name}: expected an IMAGE batch (B, H, W, 3), got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    return image[0, ..., :3].float()


def single_mask(mask: torch.Tensor | None, size: tuple[int, int], name: str = "mask") -> torch.Tensor | None:
    """MASK (B, H, W) or (H, W) -> (H, W) float32 of the image's ``size`` = (W, H)."""
    if mask is None:
        return None
    m = mask[0] if mask.ndim == 3 else mask
    if m.ndim != 2:
        raise ValueError(f"{name}: expected a MASK (B, H, W), got {tuple(mask.shape)}")
    w, h = size
    if tuple(m.shape) != (h, w):
        raise ValueError(f"{name}: the mask is {m.shape[1]}x{m.shape[0]} but the image is {w}x{h}; "
                         f"resize one of them so they match")
    return m.float().clamp(0, 1)



class KinemaMotionFromDrags:
    DESCRIPTION = ("Turn drags (and optional anchors) into a dense motion field: every pixel gets a path over "
                   "the frames, following the drags near them and fading out with distance. With a mask, only "
                   "the masked region moves, as one piece.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (MOTION, "IMAGE", "STRING")
    RETURN_NAMES = ("motion", "preview", "wan_tracks")
    OUTPUT_TOOLTIPS = ("Per-frame displacement from frame 0, in pixels; feed it to 'Animate by warping' or a model renderer.",
                       "The motion of the last frame as a colour wheel (hue = direction, strength = distance).",
                       "The drags as core WanTrackToVideo tracks (its 'tracks' input): 121 points per drag with this "
                       "node's timing and strength, anchors as still tracks, in the pixels of a wan_width x "
                       "wan_height video (set WanTrackToVideo's width and height to the same).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The picture to animate (the first frame of a batch is used)."}),
                "tracks": ("STRING", {"multiline": True, "default": '{"tracks": [], "anchors": []}',
                                      "tooltip": "Drags in image pixels. Draw them in the editor, or paste KJNodes "
                                                 "SplineEditor / WanTrackToVideo track JSON, or [[[x,y],[x,y]], ...]."}),
                "frames": ("INT", {"default": 16, "min": 2, "max": MAX_FRAMES,
                                   "tooltip": "Number of frames, including the unchanged first frame."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0, "step": 0.05,
                                       "tooltip": "Scales every displacement: 1 follows the drags exactly."}),
                "easing": (list(EASINGS), {"default": "ease_in_out",
                                           "tooltip": "Timing of the motion along each drag. 'loop' goes out and comes back."}),
                "falloff": ("INT", {"default": 0, "min": 0, "max": 2048,
                                    "tooltip": "Width in pixels over which motion fades to zero around the moving "
                                               "region. Without a mask 0 = automatic (from the image size and drag "
                                               "lengths). With a mask 0 = none: only the masked object moves and the "
                                               "background stays put; a width warps a band of background with it."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Region that moves (e.g. from 'Click to mask' or the motion brush). "
                                             "Without it, motion fades with distance from each drag."}),
                "anchors": ("STRING", {"forceInput": True,
                                       "tooltip": "Extra static points as JSON [[x,y], ...] that must not move."}),
                "wan_width": ("INT", {"default": 832, "min": 16, "max": 16384, "step": 16,
                                      "tooltip": "Width of the WanTrackToVideo video the wan_tracks output is for."}),
                "wan_height": ("INT", {"default": 480, "min": 16, "max": 16384, "step": 16,
                                       "tooltip": "Height of the WanTrackToVideo video the wan_tracks output is for."}),
            },
        }

    def build(self, image, tracks, frames, strength, easing, falloff, mask=None, anchors=None,
              wan_width=832, wan_height=480):
        with runtime.one_thread():
            return self._build(image, tracks, frames, strength, easing, falloff, mask, anchors, wan_width,
                               wan_height)

    def _build(self, image, tracks, frames, strength, easing, falloff, mask=None, anchors=None,
               wan_width=832, wan_height=480):
        img = first_image(image)
        h, w = img.shape[:2]
        tr = formats.parse_tracks(tracks, size=(w, h), anchors_text=anchors)
        if len(tr) == 0:
            raise ValueError("tracks: no drags given — draw at least one drag (a start and an end point)")
        region = single_mask(mask, (w, h))
        if region is not None and not bool((region > 0.5).any()):
            raise ValueError("mask: the mask is empty (no pixel above 0.5) — select the object that should move, "
                             "or disconnect the mask to move by distance from the drags")
        runtime.check_memory(motion_bytes((w, h), int(frames)) + 2 * img.numel() * 4,
                             f"Motion from drags: a {w}x{h} picture with {int(frames)} frames",
                             "lower frames, or make the picture smaller (e.g. ImageScale to half) and "
                             "upscale the video afterwards")
        dev = runtime.device()
        flow = dense_motion(tr.tracks, size=(w, h), frames=int(frames), anchors=tr.anchors,
                            region=None if region is None else region.to(dev), strength=float(strength),
                            easing=easing, falloff=float(falloff) if (falloff or region is not None) else None,
                            device=dev, step=runtime.check_interrupt).cpu()
        field = MotionField(flow, region)
        preview = flow_to_color(flow[-1]).unsqueeze(0)
        wan = formats.wan_tracks_json(
            [t[0] + float(strength) * (resample_track(t, formats.WAN_TRACK_SAMPLES, easing) - t[0]) for t in tr.tracks]
            + [a.expand(formats.WAN_TRACK_SAMPLES, 2) for a in tr.anchors],
            (w, h), (int(wan_width), int(wan_height)))
        # the flow preview goes to the editor (its Flow button), not to a default image preview
        return {"ui": {"kinema_flow": [save_temp_png(preview[0], "kinema_motion")],
                       "kinema_bg": [save_temp_png(img, "kinema_bg")]},
                "result": (field, preview, wan)}


class KinemaMotionBrush:
    DESCRIPTION = "Paint the region that should move; the painted region becomes a MASK for the motion nodes."
    CATEGORY = CATEGORY
    FUNCTION = "paint"
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("mask", "preview")
    OUTPUT_TOOLTIPS = ("The painted region (1 = paint).", "The picture with the painted region tinted.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The picture to paint on (the first frame of a batch is used)."}),
            "strokes": ("STRING", {"multiline": True, "default": '{"strokes": []}',
                                   "tooltip": "Brush strokes in image pixels, painted in the editor: "
                                              "{\"strokes\": [{\"mode\": \"paint\"|\"erase\", \"radius\": r, "
                                              "\"points\": [[x, y], ...]}]}"}),
        }}

    def paint(self, image, strokes):
        img = first_image(image)
        h, w = img.shape[:2]
        try:
            data = formats.load_json(strokes, "strokes")
        except ValueError as e:
            reason = str(e).split(";")[0]
            raise ValueError(f"{reason}; expected e.g. {STROKES_EXAMPLE}") from None
        if isinstance(data, dict):
            data = data.get("strokes", [])
        mask = rasterize_strokes(data, (w, h))
        if not bool((mask > 0).any()):
            raise ValueError("strokes: nothing is painted — paint the region that should move in the editor")
        preview = overlay(img, mask).unsqueeze(0)
        return {"ui": {"kinema_bg": [save_temp_png(img, "kinema_bg")]},
                "result": (mask.unsqueeze(0), preview)}


class KinemaAnimateWarp:
    DESCRIPTION = ("Animate a picture by moving its pixels along a motion field, no model needed. With an "
                   "object mask in the motion (from 'Motion from drags' with a mask) the object is cut out with a "
                   "soft edge, resampled sharply at every position and drawn in front of a still background; the "
                   "place it leaves is filled once with texture from around it. Frame 0 is the input, unchanged.")
    CATEGORY = CATEGORY
    FUNCTION = "render"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("The animation as an IMAGE batch (one image per frame).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The picture to animate (the first frame of a batch is used)."}),
            "motion": (MOTION, {"tooltip": "Motion field, e.g. from 'Motion from drags' or a motion predictor."}),
            "fill": (list(FILL_MODES), {"default": "inpaint",
                                        "tooltip": "How the background the object leaves is filled: 'inpaint' "
                                                   "with texture copied from the surrounding background, "
                                                   "'stretch' with smooth colour from around it, 'none' leaves "
                                                   "it black (for a later generative pass)."}),
            "loop": ("BOOLEAN", {"default": False,
                                 "tooltip": "Make a seamless loop: the motion goes out and comes back."}),
            "preview_fps": ("FLOAT", {"default": 8.0, "min": 1.0, "max": 60.0, "step": 1.0,
                                      "tooltip": "Frame rate of the animated preview shown in the node."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Only pixels inside the mask may move; everything else stays exactly still."}),
        }}

    def render(self, image, motion, fill, loop, preview_fps=8.0, mask=None):
        with runtime.one_thread():
            return self._render(image, motion, fill, loop, preview_fps, mask)

    def _render(self, image, motion, fill, loop, preview_fps=8.0, mask=None):
        img = first_image(image)
        h, w = img.shape[:2]
        if not isinstance(motion, MotionField):
            raise ValueError("motion: expected a Kinema motion field")
        if motion.size != (w, h):
            raise ValueError(f"motion: the motion field is {motion.size[0]}x{motion.size[1]} but the image is "
                             f"{w}x{h}; build the motion from this image")
        limit = single_mask(mask, (w, h))
        if limit is not None and not bool((limit > 0).any()):
            raise ValueError("mask: the mask is empty, so nothing could move — connect the region that may "
                             "move, or disconnect the mask to animate the whole motion field")
        runtime.check_memory(animate_bytes((w, h), motion.frames, limit is not None, bool(loop)),
                             f"Animate by warping: a {w}x{h} picture with {motion.frames} frames",
                             "lower the frame count in 'Motion from drags', or make the picture smaller "
                             "(e.g. ImageScale to half) and upscale the video afterwards")
        dev = runtime.device()
        frames = animate(img.to(dev), motion, mask=None if limit is None else limit.to(dev), loop=bool(loop),
                         fill=fill).cpu()
        return {"ui": {"images": [save_temp_webp(frames, fps=float(preview_fps), prefix="kinema_anim")],
                       "animated": (True,)},
                "result": (frames,)}


class KinemaMotionStrength:
    DESCRIPTION = ("Measure how much a region moves — in a reference video (optical flow) or in a motion field — "
                   "and turn it into Follow-Your-Click's integer motion-strength bucket.")
    CATEGORY = CATEGORY
    FUNCTION = "measure"
    OUTPUT_NODE = True
    RETURN_TYPES = ("FLOAT", "FLOAT", "INT")
    RETURN_NAMES = ("mean", "percentile", "bucket")
    OUTPUT_TOOLTIPS = ("Mean motion inside the mask, pixels per frame.",
                       "The chosen percentile of motion inside the mask, pixels per frame.",
                       "Follow-Your-Click motion-strength bucket (0-10) from the mean (see docs).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "percentile": ("FLOAT", {"default": 90.0, "min": 0.0, "max": 100.0, "step": 1.0,
                                     "tooltip": "Which percentile of the motion magnitudes to report."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Region to measure. Without it the whole frame is measured."}),
            "video": ("IMAGE", {"tooltip": "A reference video (IMAGE batch of 2 or more frames); its optical flow is measured."}),
            "motion": (MOTION, {"tooltip": "A motion field to measure instead of a video."}),
        }}

    def measure(self, percentile, mask=None, video=None, motion=None):
        if (video is None) == (motion is None):
            raise ValueError("video/motion: connect exactly one of them (a reference video or a motion field)")
        if video is not None:
            if video.ndim != 4 or video.shape[0] < 2:
                raise ValueError(f"video: needs an IMAGE batch of 2 or more frames, got {tuple(video.shape)}")
            flow = flow_from_first(video[..., :3].float())
            size = (int(video.shape[2]), int(video.shape[1]))
        else:
            flow, size = motion.flow, motion.size
        region = single_mask(mask, size)
        if region is not None and not bool((region > 0.5).any()):
            raise ValueError("mask: the mask is empty — select the region to measure")
        frames = int(flow.shape[0])
        if frames < 2:
            raise ValueError("motion: the motion field has one frame; motion needs at least 2")
        # frame-to-frame motion of the pixels of frame 0 (a mask drawn on frame 0 keeps selecting them)
        dev = runtime.device()
        stats = flow_magnitude_stats(pair_motion(flow.to(dev)), None if region is None else region.to(dev),
                                     percentile=float(percentile))
        bucket = strength_bucket(stats["mean"] * (frames - 1), size, frames)
        text = (f"mean {stats['mean']:.2f} px/frame, p{percentile:g} {stats['percentile']:.2f} px/frame, "
                f"bucket {bucket}")
        return {"ui": {"text": [text]},
                "result": (float(stats["mean"]), float(stats["percentile"]), int(bucket))}


NODE_CLASS_MAPPINGS = {
    "KinemaMotionFromDrags": KinemaMotionFromDrags,
    "KinemaMotionBrush": KinemaMotionBrush,
    "KinemaAnimateWarp": KinemaAnimateWarp,
    "KinemaMotionStrength": KinemaMotionStrength,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KinemaMotionFromDrags": "Motion from drags",
    "KinemaMotionBrush": "Motion brush",
    "KinemaAnimateWarp": "Animate by warping",
    "KinemaMotionStrength": "Motion strength",
}
