"""A decoded-and-resized image cache for training: decode every image once, not once per epoch.

On real collections (large PNGs, RGBA clip-art, multi-megapixel JPEGs) decoding and resizing the
same files again every epoch is most of a small model's step time. The cache stores every
training image once, as uint8 pixels in one memory-mapped file, already converted the way the
model's preprocessing convention converts it and reduced to a short side of ``side`` pixels
(never enlarged). Training then draws its random augmentation from the cached copy.

Layout of a cache folder (written into a temporary folder, then renamed: a crash never leaves a
half-written cache behind, and a reader never sees one)::

    pixels.u8       every image's H x W x C bytes, back to back (C = 3, or 4 with alpha kept)
    index.npy       int64 [N, 6]: offset, height, width, channels, original height, original width
                    (channels 0: the image was bad; the reason is in manifest.json)
    manifest.json   format version, fingerprint of the data and of the conversion, bad reasons

**What changes relative to decoding each time** (the uncached path is untouched):

1. The crop window of ``RandomResizedCrop`` is the same: its parameters are drawn from the same
   per-sample seeded RNG, with the same draws, against the *original* image size; the window is
   then mapped onto the cached copy with fractional coordinates (PIL ``resize(box=...)``). What
   differs is only the pixels resampled: they come from the cached copy (short side ``side``,
   by default ``ceil(size / sqrt(min_scale * min_ratio))``, so a crop is still reduced, never
   enlarged, to the model size) instead of from the full-size original. An image already no
   larger than ``side`` is stored as it is and cropped exactly as torchvision crops it (PIL
   ``crop`` of the window, then ``resize``), so its items are bit-identical to uncached ones
   (except a palette image under "open_clip", point 3).
2. Images much larger than the cache are decoded reduced (JPEG DCT scaling via ``draft``,
   ``Image.reduce`` for every other format and mode, :func:`clipforge.data.images.load_image`)
   to no less than twice ``side`` before the resize, instead of at full size.
3. The RGB conversion happens before the resize for every convention. For "clipforge" and "hf"
   that is where it already happens. For "open_clip" (which converts after the crop) images with
   transparency are cached as RGBA and converted after the crop as before; other modes (palette
   without transparency, 16-bit, CMYK) are converted first, so palette images are filtered
   bicubically instead of with PIL's nearest-neighbour resize of palette images.
4. Bad images are found once, while the cache is built; items that use them are replaced or
   dropped exactly as without the cache (same rules, same seeded substitutes).

Everything after the crop (flip, colour jitter, grayscale, RGB conversion for "open_clip",
normalisation) runs unchanged; caption sampling and data order are untouched, so exact resume
still holds. ``tests/test_image_cache.py`` checks cached items against this description
value for value and measures how far they are from uncached items.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.atomic import atomic_dir
from clipforge.data.images import ORIGINAL_SIZE, BadImageError, load_image, original_size
from clipforge.errors import DataError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageCacheError(DataError):
    """An image cache cannot be built or used (wrong data, wrong transform, damaged files)."""


def default_side(image_size: int, scale: tuple[float, float], ratio: tuple[float, float]) -> int:
    """Short side that keeps every random crop at or above the model size (capped at 2x).

    Why: the smallest crop side relative to the image is about ``sqrt(min_scale * min_ratio)``;
    caching at ``size`` divided by it means the crop is reduced to the model size as it is
    without the cache, instead of being enlarged from fewer pixels.
    """
    shrink = math.sqrt(max(1e-6, scale[0]) * min(ratio[0], 1.0 / ratio[1], 1.0))
    return int(math.ceil(image_size * min(2.0, 1.0 / shrink)))


class CacheSpec:
    """How images become cached pixels: where the RGB conversion happens and the stored size."""

    def __init__(self, side: int, interpolation: str, convert: Callable[[Any], Any] | None, keep_alpha: bool):
        self.side, self.interpolation, self.convert, self.keep_alpha = (
            side,
            interpolation,
            convert,
            keep_alpha,
        )

    def key(self) -> dict[str, Any]:
        return {
            "side": self.side,
            "interpolation": self.interpolation,
            "convert": repr(self.convert),
            "keep_alpha": self.keep_alpha,
        }

    def to_pixels(self, img: Any) -> np.ndarray:
        """A decoded image (its own mode) -> cached uint8 H x W x C (converted, reduced)."""
        from clipforge.transforms import _PIL_RESAMPLE, INTERPOLATIONS, _palette_has_transparency

        if self.keep_alpha and (
            img.mode in _ALPHA_MODES or (img.mode == "P" and _palette_has_transparency(img))
        ):
            img = img.convert("RGBA")
        elif self.convert is not None:
            img = self.convert(img)
        else:
            from clipforge.transforms import to_rgb

            img = to_rgb(img)
        w, h = img.size
        if min(w, h) > self.side:
            nw, nh = (
                (self.side, max(1, round(h * self.side / w)))
                if w <= h
                else (max(1, round(w * self.side / h)), self.side)
            )
            img = img.resize((nw, nh), _PIL_RESAMPLE[INTERPOLATIONS[self.interpolation]])
        if img.mode not in ("RGB", "RGBA"):
            img = img.convert("RGB")
        return np.asarray(img, dtype=np.uint8).reshape(img.size[1], img.size[0], -1)


def _fingerprint(dataset: Any, spec: CacheSpec) -> str:
    """Hash of the item list (paths, sizes, modification times) and of the conversion.

    Why: a cache built from other files, or for another convention or size, must not be used.
    """
    h = hashlib.sha256(json.dumps({"v": FORMAT_VERSION, **spec.key()}, sort_keys=True).encode())
    h.update(str(getattr(dataset, "source", "")).encode())
    for p in dataset.image_paths:
        h.update(p.encode())
        try:
            st = os.stat(p)
            h.update(f":{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            h.update(b":-")
    return h.hexdigest()


def _decode_one(dataset: Any, spec: CacheSpec, i: int) -> tuple[np.ndarray | None, tuple[int, int], str]:
    """Decode item ``i`` reduced (see the module doc, point 2) and convert it: (pixels, original (h, w), bad reason)."""
    try:
        data = dataset.image_bytes(i)
        img = load_image(
            data, max_pixels=dataset.max_pixels, min_side=2 * spec.side, exact_pixels=None, keep_mode=True
        )
        width, height = original_size(img)  # the crop is drawn against the uncached path's size
        full = (height, width)
        return spec.to_pixels(img), full, ""
    except BadImageError as e:
        return None, (0, 0), f"{e.reason}\t{dataset.image_paths[i]}\t{e.detail}"  # bytes carry no name


_WORKER: dict[str, Any] = {}


def _init_worker(dataset: Any, spec: CacheSpec) -> None:
    _WORKER["dataset"], _WORKER["spec"] = dataset, spec


def _worker_decode(i: int) -> tuple[int, np.ndarray | None, tuple[int, int], str]:
    return (i, *_decode_one(_WORKER["dataset"], _WORKER["spec"], i))


def _decoded(
    dataset: Any, spec: CacheSpec, workers: int
) -> Iterator[tuple[int, np.ndarray | None, tuple[int, int], str]]:
    """Every item decoded, in index order, in ``workers`` processes (0: this one)."""
    n = len(dataset)
    if workers <= 0:
        for i in range(n):
            yield (i, *_decode_one(dataset, spec, i))
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(dataset, spec)) as pool:
        # Small chunks: a few huge images next to each other must not all land on one worker.
        yield from pool.imap(_worker_decode, range(n), chunksize=2)


def build_cache(dataset: Any, folder: str | os.PathLike, spec: CacheSpec, *, workers: int = 0) -> Path:
    """Decode every image of ``dataset`` once into a cache folder (atomically); returns it.

    ``dataset`` is a table or folder dataset (:class:`clipforge.data.pairs.PairsDataset`,
    ``FolderPairsDataset``). An existing cache with the same fingerprint is kept as it is.
    """
    folder = Path(folder)
    _check_dataset(dataset)
    fingerprint = _fingerprint(dataset, spec)
    if _manifest(folder).get("fingerprint") == fingerprint:
        return folder
    with atomic_dir(folder) as tmp:
        index = np.zeros((len(dataset), 6), dtype=np.int64)
        bad: dict[str, str] = {}
        offset = 0
        with open(tmp / "pixels.u8", "wb") as f:
            for i, pixels, (oh, ow), reason in _decoded(dataset, spec, workers):
                if pixels is None:
                    bad[str(i)] = reason
                    continue
                f.write(pixels.tobytes())
                index[i] = (offset, pixels.shape[0], pixels.shape[1], pixels.shape[2], oh, ow)
                offset += pixels.size
            f.flush()
            os.fsync(f.fileno())
        np.save(tmp / "index.npy", index)
        manifest = {
            "version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "items": len(dataset),
            "bytes": offset,
            "bad": bad,
            **spec.key(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    logger.info(
        "image cache %s: %d images, %.1f MiB, %d bad",
        folder,
        len(dataset) - len(bad),
        offset / 2**20,
        len(bad),
    )
    return folder


def _manifest(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def _check_dataset(dataset: Any) -> None:
    if not (
        hasattr(dataset, "image_bytes") and hasattr(dataset, "image_paths") and hasattr(dataset, "fetch")
    ):
        raise ImageCacheError(
            f"the image cache needs a table or image-folder dataset, not {type(dataset).__name__} "
            "(webdataset shards and synthetic data are read as streams: cache them by writing a table)"
        )


class ImageCache:
    """Read side of a cache folder: item ``i`` as a PIL image of the cached pixels.

    The pixel file is memory-mapped lazily in each process (DataLoader workers re-open it after
    unpickling), so N workers share one copy in the page cache instead of N decoded copies.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.manifest = _manifest(self.folder)
        if self.manifest.get("version") != FORMAT_VERSION:
            raise ImageCacheError(
                f"{self.folder}: not an image cache of format {FORMAT_VERSION} (build it with `clipforge cache`)"
            )
        try:
            self.index = np.load(self.folder / "index.npy")
        except (OSError, ValueError) as e:
            raise ImageCacheError(f"{self.folder}/index.npy: {e}") from None
        if len(self.index) != self.manifest["items"]:
            raise ImageCacheError(
                f"{self.folder}: index has {len(self.index)} rows, manifest says {self.manifest['items']}"
            )
        self._pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pixels": None}

    def _map(self) -> np.ndarray:
        if self._pixels is None:
            size = int(self.manifest["bytes"])
            path = self.folder / "pixels.u8"
            if path.stat().st_size != size:
                raise ImageCacheError(
                    f"{path}: {path.stat().st_size} bytes, manifest says {size} (damaged cache: rebuild it)"
                )
            self._pixels = (
                np.memmap(path, dtype=np.uint8, mode="r", shape=(max(size, 1),))
                if size
                else np.zeros(1, np.uint8)
            )
        return self._pixels

    def pixels(self, i: int) -> np.ndarray:
        """Item ``i``'s cached H x W x C array (a view of the memory map); BadImageError if bad."""
        offset, h, w, c, _, _ = (int(v) for v in self.index[i])
        if c == 0:
            reason, source, detail = (self.manifest["bad"].get(str(i), "corrupt") + "\t\t").split("\t")[:3]
            raise BadImageError(
                reason, source or f"cached item {i}", f"{detail}; found while building the image cache"
            )
        return self._map()[offset : offset + h * w * c].reshape(h, w, c)

    def get(self, i: int) -> Any:
        """Item ``i`` as a PIL image carrying its original (height, width) in ``info``."""
        from PIL import Image

        arr = self.pixels(i)
        img = Image.fromarray(np.array(arr), "RGBA" if arr.shape[2] == 4 else "RGB")
        img.info[ORIGINAL_SIZE] = (int(self.index[i, 4]), int(self.index[i, 5]))
        return img


