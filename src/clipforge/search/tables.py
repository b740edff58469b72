"""Memory-mapped metadata tables for search indexes; the other table helpers are re-exported.

Why a format of its own: a search server needs the path/caption of a handful of rows per query,
and :class:`MappedTable` reads those cells from the page cache without parsing anything up front.
The parquet/CSV metadata tables, JSON and ``.npy`` helpers that ``clipforge embed`` shares with
training live in :mod:`clipforge.data.column_tables` (below both); their names stay importable
from here.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.atomic import atomic_write
from clipforge.data.column_tables import (
    INT_COLUMNS,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    clean_cell,
    find_table,
    iter_table_chunks,
    read_json,
    read_table,
    row_count,
    table_suffix,
    write_table,
)
from clipforge.errors import DataError

__all__ = [
    "INT_COLUMNS",
    "MAPPED_MAGIC",
    "MAPPED_SUFFIX",
    "MappedTable",
    "atomic_save_npy",
    "atomic_write_bytes",
    "atomic_write_json",
    "find_table",
    "iter_table_chunks",
    "open_metadata",
    "read_json",
    "read_table",
    "table_suffix",
    "write_mapped_table",
    "write_mapped_table_chunks",
    "write_table",
]

MAPPED_MAGIC = b"CFTABLE1"
MAPPED_SUFFIX = ".cftable"


def write_mapped_table(path: str | os.PathLike, columns: dict[str, Sequence[Any]]) -> Path:
    """Write ``columns`` as one file a reader can memory-map instead of parsing.

    Why: a search server needs the path/caption of a handful of rows per query, yet parsing a CSV
    of a million rows costs seconds and ~400 MB of Python objects per process. Layout (all
    little-endian, sections 8-byte aligned): ``CFTABLE1``, u64 header length, JSON header
    ``{"rows", "int_columns", "text_columns"}``; then int64 ``(n_int, rows)``; then int64 offsets
    ``(n_text, rows + 1)`` into a UTF-8 blob holding every text column back to back.
    """
    return write_mapped_table_chunks(path, list(columns), row_count(columns), [columns])


def write_mapped_table_chunks(
    path: str | os.PathLike, names: Sequence[str], rows: int, chunks: Iterable[Mapping[str, Sequence[Any]]]
) -> Path:
    """:func:`write_mapped_table` from consecutive row chunks: memory holds one chunk, not the table.

    Integer cells and text offsets are written in place (their positions follow from ``rows``);
    each text column's bytes go to a temporary file, appended in column order at the end.
    """
    path = Path(path)
    ints = [k for k in names if k in INT_COLUMNS]
    texts = [k for k in names if k not in INT_COLUMNS]
    header = json.dumps({"rows": rows, "int_columns": ints, "text_columns": texts}).encode()
    header += b" " * (-(len(MAPPED_MAGIC) + 8 + len(header)) % 8)
    int_start = len(MAPPED_MAGIC) + 8 + len(header)
    off_start = int_start + 8 * len(ints) * rows
    blobs = [tempfile.TemporaryFile(dir=path.parent) for _ in texts]
    sizes = [0] * len(texts)
    with atomic_write(path, "w+b") as f:  # read back once to shift the text offsets
        f.write(MAPPED_MAGIC + len(header).to_bytes(8, "little") + header)
        f.truncate(off_start + 8 * len(texts) * (rows + 1))
        done = 0
        for chunk in chunks:
            n = row_count({k: chunk[k] for k in names})
            if done + n > rows:
                raise ValueError(f"chunks hold more than the {rows} rows announced")
            for c, k in enumerate(ints):
                f.seek(int_start + 8 * (c * rows + done))
                f.write(np.asarray([int(v) for v in chunk[k]], dtype="<i8").tobytes())
            for c, k in enumerate(texts):
                encoded = [clean_cell(v).encode("utf-8", "surrogatepass") for v in chunk[k]]
                ends = sizes[c] + np.cumsum([len(b) for b in encoded], dtype=np.int64)
                f.seek(off_start + 8 * (c * (rows + 1) + done + 1))
                f.write(ends.astype("<i8").tobytes())
                blobs[c].write(b"".join(encoded))
                sizes[c] = int(ends[-1]) if len(ends) else sizes[c]
            done += n
        if done != rows:
            raise ValueError(f"chunks hold {done} rows, {rows} announced")
        _shift_offsets(f, off_start, rows, sizes)
        f.seek(0, os.SEEK_END)
        for blob in blobs:
            blob.seek(0)
            while block := blob.read(1 << 24):
                f.write(block)
            blob.close()
    return path


def _shift_offsets(f: Any, off_start: int, rows: int, sizes: Sequence[int]) -> None:
    """Text columns were written with offsets from their own start; make them global (column
    ``c`` starts where column ``c - 1`` ends), a chunk at a time."""
    base = 0
    for c, size in enumerate(sizes):
        col = off_start + 8 * c * (rows + 1)
        for b in range(0, rows + 1, 1 << 20):
            n = min(1 << 20, rows + 1 - b)
            f.seek(col + 8 * b)
            vals = np.frombuffer(f.read(8 * n), dtype="<i8") + base
            f.seek(col + 8 * b)
            f.write(vals.astype("<i8").tobytes())
        base += size


class _IntColumn(Sequence):
    def __init__(self, values: np.ndarray):
        self._v = values

    def __len__(self) -> int:
        return int(self._v.shape[0])

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [int(v) for v in self._v[i]]
        return int(self._v[i])


class _TextColumn(Sequence):
    def __init__(self, offsets: np.ndarray, blob: Any):
        self._off, self._blob = offsets, blob

    def __len__(self) -> int:
        return int(self._off.shape[0]) - 1

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range [0, {n})")
        i %= n
        a, b = int(self._off[i]), int(self._off[i + 1])
        return bytes(self._blob[a:b]).decode("utf-8", "surrogatepass")


class MappedTable(Mapping):
    """Read-only view of a :func:`write_mapped_table` file: ``table["path"][i]`` reads one cell
    from the page cache; nothing is parsed up front and resident memory stays near zero."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(len(MAPPED_MAGIC) + 8)
                if len(head) < 16 or head[:8] != MAPPED_MAGIC:
                    raise DataError(f"{self.path}: not a clipforge mapped table (bad magic)")
                hlen = int.from_bytes(head[8:], "little")
                meta = json.loads(f.read(hlen))
            n, ints, texts = int(meta["rows"]), list(meta["int_columns"]), list(meta["text_columns"])
        except FileNotFoundError as e:
            raise DataError(f"{self.path}: metadata table not found") from e
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{self.path}: corrupt mapped table header ({e})") from e
        start = 16 + hlen
        off_start = start + 8 * len(ints) * n
        blob_start = off_start + 8 * len(texts) * (n + 1)
        if blob_start > size:
            raise DataError(f"{self.path}: truncated ({size} bytes, header promises more)")

        def mapped(dtype: str, offset: int, shape: tuple[int, ...]) -> np.ndarray:
            if int(np.prod(shape)) == 0:
                return np.zeros(shape, dtype)
            return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape)

        int_arr = mapped("<i8", start, (len(ints), n))
        offsets = mapped("<i8", off_start, (len(texts), n + 1))
        blob_len = int(offsets[-1, -1]) if texts else 0
        if blob_start + blob_len > size:
            raise DataError(f"{self.path}: truncated text section")
        blob = mapped("u1", blob_start, (blob_len,))
        self.rows = n
        self._columns: dict[str, Sequence] = {}
        for name in meta["int_columns"]:
            self._columns[name] = _IntColumn(int_arr[ints.index(name)])
        for name in meta["text_columns"]:
            self._columns[name] = _TextColumn(offsets[texts.index(name)], blob)

    def __getitem__(self, name: str) -> Sequence:
        return self._columns[name]

    def __iter__(self):
        return iter(self._columns)

    def __len__(self) -> int:
        return len(self._columns)

    def to_columns(self) -> dict[str, list[Any]]:
        """Plain lists (what :func:`read_table` returns), e.g. to append rows and rewrite."""
        return {k: list(col) for k, col in self._columns.items()}


def open_metadata(path: str | os.PathLike) -> Mapping[str, Sequence[Any]]:
    """An index's metadata: memory-mapped when written by this version, parsed CSV/parquet before."""
    path = Path(path)
    return MappedTable(path) if path.suffix == MAPPED_SUFFIX else read_table(path)
