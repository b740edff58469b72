"""Image preprocessing: any PIL image -> normalised ``FloatTensor[3, H, W]`` for a CLIP model.

The eval transform is numerically identical to open_clip's (torchvision bicubic resize of the
shortest side, center crop, ``ToTensor``, CLIP mean/std) on RGB and grayscale images. Where we
differ, it is on purpose, in :func:`to_rgb`, which runs *first* (open_clip converts after
resizing, with ``Image.convert("RGB")``):

- transparent pixels (RGBA, LA, PA, P with a transparent colour) are composited on a background
  (white by default) instead of showing whatever colour the hidden RGB channels hold;
- 16-bit images (``I;16*``) are scaled 0..65535 -> 0..255 instead of clipped at 255 (which turns
  most of a 16-bit image white); 32-bit ``I`` and float ``F`` images are scaled by their range;
- palette and 1-bit images are converted before resizing, so they get the same bicubic
  filtering as everything else (PIL resizes "P" and "1" images with nearest neighbour);
- CMYK images carrying an ICC profile are colour-managed to sRGB when littlecms is available.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from clipforge.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
WHITE: tuple[int, int, int] = (255, 255, 255)

INTERPOLATIONS = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
    # Filters Hugging Face preprocessor configs may name (PIL resample codes 1, 4, 5).
    "lanczos": T.InterpolationMode.LANCZOS,
    "box": T.InterpolationMode.BOX,
    "hamming": T.InterpolationMode.HAMMING,
}
RESIZE_MODES = ("shortest", "longest", "squash")
#: NaFlex resize rules: Siglip2ImageProcessor's (transformers) and timm's (open_clip main).
NAFLEX_RESIZES = ("siglip2", "timm")
_PIL_RESAMPLE = {
    T.InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    T.InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    T.InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    T.InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
    T.InterpolationMode.BOX: Image.Resampling.BOX,
    T.InterpolationMode.HAMMING: Image.Resampling.HAMMING,
}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class UnsupportedImageModeError(DataError, ValueError):
    """A PIL image mode we cannot turn into RGB (a ValueError so image loaders skip it)."""


# -- mode conversion ---------------------------------------------------------------------------------
def to_rgb(img: Image.Image, background: Sequence[int] = WHITE, alpha: str = "composite") -> Image.Image:
    """Any PIL image -> an RGB image with the colours a viewer would show.

    ``background`` (an RGB triple) fills transparent areas. With ``alpha="drop"`` transparent
    images (RGBA, LA, PA, palette) are converted with PIL's plain ``convert("RGB")`` instead,
    which is what open_clip and OpenAI do; every other mode is converted the careful way either
    way. RGB input is returned unchanged (same object), so calling this again is free.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if alpha == "drop" and (mode in _ALPHA_MODES or mode == "P"):
        return (img.convert("LA") if mode == "La" else img).convert("RGB")
    if mode == "P" and _palette_has_transparency(img):
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        return _composite(img, background)
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_uint8(img), "L").convert("RGB")
    if mode == "CMYK" and img.info.get("icc_profile"):
        managed = _cmyk_with_profile(img)
        if managed is not None:
            return managed
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise UnsupportedImageModeError(f"cannot convert PIL image mode {mode!r} to RGB: {e}") from None


def _palette_has_transparency(img: Image.Image) -> bool:
    has = getattr(img, "has_transparency_data", None)  # Pillow >= 10.1
    if has is not None:
        return bool(has)
    return "transparency" in img.info


