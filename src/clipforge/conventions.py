"""Other libraries' preprocessing, reproduced number for number, and the ``--image-alpha`` option.

Weights carry the numbers of the pipeline they were trained and evaluated with, so clipforge
reproduces each origin's eval preprocessing exactly instead of approximating it:

- ``open_clip`` (and OpenAI's ``clip``): bicubic resize of the short side (torchvision's
  truncating rule), ``CenterCrop`` (offset ``round((h - th) / 2)``), then ``img.convert("RGB")``
  *after* the crop, ``ToTensor`` (``x / 255``), ``Normalize``. Alpha is dropped; palette and
  1-bit images are resized nearest-neighbour, as PIL does for those modes.
- ``hf`` (transformers' ``CLIPImageProcessor``, from ``preprocessor_config.json``): RGB
  conversion *first* (transformers >= 5 composites transparency on white; 4.x called
  ``convert("RGB")``, i.e. dropped alpha), resize of the short side to ``shortest_edge``
  (``int(edge * long / short)``), centre crop at ``int((h - ch) / 2)`` (floor, where torchvision
  rounds), then rescale and normalise in the processor's float order. Two backends exist and
  give different numbers: ``torchvision`` (transformers >= 5's ``CLIPImageProcessor``: uint8
  tensor resize with antialias, mean/std pre-multiplied by ``1 / rescale_factor``) and ``pil``
  (``CLIPImageProcessorPil``, and 4.x's ``CLIPImageProcessor``: PIL resize, ``x * (1/255)`` in
  float64, then ``(x - mean) / std`` in float32).

Everything here is written for clipforge; the libraries are only used by the tests, as oracles.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipforge.errors import ConfigError

ALPHA_MODES = ("composite", "drop")
CONVENTIONS = ("clipforge", "open_clip", "hf")
HF_BACKENDS = ("torchvision", "pil")
WHITE = (255, 255, 255)

# PIL resample codes as stored in preprocessor_config.json -> our interpolation names.
_HF_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_HEX = re.compile(r"^#?([0-9a-fA-F]{6})$")


# -- the --image-alpha value -----------------------------------------------------------------------
def parse_alpha(spec: str) -> dict[str, Any]:
    """``composite``, ``composite:#RRGGBB``, ``composite:R,G,B`` or ``drop`` -> config fields.

    Returns ``{"alpha": ...}`` plus ``"background"`` when a colour is given, so it can be
    merged over a stored config without resetting a background the weights carry.
    """
    text = str(spec).strip()
    kind, _, colour = text.partition(":")
    kind = kind.strip().lower()
    if kind not in ALPHA_MODES:
        raise ConfigError(
            f"image alpha {spec!r}: expected 'composite', 'composite:#RRGGBB', 'composite:R,G,B' or 'drop'"
        )
    if kind == "drop":
        if colour:
            raise ConfigError(f"image alpha {spec!r}: 'drop' takes no colour")
        return {"alpha": "drop"}
    if not colour:
        return {"alpha": "composite"}
    return {"alpha": "composite", "background": parse_colour(colour, f"image alpha {spec!r}")}


def parse_colour(text: str, where: str = "colour") -> tuple[int, int, int]:
    """``#RRGGBB``/``RRGGBB`` or ``R,G,B`` (0..255) -> an RGB triple."""
    text = text.strip()
    m = _HEX.match(text)
    if m:
        h = m.group(1)
        return (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16))
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise ConfigError(f"{where}: colour {text!r} is not #RRGGBB or R,G,B with values 0..255")
    return values  # type: ignore[return-value]


# -- preprocessor_config.json <-> config fields ----------------------------------------------------
def _edge(value: Any, where: str) -> tuple[int | None, tuple[int, int] | None]:
    """A ``size``/``crop_size`` entry -> (shortest_edge, (h, w)); old configs store a bare int."""
    if isinstance(value, (int, float)):
        return int(value), None
    if isinstance(value, Mapping):
        if "shortest_edge" in value:
            return int(value["shortest_edge"]), None
        if "height" in value and "width" in value:
            return None, (int(value["height"]), int(value["width"]))
    raise ConfigError(f"{where}: unsupported size {value!r} (expected shortest_edge or height/width)")