class CachedRandomResizedCrop:
    """``RandomResizedCrop`` on a cached copy: same RNG draws and window as on the original.

    Why: the window is sampled against the original size (``info[ORIGINAL_SIZE]``)
    exactly as torchvision samples it, so the augmentation stream is that of the uncached run.
    A reduced copy is resampled from the window mapped to its coordinates in one PIL
    ``resize(box=...)``; an unreduced one is cropped and resized as torchvision does (a box
    resize reads pixels outside the window for the filter's support, a crop does not).
    """

    def __init__(self, crop: Any) -> None:
        self.crop = crop

    def __call__(self, img: Any) -> Any:
        import torch
        import torchvision.transforms as T

        from clipforge.transforms import _PIL_RESAMPLE

        ow, oh = original_size(img)
        probe = torch.empty((1, 1, 1)).expand(3, oh, ow)  # only its shape is read
        top, left, h, w = T.RandomResizedCrop.get_params(probe, self.crop.scale, self.crop.ratio)
        th, tw = (
            (self.crop.size, self.crop.size) if isinstance(self.crop.size, int) else tuple(self.crop.size)
        )
        resample = _PIL_RESAMPLE[self.crop.interpolation]
        if img.size == (ow, oh):  # stored unreduced: torchvision's own crop, then resize
            return img.crop((left, top, left + w, top + h)).resize((tw, th), resample)
        sx, sy = img.size[0] / ow, img.size[1] / oh
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        return img.resize((tw, th), resample, box=box)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.crop!r})"


