"""NaFlex preprocessing: SigLIP 2 at native aspect ratio (resize + patchify + padded collate).

``Siglip2ImageProcessor`` keeps each image's aspect ratio: it picks the largest size whose sides
are multiples of the patch size and whose patch count is at most ``max_num_patches`` (found by
bisection on the scale), resizes bilinearly with antialiasing on the uint8 image, rescales to
[0, 1], normalises with mean/std 0.5 and flattens patches as (row, column, channel). The collator
pads every image to ``max_num_patches`` rows with a 0/1 mask, so a batch is a dict of
``patches`` (B, N, p*p*3), ``patch_mask`` (B, N) and ``spatial_shapes`` (B, 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


class NaFlexTransform:
    """PIL image -> ``{"patches", "spatial_shape"}`` at native aspect ratio (unpadded)."""

    def __init__(
        self,
        patch_size: int = 16,
        max_num_patches: int = 256,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> None:
        self.patch_size = patch_size
        self.max_num_patches = max_num_patches
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as tvf
        from torchvision.transforms.v2 import functional as tvf2  # its uint8 kernel, as transformers uses

        pixels = tvf.pil_to_tensor(image.convert("RGB")).contiguous()  # the kernel transformers runs
        h, w = naflex_size(pixels.shape[-2], pixels.shape[-1], self.patch_size, self.max_num_patches)
        pixels = tvf2.resize(pixels, [h, w], interpolation=InterpolationMode.BILINEAR, antialias=True)
        pixels = (pixels.float() * (1 / 255) - self.mean) / self.std
        shape = torch.tensor([h // self.patch_size, w // self.patch_size])
        return {"patches": patchify(pixels, self.patch_size), "spatial_shape": shape}

    def batch(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """A padded batch of several images (transform + :func:`naflex_collate`)."""
        return naflex_collate([self(im) for im in images], self.max_num_patches)


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
