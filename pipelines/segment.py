"""Click -> object mask.

Two backends behind :func:`segment`:

- **segment-anything** (SAM ViT-B / ViT-L / ViT-H) when a checkpoint from ``models/sams`` is
  loaded: :func:`load_sam` reads the file safely, works out the architecture from the tensor
  shapes, builds it from ``segment_anything.modeling`` and loads the weights strictly.
  :class:`SamSegmenter` encodes an image once and predicts many prompts; image embeddings are
  kept in a small LRU keyed by a hash of the image content, so further clicks on the same
  picture only run the prompt encoder and the mask decoder.
- **classical interactive segmentation** without weights
  (:func:`~.classical_segment.classical_segment`): superpixels grouped into hierarchies, the
  object chosen among the regions under the clicks by an objectness score.

Conventions: image (H, W, 3) float 0-1 (torch or numpy); mask (H, W) float32 in {0, 1};
points in pixels, x then y (:class:`~..formats.Points`).
"""
from __future__ import annotations

import hashlib
import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch

from .. import runtime
from ..formats import Points
from ..runtime import KinemaError, check_interrupt
from .checkpoint import load_strict, read_state_dict as read_model_file, summarize_keys
from .classical_segment import _check_prompt, classical_segment, to_uint8

EXPECTED_SAM = ("a segment-anything ViT-B/L/H checkpoint with keys image_encoder.*, "
                "prompt_encoder.*, mask_decoder.*")

# Encoder settings of the three released models: (embed_dim, depth, num_heads, global blocks).
SAM_VARIANTS = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}
# The mask decoder's transformer uses 8 heads in every released model; head count is the one
# setting that tensor shapes do not reveal.
DECODER_HEADS = 8


# ----------------------------------------------------------------------------------------------
# image helpers