def _composite(img: Image.Image, background: Sequence[int]) -> Image.Image:
    """Alpha-blend over an opaque background; fully opaque images skip the blend (same result)."""
    if img.mode == "La":
        img = img.convert("LA")
    # An RGBA image is used as it is (convert would copy it), and only the alpha band's minimum
    # is looked at: on a 4K photo these two save about a fifth of its decode + preprocess time.
    rgba = img if img.mode == "RGBA" else img.convert("RGBA")
    if rgba.getchannel("A").getextrema()[0] == 255:
        return rgba.convert("RGB")
    bg = tuple(int(c) for c in background)
    if len(bg) != 3 or not all(0 <= c <= 255 for c in bg):
        raise ConfigError(f"background must be an RGB triple of 0..255 ints, got {background!r}")
    base = Image.new("RGBA", rgba.size, (*bg, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """Scale 16-bit, 32-bit integer and float pixels to 0..255 instead of clipping them.

    ``I;16*`` is scaled by 255/65535 (exact integer rounding). ``I`` and ``F`` carry no bit
    depth, so their values decide: <= 1.0 (float) is taken as 0..1, <= 255 as 8-bit, <= 65535 as
    16-bit (the usual origin of mode "I"), anything larger is scaled by its maximum.
    """
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        wide = arr.astype(np.uint32)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)
    values = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    values = np.clip(values, 0.0, None)
    hi = float(values.max()) if values.size else 0.0
    if img.mode == "F" and hi <= 1.0:
        scale = 255.0
    elif hi <= 255.0:
        scale = 1.0
    elif hi <= 65535.0:
        scale = 255.0 / 65535.0
    else:
        scale = 255.0 / hi
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def _cmyk_with_profile(img: Image.Image) -> Image.Image | None:
    """Colour-manage CMYK through its embedded ICC profile; None if littlecms cannot."""
    try:
        from PIL import ImageCms

        src = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
        dst = ImageCms.createProfile("sRGB")
        return ImageCms.profileToProfile(img, src, dst, outputMode="RGB")
    except Exception as e:  # broken/unsupported profile: fall back to PIL's plain formula
        logger.debug("ICC conversion of a CMYK image failed (%s); using PIL's formula", e)
        return None


# -- configuration -------------------------------------------------------------------------------------
@dataclass
class PreprocessConfig:
    """Everything that turns an image into model input; saved inside clipforge checkpoints.

    ``image_size`` is an int (square) or ``(height, width)``. ``resize_mode``: "shortest"
    (resize the short side, center crop: CLIP), "longest" (fit inside, pad with ``fill_color``)
    or "squash" (resize to the exact size, ignoring aspect).

    ``alpha`` says what transparent pixels become: "composite" (blended on ``background``) or
    "drop" (the alpha channel is discarded, as open_clip and OpenAI do). ``convention`` says
    whose pipeline runs, with its order of operations (see :mod:`clipforge.conventions`):
    "clipforge" (careful RGB conversion first, torchvision geometry), "open_clip" (torchvision
    geometry, ``convert("RGB")`` after the crop) or "hf" (``CLIPImageProcessor``: conversion
    first, ``resize_size`` short side, floor-offset crop, ``rescale_factor``, ``backend``
    "torchvision" or "pil"). ``resize_size``, ``do_resize``, ``do_center_crop``,
    ``rescale_factor`` and ``backend`` only matter for "hf". Which convention a set of weights
    gets by default is decided by :meth:`defaults_for`.
    """

    image_size: int | tuple[int, int] = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0
    background: tuple[int, int, int] = field(default=WHITE)
    alpha: str = "composite"
    convention: str = "clipforge"
    resize_size: int | tuple[int, int] | None = None
    do_resize: bool = True
    do_center_crop: bool = True
    rescale_factor: float = 1 / 255
    backend: str = "torchvision"
    #: NaFlex (SigLIP 2 at native aspect ratio): set, the eval transform keeps each image's aspect
    #: with at most this many ``naflex_patch_size`` patches and returns a patch dict (collate with
    #: :func:`clipforge.naflex_transforms.naflex_collate`); None: a fixed-size tensor as before.
    naflex_max_patches: int | None = None
    naflex_patch_size: int = 16
    #: Whose NaFlex resize (see :data:`NAFLEX_RESIZES`): "siglip2" (``Siglip2ImageProcessor``:
    #: bilinear, antialiased, on the uint8 tensor; Siglip2 folders and checkpoints saved before
    #: the choice existed) or "timm" (timm's ``ResizeToSequence`` as open_clip main composes it:
    #: PIL resize with ``interpolation``, bicubic for its SigLIP 2 tags). Both pick the same grid.
    naflex_resize: str = "siglip2"

    def __post_init__(self) -> None:
        if isinstance(self.image_size, (list, tuple)):
            self.image_size = tuple(int(s) for s in self.image_size)  # type: ignore[assignment]
            if len(self.image_size) == 1:
                self.image_size = self.image_size[0]
        self.mean = _triple(self.mean, "mean")
        self.std = _triple(self.std, "std")
        self.background = tuple(int(c) for c in self.background)  # type: ignore[assignment]
        if isinstance(self.resize_size, (list, tuple)):
            self.resize_size = tuple(int(s) for s in self.resize_size)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        h, w = self.size
        if min(h, w) < 1:
            raise ConfigError(f"preprocess image_size must be positive, got {self.image_size!r}")
        if any(not (s > 0 and math.isfinite(s)) for s in self.std):
            raise ConfigError(f"preprocess std must be > 0, got {self.std!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"preprocess interpolation {self.interpolation!r} is not one of {sorted(INTERPOLATIONS)}"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"preprocess resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}")
        if len(self.background) != 3 or not all(0 <= c <= 255 for c in self.background):
            raise ConfigError(
                f"preprocess background must be an RGB triple of 0..255, got {self.background!r}"
            )
        self._validate_convention()

    def _validate_convention(self) -> None:
        from clipforge.conventions import ALPHA_MODES, CONVENTIONS, HF_BACKENDS

        if self.alpha not in ALPHA_MODES:
            raise ConfigError(f"preprocess alpha {self.alpha!r} is not one of {ALPHA_MODES}")
        if self.convention not in CONVENTIONS:
            raise ConfigError(f"preprocess convention {self.convention!r} is not one of {CONVENTIONS}")
        if self.backend not in HF_BACKENDS:
            raise ConfigError(f"preprocess backend {self.backend!r} is not one of {HF_BACKENDS}")
        if self.convention != "hf" and self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ConfigError(
                f"preprocess interpolation {self.interpolation!r} needs convention 'hf' "
                "(torchvision transforms support bicubic, bilinear, nearest)"
            )
        if not (self.rescale_factor > 0 and math.isfinite(self.rescale_factor)):
            raise ConfigError(f"preprocess rescale_factor must be > 0, got {self.rescale_factor!r}")
        if self.naflex_resize not in NAFLEX_RESIZES:
            raise ConfigError(
                f"preprocess naflex_resize {self.naflex_resize!r} is not one of {NAFLEX_RESIZES}"
            )
        if self.naflex_resize == "timm" and self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ConfigError(
                f"preprocess naflex_resize 'timm' resizes with bicubic, bilinear or nearest, "
                f"got interpolation {self.interpolation!r}"
            )

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the model input."""
        if isinstance(self.image_size, tuple):
            return self.image_size  # type: ignore[return-value]
        return (int(self.image_size), int(self.image_size))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.naflex_max_patches is None:  # fixed-size configs are written as before NaFlex existed
            d.pop("naflex_max_patches"), d.pop("naflex_patch_size"), d.pop("naflex_resize")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        """Accepts our keys and open_clip's ``preprocess_cfg`` keys (``size``, ``mode``)."""
        d = dict(d)
        if "size" in d:
            if "image_size" in d:
                raise ConfigError("preprocess config has both 'size' and 'image_size'")
            d["image_size"] = d.pop("size")
        mode = d.pop("mode", "RGB")
        if mode != "RGB":
            raise ConfigError(f"preprocess mode {mode!r} is not supported (only 'RGB')")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown preprocess config key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def coerce(cls, value: PreprocessConfig | dict[str, Any] | int | None) -> PreprocessConfig:
        """A config from a config, a stored dict, an image size, or None (clipforge's defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        if isinstance(value, (int, tuple, list)):
            return cls(image_size=value)  # type: ignore[arg-type]
        raise ConfigError(f"expected a PreprocessConfig, dict or size, got {type(value).__name__}")

    @classmethod
    def stored_dict(cls, value: PreprocessConfig | dict[str, Any] | None, image_size: int) -> dict[str, Any]:
        """The JSON-able dict a checkpoint stores for ``value``; None stores clipforge's own
        defaults at ``image_size`` (what a model built without weights preprocesses with)."""
        if value is None:
            return cls.defaults_for("clipforge", image_size)
        if isinstance(value, dict):
            return dict(value)
        if hasattr(value, "to_dict"):
            return dict(value.to_dict())
        raise ConfigError(f"preprocess_cfg must be a PreprocessConfig or dict, got {type(value).__name__}")

    @staticmethod
    def defaults_for(origin: str, image_size: int | tuple[int, int]) -> dict[str, Any]:
        """The stored-dict defaults for weights of ``origin``, before anything they store.

        Foreign weights keep the numbers of the library they came from: ``open_clip`` and
        ``openai`` files and tags get open_clip's pipeline with alpha dropped; ``hf`` folders
        get ``CLIPImageProcessor``'s class defaults (their ``preprocessor_config.json`` goes on
        top). ``clipforge`` (and models built without weights) composite on white, clipforge's
        training default; folders clipforge wrote store their own choice, which wins.
        """
        base: dict[str, Any] = {
            "image_size": image_size,
            "mean": list(OPENAI_MEAN),
            "std": list(OPENAI_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        }
        if origin in ("open_clip", "openai"):
            return {**base, "convention": "open_clip", "alpha": "drop"}
        if origin == "hf":
            from clipforge.conventions import fields_from_hf_processor

            size = image_size if isinstance(image_size, int) else min(image_size)
            return {**base, **fields_from_hf_processor({}, size)}
        if origin == "clipforge":
            return {**base, "convention": "clipforge", "alpha": "composite"}
        raise ConfigError(f"unknown weights origin {origin!r} (clipforge, open_clip, openai or hf)")

    @classmethod
    def from_hf_processor(
        cls, data: dict[str, Any], image_size: int, source: str = "preprocessor_config.json"
    ) -> PreprocessConfig:
        """The config reproducing the ``CLIPImageProcessor`` a ``preprocessor_config.json`` describes."""
        from clipforge.conventions import fields_from_hf_processor

        return cls.from_dict(fields_from_hf_processor(data, image_size, source))

    def to_hf_processor(self) -> dict[str, Any]:
        """A ``preprocessor_config.json`` document (exact for the "hf" convention)."""
        from clipforge.conventions import hf_processor_from_fields

        return hf_processor_from_fields(self)

    def with_alpha(self, spec: str | None) -> PreprocessConfig:
        """A copy with ``--image-alpha`` applied (``composite[:colour]`` or ``drop``); None = as is."""
        if spec is None:
            return self
        from clipforge.conventions import parse_alpha

        return replace(self, **parse_alpha(spec))


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) == 1:
        return values * 3
    if len(values) != 3:
        raise ConfigError(f"preprocess {name} must have 1 or 3 values, got {value!r}")
    return values  # type: ignore[return-value]


# -- transform steps (module-level classes so transforms pickle into DataLoader workers) -----------
class ToRGB:
    """PIL image -> RGB via :func:`to_rgb` (``alpha`` "composite" or "drop"); tensors pass through."""

    def __init__(self, background: Sequence[int] = WHITE, alpha: str = "composite") -> None:
        self.background = tuple(background)
        self.alpha = alpha

    def __call__(self, img: Any) -> Any:
        if isinstance(img, torch.Tensor):
            return img
        return to_rgb(img, self.background, self.alpha)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(background={self.background}, alpha={self.alpha})"


class ResizeKeepRatio:
    """Resize preserving aspect so the image covers (``longest=False``) or fits inside
    (``longest=True``) the target ``(h, w)``; sides are rounded to the nearest pixel."""

    def __init__(self, size: tuple[int, int], longest: bool, interpolation: T.InterpolationMode) -> None:
        self.size, self.longest, self.interpolation = size, longest, interpolation

    def __call__(self, img: Any) -> Any:
        _, h, w = TF.get_dimensions(img)
        ratios = (h / self.size[0], w / self.size[1])
        ratio = max(ratios) if self.longest else min(ratios)
        new_size = [max(1, round(h / ratio)), max(1, round(w / ratio))]
        return TF.resize(img, new_size, self.interpolation)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, longest={self.longest}, interpolation={self.interpolation.value})"


class ResizeCoverCrop:
    """Resize so the image covers ``(h, w)``, then center crop: the "shortest" resize mode.

    A square target uses torchvision's scalar ``Resize`` rule (long side truncated), as CLIP and
    open_clip do, so results are bit-identical to them. For PIL images whose resized size would
    exceed ``max_area_factor`` times the target area (aspect ratios beyond ~16:1, e.g. a 1x4000
    banner would otherwise become 224x896000 = 600 MB), the resize and crop are fused into one
    PIL ``resize(box=...)`` of the kept region: bounded memory and time, at the price of
    differences of a few grey levels near the crop edges.
    """

    def __init__(
        self, size: tuple[int, int], interpolation: T.InterpolationMode, max_area_factor: float = 16.0
    ) -> None:
        self.size, self.interpolation, self.max_area_factor = size, interpolation, max_area_factor

    def _resized_size(self, h: int, w: int) -> tuple[int, int]:
        th, tw = self.size
        if th == tw:
            if h <= w:
                return th, int(th * w / h)
            return int(tw * h / w), tw
        ratio = min(h / th, w / tw)
        return max(1, round(h / ratio)), max(1, round(w / ratio))

    def __call__(self, img: Any) -> Any:
        _, h, w = TF.get_dimensions(img)
        nh, nw = self._resized_size(h, w)
        th, tw = self.size
        if isinstance(img, Image.Image) and nh * nw > self.max_area_factor * th * tw:
            top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
            sy, sx = h / nh, w / nw
            box = (left * sx, top * sy, (left + tw) * sx, (top + th) * sy)
            resample = _PIL_RESAMPLE[self.interpolation]
            return img.resize((tw, th), resample, box=box)
        return TF.center_crop(TF.resize(img, [nh, nw], self.interpolation), [th, tw])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, interpolation={self.interpolation.value})"


class CenterCropOrPad:
    """Center crop to ``(h, w)``, padding with ``fill`` first where the image is smaller."""

    def __init__(self, size: tuple[int, int], fill: int = 0) -> None:
        self.size, self.fill = size, fill

    def __call__(self, img: Any) -> Any:
        _, h, w = TF.get_dimensions(img)
        th, tw = self.size
        if th > h or tw > w:
            pad_w, pad_h = max(tw - w, 0), max(th - h, 0)
            img = TF.pad(img, [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2], fill=self.fill)
            _, h, w = TF.get_dimensions(img)
        if (h, w) == (th, tw):
            return img
        return TF.crop(img, int(round((h - th) / 2.0)), int(round((w - tw) / 2.0)), th, tw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, fill={self.fill})"


class ToFloatTensor:
    """PIL -> float tensor in [0, 1] (torchvision ``to_tensor``); uint8 tensors are scaled."""

    def __call__(self, img: Any) -> torch.Tensor:
        if isinstance(img, torch.Tensor):
            return img.float().div(255) if img.dtype == torch.uint8 else img
        return TF.to_tensor(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RandomGrayscale3:
    """Grayscale with probability ``p``, keeping 3 channels (PIL images)."""

    def __init__(self, p: float) -> None:
        self.p = p
        self.gray = T.Grayscale(num_output_channels=3)

    def __call__(self, img: Any) -> Any:
        return self.gray(img) if torch.rand(()) < self.p else img


# -- builders ----------------------------------------------------------------------------------------
_TRAIN_OPTIONS = ("scale", "ratio", "hflip", "color_jitter", "color_jitter_prob", "gray_scale_prob")


def _naflex_transform(
    cfg: PreprocessConfig, is_train: bool, crop: tuple, augment: tuple
) -> Callable[[Any], Any]:
    """SigLIP 2's native-aspect resize (``cfg.naflex_resize``'s rule) + patchify; in training after
    a random crop (as open_clip).

    ``crop`` is the fixed-size path's ``(scale, ratio)``, here relative to the image's own aspect
    ratio (see :class:`~clipforge.naflex_transforms.NaFlexTrainTransform`); ``augment`` its
    ``(hflip, color_jitter, color_jitter_prob, gray_scale_prob)``, applied to the crop.
    """
    from clipforge.naflex_transforms import NaFlexTrainTransform, NaFlexTransform

    rule = {"resize": cfg.naflex_resize, "interpolation": cfg.interpolation}
    if not is_train:
        return NaFlexTransform(cfg.naflex_patch_size, cfg.naflex_max_patches, cfg.mean, cfg.std, **rule)
    scale, ratio = crop
    return NaFlexTrainTransform(
        cfg.naflex_patch_size,
        cfg.naflex_max_patches,
        cfg.mean,
        cfg.std,
        **rule,
        scale=scale,
        ratio=ratio,
        augment=_augment_steps(*augment),
    )


def image_transform(
    cfg: PreprocessConfig | dict[str, Any] | int | None = None,
    is_train: bool = False,
    *,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    hflip: float = 0.0,
    color_jitter: float | Sequence[float] | None = None,
    color_jitter_prob: float | None = None,
    gray_scale_prob: float = 0.0,
    **unknown: Any,
) -> Callable[[Any], torch.Tensor]:
    """Build the preprocessing callable: PIL image (any mode) -> ``FloatTensor[3, H, W]``.

    Eval: resize per ``cfg.resize_mode`` (bicubic, shortest side by default), center crop (or
    pad), to tensor, normalise: identical to ``open_clip.image_transform(size, is_train=False)``.
    Train: ``RandomResizedCrop(scale, ratio)`` then optional horizontal flip, colour jitter
    (``color_jitter`` = brightness, contrast, saturation[, hue], applied with
    ``color_jitter_prob``, default 1) and grayscale. Randomness comes from torch's global RNG, so
    ``torch.manual_seed`` makes it reproducible (DataLoader seeds each worker).

    ``cfg.convention`` decides where the RGB conversion happens (first for "clipforge" and
    "hf", after the crop for "open_clip", as those libraries do), and "hf" evaluates through
    :class:`clipforge.conventions.HFProcessor`, ``CLIPImageProcessor``'s exact arithmetic.
    With ``cfg.naflex_max_patches`` set the result is a NaFlex patch dict (see :func:`_naflex_transform`).
    """
    if unknown:
        unsupported = {"re_prob", "re_count", "use_timm"} & set(unknown)
        hint = (
            f" ({sorted(unsupported)} are open_clip/timm options clipforge does not implement)"
            if unsupported
            else ""
        )
        raise ConfigError(
            f"unknown train transform option(s) {sorted(unknown)}; known: {list(_TRAIN_OPTIONS)}{hint}"
        )
    cfg = PreprocessConfig.coerce(cfg)
    if cfg.naflex_max_patches is not None:
        augment = (hflip, color_jitter, color_jitter_prob, gray_scale_prob)
        return _naflex_transform(cfg, is_train, (scale, ratio), augment)
    first, after = _rgb_steps(cfg)
    if cfg.convention == "hf" and not is_train:
        from clipforge.conventions import HFProcessor

        return T.Compose([HFProcessor(cfg, first[0])])
    interpolation = INTERPOLATIONS[cfg.interpolation]
    if is_train:
        geometry = _train_steps(
            cfg, interpolation, scale, ratio, hflip, color_jitter, color_jitter_prob, gray_scale_prob
        )
    else:
        geometry = _eval_resize_steps(cfg, interpolation)
    # open_clip converts after the eval resize/crop, and in training right after the random
    # crop (flips, colour jitter and grayscale need RGB).
    split = 1 if is_train else len(geometry)
    steps = [*first, *geometry[:split], *after, *geometry[split:]]
    steps += [ToFloatTensor(), T.Normalize(mean=cfg.mean, std=cfg.std)]
    return T.Compose(steps)


def _rgb_steps(cfg: PreprocessConfig) -> tuple[list[Callable[[Any], Any]], list[Callable[[Any], Any]]]:
    """(steps before the geometry, steps after the first geometric step): the RGB conversion,
    placed where the convention's library places it."""
    from clipforge.conventions import HFCompositeRGB, PilConvertRGB

    if cfg.convention == "open_clip":
        after = PilConvertRGB() if cfg.alpha == "drop" else ToRGB(cfg.background)
        return [], [after]
    if cfg.convention == "hf":
        return [PilConvertRGB() if cfg.alpha == "drop" else HFCompositeRGB(cfg.background)], []
    return [ToRGB(cfg.background, cfg.alpha)], []


