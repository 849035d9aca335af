"""Story transitions: keyframes -> per-frame embeddings (the semantic motion predictor) ->
DynamiCrafter-interp decodes each pair of consecutive panels into the frames between them.

For a pair of keyframes the interpolation model gets, as trained, the two keyframe latents at the
first and the last frame of its UNet input; in place of one image context shared by every
frame (the first keyframe's), frame t gets the resampler's output for the predicted tokens of
frame t (DynamiCrafter's ``FrameContext``). With two identical keyframes and no learned
predictor that is exactly the single-image context of plain interpolation.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ... import runtime
from ..dynamicrafter.model import DynamiCrafter
from ..dynamicrafter.pipeline import AnimateOptions, _check_size, generate, prepare_image
from .predictor import predict


@dataclass
class SemanticMotion:
    """Per-frame embeddings of the transitions between consecutive keyframes.

    tokens: (pairs, frames, N, W) float32 CLIP vision tokens (frame 0 and frame -1 of pair i are
    keyframes i and i+1); height, width: the size the keyframes were cropped to before encoding
    (the transitions are made at that size); mode: "interpolation" or "learned: <file>".
    """
    tokens: torch.Tensor
    height: int
    width: int
    mode: str

    @property
    def pairs(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def frames(self) -> int:
        return int(self.tokens.shape[1])


def _check_keyframes(images, name: str, minimum: int = 2) -> torch.Tensor:
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[-1] not in (3, 4):
        got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{name}: expected an IMAGE batch (B, H, W, 3), got {got}")
    if images.shape[0] < minimum:
        raise ValueError(f"{name}: {images.shape[0]} image(s); give at least {minimum} (a transition joins two "
                         "consecutive images of the batch)")
    return images


def keyframe_tokens(model: DynamiCrafter, images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """IMAGE batch (B, H, W, 3) -> (B, N, W) CLIP vision tokens (float32, CPU) of each image
    scaled and centre-cropped to ``height`` x ``width`` as the transitions see it (one image at a
    time, exactly as the plain pipeline encodes its keyframe)."""
    out = []
    for i in range(images.shape[0]):
        x = prepare_image(images[i:i + 1], height, width, name="keyframes")
        out.append(model.encode_image_tokens(x).float().cpu())
        runtime.check_interrupt()
    return torch.cat(out)


def predict_motion(model: DynamiCrafter, keyframes: torch.Tensor, frames: int,
                   predictor: "runtime.ManagedModel | None" = None, height: int = 0, width: int = 0,
                   predictor_name: str = "") -> SemanticMotion:
    """Per-frame embeddings for every consecutive pair of ``keyframes`` (B >= 2), ``frames`` per
    transition including both keyframes. ``predictor`` None: the training-free interpolation."""
    _check_keyframes(keyframes, "keyframes")
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 3:
        raise ValueError(f"frames: {frames!r} is too few; a transition needs at least 3 frames "
                         "(the two keyframes and one between)")
    height, width = _check_size(model, height, width)
    keys = keyframe_tokens(model, keyframes, height, width)
    pairs = [predict(keys[i], keys[i + 1], frames, predictor) for i in range(keys.shape[0] - 1)]
    mode = "interpolation" if predictor is None else f"learned: {predictor_name or predictor.name}"
    return SemanticMotion(torch.stack(pairs), height, width, mode)


def _prompt_lines(prompt: str, pairs: int) -> list[str]:
    """One prompt per transition: line i for transition i; the last line repeats."""
    if not isinstance(prompt, str):
        raise ValueError("prompt: must be text (one line per transition)")
    lines = [line.strip() for line in prompt.splitlines() if line.strip()] or [""]
    return [lines[min(i, len(lines) - 1)] for i in range(pairs)]


def story_transitions(model: DynamiCrafter, panels: torch.Tensor, motion: SemanticMotion, opts: AnimateOptions,
                      hold: int = 0) -> torch.Tensor:
    """Panels (P, H, W, 3) -> one video (T, h, w, 3) at the motion's size.

    Panel i appears exactly (scaled and centre-cropped) for ``1 + hold`` frames, and between
    panels i and i+1 come the ``motion.frames - 2`` frames that DynamiCrafter-interp makes from
    the two panels and the predicted embeddings of transition i (its own decoded keyframes are
    replaced by the panels). ``opts.prompt``: one line per transition (the last line repeats);
    transition i is sampled with seed ``opts.seed + i``. T = P * (1 + hold) + (P - 1) * (frames - 2).
    """
    if not isinstance(motion, SemanticMotion):
        raise ValueError("motion: expected the output of the Semantic Motion Predictor node")
    _check_keyframes(panels, "panels")
    if motion.pairs != panels.shape[0] - 1:
        raise ValueError(f"motion: it holds {motion.pairs} transition(s) ({motion.pairs + 1} keyframes) but "
                         f"{panels.shape[0]} panels were given; connect the same images to both nodes")
    if not isinstance(hold, int) or isinstance(hold, bool) or hold < 0:
        raise ValueError(f"hold_frames: {hold!r} must be a non-negative whole number")
    h, w = motion.height, motion.width
    prompts = _prompt_lines(opts.prompt, motion.pairs)
    still = [((prepare_image(panels[i:i + 1], h, w, name="panels") + 1.0) / 2.0)[0].permute(1, 2, 0)
             for i in range(panels.shape[0])]
    video = [still[0]] * (1 + hold)
    for i in range(motion.pairs):
        o = replace(opts, prompt=prompts[i], frames=motion.frames, height=h, width=w,
                    seed=(int(opts.seed) + i) & runtime.SEED_MAX)
        frames = generate(model, [panels[i:i + 1], panels[i + 1:i + 2]], o, frame_tokens=motion.tokens[i])
        video.extend(frames[1:-1])
        video.extend([still[i + 1]] * (1 + hold))
        runtime.check_interrupt()
    return torch.stack([f.float().clamp(0, 1) for f in video])
