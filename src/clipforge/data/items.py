"""Where each image of a collection lives: a file, a member of a tar shard, or a parquet row.

``embed`` lists a collection once into :class:`Item` records (in a stable order, so a rerun
resumes shard by shard), and the search server later reads an indexed image back from the same
three fields it stored (:func:`read_item_bytes`); both go through the spec grammar of
:mod:`clipforge.data.sources` and the table reader of :mod:`clipforge.data.tables`.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clipforge.data.images import IMAGE_EXTENSIONS, iter_image_files
from clipforge.data.sources import expand_paths, source_kind, table_files
from clipforge.data.tables import TableOptions, read_table
from clipforge.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One source image: a file, a tar member (``tar_offset``/``tar_size``) or a parquet row."""

    path: str
    caption: str = ""
    tar_offset: int = -1
    tar_size: int = -1
    row: int = -1  # row of the parquet file ``path`` whose image column holds the bytes
    # The input this item was listed from (tar shard, table file, folder): distributed embedding
    # splits work at this granularity. Not part of equality: it says where, not what.
    source: str = field(default="", compare=False)

    def read_bytes(self) -> bytes:
        return read_item_bytes(self.path, self.tar_offset, self.tar_size, self.row)


_PARQUET_READERS: dict[tuple[str, str], object] = {}


def read_item_bytes(
    path: str, tar_offset: int = -1, tar_size: int = -1, row: int = -1, column: str = ""
) -> bytes:
    """The encoded image an :class:`Item` points at (file, tar member, or parquet row)."""
    if row >= 0:
        from clipforge.data.parquet import ParquetFileImages, image_bytes_column

        key = (path, column)
        reader = _PARQUET_READERS.get(key)
        if reader is None:
            reader = _PARQUET_READERS[key] = ParquetFileImages(path, column or image_bytes_column(path))
        data = reader.read(row)  # type: ignore[attr-defined]
        if not data:
            raise FileNotFoundError(f"{path}: row {row} has no image bytes")
        return data
    with open(path, "rb") as f:
        if tar_offset < 0:
            return f.read()
        f.seek(tar_offset)
        return f.read(tar_size)


def list_items(source: str | os.PathLike | Sequence[str], options: TableOptions | None = None) -> list[Item]:
    """Resolve a spec (folder, table(s), shards, image file, pattern) into an ordered item list.

    Each item's ``source`` names its input: the tar shard or table file it came from, or the
    folder / spec for image files, so consecutive items with one ``source`` form one input shard.
    """
    if isinstance(source, list | tuple):
        return [it for s in source for it in list_items(s, options)]
    spec = os.fspath(source)
    kind = source_kind(spec)
    if kind == "folder":
        path = Path(spec).expanduser()
        images = sorted(iter_image_files(path))  # globally sorted: ids follow path order
        if not images:
            raise DataError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        return [Item(str(p.resolve()), _sibling_caption(p), source=spec) for p in images]
    if kind == "image":
        return [
            Item(str(Path(p).resolve()), _sibling_caption(Path(p)), source=spec) for p in expand_paths(spec)
        ]
    if kind == "shards":
        from clipforge.data.shard_reader import expand_urls

        return [it for url in expand_urls(spec) for it in _tar_items(url)]
    if kind in ("table", "tables"):
        return [it for f in table_files(spec) for it in _table_items(f, options or TableOptions())]
    raise DataError(f"{spec}: a {kind} source has no image files to embed; give a folder, table or shards")


def _sibling_caption(image: Path) -> str:
    txt = image.with_suffix(".txt")
    if txt.is_file():
        return txt.read_text(encoding="utf-8", errors="replace").strip()
    return ""


def _tar_items(url: str) -> list[Item]:
    """A shard's samples via the one tar index (headers only); captions read from their offsets."""
    from clipforge.data.shard_reader import IMAGE_EXTS, ShardIndex

    index = ShardIndex.build(url)
    path = str(Path(url).resolve())
    items = []
    with open(url, "rb") as f:
        for _key, members in index.samples:
            image = next((members[e] for e in IMAGE_EXTS if e in members), None)
            if image is None:
                continue
            caption = ""
            text = members.get("txt") or members.get("caption")
            if text is not None:
                f.seek(text[0])
                caption = f.read(text[1]).decode("utf-8", errors="replace").strip()
            items.append(Item(path, caption, image[0], image[1], source=path))
    return items


def _table_items(path: Path, options: TableOptions) -> list[Item]:
    """Every usable row of a table; the first caption describes the image, none is fine.

    Rows refused by the table reader (no path, path outside a confined root, malformed) are
    logged with their counts by reason; the images themselves are checked when embedded.
    """
    skipped: Counter[str] = Counter()
    table = read_table(
        path,
        options,
        issue=lambda reason, *a, skip=True, **k: skip and skipped.update([reason]),
        captions=False,
    )
    if skipped:
        log.warning(
            "%s: %d row(s) not listed (%s)",
            path,
            sum(skipped.values()),
            ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())),
        )
    if not table.rows:
        raise DataError(
            f"{path}: no usable rows ({', '.join(f'{k}={v}' for k, v in sorted(skipped.items()))})"
        )
    first = [c[0] if c else "" for c in table.captions]
    name = str(path.resolve())
    if table.embedded is None:
        return [Item(p, c, source=name) for p, c in zip(table.images, first)]
    rows = table.embedded.file_row
    return [Item(name, c, row=rows[i], source=name) for i, c in enumerate(first)]
