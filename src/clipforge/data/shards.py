"""Writing webdataset tar shards (with ``webdataset.TarWriter``) plus their ``manifest.json``.

Shard layout: ``<key>.jpg|png|webp`` + ``<key>.txt`` + ``<key>.json`` (all captions and the
source row), in shards of equal size so the resumable reader (:mod:`clipforge.data.shard_reader`)
can deal whole shards to its slots. ``manifest.json`` holds per-shard sample counts so readers
need not index every tar up front. Every shard and the manifest are written through
:mod:`clipforge.atomic`: a crash never leaves a half shard under its real name.

The reader's names (``ShardDataset``, ``expand_urls``, ``ShardIndex`` ...) are re-exported here,
so ``clipforge.data.shards`` stays the one public module for shards.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipforge.atomic import atomic_path, atomic_write_text
from clipforge.data.images import BadImageError, SkipCounter, load_image
from clipforge.data.shard_reader import (
    IMAGE_EXTS,
    MANIFEST,
    ShardDataset,
    ShardIndex,
    batches_per_worker,
    expand_urls,
    read_manifest_counts,
)
from clipforge.errors import DataError

__all__ = [
    "IMAGE_EXTS",
    "MANIFEST",
    "ShardDataset",
    "ShardIndex",
    "ShardWriteResult",
    "batches_per_worker",
    "expand_urls",
    "read_manifest_counts",
    "write_shards",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
@dataclass
class ShardWriteResult:
    paths: list[str]
    counts: list[int]
    skipped: dict[str, int]
    pattern: str

    @property
    def total(self) -> int:
        return sum(self.counts)


def _encode(image: Any, fmt: str) -> tuple[bytes, str]:
    b = io.BytesIO()
    if fmt == "jpg":
        image.save(b, "JPEG", quality=95)
    elif fmt == "webp":
        image.save(b, "WEBP", quality=95)
    else:
        image.save(b, "PNG")
    return b.getvalue(), fmt


def _sample_image_bytes(ds: Any, i: int, image_format: str) -> tuple[bytes, str]:
    """Original file bytes when the format is one we store ("keep"), else re-encoded pixels."""
    from PIL import Image

    if not hasattr(ds, "image_bytes"):  # generated data (synthetic): encode the drawn image
        return _encode(ds.get_image(i), "png" if image_format == "keep" else image_format)
    raw = ds.image_bytes(i)
    image = load_image(raw, max_pixels=ds.max_pixels, min_side=None)  # validates
    if image_format == "keep":
        fmt = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(Image.open(io.BytesIO(raw)).format or "")
        if fmt is not None:
            return raw, fmt
        return _encode(image, "jpg")
    return _encode(image, image_format)


def write_shards(
    source: Any,
    out_dir: str | os.PathLike,
    *,
    max_count: int = 10_000,
    max_size: int = 1 << 30,
    prefix: str = "shard",
    image_format: str = "keep",
    progress: bool = False,
    **dataset_kw: Any,
) -> ShardWriteResult:
    """Write ``source`` (a pairs dataset, or anything :func:`build_dataset` accepts) to
    ``out_dir/<prefix>-000000.tar ...`` plus ``manifest.json``.

    A shard closes at ``max_count`` samples or ``max_size`` bytes. ``image_format="keep"``
    stores JPEG/PNG/WebP files byte-for-byte (other formats become JPEG); "jpg"/"png"/"webp"
    re-encode. Bad images are skipped and counted, never written. Each shard is written to a
    temporary name and renamed when complete, so a crash never leaves a half shard behind.
    """
    if image_format not in ("keep", "jpg", "png", "webp"):
        raise DataError(f"image_format must be keep, jpg, png or webp; got {image_format!r}")
    if max_count < 1:
        raise DataError(f"max_count must be >= 1, got {max_count}")
    if isinstance(source, str | os.PathLike):
        from clipforge.data.build import build_dataset

        source = build_dataset(os.fspath(source), **dataset_kw)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skipped = SkipCounter(f"shards {out}")
    samples = _encoded_samples(source, image_format, skipped, progress)
    paths, counts = _write_tars(samples, out, prefix, max_count, max_size)
    for reason, n in getattr(source, "stats", {}).items():
        if reason in _ROW_REASONS:
            skipped.merge({reason: n})
    pattern = f"{prefix}-{{{0:06d}..{max(len(paths) - 1, 0):06d}}}.tar"
    manifest = {
        "format": "clipforge-shards",
        "version": 1,
        "source": getattr(source, "source", str(source)),
        "pattern": pattern,
        "total": sum(counts),
        "shards": [{"name": os.path.basename(p), "count": c} for p, c in zip(paths, counts)],
        "skipped": skipped.counts(),
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    logger.info(
        "wrote %d sample(s) in %d shard(s) to %s; %s", sum(counts), len(paths), out, skipped.summary()
    )
    return ShardWriteResult(paths, counts, skipped.counts(), str(out / pattern))


#: Row problems a table dataset counts itself (``stats``); the manifest reports them with ours.
_ROW_REASONS = ("empty_caption", "path_escape", "missing_field", "missing_caption", "malformed_row")


def _encoded_samples(
    source: Any, image_format: str, skipped: SkipCounter, progress: bool
) -> Iterator[tuple[dict[str, Any], int]]:
    """(webdataset sample, approximate bytes in the tar) per usable item, bad images counted."""
    indices: Any = range(len(source))
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="shards", unit="img")
    for i in indices:
        try:
            data, ext = _sample_image_bytes(source, i, image_format)
        except BadImageError as e:
            skipped.add(e.reason, f"{_where(source, i)}: {e}")
            continue
        captions = list(source.all_captions[i])
        meta = {"captions": captions, "source": _where(source, i)}
        sample = {"__key__": f"{i:09d}", ext: data, "txt": captions[0], "json": json.dumps(meta).encode()}
        yield sample, len(data) + 1536  # tar headers and the text members


def _write_tars(
    samples: Iterator[tuple[dict[str, Any], int]], out: Path, prefix: str, max_count: int, max_size: int
) -> tuple[list[str], list[int]]:
    """Fill ``<prefix>-NNNNNN.tar`` files in turn; each is atomic (:func:`clipforge.atomic.atomic_path`),
    so an error mid-shard leaves only the shards already complete. Returns (paths, counts)."""
    from webdataset import TarWriter

    paths: list[str] = []
    counts: list[int] = []
    pending = next(samples, None)
    while pending is not None:
        final = out / f"{prefix}-{len(paths):06d}.tar"
        count = size = 0
        with atomic_path(final) as tmp:
            writer = TarWriter(str(tmp))
            try:
                while pending is not None and count < max_count and size < max_size:
                    writer.write(pending[0])
                    count, size = count + 1, size + pending[1]
                    pending = next(samples, None)
            finally:
                writer.close()
        paths.append(str(final))
        counts.append(count)
    return paths, counts


def _where(ds: Any, i: int) -> str:
    rows = getattr(ds, "rows", None)
    return rows[i] if rows is not None else f"{getattr(ds, 'source', 'item')}#{i}"