def spec_for_transform(transform: Any, side: int | None = None) -> tuple[CacheSpec, Any]:
    """(how to cache, the transform to apply to cached images) for a clipforge train transform.

    The train transform is ``[RGB conversion?, RandomResizedCrop, ...]``; the conversion before
    the crop moves into the cache, the crop becomes :class:`CachedRandomResizedCrop`, the rest
    is kept (see the module doc).
    """
    import torchvision.transforms as T

    from clipforge.conventions import PilConvertRGB

    steps = list(getattr(transform, "transforms", []))
    crops = [i for i, s in enumerate(steps) if isinstance(s, T.RandomResizedCrop)]
    if not crops:
        raise ImageCacheError(
            f"--cache-images needs clipforge's train transform (RandomResizedCrop first), got {transform!r}"
        )
    at = crops[0]
    crop = steps[at]
    before, after = steps[:at], steps[at + 1 :]
    if len(before) > 1:
        raise ImageCacheError(f"cannot cache before {before!r}: only one RGB conversion may precede the crop")
    size = crop.size if isinstance(crop.size, int) else max(crop.size)
    interpolation = crop.interpolation.value
    open_clip_style = not before and after and isinstance(after[0], PilConvertRGB | _to_rgb_type())
    convert = before[0] if before else (after[0] if open_clip_style else None)
    spec = CacheSpec(
        side or default_side(size, crop.scale, crop.ratio), interpolation, convert, bool(open_clip_style)
    )
    return spec, T.Compose([CachedRandomResizedCrop(crop), *after])