def image_key(image_u8: np.ndarray) -> str:
    """Content hash of a uint8 image (shape included)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(image_u8.shape).encode())
    h.update(image_u8.tobytes())
    return h.hexdigest()


def _ellipse(radius: int) -> np.ndarray:
    """Structuring element: the pixels within Euclidean distance ``radius`` of the centre."""
    r = max(int(radius), 0)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (xx * xx + yy * yy <= r * r).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# segment-anything: reading, architecture from shapes, building


@dataclass(frozen=True)
class SamConfig:
    """Architecture of a segment-anything model, read off its checkpoint."""
    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    prompt_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = DECODER_HEADS
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256

    @property
    def variant(self) -> str:
        """``vit_b``/``vit_l``/``vit_h`` when this is one of the released models, else ``custom``."""
        for name, (dim, depth, heads, glob) in SAM_VARIANTS.items():
            if self == SamConfig(embed_dim=dim, depth=depth, num_heads=heads, global_attn_indexes=glob):
                return name
        return "custom"


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """A SAM checkpoint's tensors, read by the pack's one model-file reader
    (:func:`.checkpoint.read_state_dict`: nothing from the file runs; unreadable files raise
    :class:`KinemaError` saying what a SAM file should be)."""
    return read_model_file(path, expected=EXPECTED_SAM)


def config_from_state_dict(sd: dict, name: str = "checkpoint") -> SamConfig:
    """Read the architecture off the tensor shapes (works on meta tensors too).

    Encoder width from ``patch_embed``, depth from the block count, heads from the
    relative-position tables (their width is the head size), global-attention blocks from
    the tables that span the whole token grid, decoder sizes from its layers.
    """
    missing_parts = [p for p in ("image_encoder.", "prompt_encoder.", "mask_decoder.")
                     if not any(k.startswith(p) for k in sd)]
    if missing_parts:
        raise KinemaError(f"SAM checkpoint '{name}': expected {EXPECTED_SAM}; found no "
                          f"{', '.join(p + '*' for p in missing_parts)} keys. The file holds "
                          f"{summarize_keys(sd.keys())}. Is it a SAM model (not e.g. an SD UNet or "
                          f"a SAM 2 / HQ-SAM / MobileSAM file)?")

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise KinemaError(f"SAM checkpoint '{name}': expected {EXPECTED_SAM}; key '{key}' is missing "
                              f"(this is not a ViT SAM layout: found {summarize_keys(sd.keys())})")
        return tuple(sd[key].shape)

    def count(prefix: str) -> int:
        idx = {int(k[len(prefix):].split(".")[0]) for k in sd
               if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
        if not idx:
            return 0
        if idx != set(range(max(idx) + 1)):
            raise KinemaError(f"SAM checkpoint '{name}': numbering of {prefix}* has gaps "
                              f"({sorted(idx)}); the file is incomplete")
        return max(idx) + 1

    pe = shape("image_encoder.patch_embed.proj.weight")
    if len(pe) != 4 or pe[1] != 3 or pe[2] != pe[3]:
        raise KinemaError(f"SAM checkpoint '{name}': image_encoder.patch_embed.proj.weight has shape {pe}, "
                          f"expected (width, 3, patch, patch)")
    embed_dim, patch = pe[0], pe[2]
    pos = shape("image_encoder.pos_embed")
    grid = pos[1]
    depth = count("image_encoder.blocks.")
    if depth == 0:
        raise KinemaError(f"SAM checkpoint '{name}': no image_encoder.blocks.* found")
    head_dim = None
    global_idx, window = [], 0
    for i in range(depth):
        rel = shape(f"image_encoder.blocks.{i}.attn.rel_pos_h")
        span = (rel[0] + 1) // 2
        head_dim = rel[1]
        if span == grid:
            global_idx.append(i)
        else:
            window = span
    if embed_dim % head_dim:
        raise KinemaError(f"SAM checkpoint '{name}': encoder width {embed_dim} is not a multiple of the "
                          f"attention head size {head_dim}")
    mlp_hidden = shape("image_encoder.blocks.0.mlp.lin1.weight")[0]
    prompt_dim = shape("image_encoder.neck.0.weight")[0]
    mask_in = shape("prompt_encoder.mask_downscaling.3.weight")[0]
    mask_tokens = shape("mask_decoder.mask_tokens.weight")[0]
    dec_depth = count("mask_decoder.transformer.layers.")
    dec_mlp = shape("mask_decoder.transformer.layers.0.mlp.lin1.weight")[0]
    iou_depth = count("mask_decoder.iou_prediction_head.layers.")
    iou_hidden = shape("mask_decoder.iou_prediction_head.layers.0.weight")[0]
    return SamConfig(
        img_size=grid * patch, patch_size=patch, embed_dim=embed_dim, depth=depth,
        num_heads=embed_dim // head_dim, mlp_ratio=mlp_hidden / embed_dim, window_size=window,
        global_attn_indexes=tuple(global_idx), prompt_dim=prompt_dim, mask_in_chans=mask_in,
        decoder_depth=dec_depth, decoder_mlp_dim=dec_mlp, num_multimask_outputs=mask_tokens - 1,
        iou_head_depth=iou_depth, iou_head_hidden_dim=iou_hidden)


def build_sam(cfg: SamConfig, device="cpu"):
    """A ``segment_anything.modeling.Sam`` with the architecture ``cfg`` (untrained weights;
    ``device="meta"`` builds it without memory)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = cfg.img_size // cfg.patch_size
    with torch.device(device):
        return Sam(
            image_encoder=ImageEncoderViT(
                img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, out_chans=cfg.prompt_dim, qkv_bias=True,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                window_size=cfg.window_size, global_attn_indexes=cfg.global_attn_indexes),
            prompt_encoder=PromptEncoder(
                embed_dim=cfg.prompt_dim, image_embedding_size=(grid, grid),
                input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=cfg.mask_in_chans),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=cfg.num_multimask_outputs,
                transformer=TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.prompt_dim,
                                              mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_heads),
                transformer_dim=cfg.prompt_dim, iou_head_depth=cfg.iou_head_depth,
                iou_head_hidden_dim=cfg.iou_head_hidden_dim),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )


def load_sam(path, device=None, cache_size: int = 4, decoder_dtype: torch.dtype | None = None) -> "SamSegmenter":
    """Load a SAM checkpoint (``.pth``/``.pt``/``.safetensors``) into a :class:`SamSegmenter`.

    The architecture comes from the tensor shapes; the weights must match it exactly (no
    missing, unexpected or differently shaped keys), otherwise :class:`KinemaError` says which.
    ``device``: where it runs (default: ComfyUI's main device); the weights stay on the offload
    device until a prediction needs them. ``decoder_dtype``: see :class:`SamSegmenter`.
    """
    path = Path(path)
    sd = read_state_dict(path)
    cfg = config_from_state_dict(sd, path.name)
    try:
        model = build_sam(cfg, device="meta")
    except Exception as e:  # noqa: BLE001
        raise KinemaError(f"SAM checkpoint '{path.name}': its shapes describe an encoder that cannot be "
                          f"built ({e}); expected {EXPECTED_SAM}") from None
    # the normalisation constants are not stored in checkpoints; make them real tensors
    model.register_buffer("pixel_mean", torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1), False)
    model.register_buffer("pixel_std", torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1), False)
    load_strict(model, {k: v.float() if v.is_floating_point() else v for k, v in sd.items()},
                f"SAM checkpoint '{path.name}' ({cfg.variant} architecture, read off its shapes)",
                advice=f"Expected {EXPECTED_SAM} as released by segment-anything (HQ-SAM, SAM 2 and MobileSAM "
                       f"files are different models)")
    return SamSegmenter(model, name=path.name, variant=cfg.variant, cache_size=cache_size, device=device,
                        decoder_dtype=decoder_dtype)


