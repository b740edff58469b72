"""CLIP-guided losses: steer an image generator (or raw pixels) with a frozen CLIP model.

Two families of use:

* **Prompt matching** (CLIP-guided diffusion, VQGAN+CLIP): pull the image embedding towards a
  text (or image) embedding. ``kind="cosine"`` is ``1 - cos``; ``kind="spherical"`` is
  ``2 * arcsin(||a - b|| / 2) ** 2`` on unit vectors, the squared great-circle distance, whose
  gradient does not vanish as the vectors align the way ``1 - cos``'s does.
* **Directional** (StyleGAN-NADA): match the *change* between a source and an edited image to
  the change between two texts, ``1 - cos(E_I(tgt) - E_I(src), E_T(tgt_text) - E_T(src_text))``.
  It edits along the text direction instead of collapsing every image onto one embedding.

Images enter as ``[B, 3, H, W]`` floats in ``[0, 1]`` of any size. They are resized and
normalised with tensor ops (``F.interpolate``, antialiased), never PIL, so gradients reach the
pixels. Text embeddings are cached per string: guidance calls the loss thousands of times with
the same prompts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from clipforge.errors import ConfigError

log = logging.getLogger(__name__)

LOSS_KINDS = ("cosine", "spherical")
_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "lanczos": "bicubic"}


# --- distances on features (usable without a model) --------------------------------------------
def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos(a, b)`` along the last dim (inputs need not be normalised)."""
    return 1.0 - F.cosine_similarity(a, b, dim=-1)


def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``2 * arcsin(||â - b̂|| / 2) ** 2``: squared angle between the directions of ``a`` and ``b``."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    half_chord = ((a - b).norm(dim=-1) / 2).clamp(max=1.0)
    return half_chord.arcsin().pow(2).mul(2)


def directional_distance(
    src_image: torch.Tensor, tgt_image: torch.Tensor, src_text: torch.Tensor, tgt_text: torch.Tensor
) -> torch.Tensor:
    """StyleGAN-NADA: ``1 - cos(tgt_image - src_image, tgt_text - src_text)`` per row.

    Image features are L2-normalised before the difference (as NADA does); text features are
    broadcast, so one text direction serves a whole batch.
    """
    image_dir = F.normalize(tgt_image, dim=-1) - F.normalize(src_image, dim=-1)
    text_dir = F.normalize(tgt_text, dim=-1) - F.normalize(src_text, dim=-1)
    return cosine_distance(image_dir, text_dir.expand_as(image_dir))


def _distance(kind: str) -> Any:
    if kind == "cosine":
        return cosine_distance
    if kind == "spherical":
        return spherical_distance
    raise ConfigError(f"loss kind must be one of {LOSS_KINDS}, got {kind!r}")


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise ConfigError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


