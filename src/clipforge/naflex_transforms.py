"""NaFlex preprocessing: SigLIP 2 at native aspect ratio (resize + patchify + padded collate).

``Siglip2ImageProcessor`` keeps each image's aspect ratio: it picks the largest size whose sides
are multiples of the patch size and whose patch count is at most ``max_num_patches`` (found by
bisection on the scale), resizes bilinearly with antialiasing on the uint8 image, rescales to
[0, 1], normalises with mean/std 0.5 and flattens patches as (row, column, channel). The collator
pads every image to ``max_num_patches`` rows with a 0/1 mask, so a batch is a dict of
``patches`` (B, N, p*p*3), ``patch_mask`` (B, N) and ``spatial_shapes`` (B, 2).

open_clip main preprocesses its own NaFlex weights with timm's transforms instead
(``ResizeToSequence``, ``ToTensor``, ``Normalize``, ``Patchify``): the same grid (timm's bisection
is this one), the same patch order and mask, but the resize is PIL's on the PIL image with the
weights' interpolation (bicubic for SigLIP 2) and the rescale a division by 255. ``resize="timm"``
is that rule; "siglip2" (the default) is the processor's. On real photos the two differ by up to
0.26 (in the normalised [-1, 1] range), about 1e-3 on average.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from clipforge.errors import ConfigError


def _scaled_side(scale: float, side: int, patch_size: int) -> int:
    """A side scaled, rounded up to a multiple of the patch size, at least one patch."""
    return int(max(patch_size, math.ceil(side * scale / patch_size) * patch_size))


def naflex_size(
    height: int, width: int, patch_size: int, max_num_patches: int, eps: float = 1e-5
) -> tuple[int, int]:
    """(height, width) SigLIP 2 resizes to: bisect the scale so the patch count stays <= the maximum.

    The same bisection bounds and stopping rule as the processor, so sizes agree to the pixel.
    """
    if max_num_patches < 1 or patch_size < 1:
        raise ConfigError(
            f"NaFlex needs max_num_patches >= 1 and patch_size >= 1, got {max_num_patches}, {patch_size}"
        )
    low, high = eps / 10, 100.0
    while high - low >= eps:
        mid = (low + high) / 2
        rows = _scaled_side(mid, height, patch_size) / patch_size
        cols = _scaled_side(mid, width, patch_size) / patch_size
        if rows * cols <= max_num_patches:
            low = mid
        else:
            high = mid
    return _scaled_side(low, height, patch_size), _scaled_side(low, width, patch_size)


def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(C, H, W) -> (H/p * W/p, p*p*C), patches in row-major order, pixels as (row, column, channel)."""
    c, h, w = image.shape
    grid = image.reshape(c, h // patch_size, patch_size, w // patch_size, patch_size)
    return grid.permute(1, 3, 2, 4, 0).reshape((h // patch_size) * (w // patch_size), -1)


#: PIL filters of the "timm" rule, by ``PreprocessConfig.interpolation`` (torchvision's PIL path).
_PIL_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def _siglip2_pixels(image: Image.Image, patch_size: int, max_num_patches: int) -> torch.Tensor:
    """Siglip2ImageProcessor's resize: torchvision's uint8 bilinear antialiased kernel, * 1/255."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf
    from torchvision.transforms.v2 import functional as tvf2  # its uint8 kernel, as transformers uses

    pixels = tvf.pil_to_tensor(image).contiguous()  # the kernel transformers runs
    h, w = naflex_size(pixels.shape[-2], pixels.shape[-1], patch_size, max_num_patches)
    pixels = tvf2.resize(pixels, [h, w], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return pixels.float() * (1 / 255)


def _timm_pixels(
    image: Image.Image, patch_size: int, max_num_patches: int, interpolation: str
) -> torch.Tensor:
    """timm's ``ResizeToSequence`` on a PIL image (PIL's filter, antialiased), then ``ToTensor``'s / 255."""
    from torchvision.transforms import functional as tvf

    h, w = naflex_size(image.height, image.width, patch_size, max_num_patches)
    resized = image.resize((w, h), _PIL_FILTERS[interpolation])
    return tvf.pil_to_tensor(resized).float().div(255)


class NaFlexTransform:
    """PIL image -> ``{"patches", "spatial_shape"}`` at native aspect ratio (unpadded).

    ``resize`` picks whose pixels: "siglip2" (transformers' processor, what Siglip2 folders were
    trained and evaluated with) or "timm" (open_clip main's transforms for its own NaFlex weights,
    filtered with ``interpolation``); see the module docstring for how they differ.
    """

    def __init__(
        self,
        patch_size: int = 16,
        max_num_patches: int = 256,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        resize: str = "siglip2",
        interpolation: str = "bicubic",
    ) -> None:
        if resize not in ("siglip2", "timm"):
            raise ConfigError(f"NaFlex resize must be 'siglip2' or 'timm', got {resize!r}")
        if resize == "timm" and interpolation not in _PIL_FILTERS:
            raise ConfigError(
                f"NaFlex resize 'timm' needs interpolation in {sorted(_PIL_FILTERS)}, got {interpolation!r}"
            )
        self.patch_size = patch_size
        self.max_num_patches = max_num_patches
        self.resize, self.interpolation = resize, interpolation
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        rgb = image.convert("RGB")
        if self.resize == "timm":
            pixels = _timm_pixels(rgb, self.patch_size, self.max_num_patches, self.interpolation)
        else:
            pixels = _siglip2_pixels(rgb, self.patch_size, self.max_num_patches)
        pixels = (pixels - self.mean) / self.std
        h, w = pixels.shape[-2:]
        shape = torch.tensor([h // self.patch_size, w // self.patch_size])
        return {"patches": patchify(pixels, self.patch_size), "spatial_shape": shape}

    def batch(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """A padded batch of several images (transform + :func:`naflex_collate`)."""
        return naflex_collate([self(im) for im in images], self.max_num_patches)


class NaFlexTrainTransform(NaFlexTransform):
    """Training: a random crop around the image's own aspect ratio, then the eval resize + patchify.

    open_clip main trains SigLIP 2 NaFlex with timm's ``RandomResizedCropToSequence``: the crop
    covers ``scale`` of the image's area and its aspect ratio is the image's own times a
    log-uniform factor from ``ratio`` (so a wide photo stays wide), and the crop is then resized
    to the largest patch grid that fits ``max_num_patches`` at its aspect ratio. This does the
    same with clipforge's fixed-size defaults (``scale`` 0.9-1, ``ratio`` 3/4-4/3) and resizes
    with the eval transform's rule (``resize``: SigLIP 2's bilinear or timm's PIL filter), so
    training and evaluation see the same kind of pixels. After 10 crops that do not fit the whole image is
    used. ``augment`` (flip, colour jitter, grayscale, built as for the fixed-size path) runs on
    the crop. Randomness comes from torch's global RNG, as ``RandomResizedCrop``'s does, so the
    loader's per-sample seeds make a batch reproducible and a resumed run exact.
    """

    def __init__(
        self,
        patch_size: int = 16,
        max_num_patches: int = 256,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        resize: str = "siglip2",
        interpolation: str = "bicubic",
        *,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        augment: Sequence[Callable[[Any], Any]] = (),
    ) -> None:
        super().__init__(patch_size, max_num_patches, mean, std, resize, interpolation)
        lo, hi = (float(s) for s in scale)
        r_lo, r_hi = (float(r) for r in ratio)
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(
                f"NaFlex train transform: scale must satisfy 0 < min <= max <= 1, got {scale!r}"
            )
        if not 0.0 < r_lo <= r_hi:
            raise ConfigError(f"NaFlex train transform: ratio must satisfy 0 < min <= max, got {ratio!r}")
        self.scale, self.ratio, self.augment = (lo, hi), (r_lo, r_hi), tuple(augment)

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` of one random crop of a ``width`` x ``height`` image."""
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            area = width * height * float(torch.empty(1).uniform_(*self.scale))
            aspect = width / height * math.exp(float(torch.empty(1).uniform_(log_lo, log_hi)))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,)))
                left = int(torch.randint(0, width - w + 1, (1,)))
                return left, top, left + w, top + h
        return 0, 0, width, height

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        image = image.crop(self.crop_box(*image.size)).convert("RGB")
        for step in self.augment:
            image = step(image)
        return super().__call__(image)


def naflex_collate(
    items: Sequence[dict[str, Any]], max_num_patches: int | None = None
) -> dict[str, torch.Tensor]:
    """Pad transformed images to ``max_num_patches`` (default: the longest) with a 0/1 patch mask."""
    if not items:
        raise ConfigError("naflex_collate: no images to collate")
    longest = max(int(it["patches"].shape[0]) for it in items)
    n = longest if max_num_patches is None else max_num_patches
    if longest > n:
        raise ConfigError(f"naflex_collate: an image has {longest} patches, more than max_num_patches={n}")
    dim = items[0]["patches"].shape[1]
    patches = torch.zeros(len(items), n, dim, dtype=items[0]["patches"].dtype)
    mask = torch.zeros(len(items), n, dtype=torch.int32)
    for i, it in enumerate(items):
        k = it["patches"].shape[0]
        patches[i, :k] = it["patches"]
        mask[i, :k] = 1
    shapes = torch.stack([torch.as_tensor(it["spatial_shape"]) for it in items])
    return {"patches": patches, "patch_mask": mask, "spatial_shapes": shapes}


# -- NaFlex batches in training: an image batch may be a padded patch dict rather than a tensor ------
def is_patch_dict(value: Any) -> bool:
    """A NaFlex image (``patches`` + ``spatial_shape``) or batch (``patches`` + ``patch_mask``)."""
    return isinstance(value, Mapping) and "patches" in value


def stack_images(items: Sequence[Any]) -> Any:
    """Preprocessed images as one batch: pixel tensors stacked, NaFlex patch dicts padded to the
    longest with a mask (:func:`naflex_collate`). The one choice embed and search both make."""
    return naflex_collate(items) if is_patch_dict(items[0]) else torch.stack(list(items))


class NaFlexCollate:
    """Training collate: every NaFlex field of the items padded to ``max_num_patches``, the rest stacked.

    Items are ``(image, tokens, ...)`` tuples (plain pairs, shard samples with their position) or
    dicts (objective items, whose ``image_views`` is a second NaFlex image). Padding to the
    maximum rather than to the batch's longest keeps every batch the same shape, as open_clip's
    NaFlex collator does: micro-batches, a second view and DDP ranks then line up without
    re-padding. A class, not a closure, so DataLoader workers can pickle it.
    """

    def __init__(self, max_num_patches: int) -> None:
        self.max_num_patches = int(max_num_patches)

    def field(self, values: Sequence[Any]) -> Any:
        """One field of every item: padded NaFlex dicts, or torch's default collate."""
        from torch.utils.data import default_collate

        if is_patch_dict(values[0]):
            return naflex_collate(values, self.max_num_patches)
        return default_collate(values)

    def __call__(self, items: Sequence[Any]) -> Any:
        first = items[0]
        if isinstance(first, Mapping) and not is_patch_dict(first):
            return {key: self.field([it[key] for it in items]) for key in first}
        if isinstance(first, (tuple, list)):
            return [self.field([it[i] for it in items]) for i in range(len(first))]
        return self.field(items)


def batch_length(images: Any) -> int:
    """Images in a batch: a pixel tensor's first dimension, or a patch dict's."""
    return int(images["patches"].shape[0] if is_patch_dict(images) else images.shape[0])


def batch_device(images: Any) -> torch.device:
    """Where a pixel tensor or a patch dict lives (its patches')."""
    return images["patches"].device if is_patch_dict(images) else images.device


def images_to(images: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """A pixel tensor or every tensor of a patch dict on ``device`` (dtypes kept: the model casts)."""
    if is_patch_dict(images):
        return {k: torch.as_tensor(v).to(device, non_blocking=non_blocking) for k, v in images.items()}
    return images.to(device, non_blocking=non_blocking)


def chunk_images(images: Any, parts: int) -> list[Any]:
    """``torch.chunk`` for pixel tensors and patch dicts alike (every key split the same way)."""
    if not is_patch_dict(images):
        return list(images.chunk(parts))
    pieces = {k: torch.as_tensor(v).chunk(parts) for k, v in images.items()}
    return [{k: p[m] for k, p in pieces.items()} for m in range(len(pieces["patches"]))]


def cat_images(batches: Sequence[Any]) -> Any:
    """Concatenate image batches (pixel tensors, or patch dicts padded to the longest of them)."""
    if not is_patch_dict(batches[0]):
        return torch.cat([b.to(batches[0].dtype) for b in batches])
    n = max(int(b["patches"].shape[1]) for b in batches)

    def padded(key: str, b: Mapping[str, torch.Tensor]) -> torch.Tensor:
        t = torch.as_tensor(b[key])
        extra = n - t.shape[1] if key in ("patches", "patch_mask") else 0
        return torch.nn.functional.pad(t, (0, 0, 0, extra) if t.ndim == 3 else (0, extra)) if extra else t

    return {key: torch.cat([padded(key, b) for b in batches]) for key in batches[0]}