# ----------------------------------------------------------------------------------------------
# segment-anything: prediction with an embedding cache


@dataclass
class ImageEmbedding:
    """SAM's encoding of one image: ``features`` (1, C, h, w) on the CPU, the resized input
    size ``input_size`` (h', w') before padding, and ``original_size`` (H, W)."""
    features: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]


class EmbeddingCache:
    """At most ``max_items`` image embeddings, least recently used dropped first."""

    def __init__(self, max_items: int = 4):
        if max_items < 1:
            raise ValueError(f"max_items: need at least 1, got {max_items}")
        self.max_items = int(max_items)
        self._items: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> ImageEmbedding | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: str, item: ImageEmbedding) -> None:
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class SamPrediction:
    """All masks SAM proposed for one prompt: ``scores`` (C,) predicted IoU, ``best`` the index of
    the highest score, ``masks`` (C, H, W) bool and ``mask`` (H, W) float the best one.

    Masks are scaled up from SAM's low-resolution logits on first use, and ``mask`` scales up
    only the best one (a click needs just that): the same numbers as scaling all of them.
    """

    def __init__(self, low_res: torch.Tensor, scores: torch.Tensor, best: int, upscale):
        self.scores = scores
        self.best = best
        self._low_res = low_res  # (C, h, w) logits
        self._upscale = upscale  # (n, h, w) logits -> (n, H, W) bool
        self._masks = None

    @property
    def masks(self) -> torch.Tensor:
        if self._masks is None:
            self._masks = self._upscale(self._low_res)
        return self._masks

    @property
    def mask(self) -> torch.Tensor:
        if self._masks is not None:
            return self._masks[self.best].float()
        return self._upscale(self._low_res[self.best:self.best + 1])[0].float()

    @property
    def score(self) -> float:
        return float(self.scores[self.best])


