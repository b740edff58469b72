"""The files of an embed or index folder: metadata tables (parquet or CSV), JSON and ``.npy``.

Why here, in ``data/``: ``clipforge embed`` writes these files and both search (indexes,
servers) and training (teacher features, :mod:`clipforge.data.objective_items`) read them back,
so they sit below both. The metadata table has one reader/writer pair so parquet vs CSV is
decided in exactly one place (parquet when pyarrow is installed, CSV otherwise), and every write
goes through :mod:`clipforge.atomic`: a crash leaves the old file or the new one, never half.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.atomic import atomic_write
from clipforge.errors import DataError

#: Columns stored as integers; everything else in a metadata table is text.
INT_COLUMNS = frozenset({"id", "width", "height", "tar_offset", "tar_size", "row", "source_index"})


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_write(path, "wb") as f:
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


def clean_cell(value: Any) -> str:
    """A text cell as stored: NUL bytes cannot round-trip through CSV and mean nothing in a caption."""
    return "" if value is None else str(value).replace("\x00", "")


def row_count(columns: dict[str, Sequence[Any]]) -> int:
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
    row_count(columns)  # validates
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = {
            k: [int(v) for v in col] if k in INT_COLUMNS else [clean_cell(v) for v in col]
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
        writer.writerow([int(v) if k in INT_COLUMNS else clean_cell(v) for k, v in zip(names, row)])
    atomic_write_bytes(path, buf.getvalue().encode("utf-8", errors="surrogatepass"))
    return path


def read_table(path: str | os.PathLike) -> dict[str, list[Any]]:
    """Read a table written by :func:`write_table` into column lists (ints restored)."""
    path = _existing_table(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return {k: list(v) for k, v in pq.read_table(path).to_pydict().items()}
    return next(_csv_chunks(path, sys.maxsize))


def iter_table_chunks(path: str | os.PathLike, rows: int = 16_384) -> Iterator[dict[str, list[Any]]]:
    """A :func:`write_table` file (parquet or CSV) as consecutive chunks of column lists."""
    path = _existing_table(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=rows):
            yield {k: list(v) for k, v in batch.to_pydict().items()}
        return
    for chunk in _csv_chunks(path, rows):
        if any(chunk.values()):
            yield chunk


def _existing_table(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: metadata table not found")
    return path


def _csv_chunks(path: Path, rows: int) -> Iterator[dict[str, list[Any]]]:
    """The CSV's columns in chunks of ``rows``; the last chunk comes even when empty, so a
    header-only table reads as empty columns. Ints are restored, field counts checked per line."""
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
            if names and len(cols[names[0]]) >= rows:
                yield cols
                cols = {k: [] for k in names}
        yield cols


def find_table(directory: Path, stem: str) -> Path:
    """The ``stem.parquet`` or ``stem.csv`` in ``directory`` (whichever exists)."""
    for suffix in (".parquet", ".csv"):
        p = directory / f"{stem}{suffix}"
        if p.is_file():
            return p
    raise DataError(f"{directory}: no {stem}.parquet or {stem}.csv found")
