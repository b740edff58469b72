"""Small file helpers shared by embed / index / searcher: atomic writes and metadata tables.

Why a module of its own: every artefact of the search pipeline (embedding shards, metadata,
faiss index, manifests) must be written so that a crash leaves either the old file or the new one,
never half of one, and the metadata table has one reader/writer pair so parquet vs CSV is decided
in exactly one place (parquet when pyarrow is installed, CSV otherwise).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.errors import DataError

#: Columns stored as integers; everything else in a metadata table is text.
INT_COLUMNS = frozenset({"id", "width", "height", "tar_offset", "tar_size", "row", "source_index"})


def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Any:
    """The shared atomic writer (temp file beside ``path``, fsync, ``os.replace``)."""
    from clipforge.atomic import atomic_write

    return atomic_write(path, mode)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def _has_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def table_suffix() -> str:
    return ".parquet" if _has_pyarrow() else ".csv"


def _clean_text(value: Any) -> str:
    # NUL bytes cannot round-trip through CSV; they carry no meaning in a caption anyway.
    return "" if value is None else str(value).replace("\x00", "")


def _row_count(columns: dict[str, Sequence[Any]]) -> int:
    """The shared length of ``columns``; unequal lengths are a caller bug, said plainly."""
    lengths = {name: len(values) for name, values in columns.items()}
    n = next(iter(lengths.values()), 0)
    for name, length in lengths.items():
        if length != n:
            raise ValueError(f"column {name!r} has {length} rows, expected {n}")
    return n


def write_table(path: str | os.PathLike, columns: dict[str, Sequence[Any]]) -> Path:
    """Write ``columns`` (equal-length lists) atomically; the suffix of ``path`` picks the format."""
    path = Path(path)
    names = list(columns)
    _row_count(columns)  # validates
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = {
            k: [int(v) for v in col] if k in INT_COLUMNS else [_clean_text(v) for v in col]
            for k, col in columns.items()
        }
        buf = io.BytesIO()
        pq.write_table(pa.table(data), buf)
        atomic_write_bytes(path, buf.getvalue())
        return path
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(names)
    for row in zip(*(columns[k] for k in names)):
        writer.writerow([int(v) if k in INT_COLUMNS else _clean_text(v) for k, v in zip(names, row)])
    atomic_write_bytes(path, buf.getvalue().encode("utf-8", errors="surrogatepass"))
    return path


def read_table(path: str | os.PathLike) -> dict[str, list[Any]]:
    """Read a table written by :func:`write_table` into column lists (ints restored)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: metadata table not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return {k: list(v) for k, v in pq.read_table(path).to_pydict().items()}
    csv.field_size_limit(1 << 24)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            names = next(reader)
        except StopIteration as e:
            raise DataError(f"{path}: empty metadata table (no header)") from e
        cols: dict[str, list[Any]] = {k: [] for k in names}
        for lineno, row in enumerate(reader, start=2):
            if len(row) != len(names):
                raise DataError(f"{path}:{lineno}: expected {len(names)} fields, got {len(row)}")
            for k, v in zip(names, row):
                cols[k].append(int(v) if k in INT_COLUMNS else v)
    return cols


def find_table(directory: Path, stem: str) -> Path:
    """The ``stem.parquet`` or ``stem.csv`` in ``directory`` (whichever exists)."""
    for suffix in (".parquet", ".csv"):
        p = directory / f"{stem}{suffix}"
        if p.is_file():
            return p
    raise DataError(f"{directory}: no {stem}.parquet or {stem}.csv found")


# --------------------------------------------------------------------------- memory-mapped table
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
    return write_mapped_table_chunks(path, list(columns), _row_count(columns), [columns])


def write_mapped_table_chunks(
    path: str | os.PathLike, names: Sequence[str], rows: int, chunks: Iterable[Mapping[str, Sequence[Any]]]
) -> Path:
    """:func:`write_mapped_table` from consecutive row chunks: memory holds one chunk, not the table.

    Integer cells and text offsets are written in place (their positions follow from ``rows``);
    each text column's bytes go to a temporary file, appended in column order at the end.
    """
    import tempfile

    path = Path(path)
    ints = [k for k in names if k in INT_COLUMNS]
    texts = [k for k in names if k not in INT_COLUMNS]
    header = json.dumps({"rows": rows, "int_columns": ints, "text_columns": texts}).encode()
    header += b" " * (-(len(MAPPED_MAGIC) + 8 + len(header)) % 8)
    int_start = len(MAPPED_MAGIC) + 8 + len(header)
    off_start = int_start + 8 * len(ints) * rows
    blobs = [tempfile.TemporaryFile(dir=path.parent) for _ in texts]
    sizes = [0] * len(texts)
    with atomic_open(path, "w+b") as f:  # read back once to shift the text offsets
        f.write(MAPPED_MAGIC + len(header).to_bytes(8, "little") + header)
        f.truncate(off_start + 8 * len(texts) * (rows + 1))
        done = 0
        for chunk in chunks:
            n = _row_count({k: chunk[k] for k in names})
            if done + n > rows:
                raise ValueError(f"chunks hold more than the {rows} rows announced")
            for c, k in enumerate(ints):
                f.seek(int_start + 8 * (c * rows + done))
                f.write(np.asarray([int(v) for v in chunk[k]], dtype="<i8").tobytes())
            for c, k in enumerate(texts):
                encoded = [_clean_text(v).encode("utf-8", "surrogatepass") for v in chunk[k]]
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


def iter_table_chunks(path: str | os.PathLike, rows: int = 16_384) -> Iterator[dict[str, list[Any]]]:
    """A :func:`write_table` file (parquet or CSV) as consecutive chunks of column lists."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: metadata table not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=rows):
            yield {k: list(v) for k, v in batch.to_pydict().items()}
        return
    csv.field_size_limit(1 << 24)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        names = next(reader, None)
        if names is None:
            raise DataError(f"{path}: empty metadata table (no header)")
        cols: dict[str, list[Any]] = {k: [] for k in names}
        for lineno, row in enumerate(reader, start=2):
            if len(row) != len(names):
                raise DataError(f"{path}:{lineno}: expected {len(names)} fields, got {len(row)}")
            for k, v in zip(names, row):
                cols[k].append(int(v) if k in INT_COLUMNS else v)
            if len(cols[names[0]]) >= rows:
                yield cols
                cols = {k: [] for k in names}
        if cols[names[0]]:
            yield cols


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