def _eval_resize_steps(
    cfg: PreprocessConfig, interpolation: T.InterpolationMode
) -> list[Callable[[Any], Any]]:
    size = cfg.size
    if cfg.resize_mode == "squash":
        return [T.Resize(size, interpolation=interpolation)]
    if cfg.resize_mode == "longest":
        return [
            ResizeKeepRatio(size, longest=True, interpolation=interpolation),
            CenterCropOrPad(size, cfg.fill_color),
        ]
    return [ResizeCoverCrop(size, interpolation)]


def _train_steps(
    cfg: PreprocessConfig,
    interpolation: T.InterpolationMode,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip: float,
    color_jitter: float | Sequence[float] | None,
    color_jitter_prob: float | None,
    gray_scale_prob: float,
) -> list[Callable[[Any], Any]]:
    lo, hi = (float(s) for s in scale)
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"train transform scale must satisfy 0 < min <= max <= 1, got {scale!r}")
    crop = T.RandomResizedCrop(cfg.size, scale=(lo, hi), ratio=tuple(ratio), interpolation=interpolation)
    return [crop, *_augment_steps(hflip, color_jitter, color_jitter_prob, gray_scale_prob)]


def _augment_steps(
    hflip: float,
    color_jitter: float | Sequence[float] | None,
    color_jitter_prob: float | None,
    gray_scale_prob: float,
) -> list[Callable[[Any], Any]]:
    """The training augmentations after the crop (flip, colour jitter, grayscale), on RGB images."""
    steps: list[Callable[[Any], Any]] = []
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    if color_jitter is not None:
        jitter = (color_jitter,) * 3 if isinstance(color_jitter, (int, float)) else tuple(color_jitter)
        if len(jitter) not in (3, 4):
            raise ConfigError(f"color_jitter must be a number or 3-4 numbers, got {color_jitter!r}")
        prob = 1.0 if color_jitter_prob is None else float(color_jitter_prob)
        steps.append(T.RandomApply([T.ColorJitter(*jitter)], p=prob))
    if gray_scale_prob > 0:
        steps.append(RandomGrayscale3(gray_scale_prob))
    return steps