def fields_from_hf_processor(
    data: Mapping[str, Any], image_size: int, source: str = "preprocessor_config.json"
) -> dict[str, Any]:
    """``PreprocessConfig`` fields reproducing the ``CLIPImageProcessor`` that ``data`` describes.

    Missing keys take ``CLIPImageProcessor``'s class defaults (``shortest_edge`` = the model's
    image size, crop = the same, bicubic, OpenAI mean/std, rescale 1/255).
    """
    kind = str(data.get("image_processor_type") or data.get("feature_extractor_type") or "CLIPImageProcessor")
    if "CLIP" not in kind:
        raise ConfigError(f"{source}: image_processor_type {kind!r} is not a CLIPImageProcessor")
    for key in ("do_rescale", "do_normalize"):
        if data.get(key) is False:
            raise ConfigError(f"{source}: {key}=false is not supported (CLIP models expect normalised input)")
    short, exact = _edge(data.get("size", image_size), f"{source}: size")
    crop = data.get("crop_size", image_size)
    crop_short, crop_hw = _edge(crop, f"{source}: crop_size")
    crop_hw = crop_hw or (crop_short, crop_short)  # type: ignore[assignment]
    resample = int(data.get("resample", 3))
    if resample not in _HF_RESAMPLE:
        raise ConfigError(f"{source}: resample {resample!r} is not a PIL filter code 0..5")
    out: dict[str, Any] = {
        "convention": "hf",
        "alpha": "composite",
        "background": WHITE,
        "image_size": crop_hw if crop_hw[0] != crop_hw[1] else crop_hw[0],
        "resize_size": short if short is not None else list(exact),  # type: ignore[arg-type]
        "interpolation": _HF_RESAMPLE[resample],
        "mean": tuple(data.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
        "std": tuple(data.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
        "rescale_factor": float(data.get("rescale_factor", 1 / 255)),
        "do_resize": bool(data.get("do_resize", True)),
        "do_center_crop": bool(data.get("do_center_crop", True)),
    }
    if str(kind).endswith("Pil"):
        out["backend"] = "pil"
    return out


def hf_processor_from_fields(cfg: Any) -> dict[str, Any]:
    """A ``preprocessor_config.json`` document for ``cfg`` (a ``PreprocessConfig``).

    Exact only for configs of the ``hf`` convention; others get the processor that comes
    closest (same sizes, filter and mean/std), which is what a transformers user would use.
    """
    h, w = cfg.size
    resize = cfg.resize_size if cfg.resize_size is not None else min(h, w)
    size = {"shortest_edge": resize} if isinstance(resize, int) else {"height": resize[0], "width": resize[1]}
    resample = {v: k for k, v in _HF_RESAMPLE.items()}.get(cfg.interpolation, 3)
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": bool(cfg.do_resize),
        "size": size,
        "resample": resample,
        "do_center_crop": bool(cfg.do_center_crop),
        "crop_size": {"height": h, "width": w},
        "do_rescale": True,
        "rescale_factor": cfg.rescale_factor,
        "do_normalize": True,
        "image_mean": list(cfg.mean),
        "image_std": list(cfg.std),
        "do_convert_rgb": True,
    }


# -- conversions at the point each library makes them ----------------------------------------------
class PilConvertRGB:
    """``img.convert("RGB")`` on PIL images, as open_clip's ``MaybeConvertMode`` and 4.x HF do.

    Alpha is dropped (the hidden colour of transparent pixels shows); ``La`` (premultiplied,
    which PIL cannot convert directly) goes through ``LA`` first. Tensors pass through.
    """

    def __call__(self, img: Any) -> Any:
        if not isinstance(img, Image.Image) or img.mode == "RGB":
            return img
        if img.mode == "La":
            img = img.convert("LA")
        return img.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class HFCompositeRGB:
    """transformers >= 5's ``convert_to_rgb``: composite on ``background`` whenever the image
    has an alpha band or a ``transparency`` entry (any mode, RGB and L included), else
    ``convert("RGB")``. Its rule for "has alpha" differs from clipforge's, hence its own step."""

    def __init__(self, background: Sequence[int] = WHITE) -> None:
        self.background = tuple(int(c) for c in background)

    def __call__(self, img: Any) -> Any:
        if not isinstance(img, Image.Image):
            return img
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            rgba = img.convert("LA").convert("RGBA") if img.mode == "La" else img.convert("RGBA")
            base = Image.new("RGBA", rgba.size, (*self.background, 255))
            return Image.alpha_composite(base, rgba).convert("RGB")
        return img.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(background={self.background})"


# -- CLIPImageProcessor's geometry and arithmetic -----------------------------------------------------
def hf_resize_size(h: int, w: int, resize: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` after the processor's resize: an exact ``(h, w)``, or the short side
    set to ``resize`` and the long side ``int(resize * long / short)`` (truncated, in float)."""
    if not isinstance(resize, int):
        return int(resize[0]), int(resize[1])
    if w <= h:
        return int(resize * h / w), resize
    return resize, int(resize * w / h)


class HFProcessor:
    """PIL image (any mode) -> ``FloatTensor[3, H, W]`` exactly as ``CLIPImageProcessor`` makes it.

    ``convert`` is the RGB step (run first, as transformers does); ``backend`` chooses between
    the torchvision-tensor pipeline and the PIL/NumPy one (their numbers differ by design).
    """

    def __init__(self, cfg: Any, convert: Any) -> None:
        if cfg.backend not in HF_BACKENDS:
            raise ConfigError(f"preprocess backend {cfg.backend!r} is not one of {HF_BACKENDS}")
        self.convert = convert
        self.crop = cfg.size
        self.resize = cfg.resize_size if cfg.resize_size is not None else min(cfg.size)
        self.do_resize, self.do_crop = cfg.do_resize, cfg.do_center_crop
        self.interpolation, self.backend = cfg.interpolation, cfg.backend
        self.mean, self.std, self.scale = tuple(cfg.mean), tuple(cfg.std), float(cfg.rescale_factor)

    def __call__(self, img: Any) -> torch.Tensor:
        rgb = self.convert(img)
        if isinstance(rgb, torch.Tensor):
            chw = rgb if rgb.dtype == torch.uint8 else (rgb * 255).round().clamp(0, 255).to(torch.uint8)
            rgb = Image.fromarray(chw.permute(1, 2, 0).numpy(), "RGB")
        if self.backend == "pil":
            return self._pil(rgb)
        return self._torchvision(rgb)

    def _torchvision(self, rgb: Image.Image) -> torch.Tensor:
        """uint8 tensor resize (antialias), crop, then ``(x - mean/s) / (std/s)`` in float32."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as tvf

        x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()
        if self.do_resize:
            mode = "nearest_exact" if self.interpolation == "nearest" else self.interpolation
            size = hf_resize_size(x.shape[-2], x.shape[-1], self.resize)
            x = tvf.resize(x, list(size), interpolation=InterpolationMode(mode), antialias=True)
        if self.do_crop:
            x = _tv_center_crop(x, self.crop)
        inv = 1.0 / self.scale
        mean = torch.tensor(self.mean) * inv
        std = torch.tensor(self.std) * inv
        return tvf.normalize(x.to(torch.float32), mean, std, inplace=True)

    def _pil(self, rgb: Image.Image) -> torch.Tensor:
        """PIL resize, floor-offset crop, float64 rescale cast to float32, float32 normalise."""
        if self.do_resize:
            h, w = hf_resize_size(rgb.height, rgb.width, self.resize)
            rgb = rgb.resize((w, h), resample=_PIL_FILTERS[self.interpolation])
        arr = np.array(rgb).transpose(2, 0, 1)
        if self.do_crop:
            arr = _np_center_crop(arr, self.crop)
        x = (arr.astype(np.float64) * self.scale).astype(np.float32)
        mean = np.array(self.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.array(self.std, dtype=np.float32).reshape(3, 1, 1)
        return torch.from_numpy(np.ascontiguousarray((x - mean) / std))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(convert={self.convert!r}, resize={self.resize}, crop={self.crop}, "
            f"interpolation={self.interpolation}, backend={self.backend})"
        )


def _tv_center_crop(x: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """Zero-pad (left/top get the smaller half) where too small, then crop at ``int((h-ch)/2)``."""
    from torchvision.transforms.v2 import functional as tvf

    ch, cw = crop
    h, w = x.shape[-2:]
    if ch > h or cw > w:
        pad_w, pad_h = max(cw - w, 0), max(ch - h, 0)
        x = tvf.pad(x, [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2], fill=0)
        h, w = x.shape[-2:]
    return x[
        ..., int((h - ch) / 2.0) : int((h - ch) / 2.0) + ch, int((w - cw) / 2.0) : int((w - cw) / 2.0) + cw
    ]


def _np_center_crop(arr: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """Crop at ``(h - ch) // 2``; where too small, zero-pad with the larger half on the top/left."""
    ch, cw = crop
    h, w = arr.shape[-2:]
    if ch > h or cw > w:
        nh, nw = max(ch, h), max(cw, w)
        top_pad, left_pad = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
        padded = np.zeros(arr.shape[:-2] + (nh, nw), dtype=arr.dtype)
        padded[..., top_pad : top_pad + h, left_pad : left_pad + w] = arr
        top, left = (h - ch) // 2 + top_pad, (w - cw) // 2 + left_pad
        return padded[..., max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]
    top, left = (h - ch) // 2, (w - cw) // 2
    return arr[..., top : top + ch, left : left + cw]