def _to_rgb_type() -> type:
    from clipforge.transforms import ToRGB

    return ToRGB


def attach_cache(
    dataset: Any, folder: str | os.PathLike, *, side: int | None = None, workers: int = 0
) -> Any:
    """Build (if missing or stale) and use an image cache for ``dataset``; returns the dataset.

    The dataset keeps its items, captions, sampling and bad-image rules; only where the decoded
    image comes from and the transform that follows change (see the module doc).
    """
    _check_dataset(dataset)
    spec, transform = spec_for_transform(dataset.transform, side)
    cache = ImageCache(build_cache(dataset, folder, spec, workers=workers))
    if len(cache) != len(dataset):
        raise ImageCacheError(f"{folder}: {len(cache)} cached images for {len(dataset)} items")
    dataset.use_image_cache(cache, transform)
    return dataset


def maybe_cache_images(cfg: Any, info: Any, dataset: Any) -> Any:
    """``--cache-images``: build the cache on rank 0 (others wait) and attach it on every rank.

    ``cfg`` needs ``cache_images``, ``cache_dir``, ``output_dir``; ``info`` ``rank``,
    ``world_size`` (a :class:`clipforge.train.config.TrainConfig` and ``DistInfo``).
    """
    if not getattr(cfg, "cache_images", False):
        return dataset
    from clipforge.data.workers import available_cores

    folder = Path(cfg.cache_dir or Path(cfg.output_dir) / "image_cache")
    builders = min(8, available_cores()) if info.rank == 0 else 0  # training waits: every core decodes
    if info.rank == 0:
        _check_dataset(dataset)
        spec, _ = spec_for_transform(dataset.transform)
        build_cache(dataset, folder, spec, workers=builders)
    if info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    return attach_cache(dataset, folder)
