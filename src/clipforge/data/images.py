"""Robust image decoding for scraped data.

Web-scale image-caption data is full of zero-byte files, half-downloaded JPEGs, HTML error
pages saved as ``.jpg``, CMYK scans, 16-bit PNGs and decompression bombs. A training run must
not die on any of them, and must not silently train on garbage either, so ``load_image``
either returns a clean RGB ``PIL.Image`` or raises :class:`BadImageError` carrying a short
*reason code* that datasets count with :class:`SkipCounter` and ``clipforge doctor`` reports.

Reason codes: ``missing`` (no such file), ``empty`` (zero bytes), ``truncated`` (a known
image signature but the data stops early), ``not_an_image`` (no decoder recognises it),
``too_large`` (declared size above ``max_pixels``: refused from the header, nothing
allocated), ``corrupt`` (recognised but undecodable), ``unreadable`` (OS error reading it).
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from clipforge.errors import DataError

logger = logging.getLogger(__name__)

# Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS): a 13,000 x 13,000 image is the most we
# accept by default; a 40,000 x 40,000 header (1.6 G pixels, ~4.8 GB as RGB) is refused.
DEFAULT_MAX_PIXELS = 178_956_970
# Images whose shorter side exceeds 2 * min_side are reduced by an integer factor while
# decoding (JPEG: DCT scaling, nothing full-size is ever allocated). 1024 keeps every crop size
# in use (224..448) well above the resize target, so normal photos are never touched.
DEFAULT_MIN_SIDE = 1024
# ... but only images above this many pixels are reduced: below it every image is decoded at
# full size, so preprocessing gives exactly the numbers open_clip / Hugging Face compute from
# the same file (a reduced image differs by up to ~0.06 in normalised units after resizing).
# 50 M pixels (48 MP phone photos, 8K frames) is ~200 MB as RGBA: safe per decoding worker.
DEFAULT_EXACT_PIXELS = 50_000_000
#: ``img.info`` key of a reduced image's full-size (height, width), EXIF orientation applied.
ORIGINAL_SIZE = "clipforge_original_size"

REASONS = (
    "missing",
    "empty",
    "truncated",
    "not_an_image",
    "too_large",
    "corrupt",
    "unreadable",
    # Not image-level, but counted by the same counter in datasets:
    "empty_caption",
    "path_escape",
    "malformed_row",
    "missing_caption",
    "missing_field",
    "other",
)

# File signatures: an unidentifiable file that starts like an image was cut short.
_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"RIFF",  # WebP (RIFF....WEBP)
    b"BM",
    b"II*\x00",  # TIFF
    b"MM\x00*",
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes]


class BadImageError(DataError):
    """An image that cannot be used; ``reason`` is one of :data:`REASONS`.

    Datasets catch it, count ``reason`` and move on: bad images are never fatal.
    """

    def __init__(self, reason: str, source: str, detail: str = "") -> None:
        self.reason = reason
        self.source = source
        self.detail = detail
        super().__init__(f"{source}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # keep the reason when the error crosses a worker process boundary
        return (type(self), (self.reason, self.source, self.detail))


def _describe(src: Any) -> str:
    if isinstance(src, str | os.PathLike):
        return os.fspath(src)
    if isinstance(src, bytes | bytearray | memoryview):
        return f"<{len(src)} bytes>"
    return getattr(src, "name", None) or f"<{type(src).__name__}>"


def _read_source(src: ImageSource) -> tuple[bytes, str]:
    """Return the raw bytes; paths are checked first so missing/empty files get their own code."""
    name = _describe(src)
    if isinstance(src, str | os.PathLike):
        path = Path(src)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BadImageError("missing", name, "no such file") from None
        except IsADirectoryError:
            raise BadImageError("missing", name, "is a directory") from None
        except OSError as e:
            raise BadImageError("unreadable", name, str(e)) from None
    elif isinstance(src, bytes | bytearray | memoryview):
        data = bytes(src)
    else:
        try:
            data = src.read()
        except OSError as e:
            raise BadImageError("unreadable", name, str(e)) from None
    if not data:
        raise BadImageError("empty", name, "zero bytes")
    return data, name


def _reduce_factor(size: tuple[int, int], min_side: int | None, exact_pixels: int | None = None) -> int:
    """The integer factor to shrink by while decoding (1 = decode at full size)."""
    if not min_side or (exact_pixels is not None and size[0] * size[1] <= exact_pixels):
        return 1
    factor = min(size) // min_side
    return factor if factor >= 2 else 1


def _reduce(img: Any, factor: int) -> Any:
    """``Image.reduce`` for every mode, keeping what the mode means.

    ``reduce`` (a box average) refuses P, 1 and I;16*. Palette images become RGBA (if they have
    transparency) or RGB, 1-bit ones L, and 16-bit ones are averaged as 32-bit ``I`` and stored
    back as 16-bit (so the transforms still scale them as 16-bit). Images with alpha are
    averaged premultiplied, as PIL's own resize does, so hidden colours do not bleed.
    """
    mode = img.mode
    if mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or img.has_transparency_data
        img = img.convert("RGBA" if has_alpha else "RGB")
    elif mode == "1":
        img = img.convert("L")
    elif mode.startswith("I;16"):
        return img.convert("I").reduce(factor).convert(mode)
    premultiplied = {"RGBA": "RGBa", "LA": "La"}.get(img.mode)
    if premultiplied is not None:
        return img.convert(premultiplied).reduce(factor).convert(img.mode)
    return img.reduce(factor)


def load_image(
    src: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_side: int | None = DEFAULT_MIN_SIDE,
    exact_pixels: int | None = DEFAULT_EXACT_PIXELS,
    keep_mode: bool = False,
) -> Any:
    """Decode ``src`` (path, bytes or binary file object) into an RGB ``PIL.Image``.

    * Refuses images whose *declared* size exceeds ``max_pixels`` straight from the header,
      before any pixel buffer exists (decompression bombs cost microseconds, not gigabytes).
      Pillow's own limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``) still applies on top.
    * Huge but legal images are reduced by an integer factor while decoding so the shorter side
      stays >= ``min_side`` (JPEG via DCT draft mode; other formats via ``Image.reduce``, for
      every mode). Only images above ``exact_pixels`` are reduced, so ordinary photos keep the
      exact numbers of other libraries; ``min_side=None`` disables it, ``exact_pixels=None``
      reduces whatever ``min_side`` allows.
    * Applies the EXIF orientation and keeps only the first frame of animations.
    * Converts every mode (CMYK, 16-bit, palette+transparency, grayscale, LA/RGBA) to correct
      RGB, unless ``keep_mode``: then the image keeps its mode (and palette transparency) so
      the model's transform converts it where its convention does (open_clip drops alpha after
      resizing, ``CLIPImageProcessor`` converts first). Datasets feeding a transform use it.

    Raises :class:`BadImageError` with a reason code; never any other exception for bad data.
    """
    data, name = _read_source(src)
    img = _open_checked(data, name, max_pixels)
    rgb = _decode(img, name, min_side, exact_pixels, keep_mode)
    if rgb is img and hasattr(img, "fp") and img.fp is not None:
        rgb = img.copy()  # detach from the file buffer
    return rgb


def original_size(img: Any) -> tuple[int, int]:
    """(width, height) of the image as decoded at full size: what ``img.info[ORIGINAL_SIZE]``
    says (set where the pixels were reduced: by :func:`load_image`, or a cached copy), else its
    own size.

    Why: a reduced decode is smaller than the file by an integer factor, but what is recorded
    (metadata) or sampled against (random crops) must be the image's own size; the decoder
    knows it without reading the header a second time.
    """
    height, width = img.info.get(ORIGINAL_SIZE, (img.size[1], img.size[0]))
    return int(width), int(height)


def _open_checked(data: bytes, name: str, max_pixels: int | None) -> Any:
    """``Image.open`` (the header only) with the declared size checked before any pixel exists."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImageError("too_large", name, str(e)) from None
    except UnidentifiedImageError:
        code = "truncated" if data.startswith(_MAGIC) else "not_an_image"
        raise BadImageError(code, name, "cannot identify image data") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImageError("truncated" if data.startswith(_MAGIC) else "corrupt", name, str(e)) from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise BadImageError("corrupt", name, f"declared size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise BadImageError("too_large", name, f"{width}x{height} exceeds max_pixels={max_pixels}")
    return img


def _decode(img: Any, name: str, min_side: int | None, exact_pixels: int | None, keep_mode: bool) -> Any:
    """Pixels of the first frame, reduced while decoding when huge, EXIF-oriented, RGB unless
    ``keep_mode``; every decoder failure becomes a :class:`BadImageError` with its reason."""
    from PIL import Image, ImageOps

    width, height = img.size
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        factor = _reduce_factor(img.size, min_side, exact_pixels)
        if factor > 1 and img.format == "JPEG":
            # draft() picks the largest DCT scale (1/2, 1/4, 1/8) that stays >= the request.
            img.draft(img.mode, (width // factor, height // factor))
            factor = _reduce_factor(img.size, min_side)
        img.load()
        if factor > 1:
            img = _reduce(img, factor)
        full = _oriented(img, width, height) if img.size != (width, height) else None
        # In place: without an orientation tag nothing moves (the copying form would copy the
        # whole decoded image, ~5% of a 4K photo's decode time, for nothing).
        ImageOps.exif_transpose(img, in_place=True)
        out = img if keep_mode else _to_rgb(img)
        if full is not None:
            out.info[ORIGINAL_SIZE] = full
        return out
    except Image.DecompressionBombError as e:
        raise BadImageError("too_large", name, str(e)) from None
    except (OSError, EOFError) as e:
        msg = str(e)
        code = "truncated" if ("truncat" in msg.lower() or isinstance(e, EOFError)) else "corrupt"
        raise BadImageError(code, name, msg) from None
    except (SyntaxError, ValueError, TypeError, IndexError, KeyError, MemoryError, DataError) as e:
        raise BadImageError("corrupt", name, f"{type(e).__name__}: {e}") from None


def _oriented(img: Any, width: int, height: int) -> tuple[int, int]:
    """(height, width) of a ``width`` x ``height`` file once its EXIF orientation is applied."""
    swap = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    return (width, height) if swap else (height, width)


def _to_rgb(img: Any) -> Any:
    """The shared mode converter (transforms owns the colour rules: alpha on white, 16-bit
    scaled, CMYK managed), imported lazily so this module stays free of torch."""
    from clipforge.transforms import to_rgb

    return to_rgb(img)


class SkipCounter:
    """Counts skipped items by reason, across threads and DataLoader worker processes.

    Counts live in a small shared-memory array, so a worker process that skips a corrupt image
    increments the number the main process logs (the array travels to workers when they are
    started). The first ``max_examples`` offending items per reason are remembered (in the
    process that saw them) for reports. Pickling outside process start-up snapshots the counts.
    """

    def __init__(self, name: str = "data", max_examples: int = 20, *, _counts: Any = None) -> None:
        self.name = name
        self.max_examples = max_examples
        self._counts = _counts if _counts is not None else multiprocessing.Array("q", len(REASONS))
        self._examples: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def add(self, reason: str, item: str = "", *, log: bool = True) -> None:
        """Record one skipped item; ``item`` says where (path, row, shard/key)."""
        idx = REASONS.index(reason) if reason in REASONS else REASONS.index("other")
        with self._counts.get_lock():
            self._counts[idx] += 1
            n = self._counts[idx]
        with self._lock:
            examples = self._examples.setdefault(reason, [])
            if len(examples) < self.max_examples:
                examples.append(item)
        if log:
            # The first few of each reason are worth a warning; the rest only at debug level.
            level = logging.WARNING if n <= 3 else logging.DEBUG
            logger.log(level, "%s: skipped %s (%s)%s", self.name, item, reason, " ..." if n == 3 else "")

    def counts(self) -> dict[str, int]:
        with self._counts.get_lock():
            return {r: int(c) for r, c in zip(REASONS, self._counts[:]) if c}

    @property
    def total(self) -> int:
        return sum(self.counts().values())

    def __getitem__(self, reason: str) -> int:
        return self.counts().get(reason, 0)

    def examples(self) -> dict[str, list[str]]:
        with self._lock:
            return {k: list(v) for k, v in self._examples.items()}

    def reset(self) -> None:
        with self._counts.get_lock():
            for i in range(len(REASONS)):
                self._counts[i] = 0
        with self._lock:
            self._examples.clear()

    def summary(self) -> str:
        counts = self.counts()
        if not counts:
            return f"{self.name}: nothing skipped"
        parts = ", ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        return f"{self.name}: skipped {sum(counts.values())} item(s): {parts}"

    def log_summary(self, log: logging.Logger | None = None) -> None:
        (log or logger).info(self.summary())

    def merge(self, counts: dict[str, int]) -> None:
        """Add counts gathered elsewhere (e.g. from other ranks)."""
        with self._counts.get_lock():
            for reason, n in counts.items():
                idx = REASONS.index(reason) if reason in REASONS else REASONS.index("other")
                self._counts[idx] += int(n)

    def __getstate__(self) -> dict[str, Any]:
        from multiprocessing import context

        state = {"name": self.name, "max_examples": self.max_examples, "examples": self.examples()}
        if context.get_spawning_popen() is not None:
            state["counts"] = self._counts  # process start-up: share the memory
        else:
            state["snapshot"] = [int(c) for c in self._counts[:]]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        counts = state.get("counts")
        if counts is None:
            counts = multiprocessing.Array("q", len(REASONS))
            for i, c in enumerate(state["snapshot"]):
                counts[i] = c
        self.__init__(state["name"], state["max_examples"], _counts=counts)
        self._examples = state["examples"]


def iter_image_files(root: str | os.PathLike, extensions: Iterable[str] | None = None) -> list[Path]:
    """All image files under ``root`` (recursive, sorted, hidden entries skipped)."""
    exts = {e.lower() for e in (extensions or IMAGE_EXTENSIONS)}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts:
                out.append(Path(dirpath) / f)
    return out