class SamSegmenter:
    """A loaded SAM plus a cache of image embeddings: set an image once, predict many prompts.

    Same computation as ``segment_anything.SamPredictor`` (resize the long side to the
    encoder size, normalise and pad, encode; prompts go through the prompt encoder and the mask
    decoder, masks are scaled back and thresholded at 0), with the embedding looked up by image
    content first. The network is a :class:`~..runtime.ManagedModel`: ComfyUI loads it right
    before a prediction and may unload it afterwards. Predictions are serialised by a lock, so
    the Click to Mask node and the live-mask route can share one segmenter.

    ``decoder_dtype``: the mask decoder's precision - what a further click costs. Default:
    :func:`runtime.default_dtype` for the device (bf16 on a CPU with native bf16: a click in
    about two thirds of the fp32 time, masks within a pixel or two of fp32's at the edges;
    fp16 / bf16 on a GPU). The image encoder, run once per picture, stays fp32.
    """

    def __init__(self, model, name: str = "", variant: str = "custom", cache_size: int = 4, device=None,
                 decoder_dtype: torch.dtype | None = None):
        from segment_anything.utils.transforms import ResizeLongestSide

        self.managed = runtime.ManagedModel(model, f"SAM {variant} ({name or 'unnamed'})", load_device=device)
        self.model = model
        self.name = name
        self.variant = variant
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        self.embeddings = EmbeddingCache(cache_size)
        self.lock = threading.RLock()
        if decoder_dtype is None:
            decoder_dtype = runtime.default_dtype(self.device)
        self.decoder_dtype = decoder_dtype
        model.mask_decoder.to(decoder_dtype)
        self._dense_pe: dict = {}

    @property
    def device(self) -> torch.device:
        """Where the network runs."""
        return self.managed.device

    def __repr__(self) -> str:
        return f"SamSegmenter({self.name or 'unnamed'}, {self.variant}, cached={len(self.embeddings)})"

    @torch.no_grad()
    def embed(self, image) -> ImageEmbedding:
        """The embedding of ``image`` (H, W, 3), from the cache when this picture was seen."""
        rgb = to_uint8(image)
        key = image_key(rgb)
        hit = self.embeddings.get(key)
        if hit is not None:
            return hit
        resized = self.transform.apply_image(rgb)
        with self.lock:
            runtime.load_models(self.managed)
            x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
            feats = self.model.image_encoder(self.model.preprocess(x.float()))
        item = ImageEmbedding(feats.detach().to("cpu"), tuple(resized.shape[:2]), tuple(rgb.shape[:2]))
        self.embeddings.put(key, item)
        return item

    @torch.no_grad()
    def predict(self, image, points: Points, multimask: bool = True) -> SamPrediction:
        """Masks for ``points`` (positive/negative clicks, optional box) on ``image`` (H, W, 3).

        ``multimask`` asks for the three alternative masks (best for a single ambiguous click)
        and keeps the one with the highest predicted IoU; otherwise SAM returns one mask.
        """
        _check_prompt(points)
        with self.lock:
            return self._predict(self.embed(image), points, multimask)

    def _image_pe(self, dev) -> torch.Tensor:
        """The prompt encoder's positional encoding of the embedding grid (a constant of the
        weights), made once per device."""
        key = (str(dev), self.decoder_dtype)
        if key not in self._dense_pe:
            self._dense_pe.clear()
            self._dense_pe[key] = self.model.prompt_encoder.get_dense_pe().to(dev, self.decoder_dtype)
        return self._dense_pe[key]

    def _predict(self, emb: ImageEmbedding, points: Points, multimask: bool) -> SamPrediction:
        runtime.load_models(self.managed)
        dev = self.device
        n_pos, n_neg = points.positive.shape[0], points.negative.shape[0]
        point_args = None
        if n_pos + n_neg:
            coords = torch.cat([points.positive, points.negative]).double().numpy()
            coords = self.transform.apply_coords(coords, emb.original_size)
            labels = torch.cat([torch.ones(n_pos, dtype=torch.int), torch.zeros(n_neg, dtype=torch.int)])
            point_args = (torch.as_tensor(coords, dtype=torch.float, device=dev)[None], labels.to(dev)[None])
        box = None
        if points.box is not None:
            b = self.transform.apply_boxes(points.box.double().numpy().reshape(1, 4), emb.original_size)
            box = torch.as_tensor(b, dtype=torch.float, device=dev)
        m = self.model
        dt = self.decoder_dtype
        sparse, dense = m.prompt_encoder(points=point_args, boxes=box, masks=None)
        low_res, iou = m.mask_decoder(
            image_embeddings=emb.features.to(dev, dt), image_pe=self._image_pe(dev),
            sparse_prompt_embeddings=sparse.to(dt), dense_prompt_embeddings=dense.to(dt),
            multimask_output=bool(multimask))
        scores = iou[0].float().cpu()

        def upscale(logits: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                full = m.postprocess_masks(logits[None].float(), emb.input_size, emb.original_size)
            return (full[0] > m.mask_threshold).cpu()

        return SamPrediction(low_res[0], scores, int(torch.argmax(scores)), upscale)


class SamStore:
    """The loaded SAMs of the whole pack, one per file: the loader node and the live-mask route
    ask here, so they share one model (and its embedding cache).

    At most ``max_files`` segmenters are held (least recently used dropped first). When ComfyUI
    unloads one ("Unload models", or memory needed for another model) the store lets go of it;
    it is found again while anything else (a loader node's cached output) still holds it. A file
    that changed on disk (size or modification time) is loaded afresh.
    """

    def __init__(self, max_files: int = 2, embeddings_per_model: int = 4):
        if max_files < 1:
            raise ValueError(f"max_files: need at least 1, got {max_files}")
        self.max_files = int(max_files)
        self.embeddings_per_model = int(embeddings_per_model)
        self._held: OrderedDict = OrderedDict()
        self._known: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self.loads = 0

    def __len__(self) -> int:
        return len(self._held)

    def clear(self) -> None:
        with self._lock:
            self._held.clear()

    def get(self, path, device=None) -> SamSegmenter:
        """The segmenter for the SAM file ``path`` running on ``device`` (default: ComfyUI's
        main device); loaded on first use."""
        path = Path(path)
        st = path.stat()
        dev = str(torch.device(device)) if device is not None else "auto"
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, dev)
        with self._lock:
            seg = self._held.get(key) or self._known.get(key)
            if seg is None:
                for old in [k for k in self._held if k[0] == key[0] and k[3] == dev]:
                    del self._held[old]
                seg = load_sam(path, device=device, cache_size=self.embeddings_per_model)
                self.loads += 1
                self._known[key] = seg
                runtime.on_unload(seg.managed, partial(self._release, key))
            self._held[key] = seg
            self._held.move_to_end(key)
            while len(self._held) > self.max_files:
                self._held.popitem(last=False)
            return seg

    def _release(self, key) -> None:
        with self._lock:
            self._held.pop(key, None)