# --- differentiable preprocessing --------------------------------------------------------------
def _resize(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if mode == "nearest":
        return F.interpolate(images, size=size, mode="nearest")
    return F.interpolate(images, size=size, mode=mode, align_corners=False, antialias=True)


def resize_like_eval(images: torch.Tensor, cfg: Any) -> torch.Tensor:
    """Tensor version of the eval transform's geometry (``cfg.resize_mode``), differentiable.

    "shortest": scale the short side to fit, center crop (CLIP); "longest": fit inside, pad with
    ``fill_color``; "squash": resize to the exact size. Pixel values differ slightly from PIL's
    resampling; the geometry is the same.
    """
    th, tw = cfg.size
    h, w = images.shape[-2:]
    mode = _MODES.get(cfg.interpolation, "bicubic")
    if cfg.resize_mode == "squash" or (h, w) == (th, tw):
        return _resize(images, (th, tw), mode)
    if cfg.resize_mode == "longest":
        scale = min(th / h, tw / w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        x = _resize(images, (nh, nw), mode)
        top, left = (th - nh) // 2, (tw - nw) // 2
        return F.pad(x, (left, tw - nw - left, top, th - nh - top), value=cfg.fill_color / 255.0)
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    x = _resize(images, (nh, nw), mode)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return x[..., top : top + th, left : left + tw]


class CLIPGuidance:
    """CLIP losses on ``[0, 1]`` image tensors with a frozen clipforge CLIP model.

    Args:
        model: a clipforge CLIP. It is put in eval mode; with ``freeze=True`` (default) its
            parameters stop requiring grad so backward only flows to the images.
        tokenizer: the model's tokenizer (``clipforge.get_tokenizer(model)``).
        preprocess_cfg: size/mean/std/resize mode; default ``model.preprocess_cfg``.
        n_cuts: random square crops per image for ``clip_loss`` (0 = the whole image only).
            Averaging over cutouts is what keeps CLIP-guided generation from fooling CLIP with
            adversarial high-frequency patterns.
        cut_min: smallest cutout side as a fraction of the image's short side.
        seed: seeds the cutout generator, so a run is reproducible.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        preprocess_cfg: Any = None,
        *,
        n_cuts: int = 0,
        cut_min: float = 0.5,
        seed: int = 0,
        freeze: bool = True,
    ) -> None:
        if n_cuts < 0:
            raise ConfigError(f"n_cuts must be >= 0, got {n_cuts}")
        if not 0.0 < cut_min <= 1.0:
            raise ConfigError(f"cut_min must be in (0, 1], got {cut_min}")
        self.model = model.eval()
        if freeze:
            model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess_cfg = preprocess_cfg or getattr(model, "preprocess_cfg", None) or _default_cfg(model)
        self.n_cuts = n_cuts
        self.cut_min = cut_min
        self._generator = torch.Generator().manual_seed(seed)
        self._text_cache: dict[str, torch.Tensor] = {}
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self._mean = torch.tensor(self.preprocess_cfg.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.preprocess_cfg.std, device=self.device).view(1, 3, 1, 1)

    # --- encoding ----------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` -> model input (resized, normalised), differentiable."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ConfigError(f"images must be [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        x = resize_like_eval(images.to(self.device, torch.float32), self.preprocess_cfg)
        return (x - self._mean) / self._std

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings ``[B, E]`` (float32), with gradients to ``images``."""
        features = self.model.encode_image(self.preprocess(images).to(self.dtype))
        return F.normalize(features.float(), dim=-1)

    def encode_texts(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Unit text embeddings ``[N, E]`` (float32, no grad); each distinct string encoded once."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        if missing:
            with torch.no_grad():
                tokens = self.tokenizer(missing).to(self.device)
                features = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
            self._text_cache.update(zip(missing, features))
            log.debug("encoded %d new prompt(s); cache holds %d", len(missing), len(self._text_cache))
        return torch.stack([self._text_cache[t] for t in texts])

    def clear_cache(self) -> None:
        self._text_cache.clear()

    def cutouts(self, images: torch.Tensor, boxes: list[tuple[int, int, int]] | None = None) -> torch.Tensor:
        """``[C * B, 3, h, w]`` square crops (cut-major), each resized to the model's input size.

        ``boxes`` ``(top, left, side)`` default to ``n_cuts`` fresh random ones from the seeded
        generator; pass the same boxes to crop two batches identically.
        """
        boxes = boxes if boxes is not None else self.sample_boxes(*images.shape[-2:])
        size = self.preprocess_cfg.size
        mode = _MODES.get(self.preprocess_cfg.interpolation, "bicubic")
        crops = [_resize(images[..., t : t + s, x : x + s], size, mode) for t, x, s in boxes]
        return torch.cat(crops)

    def sample_boxes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        short = min(height, width)
        lo = max(1, math.ceil(self.cut_min * short))
        boxes = []
        for _ in range(self.n_cuts):
            side = int(torch.randint(lo, short + 1, (), generator=self._generator))
            top = int(torch.randint(0, height - side + 1, (), generator=self._generator))
            left = int(torch.randint(0, width - side + 1, (), generator=self._generator))
            boxes.append((top, left, side))
        return boxes

    def _embed_views(self, images: torch.Tensor, boxes: list[tuple[int, int, int]] | None) -> torch.Tensor:
        """``[C, B, E]``: the whole image (C = 1) or ``n_cuts`` cutouts per image."""
        if not self.n_cuts:
            return self.encode_images(images).unsqueeze(0)
        views = self.cutouts(images, boxes)
        features = self.encode_images(views)
        return features.view(-1, images.shape[0], features.shape[-1])

    def _targets(self, texts: str | Sequence[str] | torch.Tensor, batch: int) -> torch.Tensor:
        """Prompt embeddings ``[B or 1, E]``: strings are encoded (cached), tensors used as given
        (e.g. an image prompt's embedding)."""
        target = (
            texts.to(self.device).float() if isinstance(texts, torch.Tensor) else self.encode_texts(texts)
        )
        if target.dim() == 1:
            target = target.unsqueeze(0)
        if target.shape[0] not in (1, batch):
            raise ConfigError(
                f"got {target.shape[0]} prompts for {batch} images; give 1 prompt or one per image"
            )
        return target

    # --- losses ------------------------------------------------------------------------------------
    def clip_loss(
        self,
        images: torch.Tensor,
        texts: str | Sequence[str] | torch.Tensor,
        kind: str = "cosine",
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Distance between each image and its prompt (one prompt for all, or one per image).

        With cutouts the distance is averaged over the cuts of each image.
        """
        dist = _distance(kind)
        target = self._targets(texts, images.shape[0])
        views = self._embed_views(images, None)  # [C, B, E]
        return _reduce(dist(views, target.unsqueeze(0)).mean(0), reduction)

    def directional_loss(
        self,
        src_images: torch.Tensor,
        tgt_images: torch.Tensor,
        src_text: str | Sequence[str],
        tgt_text: str | Sequence[str],
        reduction: str = "mean",
    ) -> torch.Tensor:
        """StyleGAN-NADA's loss: ``1 - cos(E_I(tgt) - E_I(src), E_T(tgt_text) - E_T(src_text))``.

        A list of texts (e.g. several templates) on each side gives the mean direction. With
        cutouts, source and target share the same boxes so each pair of views is comparable.
        """
        if src_images.shape != tgt_images.shape:
            raise ConfigError(
                f"source and target images must have the same shape, got "
                f"{tuple(src_images.shape)} and {tuple(tgt_images.shape)}"
            )
        src_t, tgt_t = self.encode_texts(src_text), self.encode_texts(tgt_text)
        if src_t.shape[0] != tgt_t.shape[0]:
            raise ConfigError(
                f"got {src_t.shape[0]} source and {tgt_t.shape[0]} target texts; give as many of each"
            )
        text_dir = (tgt_t - src_t).mean(0, keepdim=True)
        boxes = self.sample_boxes(*src_images.shape[-2:]) if self.n_cuts else None
        src, tgt = self._embed_views(src_images, boxes), self._embed_views(tgt_images, boxes)
        image_dir = tgt - src
        return _reduce(cosine_distance(image_dir, text_dir.expand_as(image_dir)).mean(0), reduction)


def _default_cfg(model: torch.nn.Module) -> Any:
    from clipforge.transforms import PreprocessConfig

    return PreprocessConfig(image_size=model.config.vision.image_size)