# ----------------------------------------------------------------------------------------------
# one interface for both backends, and what comes after


def segment(image, points: Points, segmenter: SamSegmenter | None = None,
            multimask: bool = True) -> tuple[torch.Tensor, float]:
    """Object mask for clicks on ``image`` (H, W, 3) float 0-1.

    With ``segmenter`` (a loaded SAM) SAM predicts; without it the classical backend
    (:func:`~.classical_segment.classical_segment`) does. Returns ``(mask (H, W) float32 {0, 1},
    score)``; the score is SAM's predicted IoU, or the objectness of the chosen region for the
    classical backend.
    """
    if len(tuple(np.shape(image))) != 3:
        raise ValueError(f"image: expected one (H, W, 3) picture, got shape {tuple(np.shape(image))}")
    if segmenter is None:
        return classical_segment(image, points, check=check_interrupt)
    pred = segmenter.predict(image, points, multimask=multimask)
    return pred.mask, pred.score


def refine_mask(mask: torch.Tensor, grow: int = 0, feather: int = 0) -> torch.Tensor:
    """Grow (``grow`` > 0, dilate by that many pixels) or shrink (< 0, erode) a (H, W) mask,
    then soften its edge with a Gaussian of sigma ``feather / 2`` pixels. Values stay in [0, 1]."""
    m = mask.detach().to("cpu", torch.float32).numpy()
    if grow:
        binary = (m >= 0.5).astype(np.uint8)
        k = _ellipse(abs(int(grow)))
        m = (cv2.dilate(binary, k) if grow > 0 else cv2.erode(binary, k, borderValue=1)).astype(np.float32)
    if feather > 0:
        sigma = feather / 2.0
        ksize = 2 * int(math.ceil(3 * sigma)) + 1
        m = cv2.GaussianBlur(m.astype(np.float32), (ksize, ksize), sigma, borderType=cv2.BORDER_REPLICATE)
    return torch.from_numpy(np.clip(m, 0.0, 1.0).astype(np.float32))


def overlay(image, mask, points: Points | None = None, color=(0.15, 0.45, 1.0),
            alpha: float = 0.5) -> torch.Tensor:
    """Preview: ``image`` (H, W, 3) with ``mask`` (H, W) tinted in ``color`` and outlined,
    positive clicks as green dots, negative clicks as red dots, the box in yellow.
    Returns (H, W, 3) float32 in [0, 1]."""
    img = to_uint8(image).astype(np.float32) / 255.0
    H, W = img.shape[:2]
    m = mask.detach().to("cpu", torch.float32).numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask, np.float32)
    if m.shape != (H, W):
        raise ValueError(f"mask: shape {m.shape} does not match the {W}x{H} image")
    m = np.clip(m, 0, 1)[..., None] * alpha
    col = np.asarray(color, np.float32).reshape(1, 1, 3)
    out = np.ascontiguousarray(img * (1 - m) + col * m, dtype=np.float32)
    thick = max(1, int(round(max(H, W) / 400)))
    contours, _ = cv2.findContours((m[..., 0] > 0.5 * alpha).astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, tuple(float(c) for c in color), thick, lineType=cv2.LINE_AA)
    if points is not None:
        r = max(3, int(round(max(H, W) * 0.012)))
        if points.box is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in points.box.tolist())
            cv2.rectangle(out, (x0, y0), (x1, y1), (1.0, 0.85, 0.0), thick + 1)
        for pts, c in ((points.positive, (0.0, 1.0, 0.0)), (points.negative, (1.0, 0.0, 0.0))):
            for x, y in pts.tolist():
                p = (int(round(x)), int(round(y)))
                cv2.circle(out, p, r + 1, (1.0, 1.0, 1.0), -1, lineType=cv2.LINE_AA)
                cv2.circle(out, p, r, c, -1, lineType=cv2.LINE_AA)
    return torch.from_numpy(np.clip(out, 0.0, 1.0))
